/* terraseg demo [--out DIR]: the whole pipeline on a built-in synthetic
 * scene (generate, split, train, predict, polygonize, held-out eval). */
#ifndef TS_CMD_DEMO_H
#define TS_CMD_DEMO_H

#include "tools/cli.h"

extern cli_option demo_options[];
int run_demo(int argc, char **argv);

#endif
