/* The trainer (train/trainer.h). */
#include "train/trainer.h"

#include <cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "io/tile.h"
#include "kernels/outfile.h"
#include "kernels/threads.h"
#include "train/metrics.h"
#include "weights/pth.h"
#include "weights/safetensors.h"
#include "weights/smp.h"

/* ---- stop requests ------------------------------------------------------------ */
static volatile sig_atomic_t g_stop_sig = 0;

void ts_train_request_stop(int sig) { g_stop_sig = sig ? sig : SIGINT; }

static void on_signal(int sig) { ts_train_request_stop(sig); }

void ts_train_run_opts_init(ts_train_run_opts *o)
{
    memset(o, 0, sizeof *o);
    o->progress = -1;
}

/* ---- small helpers --------------------------------------------------------------- */
static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static ts_status mkdir_p(const char *path)
{
    char *p = strdup(path);
    if (!p) return ts_error(TS_ERR_NOMEM, "train: out of memory");
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0777) && errno != EEXIST) {
            ts_status st = ts_error(TS_ERR_IO, "train: cannot create folder %s: %s", p, strerror(errno));
            free(p);
            return st;
        }
        *s = '/';
    }
    ts_status st = TS_OK;
    if (mkdir(p, 0777) && errno != EEXIST) st = ts_error(TS_ERR_IO, "train: cannot create output folder %s: %s", p, strerror(errno));
    free(p);
    return st;
}

/* A growable text buffer. */
typedef struct sbuf {
    char *s;
    size_t n, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        size_t room = b->cap - b->n;
        int k = vsnprintf(b->s ? b->s + b->n : NULL, b->s ? room : 0, fmt, ap);
        va_end(ap);
        if (k < 0) {
            b->oom = 1;
            return;
        }
        if (b->s && (size_t)k < room) {
            b->n += (size_t)k;
            return;
        }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->n + (size_t)k + 1) cap *= 2;
        char *s = realloc(b->s, cap);
        if (!s) {
            b->oom = 1;
            return;
        }
        b->s = s;
        b->cap = cap;
    }
}

/* ---- per-epoch history --------------------------------------------------------------- */
typedef struct hist_row {
    int epoch; /* 1-based */
    int64_t step;
    double lr, train_loss, val_loss, miou, oa;
    double *iou; /* [K], NaN = absent / not validated */
} hist_row;

typedef struct history {
    hist_row *rows;
    int n, cap, classes;
} history;

static void history_free(history *h)
{
    for (int i = 0; i < h->n; i++) free(h->rows[i].iou);
    free(h->rows);
    memset(h, 0, sizeof *h);
}

static ts_status history_push(history *h, const hist_row *r)
{
    if (h->n == h->cap) {
        int cap = h->cap ? h->cap * 2 : 16;
        hist_row *rows = realloc(h->rows, (size_t)cap * sizeof *rows);
        if (!rows) return ts_error(TS_ERR_NOMEM, "train: out of memory");
        h->rows = rows;
        h->cap = cap;
    }
    hist_row c = *r;
    c.iou = malloc((size_t)h->classes * sizeof *c.iou);
    if (!c.iou) return ts_error(TS_ERR_NOMEM, "train: out of memory");
    for (int k = 0; k < h->classes; k++) c.iou[k] = r->iou ? r->iou[k] : NAN;
    h->rows[h->n++] = c;
    return TS_OK;
}

static cJSON *num_or_null(double v) { return isfinite(v) ? cJSON_CreateNumber(v) : cJSON_CreateNull(); }

static cJSON *history_json(const history *h, const ts_train_config *c)
{
    cJSON *arr = cJSON_CreateArray();
    if (!arr) return NULL;
    for (int i = 0; i < h->n; i++) {
        const hist_row *r = &h->rows[i];
        cJSON *o = cJSON_CreateObject();
        if (!o) break;
        cJSON_AddItemToArray(arr, o);
        cJSON_AddNumberToObject(o, "epoch", r->epoch);
        cJSON_AddNumberToObject(o, "step", (double)r->step);
        cJSON_AddItemToObject(o, "lr", num_or_null(r->lr));
        cJSON_AddItemToObject(o, "train_loss", num_or_null(r->train_loss));
        cJSON_AddItemToObject(o, "val_loss", num_or_null(r->val_loss));
        cJSON_AddItemToObject(o, "miou", num_or_null(r->miou));
        cJSON_AddItemToObject(o, "oa", num_or_null(r->oa));
        cJSON *iou = cJSON_CreateObject();
        cJSON_AddItemToObject(o, "iou", iou);
        for (int k = 0; k < h->classes && iou; k++)
            cJSON_AddItemToObject(iou, c->classes.v[k].name, num_or_null(r->iou[k]));
    }
    return arr;
}

static double json_num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

static ts_status history_parse(history *h, const char *text, const ts_train_config *c)
{
    cJSON *arr = cJSON_Parse(text);
    if (!cJSON_IsArray(arr)) {
        cJSON_Delete(arr);
        return ts_error(TS_ERR_INVALID_ARG, "train: checkpoint metadata terraseg.history is not a JSON array");
    }
    ts_status st = TS_OK;
    double *iou = malloc((size_t)h->classes * sizeof *iou + 1);
    if (!iou) st = ts_error(TS_ERR_NOMEM, "train: out of memory");
    const cJSON *o;
    cJSON_ArrayForEach(o, arr)
    {
        if (st) break;
        hist_row r = {.epoch = (int)json_num(o, "epoch"),
                      .step = (int64_t)json_num(o, "step"),
                      .lr = json_num(o, "lr"),
                      .train_loss = json_num(o, "train_loss"),
                      .val_loss = json_num(o, "val_loss"),
                      .miou = json_num(o, "miou"),
                      .oa = json_num(o, "oa"),
                      .iou = iou};
        const cJSON *io = cJSON_GetObjectItemCaseSensitive(o, "iou");
        for (int k = 0; k < h->classes; k++) iou[k] = io ? json_num(io, c->classes.v[k].name) : NAN;
        st = history_push(h, &r);
    }
    free(iou);
    cJSON_Delete(arr);
    return st;
}

static void csv_num(sbuf *b, double v)
{
    if (isfinite(v)) sb_printf(b, ",%.9g", v);
    else sb_printf(b, ",");
}

