/* Class ids, names and colours as a class map raster carries them.
 *
 * A terraseg class raster (what `terraseg predict` writes) is one Byte band
 * of class ids 0..K-1 with nodata 255, a colour table (entry i = class i's
 * colour; 256 entries, the unused ones black/transparent) and GDAL category
 * names (entry i = class i's name). polygonize and eval read both back from
 * the band; a raster without them gets "class <id>" and the default palette.
 *
 * Default palette: class 0 (background) dark grey, then 20 well-separated
 * colours (the "tab20"-like set QGIS and matplotlib users know), then a
 * deterministic hash colour for ids beyond. */
#ifndef TS_IO_CLASSES_H
#define TS_IO_CLASSES_H

#include <gdal.h>
#include <stdint.h>

#include "kernels/status.h"
#include "weights/card.h"

typedef struct ts_class_table {
    int n;            /* entries, for ids 0..n-1 */
    char **names;     /* [n] each malloc'ed, never NULL after from_card/read_band */
    uint8_t (*rgb)[3];/* [n] */
} ts_class_table;

void ts_class_table_free(ts_class_table *t);
void ts_default_class_color(int id, uint8_t rgb[3]);
/* K classes named from the card (a class the card lacks: "class <id>"),
 * coloured from the card's colours or the default palette. */
ts_status ts_class_table_from_card(const ts_model_card *c, int k, ts_class_table *t);
/* Sets category names and a 256-entry colour table on band b (n <= 255). */
ts_status ts_class_table_write_band(GDALRasterBandH b, const ts_class_table *t);
/* Reads names and colours of ids 0..max_id from band b (max_id >= 0: the
 * largest id the caller needs; the table then has max_id + 1 entries). */
ts_status ts_class_table_read_band(GDALRasterBandH b, int max_id, ts_class_table *t);

#endif
