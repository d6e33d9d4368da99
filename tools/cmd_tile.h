/* terraseg tile IMAGE --windows windows.csv --out DIR: each window as an
 * image GeoTIFF (source data type and values, like gdal_translate -srcwin)
 * and, with --labels, its label mask. The lead wires it into
 * tools/terraseg.c's command table. */
#ifndef TS_CMD_TILE_H
#define TS_CMD_TILE_H

#include "tools/cli.h"

extern cli_option tile_options[];
int run_tile(int argc, char **argv);

#endif
