/* terraseg qc IMAGE --labels LABELS --classes K: label histograms per split,
 * class weights and geometry checks before training (io/qc.h). The lead
 * wires it into tools/terraseg.c's command table. */
#ifndef TS_CMD_QC_H
#define TS_CMD_QC_H

#include "tools/cli.h"

extern cli_option qc_options[];
int run_qc(int argc, char **argv);

#endif