static ts_status write_metrics_files(const char *outdir, const history *h, const ts_train_config *c)
{
    sbuf b = {0};
    sb_printf(&b, "epoch,step,lr,train_loss,val_loss,miou,oa");
    for (int k = 0; k < h->classes; k++) sb_printf(&b, ",iou_%s", c->classes.v[k].name);
    sb_printf(&b, "\n");
    for (int i = 0; i < h->n; i++) {
        const hist_row *r = &h->rows[i];
        sb_printf(&b, "%d,%" PRId64, r->epoch, r->step);
        csv_num(&b, r->lr);
        csv_num(&b, r->train_loss);
        csv_num(&b, r->val_loss);
        csv_num(&b, r->miou);
        csv_num(&b, r->oa);
        for (int k = 0; k < h->classes; k++) csv_num(&b, r->iou[k]);
        sb_printf(&b, "\n");
    }
    if (b.oom) {
        free(b.s);
        return ts_error(TS_ERR_NOMEM, "train: out of memory");
    }
    char *p = path_join(outdir, "metrics.csv");
    ts_status st = p ? ts_write_file_atomic(p, b.s, b.n) : ts_error(TS_ERR_NOMEM, "train: out of memory");
    free(p);
    free(b.s);
    if (st) return st;

    cJSON *arr = history_json(h, c);
    char *js = arr ? cJSON_Print(arr) : NULL;
    cJSON_Delete(arr);
    if (!js) return ts_error(TS_ERR_NOMEM, "train: out of memory");
    p = path_join(outdir, "metrics.json");
    st = p ? ts_write_file_atomic(p, js, strlen(js)) : ts_error(TS_ERR_NOMEM, "train: out of memory");
    free(p);
    free(js);
    if (st) return st;

    /* curves.svg: losses on the left axis, mIoU on the right (0..1) */
    const double W = 720, H = 400, L = 60, R = 60, T = 30, B = 50;
    double lmax = 0;
    for (int i = 0; i < h->n; i++) {
        if (isfinite(h->rows[i].train_loss) && h->rows[i].train_loss > lmax) lmax = h->rows[i].train_loss;
        if (isfinite(h->rows[i].val_loss) && h->rows[i].val_loss > lmax) lmax = h->rows[i].val_loss;
    }
    if (lmax <= 0) lmax = 1;
    int emax = h->n ? h->rows[h->n - 1].epoch : 1;
    if (emax < 2) emax = 2;
    sbuf s = {0};
    sb_printf(&s,
              "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" viewBox=\"0 0 %g %g\" "
              "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
              W, H, W, H);
    sb_printf(&s, "<text x=\"%g\" y=\"18\" text-anchor=\"middle\">terraseg training curves</text>\n", W / 2);
    sb_printf(&s,
              "<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" stroke=\"#888\"/>\n"
              "<text x=\"%g\" y=\"%g\" text-anchor=\"middle\">epoch</text>\n"
              "<text x=\"14\" y=\"%g\" transform=\"rotate(-90 14 %g)\" text-anchor=\"middle\">loss (0..%.3g)</text>\n"
              "<text x=\"%g\" y=\"%g\" transform=\"rotate(90 %g %g)\" text-anchor=\"middle\">val mIoU (0..1)</text>\n",
              L, T, W - L - R, H - T - B, W / 2, H - 12, H / 2, H / 2, lmax, W - 14, H / 2, W - 14, H / 2);
    for (int e = 1; e <= emax; e += (emax + 9) / 10)
        sb_printf(&s, "<text x=\"%.1f\" y=\"%g\" text-anchor=\"middle\">%d</text>\n",
                  L + (W - L - R) * (e - 1) / (double)(emax - 1), H - B + 16, e);
    const char *colors[3] = {"#1f77b4", "#ff7f0e", "#2ca02c"};
    const char *names[3] = {"train loss", "val loss", "val mIoU"};
    for (int series = 0; series < 3; series++) {
        sb_printf(&s, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\" points=\"", colors[series]);
        for (int i = 0; i < h->n; i++) {
            const hist_row *r = &h->rows[i];
            double v = series == 0 ? r->train_loss : series == 1 ? r->val_loss : r->miou;
            if (!isfinite(v)) continue;
            double y = series == 2 ? v : v / lmax;
            sb_printf(&s, "%.1f,%.1f ", L + (W - L - R) * (r->epoch - 1) / (double)(emax - 1),
                      T + (H - T - B) * (1 - y));
        }
        sb_printf(&s, "\"/>\n<text x=\"%g\" y=\"%d\" fill=\"%s\">%s</text>\n", L + 10 + 110 * series, (int)T + 16,
                  colors[series], names[series]);
    }
    sb_printf(&s, "</svg>\n");
    if (s.oom) {
        free(s.s);
        return ts_error(TS_ERR_NOMEM, "train: out of memory");
    }
    p = path_join(outdir, "curves.svg");
    st = p ? ts_write_file_atomic(p, s.s, s.n) : ts_error(TS_ERR_NOMEM, "train: out of memory");
    free(p);
    free(s.s);
    return st;
}

/* ---- data ------------------------------------------------------------------------------ */
typedef struct sample_ref {
    int image;
    ts_window w;
} sample_ref;

typedef struct reader_slot {
    ts_raster **rasters; /* [n_images] */
    ts_labels **labels;  /* [n_images] */
} reader_slot;

typedef struct reader_set {
    struct trainer *t;
    const sample_ref *refs;
    reader_slot *slots;
    int n_slots;
} reader_set;

typedef struct trainer {
    const ts_train_config *c;
    int n_images;
    ts_raster **rasters; /* the main handles */
    ts_grid *grids;
    ts_label_opts lopts;
    ts_label_class *cmap;
    ts_label_color *colors;
    int channels;
    sample_ref *train_refs, *val_refs;
    size_t n_train, n_val;
    reader_set rs_train, rs_val;
} trainer;

static const char *label_path(const ts_train_config *c, int i)
{
    return c->labels.path.n == 1 ? c->labels.path.v[0] : c->labels.path.v[i];
}

static ts_status read_sample(void *user, int worker, size_t index, const ts_window *w, float *image, int32_t *mask,
                             uint8_t *valid)
{
    reader_set *rs = user;
    const sample_ref *ref = &rs->refs[index];
    reader_slot *slot = &rs->slots[worker < rs->n_slots ? worker : 0];
    ts_status st = ts_raster_read(slot->rasters[ref->image], w, image, valid);
    if (st) return st;
    st = ts_labels_read(slot->labels[ref->image], w, mask);
    if (st) return st;
    size_t npix = (size_t)w->width * (size_t)w->height;
    int32_t ig = rs->t->c->ignore_id;
    for (size_t i = 0; i < npix; i++)
        if (!valid[i]) mask[i] = ig;
    return TS_OK;
}

static void reader_set_free(reader_set *rs, int n_images)
{
    for (int s = 0; s < rs->n_slots; s++) {
        for (int i = 0; i < n_images; i++) {
            if (rs->slots[s].rasters) ts_raster_close(rs->slots[s].rasters[i]);
            if (rs->slots[s].labels && rs->slots[s].labels[i]) ts_labels_close(rs->slots[s].labels[i]);
        }
        free(rs->slots[s].rasters);
        free(rs->slots[s].labels);
    }
    free(rs->slots);
    rs->slots = NULL;
    rs->n_slots = 0;
}

static ts_status reader_set_open(trainer *t, reader_set *rs, const sample_ref *refs, int n_slots)
{
    rs->t = t;
    rs->refs = refs;
    rs->slots = calloc((size_t)n_slots, sizeof *rs->slots);
    if (!rs->slots) return ts_error(TS_ERR_NOMEM, "train: out of memory");
    rs->n_slots = n_slots;
    for (int s = 0; s < n_slots; s++) {
        reader_slot *sl = &rs->slots[s];
        sl->rasters = calloc((size_t)t->n_images, sizeof *sl->rasters);
        sl->labels = calloc((size_t)t->n_images, sizeof *sl->labels);
        if (!sl->rasters || !sl->labels) return ts_error(TS_ERR_NOMEM, "train: out of memory");
        for (int i = 0; i < t->n_images; i++) {
            ts_status st = ts_raster_clone(t->rasters[i], &sl->rasters[i]);
            if (!st) st = ts_labels_open(label_path(t->c, i), &t->grids[i], &t->lopts, &sl->labels[i]);
            if (st) return st;
        }
    }
    return TS_OK;
}

