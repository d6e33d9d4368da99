/* terraseg train CONFIG.yaml [--set KEY=VALUE]... [--resume CKPT] [--print-config] [--print-schema]
 * (train/trainer.h). The lead wires it into tools/terraseg.c's command table. */
#ifndef TS_CMD_TRAIN_H
#define TS_CMD_TRAIN_H

#include "tools/cli.h"

extern cli_option train_options[];
int run_train(int argc, char **argv);

#endif
