/* Writing a GDAL/OGR output so that nothing already there is lost and an
 * interrupted run never leaves a half-written file under the final name.
 *
 * ts_gdal_out_begin() refuses an existing PATH unless overwrite is set and
 * gives a temporary name beside it that keeps the extension, so drivers that
 * look at it still work and multi-file formats keep their sidecars together:
 * "scene.tif" -> "scene.tmp-<pid>.tif" (GDAL may add "....tif.aux.xml"),
 * "out.shp" -> "out.tmp-<pid>.shp" (+ .shx .dbf .prj .cpg). Write the dataset
 * at o->tmp, close it, then ts_gdal_out_commit() renames the temporary and
 * every sidecar it has onto the final names (removing a stale sidecar of the
 * old output, e.g. an old .aux.xml, when overwriting). ts_gdal_out_abort()
 * deletes the temporary and its sidecars. */
#ifndef TS_IO_GDAL_OUT_H
#define TS_IO_GDAL_OUT_H

#include "kernels/status.h"

typedef struct ts_gdal_out {
    char *path; /* the final name */
    char *tmp;  /* where to write */
} ts_gdal_out;

/* Errors: path exists and !overwrite ("... exists; use --overwrite"), path
 * is a folder, its folder does not exist. `what` names the output in
 * messages ("prediction", "polygons"). */
ts_status ts_gdal_out_begin(ts_gdal_out *o, const char *path, int overwrite, const char *what);
/* Renames o->tmp and its sidecars onto o->path; frees o. On failure removes
 * the temporary files and leaves an existing output untouched. */
ts_status ts_gdal_out_commit(ts_gdal_out *o);
/* Removes o->tmp and its sidecars; frees o (NULL members are fine). */
void ts_gdal_out_abort(ts_gdal_out *o);

/* The OGR vector driver for an output name, chosen by extension: GPKG
 * (.gpkg), GeoJSON (.geojson, .json), ESRI Shapefile (.shp), FlatGeobuf
 * (.fgb); NULL with the error set, naming the extensions accepted. */
const char *ts_vector_driver_for(const char *path);

#endif