static void trainer_free(trainer *t)
{
    reader_set_free(&t->rs_train, t->n_images);
    reader_set_free(&t->rs_val, t->n_images);
    for (int i = 0; i < t->n_images; i++) {
        if (t->rasters) ts_raster_close(t->rasters[i]);
        if (t->grids) ts_grid_free(&t->grids[i]);
    }
    free(t->rasters);
    free(t->grids);
    free(t->cmap);
    free(t->colors);
    free(t->train_refs);
    free(t->val_refs);
}

static ts_status push_ref(sample_ref **arr, size_t *n, size_t *cap, int image, ts_window w)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 256;
        sample_ref *a = realloc(*arr, nc * sizeof *a);
        if (!a) return ts_error(TS_ERR_NOMEM, "train: out of memory");
        *arr = a;
        *cap = nc;
    }
    (*arr)[(*n)++] = (sample_ref){image, w};
    return TS_OK;
}

static ts_status open_data(trainer *t, FILE *log, int verbose)
{
    const ts_train_config *c = t->c;
    t->n_images = c->data.images.n;
    if (t->n_images < 1) return ts_error(TS_ERR_INVALID_ARG, "train: data.images is empty");
    t->rasters = calloc((size_t)t->n_images, sizeof *t->rasters);
    t->grids = calloc((size_t)t->n_images, sizeof *t->grids);
    if (!t->rasters || !t->grids) return ts_error(TS_ERR_NOMEM, "train: out of memory");
    ts_status st = ts_train_config_label_opts(c, &t->lopts, &t->cmap, &t->colors);
    if (st) return st;
    ts_raster_opts ro;
    ts_band_norm *norm = NULL;
    ts_index_spec *indices = NULL;
    st = ts_train_config_raster_opts(c, &ro, &norm, &indices);
    if (st) return st;
    size_t cap_tr = 0, cap_va = 0;
    ts_window_list wl;
    ts_window_list_init(&wl);
    for (int i = 0; i < t->n_images && !st; i++) {
        const char *img = c->data.images.v[i];
        st = ts_raster_open(img, &ro, &t->rasters[i]);
        if (st) break;
        st = ts_raster_grid(t->rasters[i], &t->grids[i]);
        if (st) break;
        int ch = ts_raster_channels(t->rasters[i]);
        if (i == 0) t->channels = ch;
        else if (ch != t->channels) {
            st = ts_error(TS_ERR_INVALID_ARG, "train: %s has %d channels but %s has %d; every image must give the same channels",
                          img, ch, c->data.images.v[0], t->channels);
            break;
        }
        /* open the labels once here: this checks every vector feature's class before training */
        ts_labels *lab = NULL;
        st = ts_labels_open(label_path(c, i), &t->grids[i], &t->lopts, &lab);
        ts_labels_close(lab);
        if (st) break;
        /* windows */
        ts_window_list_clear(&wl);
        int64_t W = t->grids[i].width, H = t->grids[i].height;
        int tile = c->windows.tile, stride = c->windows.tile - c->windows.overlap;
        if (c->windows.csv.n) st = ts_windows_read_csv(&wl, c->windows.csv.v[i], NULL, W, H, tile, tile);
        else st = ts_windows_grid(&wl, W, H, tile, tile, stride, stride, c->windows.allow_small);
        if (st) break;
        size_t before = wl.count;
        if (c->windows.drop_background || c->windows.max_nodata < 1) {
            ts_mask_reader_opts mo = {.image = img,
                                      .bands = ro.bands,
                                      .nbands = ro.nbands,
                                      .has_nodata = ro.has_nodata,
                                      .nodata = ro.nodata,
                                      .read_valid = 1,
                                      .labels = label_path(c, i),
                                      .label_opts = &t->lopts};
            ts_mask_filter_params mp = {.drop_background = c->windows.drop_background,
                                        .background = c->labels.background_id,
                                        .ignore_index = c->ignore_id,
                                        .max_nodata_fraction = c->windows.max_nodata};
            ts_mask_filter_report rep;
            st = ts_windows_filter_masks(&wl, &mo, &mp, ts_threads_count(), &rep);
            if (st) break;
            if (verbose)
                fprintf(log, "%s: %zu windows, %zu dropped for nodata, %zu dropped as background\n", img, before,
                        rep.dropped_nodata, rep.dropped_background);
        }
        if (wl.count == 0) {
            st = ts_error(TS_ERR_INVALID_ARG, "train: %s: no window left (%zu before the filters windows.drop_background / "
                          "windows.max_nodata)", img, before);
            break;
        }
        /* split */
        if (c->split.method == TS_SPLIT_FROM_CSV) {
            if (!wl.has_split) {
                st = ts_error(TS_ERR_INVALID_ARG, "train: split.method is csv but %s has no split column",
                              c->windows.csv.v[i]);
                break;
            }
        } else {
            ts_split_params sp;
            ts_train_config_split(c, &sp);
            ts_split_report srep;
            st = ts_split_assign(&wl, W, H, &sp, &srep);
            if (st) break;
        }
        for (size_t k = 0; k < wl.count && !st; k++) {
            if (wl.split[k] == TS_SPLIT_TRAIN) st = push_ref(&t->train_refs, &t->n_train, &cap_tr, i, wl.w[k]);
            else if (wl.split[k] == TS_SPLIT_VAL) st = push_ref(&t->val_refs, &t->n_val, &cap_va, i, wl.w[k]);
        }
    }
    ts_window_list_free(&wl);
    free(norm);
    free(indices);
    if (st) return st;
    if (t->n_train == 0)
        return ts_error(TS_ERR_INVALID_ARG,
                        "train: the training split is empty (%zu validation windows): check split.ratios, split.block "
                        "(smaller blocks give the split more to work with) or the split column of windows.csv",
                        t->n_val);
    return TS_OK;
}

/* ---- model ---------------------------------------------------------------------------------- */
static ts_status read_weight_dict(const char *path, ts_dict *d)
{
    ts_model_format f;
    ts_status st = ts_model_detect(path, &f);
    if (st) return st;
    if (f == TS_FORMAT_SAFETENSORS) return ts_safetensors_read(path, d);
    if (f == TS_FORMAT_PTH) return ts_pth_read(path, d);
    return ts_error(TS_ERR_UNSUPPORTED, "train: %s: expected a .safetensors or .pth file (%s)", path,
                    ts_model_format_name(f));
}

