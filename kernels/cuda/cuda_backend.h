/* The CUDA side of the runtime, compiled only when TERRASEG_CUDA is on. */
#ifndef TS_CUDA_BACKEND_H
#define TS_CUDA_BACKEND_H

#include <stddef.h>

#include "../backend.h"

/* "CUDA runtime X, driver Y, cuDNN Z, cuBLAS W, N device(s): <name>"; reports
 * each library's own version so a mismatch is visible. */
void ts_cuda_describe(char *buf, size_t size);

/* The CUDA backend table, or an error saying why it cannot be used. */
ts_status ts_cuda_backend(const ts_backend **out);

#endif
