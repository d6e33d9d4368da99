/* Subcommands that live outside terraseg.c; each has its option table. */
#ifndef TS_COMMANDS_H
#define TS_COMMANDS_H

#include "tools/cli.h"

extern cli_option info_options[];
int run_info(int argc, char **argv);
extern cli_option convert_options[];
int run_convert(int argc, char **argv);

#endif