static ts_status init_model(trainer *t, ts_unet *m)
{
    const ts_train_config *c = t->c;
    ts_unet_config uc;
    ts_status st = ts_train_config_unet(c, t->channels, &uc);
    if (st) return st;
    st = ts_unet_init(m, &uc);
    if (!st) st = ts_unet_init_random(m, (uint64_t)c->seed);
    if (st) return st;
    if (c->model.init == TS_INIT_IMAGENET) {
        ts_dict d;
        ts_dict_init(&d);
        st = read_weight_dict(c->model.weights, &d);
        if (!st) st = ts_unet_load_imagenet_encoder(m, &d, c->model.weights);
        ts_dict_free(&d);
    } else if (c->model.init == TS_INIT_MODEL) {
        ts_unet src;
        memset(&src, 0, sizeof src);
        ts_load_opts lo = {.allow_new_head = c->model.allow_new_head};
        st = ts_model_load(c->model.weights, &src, &lo);
        if (st) return st;
        if (src.cfg.in_channels != uc.in_channels) {
            st = ts_error(TS_ERR_INVALID_ARG,
                          "train: model.weights %s takes %d input channels but the data gives %d (data.bands / "
                          "data.indices of %s); choose bands that match the model, or train from scratch / imagenet",
                          c->model.weights, src.cfg.in_channels, uc.in_channels, c->data.images.v[0]);
        } else if (src.cfg.encoder_depth != uc.encoder_depth) {
            st = ts_error(TS_ERR_INVALID_ARG, "train: model.weights %s has encoder_depth %d but model.encoder_depth is %d",
                          c->model.weights, src.cfg.encoder_depth, uc.encoder_depth);
        } else {
            ts_dict d;
            ts_dict_init(&d);
            st = ts_unet_to_dict(&src, &d);
            if (!st) st = ts_unet_load_dict(m, &d, &lo, c->model.weights);
            ts_dict_free(&d);
        }
        ts_unet_free(&src);
    }
    return st;
}

static ts_status make_card(trainer *t, ts_unet *m)
{
    ts_model_card card;
    ts_status st = ts_train_config_card(t->c, &card);
    if (st) return st;
    card.bands = calloc((size_t)t->channels, sizeof *card.bands);
    if (!card.bands) st = ts_error(TS_ERR_NOMEM, "train: out of memory");
    for (int ch = 0; ch < t->channels && !st; ch++) {
        ts_card_band *b = &card.bands[ch];
        card.n_bands = ch + 1;
        b->index = ts_raster_channel_band(t->rasters[0], ch);
        const char *name = ts_raster_channel_name(t->rasters[0], ch);
        b->name = name ? strdup(name) : NULL;
        b->offset = 0;
        b->scale = 1;
        ts_band_norm n;
        st = ts_raster_norm(t->rasters[0], ch, &n);
        if (st) break;
        switch (n.kind) {
        case TS_NORM_SCALE:
            if (n.scale != 0) {
                b->offset = -n.offset / n.scale;
                b->scale = 1 / n.scale;
            }
            break;
        case TS_NORM_MEANSTD:
        case TS_NORM_MEANSTD_STATS:
            b->offset = n.mean;
            b->scale = n.std > 0 ? n.std : 1;
            break;
        case TS_NORM_MINMAX:
        case TS_NORM_MINMAX_STATS:
        case TS_NORM_PERCENTILE_STATS:
            b->offset = n.min;
            b->scale = n.max > n.min ? n.max - n.min : 1;
            b->has_clip = n.max > n.min;
            b->clip_lo = n.min;
            b->clip_hi = n.max;
            break;
        default: break;
        }
    }
    if (!st) st = ts_unet_set_card(m, &card);
    ts_card_free(&card);
    return st;
}

/* ---- checkpoints -------------------------------------------------------------------------------- */
typedef struct run_state {
    int epoch;          /* 0-based epoch in progress / to start */
    int64_t next_batch; /* first batch of `epoch` not trained */
    int64_t global_step;
    double best_miou;
    int best_epoch; /* 1-based; 0 none */
    int bad_epochs;
    double loss_sum;
    int64_t loss_count;
    history hist;
} run_state;

