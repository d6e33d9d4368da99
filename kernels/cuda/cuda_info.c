/* Version and device reporting for `terraseg version`. Plain C against the
 * CUDA runtime, cuBLAS and cuDNN C APIs: nothing here launches a kernel, so it
 * also answers on a machine without a GPU (as "no device"). */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <stdio.h>

#include "cuda_backend.h"

void ts_cuda_describe(char *buf, size_t size)
{
    int runtime = 0, driver = 0, devices = 0;
    cudaError_t rt_err = cudaRuntimeGetVersion(&runtime);
    cudaError_t drv_err = cudaDriverGetVersion(&driver);
    cudaError_t dev_err = cudaGetDeviceCount(&devices);
    size_t cudnn = cudnnGetVersion();
    int cublas = 0;
    cublasStatus_t cb_err = cublasGetProperty(MAJOR_VERSION, &cublas);
    int cublas_minor = 0;
    if (cb_err == CUBLAS_STATUS_SUCCESS) cb_err = cublasGetProperty(MINOR_VERSION, &cublas_minor);

    char devs[400];
    if (dev_err != cudaSuccess || devices == 0) {
        snprintf(devs, sizeof devs, "no device (%s)", dev_err != cudaSuccess ? cudaGetErrorString(dev_err) : "none found");
    } else {
        struct cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
            snprintf(devs, sizeof devs, "%d device(s), 0: %.200s (sm_%d%d, %.1f GiB)", devices, prop.name, prop.major,
                     prop.minor, (double)prop.totalGlobalMem / (1 << 30));
        else
            snprintf(devs, sizeof devs, "%d device(s)", devices);
    }
    char rt[32] = "unknown", drv[32] = "none";
    if (rt_err == cudaSuccess) snprintf(rt, sizeof rt, "%d.%d", runtime / 1000, runtime % 1000 / 10);
    if (drv_err == cudaSuccess && driver > 0) snprintf(drv, sizeof drv, "%d.%d", driver / 1000, driver % 1000 / 10);
    char cb[32] = "unknown";
    if (cb_err == CUBLAS_STATUS_SUCCESS) snprintf(cb, sizeof cb, "%d.%d", cublas, cublas_minor);
    snprintf(buf, size, "CUDA runtime %s, driver %s; cuDNN %zu.%zu.%zu; cuBLAS %s; %s", rt, drv, cudnn / 10000,
             cudnn % 10000 / 100, cudnn % 100, cb, devs);
}
