/* terraseg windows and terraseg split: window CSVs and spatial splits
 * (io/windows.h). The lead wires these into tools/terraseg.c's command table. */
#ifndef TS_CMD_WINDOWS_H
#define TS_CMD_WINDOWS_H

#include "tools/cli.h"

extern cli_option windows_options[];
int run_windows(int argc, char **argv);
extern cli_option split_options[];
int run_split(int argc, char **argv);

#endif
