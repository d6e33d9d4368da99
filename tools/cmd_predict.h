/* terraseg predict MODEL SCENE OUT.tif: whole-scene sliding-window
 * inference into a georeferenced class map (io/predict.h). */
#ifndef TS_CMD_PREDICT_H
#define TS_CMD_PREDICT_H

#include "tools/cli.h"

extern cli_option predict_options[];
int run_predict(int argc, char **argv);

#endif
