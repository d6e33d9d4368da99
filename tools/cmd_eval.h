/* terraseg eval PRED TRUTH: a prediction's scores against a reference raster
 * or vector layer over the whole scene (io/evaluate.h). The lead wires it
 * into tools/terraseg.c's command table. */
#ifndef TS_CMD_EVAL_H
#define TS_CMD_EVAL_H

#include "tools/cli.h"

extern cli_option eval_options[];
int run_eval(int argc, char **argv);

#endif