static ts_status meta_set_f(ts_dict *d, const char *key, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static ts_status meta_set_f(ts_dict *d, const char *key, const char *fmt, ...)
{
    char buf[64];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return ts_dict_set_meta(d, key, buf);
}

/* The model-only dictionary (weights, card, config) plus run metadata. */
static ts_status model_dict(const ts_unet *m, ts_dict *d)
{
    ts_status st = ts_unet_to_dict(m, d);
    if (!st) st = ts_unet_set_model_card(m, d);
    return st;
}

static ts_status save_checkpoint(const char *path, const ts_unet *m, const ts_optim *o, const ts_sched *s,
                                 const run_state *rs, const char *yaml, const ts_train_config *c)
{
    ts_dict d;
    ts_dict_init(&d);
    ts_status st = model_dict(m, &d);
    if (!st) st = ts_optim_save(o, m, &d);
    if (!st) st = ts_sched_save(s, &d);
    if (!st) st = ts_dict_set_meta(&d, "terraseg.checkpoint", "1");
    if (!st) st = ts_dict_set_meta(&d, "terraseg.train_config", yaml);
    if (!st) st = meta_set_f(&d, "terraseg.epoch", "%d", rs->epoch);
    if (!st) st = meta_set_f(&d, "terraseg.next_batch", "%" PRId64, rs->next_batch);
    if (!st) st = meta_set_f(&d, "terraseg.global_step", "%" PRId64, rs->global_step);
    if (!st) st = meta_set_f(&d, "terraseg.best_miou", "%.17g", rs->best_miou);
    if (!st) st = meta_set_f(&d, "terraseg.best_epoch", "%d", rs->best_epoch);
    if (!st) st = meta_set_f(&d, "terraseg.bad_epochs", "%d", rs->bad_epochs);
    if (!st) st = meta_set_f(&d, "terraseg.seed", "%" PRId64, c->seed);
    if (!st) st = meta_set_f(&d, "terraseg.train_loss_sum", "%.17g", rs->loss_sum);
    if (!st) st = meta_set_f(&d, "terraseg.train_loss_count", "%" PRId64, rs->loss_count);
    if (!st) {
        cJSON *h = history_json(&rs->hist, c);
        char *js = h ? cJSON_PrintUnformatted(h) : NULL;
        cJSON_Delete(h);
        st = js ? ts_dict_set_meta(&d, "terraseg.history", js) : ts_error(TS_ERR_NOMEM, "train: out of memory");
        free(js);
    }
    if (!st) st = ts_safetensors_write(path, &d);
    ts_dict_free(&d);
    return st;
}

static ts_status meta_get(const ts_dict *d, const char *path, const char *key, const char **out)
{
    *out = ts_dict_get_meta(d, key);
    if (!*out) return ts_error(TS_ERR_INVALID_ARG, "train: %s is not a terraseg training checkpoint (no %s metadata)", path, key);
    return TS_OK;
}

static ts_status load_checkpoint(const char *path, ts_unet *m, ts_optim *o, ts_sched *s, run_state *rs,
                                 const ts_train_config *c, FILE *log)
{
    ts_dict d, md;
    ts_dict_init(&d);
    ts_dict_init(&md);
    ts_status st = ts_safetensors_read(path, &d);
    const char *v = NULL;
    if (!st) st = meta_get(&d, path, "terraseg.checkpoint", &v);
    if (!st && strcmp(v, "1")) st = ts_error(TS_ERR_UNSUPPORTED, "train: %s: checkpoint format %s is not supported", path, v);
    /* model tensors: everything but the optimizer's and the scheduler's */
    for (size_t i = 0; i < d.count && !st; i++) {
        const ts_named_tensor *t = &d.items[i];
        if (!strncmp(t->name, "optimizer.", 10) || !strncmp(t->name, "scheduler.", 10)) continue;
        st = ts_dict_add(&md, t->name, t->dtype, t->ndim, t->shape, t->data);
    }
    if (!st) st = ts_unet_load_dict(m, &md, NULL, path);
    if (!st) st = ts_optim_load(o, m, &d);
    if (!st) st = ts_sched_load(s, &d);
    if (!st) {
        const char *yaml = ts_dict_get_meta(&d, "terraseg.train_config");
        ts_train_config old;
        if (yaml && !ts_train_config_parse_string(yaml, path, &old)) {
            if (!ts_train_config_equal(&old, c))
                fprintf(log, "warning: resuming %s with a configuration that differs from the checkpoint's; the run "
                             "continues with the new one\n", path);
            ts_train_config_free(&old);
        }
    }
    const char *keys[] = {"terraseg.epoch", "terraseg.next_batch", "terraseg.global_step", "terraseg.best_miou",
                          "terraseg.best_epoch", "terraseg.bad_epochs", "terraseg.train_loss_sum",
                          "terraseg.train_loss_count", "terraseg.history"};
    const char *vals[9];
    for (int i = 0; i < 9 && !st; i++) st = meta_get(&d, path, keys[i], &vals[i]);
    if (!st) {
        rs->epoch = atoi(vals[0]);
        rs->next_batch = strtoll(vals[1], NULL, 10);
        rs->global_step = strtoll(vals[2], NULL, 10);
        rs->best_miou = strtod(vals[3], NULL);
        rs->best_epoch = atoi(vals[4]);
        rs->bad_epochs = atoi(vals[5]);
        rs->loss_sum = strtod(vals[6], NULL);
        rs->loss_count = strtoll(vals[7], NULL, 10);
        st = history_parse(&rs->hist, vals[8], c);
    }
    ts_dict_free(&md);
    ts_dict_free(&d);
    return st;
}

static ts_status save_model_file(const char *path, const ts_unet *m, const run_state *rs, int epoch, double miou)
{
    ts_dict d;
    ts_dict_init(&d);
    ts_status st = model_dict(m, &d);
    if (!st) st = meta_set_f(&d, "terraseg.epoch", "%d", epoch);
    if (!st) st = meta_set_f(&d, "terraseg.global_step", "%" PRId64, rs->global_step);
    if (!st && isfinite(miou)) st = meta_set_f(&d, "terraseg.val_miou", "%.17g", miou);
    if (!st) st = ts_safetensors_write(path, &d);
    ts_dict_free(&d);
    return st;
}

/* ---- the training copy's staging buffers ----------------------------------------------------------- */
/* The model trains as a training copy on the run's backend
 * (ts_unet_device_init_train), whose memory may be the host's (the CPU) or
 * a device's (CUDA). The host model m is the copy files are read into and
 * written from: sync_host before every save or hook that reads it. */
typedef struct staging {
    const ts_backend_memory *mem; /* NULL: host memory, labels are read in place */
    int32_t *labels;              /* device memory: [batch, tile, tile] */
    float *dlogits;               /* the backend's memory: [batch, K, tile, tile] */
    float *logits_host;           /* device memory only: validation logits for the confusion matrix */
    size_t label_n, logit_n;      /* capacities in elements */
} staging;

static ts_status staging_init(staging *sg, const ts_backend *B, int batch, int K, int tile)
{
    memset(sg, 0, sizeof *sg);
    const ts_backend_memory *mem = B->memory;
    sg->label_n = (size_t)batch * tile * tile;
    sg->logit_n = sg->label_n * (size_t)K;
    void *p = NULL;
    ts_status st = mem->alloc(&p, sg->logit_n * sizeof(float));
    if (!st && !p) st = ts_error(TS_ERR_NOMEM, "backend gave no memory");
    sg->dlogits = p;
    if (!st && !mem->host) {
        sg->mem = mem;
        p = NULL;
        st = mem->alloc(&p, sg->label_n * sizeof(int32_t));
        if (!st && !p) st = ts_error(TS_ERR_NOMEM, "backend gave no memory");
        sg->labels = p;
        sg->logits_host = malloc(sg->logit_n * sizeof(float));
        if (!st && !sg->logits_host) st = ts_error(TS_ERR_NOMEM, "train: out of memory");
    }
    if (st) {
        char why[512];
        snprintf(why, sizeof why, "%s", ts_last_error());
        return ts_error(st, "train: %.1f MiB of batch buffers on backend %s: %s",
                        (double)sg->logit_n * 8 / (1 << 20), B->name, why);
    }
    return TS_OK;
}

static void staging_free(staging *sg, const ts_backend *B)
{
    if (B) {
        B->memory->free(sg->dlogits);
        B->memory->free(sg->labels);
    }
    free(sg->logits_host);
    memset(sg, 0, sizeof *sg);
}

/* The batch's labels where the backend's loss ops read them. */
static ts_status stage_labels(staging *sg, const ts_batch *b, const int32_t **out)
{
    if (!sg->mem) {
        *out = b->mask;
        return TS_OK;
    }
    size_t n = (size_t)b->size * b->image.h * b->image.w;
    if (n > sg->label_n) return ts_error(TS_ERR_INVALID_ARG, "train: batch of %zu labels exceeds the buffer", n);
    *out = sg->labels;
    return sg->mem->upload(sg->labels, b->mask, n * sizeof(int32_t));
}

static ts_status sync_host(const ts_unet_device *dev, ts_unet *m)
{
    ts_status st = ts_unet_device_download_params(dev, m);
    if (st) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", ts_last_error());
        return ts_error(st, "train: copying the weights back from the %s backend: %s", dev->backend->name, msg);
    }
    return TS_OK;
}

