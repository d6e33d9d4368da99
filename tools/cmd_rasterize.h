/* terraseg rasterize LABELS --like IMAGE OUT.tif: labels (vector, or a raster
 * mask in any CRS/resolution) written as a class-id GeoTIFF on the image grid. */
#ifndef TS_CMD_RASTERIZE_H
#define TS_CMD_RASTERIZE_H

#include "tools/cli.h"

extern cli_option rasterize_options[];
int run_rasterize(int argc, char **argv);

#endif
