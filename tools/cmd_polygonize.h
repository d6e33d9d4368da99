/* terraseg polygonize CLASSES.tif OUT.gpkg: a class raster (what terraseg
 * predict writes) as polygons with class id, name, area, pixel count and
 * optionally mean confidence, in GPKG (styled for QGIS), GeoJSON, Shapefile
 * or FlatGeobuf. The lead wires it into tools/terraseg.c's command table. */
#ifndef TS_CMD_POLYGONIZE_H
#define TS_CMD_POLYGONIZE_H

#include "tools/cli.h"

extern cli_option polygonize_options[];
int run_polygonize(int argc, char **argv);

#endif