/* ---- validation ------------------------------------------------------------------------------------ */
static ts_status validate(ts_unet_device *dev, ts_ctx *ctx, staging *sg, ts_loader *vl, const ts_loss *loss,
                          int classes, int ignore, int epoch, double *val_loss, ts_metrics *met)
{
    ts_confusion cm;
    ts_status st = ts_confusion_init(&cm, classes);
    if (st) return st;
    st = ts_loader_begin_epoch(vl, 0, 0);
    double sum = 0;
    int64_t n = 0;
    while (!st) {
        ts_batch b;
        int end = 0;
        st = ts_loader_next(vl, &b, &end);
        if (st || end) break;
        ts_tensor logits;
        const int32_t *labels = NULL;
        st = ts_unet_device_run(dev, ctx, &b.image, 0, &logits);
        if (!st) st = stage_labels(sg, &b, &labels);
        if (st) break;
        ts_loss_value lv;
        st = ts_loss_forward(loss, ctx, &logits, labels, &lv);
        if (st) {
            char msg[1024];
            snprintf(msg, sizeof msg, "%s", ts_last_error());
            st = ts_error(st, "train: epoch %d, validation batch %zu: %s", epoch + 1, b.batch, msg);
            break;
        }
        sum += lv.total * b.size;
        n += b.size;
        /* The confusion matrix is counted on the host. */
        ts_tensor lh = logits;
        if (sg->mem) {
            lh.data = sg->logits_host;
            st = sg->mem->download(lh.data, logits.data, ts_tensor_numel(&logits) * sizeof(float));
            if (st) break;
        }
        st = ts_confusion_add_logits(&cm, &lh, b.mask, b.valid, ignore);
    }
    if (!st) {
        *val_loss = n ? sum / (double)n : NAN;
        st = ts_metrics_compute(met, &cm, NULL);
    }
    ts_confusion_free(&cm);
    return st;
}

/* ---- progress ------------------------------------------------------------------------------------- */
static void fmt_eta(char *buf, size_t n, double s)
{
    if (!isfinite(s) || s < 0) snprintf(buf, n, "--");
    else if (s >= 3600) snprintf(buf, n, "%dh%02dm", (int)(s / 3600), (int)(fmod(s, 3600) / 60));
    else snprintf(buf, n, "%dm%02ds", (int)(s / 60), (int)fmod(s, 60));
}

/* ---- the run ---------------------------------------------------------------------------------------- */
ts_status ts_train_run(const ts_train_config *c, const ts_train_run_opts *opts, ts_train_result *res)
{
    ts_train_run_opts defo;
    ts_train_run_opts_init(&defo);
    const ts_train_run_opts *o = opts ? opts : &defo;
    FILE *log = o->log ? o->log : stderr;
    int mode = o->progress;
    if (mode < 0) mode = isatty(fileno(log)) ? 1 : 0;
    const int silent = mode == 2, live = mode == 1;
    const double t_start = now_s();
    ts_train_result r_local;
    ts_train_result *r = res ? res : &r_local;
    memset(r, 0, sizeof *r);
    r->train_loss = r->val_loss = r->miou = r->oa = r->best_miou = NAN;

    ts_status st = ts_train_config_validate(c);
    if (st) return st;
    char *yaml = NULL;
    st = ts_train_config_format(c, &yaml);
    if (st) return st;
    if (o->print_config && !silent) fprintf(log, "# resolved configuration\n%s\n", yaml);
    const ts_backend *B = o->backend;
    if (!B && c->device == TS_DEVICE_CPU) B = ts_backend_cpu();
    if (!B) {
        char name[32];
        snprintf(name, sizeof name, "cuda:%d", c->cuda_device);
        st = ts_backend_get(name, &B);
        if (st) {
            char msg[768];
            snprintf(msg, sizeof msg, "%s", ts_last_error());
            free(yaml);
            return ts_error(st, "train: device %s: %s", name, msg);
        }
    }
    if (c->device == TS_DEVICE_CUDA) {
        /* Process-wide, as torch.backends.cudnn's flags: every plan made from
         * here on sees them (a plan's key holds them). */
        const ts_device_math dm = {c->deterministic, c->tf32, c->cudnn_benchmark};
        if ((st = ts_device_math_set(&dm))) {
            free(yaml);
            return st;
        }
    }
    ts_threads_init(c->threads);

    const int K = c->classes.n;
    trainer t;
    memset(&t, 0, sizeof t);
    t.c = c;
    ts_unet m;
    memset(&m, 0, sizeof m);
    ts_unet_device dev;
    memset(&dev, 0, sizeof dev);
    staging sg;
    memset(&sg, 0, sizeof sg);
    ts_ctx ctx;
    memset(&ctx, 0, sizeof ctx);
    ts_loss loss;
    memset(&loss, 0, sizeof loss);
    ts_optim opt;
    memset(&opt, 0, sizeof opt);
    ts_sched sched;
    memset(&sched, 0, sizeof sched);
    ts_loader *tl = NULL, *vl = NULL;
    run_state rs;
    memset(&rs, 0, sizeof rs);
    rs.best_miou = NAN;
    rs.hist.classes = K;
    char *p_last = NULL, *p_best = NULL;
    struct sigaction old_int, old_term;
    int signals_installed = 0;
    g_stop_sig = 0;

    st = mkdir_p(c->output);
    if (!st) {
        p_last = path_join(c->output, "last.safetensors");
        p_best = path_join(c->output, "best.safetensors");
        if (!p_last || !p_best) st = ts_error(TS_ERR_NOMEM, "train: out of memory");
    }
    if (!st) st = open_data(&t, log, !silent);
    if (!st) {
        r->train_windows = t.n_train;
        r->val_windows = t.n_val;
        if (!silent)
            fprintf(log, "data: %d image(s), %d channels, %zu training and %zu validation windows of %d px\n",
                    t.n_images, t.channels, t.n_train, t.n_val, c->windows.tile);
    }
    /* loaders */
    ts_loader_opts lo;
    if (!st) {
        int slots = c->loader.workers > 0 ? c->loader.workers : 1;
        st = reader_set_open(&t, &t.rs_train, t.train_refs, slots);
        if (!st && t.n_val) st = reader_set_open(&t, &t.rs_val, t.val_refs, slots);
    }
    if (!st) {
        ts_window *ws = malloc((t.n_train + t.n_val + 1) * sizeof *ws);
        if (!ws) st = ts_error(TS_ERR_NOMEM, "train: out of memory");
        for (size_t i = 0; i < t.n_train && ws; i++) ws[i] = t.train_refs[i].w;
        for (size_t i = 0; i < t.n_val && ws; i++) ws[t.n_train + i] = t.val_refs[i].w;
        ts_train_config_loader(c, t.channels, &lo);
        if (!st) st = ts_loader_create(&lo, ws, t.n_train, read_sample, &t.rs_train, &tl);
        if (!st && t.n_val) {
            ts_loader_opts vo = lo;
            vo.shuffle = 0;
            vo.drop_last = 0;
            memset(&vo.aug, 0, sizeof vo.aug);
            st = ts_loader_create(&vo, ws + t.n_train, t.n_val, read_sample, &t.rs_val, &vl);
        }
        free(ws);
    }
    size_t batches = 0;
    int64_t steps_per_epoch = 0;
    const int k_acc = c->train.accumulate > 0 ? c->train.accumulate : 1;
    if (!st) {
        batches = ts_loader_batches_per_epoch(tl);
        if (batches == 0)
            st = ts_error(TS_ERR_INVALID_ARG, "train: %zu training windows make no batch of %d with train.drop_last",
                          t.n_train, c->train.batch_size);
        steps_per_epoch = (int64_t)((batches + (size_t)k_acc - 1) / (size_t)k_acc);
    }
    if (!st) st = ts_train_config_check_steps(c, steps_per_epoch);
    /* model, loss, optimizer, schedule */
    if (!st) st = init_model(&t, &m);
    if (!st) st = make_card(&t, &m);
    if (!st) st = ts_ctx_init(&ctx, B);
    if (!st) {
        ts_loss_config lc;
        float *cw = NULL;
        st = ts_train_config_loss_config(c, &lc, &cw);
        if (!st) st = ts_loss_init(&loss, &lc, K);
        free(cw);
    }
    if (!st) {
        ts_optim_config oc;
        ts_train_config_optim(c, &oc);
        st = ts_optim_init_on(&opt, &oc, &m, B);
    }
    if (!st) {
        ts_sched_config sc;
        st = ts_train_config_schedule(c, steps_per_epoch, &sc);
        if (!st) st = ts_sched_init(&sched, &sc, c->optimizer.lr);
    }
    if (!st) st = staging_init(&sg, B, c->train.batch_size, K, c->windows.tile);
    if (!st && o->resume) {
        st = load_checkpoint(o->resume, &m, &opt, &sched, &rs, c, log);
        if (!st && !silent)
            fprintf(log, "resumed %s: epoch %d, batch %" PRId64 ", step %" PRId64 "\n", o->resume, rs.epoch + 1,
                    rs.next_batch, rs.global_step);
        if (!st && rs.next_batch > (int64_t)batches)
            st = ts_error(TS_ERR_INVALID_ARG, "train: %s stopped at batch %" PRId64 " but an epoch has %zu batches now",
                          o->resume, rs.next_batch, batches);
    }
    /* The training copy on the backend, made from the model as loaded or resumed. */
    if (!st) st = ts_unet_device_init_train(&dev, &m, B);
    if (!st && c->precision != TS_F32) st = ts_unet_device_set_precision(&dev, &ctx, (ts_dtype)c->precision);
    const ts_unet_trainable trainable = ts_unet_device_trainable(&dev);
    const char *prec = c->precision == TS_BF16 ? "bf16 mixed precision"
                       : c->precision == TS_F16 ? "fp16 mixed precision, dynamic loss scaling"
                                                : "fp32";
    if (!st && !silent)
        fprintf(log, "model: U-Net ResNet-34, depth %d, %d -> %d classes, %zu trainable parameters; %zu batches "
                     "(%" PRId64 " optimizer steps) per epoch; device %s, %s%s%s%s%s\n",
                m.cfg.encoder_depth, m.cfg.in_channels, K, ts_unet_count_trainable(&m), batches, steps_per_epoch,
                B->name, prec,
                c->precision != TS_F32 && ts_backend_is_host(B) ? " (emulated on the CPU: slower than fp32)" : "",
                c->device == TS_DEVICE_CUDA && c->tf32 && c->precision == TS_F32 ? ", TF32" : "",
                c->device == TS_DEVICE_CUDA && c->deterministic ? ", deterministic" : "",
                c->device == TS_DEVICE_CUDA && c->cudnn_benchmark && !c->deterministic ? ", cuDNN benchmark" : "");
    if (!st && o->install_signals) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_signal;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGINT, &sa, &old_int);
        sigaction(SIGTERM, &sa, &old_term);
        signals_installed = 1;
    }

    const int epochs = c->train.epochs;
    const int is_tty_live = live && !silent;
    double t_epoch0 = now_s();
    int64_t tiles_done = 0;
    int stop = 0;
    if (!st && o->on_step_model) {
        o->on_step_model(o->on_step_user, &m, rs.epoch, rs.global_step);
        st = ts_unet_device_upload_params(&dev, &m);
    }
    while (!st && !stop && rs.epoch < epochs) {
        const int e = rs.epoch;
        st = ts_loader_begin_epoch(tl, e, (size_t)rs.next_batch);
        if (st) break;
        t_epoch0 = now_s();
        tiles_done = 0;
        int micro = 0;
        size_t bi = (size_t)rs.next_batch;
        for (;;) {
            ts_batch b;
            int end = 0;
            st = ts_loader_next(tl, &b, &end);
            if (st || end) break;
            if (micro == 0) {
                st = ts_unet_device_zero_grad(&dev, &ctx);
                if (st) break;
            }
            ts_tensor logits;
            const int32_t *labels = NULL;
            st = ts_unet_device_run(&dev, &ctx, &b.image, 1, &logits);
            if (!st) st = stage_labels(&sg, &b, &labels);
            if (st) break;
            ts_loss_value lv;
            st = ts_loss_forward(&loss, &ctx, &logits, labels, &lv);
            if (st) {
                char msg[1024];
                snprintf(msg, sizeof msg, "%s", ts_last_error());
                st = ts_error(st, "train: epoch %d, batch %zu of %zu (optimizer step %" PRId64 "): %s; training "
                              "stopped, the last checkpoint (%s) is the last good state", e + 1, bi + 1, batches,
                              rs.global_step + 1, msg, p_last);
                break;
            }
            ts_tensor dv = ts_tensor_view(sg.dlogits, b.size, K, c->windows.tile, c->windows.tile);
            st = ctx.backend->zero(&ctx, dv.data, ts_tensor_numel(&dv));
            if (!st) st = ts_loss_backward(&loss, &ctx, &dv, &logits, labels, ts_optim_loss_scale(&opt));
            if (!st) st = ts_unet_device_backward(&dev, &ctx, &dv);
            if (st) break;
            rs.loss_sum += lv.total;
            rs.loss_count++;
            tiles_done += b.size;
            micro++;
            bi++;
            if (micro < k_acc && bi < batches) continue;
            micro = 0;
            double gn = 0;
            st = ts_optim_step_on(&opt, &ctx, &trainable, ts_sched_lr(&sched), &gn);
            if (st) {
                char msg[1024];
                snprintf(msg, sizeof msg, "%s", ts_last_error());
                st = ts_error(st, "train: epoch %d, optimizer step %" PRId64 ": %s; the last checkpoint (%s) is the "
                              "last good state", e + 1, rs.global_step + 1, msg, p_last);
                break;
            }
            if (opt.last_skipped && !silent)
                fprintf(log, "%sstep %" PRId64 ": fp16 gradients overflowed at loss scale %g: update skipped, scale now "
                        "%g\n", is_tty_live ? "\r\033[K" : "", rs.global_step + 1, opt.loss_scale * 2, opt.loss_scale);
            /* A skipped update still counts as a step for the schedule, as
             * scheduler.step() after scaler.step() does in PyTorch. */
            ts_sched_after_iteration(&sched);
            rs.global_step++;
            rs.next_batch = (int64_t)bi;
            if (o->on_step) o->on_step(o->on_step_user, e, rs.global_step);
            if (o->on_step_model) {
                /* the hook sees (and may change) the host model */
                st = sync_host(&dev, &m);
                if (st) break;
                o->on_step_model(o->on_step_user, &m, e, rs.global_step);
                st = ts_unet_device_upload_params(&dev, &m);
                if (st) break;
            }
            if (!silent) {
                double el = now_s() - t_epoch0;
                double tps = el > 0 ? tiles_done / el : 0;
                double rem = tps > 0 ? ((double)(batches - bi) * c->train.batch_size +
                                        (double)(epochs - e - 1) * batches * c->train.batch_size) / tps
                                     : NAN;
                char eta[32];
                fmt_eta(eta, sizeof eta, rem);
                double ml = rs.loss_count ? rs.loss_sum / (double)rs.loss_count : NAN;
                if (is_tty_live)
                    fprintf(log, "\r\033[Kepoch %d/%d  batch %zu/%zu  step %" PRId64 "  loss %.4f  %.1f tiles/s  ETA %s",
                            e + 1, epochs, bi, batches, rs.global_step, ml, tps, eta);
                else if (bi == batches || rs.global_step % 50 == 0)
                    fprintf(log, "epoch %d/%d batch %zu/%zu step %" PRId64 " loss %.4f %.1f tiles/s ETA %s\n", e + 1,
                            epochs, bi, batches, rs.global_step, ml, tps, eta);
                fflush(log);
            }
            if (o->stop_after_steps > 0 && rs.global_step >= o->stop_after_steps && !g_stop_sig) g_stop_sig = SIGINT;
            int want_stop = g_stop_sig != 0 && bi < batches;
            if (want_stop || (c->train.checkpoint_steps > 0 && rs.global_step % c->train.checkpoint_steps == 0 &&
                              bi < batches)) {
                st = sync_host(&dev, &m);
                if (!st) st = save_checkpoint(p_last, &m, &opt, &sched, &rs, yaml, c);
                if (st) break;
            }
            if (want_stop) {
                stop = 1;
                break;
            }
        }
        if (st || stop) break;
        if (is_tty_live) fprintf(log, "\n");
        /* epoch end */
        ts_sched_after_epoch(&sched);
        hist_row row = {.epoch = e + 1, .step = rs.global_step, .lr = ts_sched_lr(&sched),
                        .train_loss = rs.loss_count ? rs.loss_sum / (double)rs.loss_count : NAN,
                        .val_loss = NAN, .miou = NAN, .oa = NAN, .iou = NULL};
        r->train_loss = row.train_loss;
        double *iou = NULL;
        int improved = 0;
        if (vl && ((e + 1) % c->train.val_every == 0 || e + 1 == epochs)) {
            ts_metrics met;
            memset(&met, 0, sizeof met);
            st = validate(&dev, &ctx, &sg, vl, &loss, K, c->ignore_id, e, &row.val_loss, &met);
            if (st) break;
            row.miou = met.miou;
            row.oa = met.oa;
            iou = malloc((size_t)K * sizeof *iou);
            if (!iou) {
                ts_metrics_free(&met);
                st = ts_error(TS_ERR_NOMEM, "train: out of memory");
                break;
            }
            for (int k = 0; k < K; k++) iou[k] = met.cls[k].iou;
            row.iou = iou;
            r->val_loss = row.val_loss;
            r->miou = row.miou;
            r->oa = row.oa;
            if (!silent) {
                fprintf(log, "epoch %d: train loss %.4f, val loss %.4f, mIoU %.4f, OA %.4f, IoU", e + 1,
                        row.train_loss, row.val_loss, row.miou, row.oa);
                for (int k = 0; k < K; k++) fprintf(log, " %s %.3f", c->classes.v[k].name, iou[k]);
                fprintf(log, "\n");
            }
            ts_metrics_free(&met);
            if (isfinite(row.miou) && (!isfinite(rs.best_miou) || row.miou > rs.best_miou)) {
                rs.best_miou = row.miou;
                rs.best_epoch = e + 1;
                rs.bad_epochs = 0;
                improved = 1;
            } else {
                rs.bad_epochs++;
            }
        } else if (!silent) {
            fprintf(log, "epoch %d: train loss %.4f\n", e + 1, row.train_loss);
        }
        st = history_push(&rs.hist, &row);
        free(iou);
        if (st) break;
        rs.epoch = e + 1;
        rs.next_batch = 0;
        rs.loss_sum = 0;
        rs.loss_count = 0;
        r->epochs_done = rs.epoch;
        st = sync_host(&dev, &m);
        if (!st && improved) st = save_model_file(p_best, &m, &rs, e + 1, row.miou);
        if (!st) st = write_metrics_files(c->output, &rs.hist, c);
        if (!st) st = save_checkpoint(p_last, &m, &opt, &sched, &rs, yaml, c);
        if (!st && c->train.keep_every > 0 && (e + 1) % c->train.keep_every == 0) {
            char name[64];
            snprintf(name, sizeof name, "epoch-%d.safetensors", e + 1);
            char *p = path_join(c->output, name);
            st = p ? save_checkpoint(p, &m, &opt, &sched, &rs, yaml, c) : ts_error(TS_ERR_NOMEM, "train: out of memory");
            free(p);
        }
        if (st) break;
        if (c->train.patience > 0 && rs.bad_epochs >= c->train.patience && vl) {
            if (!silent)
                fprintf(log, "early stopping: no better val mIoU for %d epochs (best %.4f at epoch %d)\n",
                        rs.bad_epochs, rs.best_miou, rs.best_epoch);
            r->early_stopped = 1;
            break;
        }
        if (g_stop_sig) {
            stop = 1;
            break;
        }
    }
    if (is_tty_live && (st || stop)) fprintf(log, "\n");
    r->global_step = rs.global_step;
    r->skipped_steps = opt.skipped_steps;
    r->epochs_done = rs.epoch;
    r->best_miou = rs.best_miou;
    r->best_epoch = rs.best_epoch;
    if (!st && stop) {
        r->interrupted = g_stop_sig ? g_stop_sig : SIGINT;
        if (!silent)
            fprintf(log, "stopped (signal %d) at epoch %d, batch %" PRId64 ", step %" PRId64 "; resume with --resume %s\n",
                    r->interrupted, rs.epoch + 1, rs.next_batch, rs.global_step, p_last);
    } else if (!st) {
        /* final outputs */
        char *pm = path_join(c->output, "model.safetensors");
        char *ps = path_join(c->output, "smp");
        if (!pm || !ps) st = ts_error(TS_ERR_NOMEM, "train: out of memory");
        if (!st) st = save_model_file(pm, &m, &rs, rs.epoch, r->miou);
        if (!st) st = ts_model_save(ps, &m, TS_FORMAT_SMP_DIR);
        if (!st && rs.hist.n == 0) st = write_metrics_files(c->output, &rs.hist, c);
        if (!st && !silent)
            fprintf(log, "done: %d epochs, %" PRId64 " steps, best val mIoU %.4f (epoch %d); outputs in %s\n", rs.epoch,
                    rs.global_step, rs.best_miou, rs.best_epoch, c->output);
        free(pm);
        free(ps);
    }
    if (signals_installed) {
        sigaction(SIGINT, &old_int, NULL);
        sigaction(SIGTERM, &old_term, NULL);
    }
    g_stop_sig = 0;
    ts_loader_destroy(tl);
    ts_loader_destroy(vl);
    staging_free(&sg, B);
    ts_unet_device_free(&dev);
    ts_optim_free(&opt);
    ts_loss_free(&loss);
    ts_ctx_free(&ctx);
    ts_unet_free(&m);
    trainer_free(&t);
    history_free(&rs.hist);
    free(p_last);
    free(p_best);
    free(yaml);
    r->seconds = now_s() - t_start;
    return st;
}
