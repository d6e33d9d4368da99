/* The synthetic demo scene (see demo_scene.h). */
#include "io/demo_scene.h"

#include <cpl_conv.h>
#include <cpl_error.h>
#include <cpl_string.h>
#include <gdal.h>
#include <gdal_alg.h>
#include <math.h>
#include <ogr_api.h>
#include <ogr_srs_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/gdal_out.h"
#include "io/io.h"

const demo_class demo_classes[DEMO_NCLASSES] = {
    {0, "background", "#a0a0a0"}, {1, "building", "#e31a1c"}, {2, "road", "#404040"},
    {3, "water", "#1f78b4"},      {4, "vegetation", "#33a02c"}, {5, "bare_soil", "#b15928"},
};

enum { C_BG = 0, C_BUILDING = 1, C_ROAD = 2, C_WATER = 3, C_VEG = 4, C_SOIL = 5 };
/* The layer order: later features win where they overlap. */
static const int burn_order[5] = {C_SOIL, C_VEG, C_WATER, C_ROAD, C_BUILDING};

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

void demo_scene_defaults(demo_scene_params *p)
{
    memset(p, 0, sizeof *p);
    p->width = 2048;
    p->height = 2048;
    p->seed = 1;
    p->pixel_size = 1.0;
    p->epsg = 32633;
    p->origin_x = 500000.0;
    p->origin_y = 5800000.0;
}

/* ---- random numbers: splitmix64 stream, and hashes for the noise ---------- */

typedef struct rng {
    uint64_t s;
} rng;

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static uint64_t rnext(rng *r) { return mix64(r->s += 0x9e3779b97f4a7c15ULL); }
static double runif(rng *r, double lo, double hi) { return lo + (hi - lo) * (double)(rnext(r) >> 11) * 0x1.0p-53; }
static int rint_n(rng *r, int n) { return (int)((rnext(r) >> 33) % (uint64_t)n); }

/* Uniform [0, 1) from a seed and a lattice point. */
static inline double hash01(uint64_t seed, int64_t x, int64_t y)
{
    uint64_t h = mix64(seed ^ mix64((uint64_t)x * 0x9e3779b97f4a7c15ULL + (uint64_t)y * 0xc2b2ae3d27d4eb4fULL));
    return (double)(h >> 11) * 0x1.0p-53;
}

/* Value noise in [-1, 1] on a unit lattice, smoothstep-interpolated. */
static inline double vnoise(uint64_t seed, double x, double y)
{
    const double fx = floor(x), fy = floor(y);
    const int64_t ix = (int64_t)fx, iy = (int64_t)fy;
    double tx = x - fx, ty = y - fy;
    tx = tx * tx * (3 - 2 * tx);
    ty = ty * ty * (3 - 2 * ty);
    const double a = hash01(seed, ix, iy), b = hash01(seed, ix + 1, iy);
    const double c = hash01(seed, ix, iy + 1), d = hash01(seed, ix + 1, iy + 1);
    const double v = a + (b - a) * tx + (c - a) * ty + (a - b - c + d) * tx * ty;
    return 2 * v - 1;
}

/* Octaves of value noise at feature size `scale` (metres), about [-1, 1]. */
static inline double fbm(uint64_t seed, double x, double y, double scale, int octaves)
{
    double sum = 0, amp = 1, norm = 0, s = 1.0 / scale;
    for (int i = 0; i < octaves; i++) {
        sum += amp * vnoise(seed + (uint64_t)i * 0x632be59bd9b4e019ULL, x * s, y * s);
        norm += amp;
        amp *= 0.5;
        s *= 2;
    }
    return sum / norm;
}

/* About N(0, 1) from four hashes. */
static inline double gauss(uint64_t seed, int64_t x, int64_t y)
{
    return (hash01(seed, x, y) + hash01(seed + 1, x, y) + hash01(seed + 2, x, y) + hash01(seed + 3, x, y) - 2.0) *
           1.7320508075688772;
}

static double clampd(double v, double lo, double hi) { return v < lo ? lo : v > hi ? hi : v; }

/* ---- features ----------------------------------------------------------- */

typedef struct feat {
    OGRGeometryH g;
    OGREnvelope env;
    int cls, kind;
    float spec[4];
    double angle, period; /* row/furrow texture; roof ridge direction */
    double cx, cy;        /* buildings: centre (world) */
    double height;        /* buildings: metres, for the shadow */
    int gable;
} feat;

typedef struct flist {
    feat *v;
    int n, cap;
} flist;

typedef struct gen {
    rng r;
    double ox, oy, Wm, Hm, Sm, A; /* origin, extent, min side, area / 2048^2 m^2 */
    flist f[DEMO_NCLASSES];
    OGRGeometryH *lines; /* road centre lines, for building placement */
    double *line_w;      /* their widths */
    int *line_town;
    int n_lines, cap_lines;
} gen;

static ts_status add_feat(gen *g, int cls, OGRGeometryH geom, feat **out)
{
    if (!geom) return ts_gdal_error(TS_ERR_BACKEND, "demo scene: building a %s polygon failed", demo_classes[cls].name);
    flist *l = &g->f[cls];
    if (l->n == l->cap) {
        int nc = l->cap ? 2 * l->cap : 64;
        feat *p = realloc(l->v, (size_t)nc * sizeof *p);
        if (!p) {
            OGR_G_DestroyGeometry(geom);
            return ts_error(TS_ERR_NOMEM, "demo scene: out of memory");
        }
        l->v = p;
        l->cap = nc;
    }
    feat *f = &l->v[l->n++];
    memset(f, 0, sizeof *f);
    f->g = geom;
    f->cls = cls;
    OGR_G_GetEnvelope(geom, &f->env);
    if (out) *out = f;
    return TS_OK;
}

static OGRGeometryH make_poly(const double *xy, int n)
{
    OGRGeometryH ring = OGR_G_CreateGeometry(wkbLinearRing);
    for (int i = 0; i < n; i++) OGR_G_AddPoint_2D(ring, xy[2 * i], xy[2 * i + 1]);
    OGR_G_AddPoint_2D(ring, xy[0], xy[1]);
    OGRGeometryH poly = OGR_G_CreateGeometry(wkbPolygon);
    OGR_G_AddGeometryDirectly(poly, ring);
    return poly;
}

/* A star-shaped blob: radius R (x sx along angle rot), wobbly outline. */
static OGRGeometryH make_blob(rng *r, double cx, double cy, double R, double sx, double rot)
{
    enum { NV = 72, NH = 4 };
    double amp[NH], ph[NH], xy[2 * NV];
    double total = runif(r, 0.2, 0.45);
    for (int k = 0; k < NH; k++) {
        amp[k] = runif(r, 0.2, 1.0);
        ph[k] = runif(r, 0, 2 * M_PI);
    }
    double s = 0;
    for (int k = 0; k < NH; k++) s += amp[k];
    for (int k = 0; k < NH; k++) amp[k] *= total / s;
    const double c = cos(rot), sn = sin(rot);
    for (int i = 0; i < NV; i++) {
        double t = 2 * M_PI * i / NV, rad = 1;
        for (int k = 0; k < NH; k++) rad += amp[k] * cos((k + 2) * t + ph[k]);
        double x = R * rad * cos(t) * sx, y = R * rad * sin(t);
        xy[2 * i] = cx + x * c - y * sn;
        xy[2 * i + 1] = cy + x * sn + y * c;
    }
    return make_poly(xy, NV);
}

/* A rectangle a x b centred at (cx, cy), long side along angle; with an L
 * notch (fraction nx x ny of the corner) when notch. */
static int rect_pts(double cx, double cy, double a, double b, double ang, int notch, double nx, double ny, double *xy)
{
    double lx[6], ly[6];
    int n;
    if (!notch) {
        double px[4] = {-a / 2, a / 2, a / 2, -a / 2}, py[4] = {-b / 2, -b / 2, b / 2, b / 2};
        memcpy(lx, px, sizeof px);
        memcpy(ly, py, sizeof py);
        n = 4;
    } else {
        double px[6] = {-a / 2, a / 2, a / 2, a / 2 - nx * a, a / 2 - nx * a, -a / 2};
        double py[6] = {-b / 2, -b / 2, b / 2 - ny * b, b / 2 - ny * b, b / 2, b / 2};
        memcpy(lx, px, sizeof px);
        memcpy(ly, py, sizeof py);
        n = 6;
    }
    const double c = cos(ang), s = sin(ang);
    for (int i = 0; i < n; i++) {
        xy[2 * i] = cx + lx[i] * c - ly[i] * s;
        xy[2 * i + 1] = cy + lx[i] * s + ly[i] * c;
    }
    return n;
}

static ts_status add_line(gen *g, OGRGeometryH line, double width, int town)
{
    if (g->n_lines == g->cap_lines) {
        int nc = g->cap_lines ? 2 * g->cap_lines : 32;
        OGRGeometryH *l = realloc(g->lines, (size_t)nc * sizeof *l);
        if (l) g->lines = l;
        double *w = realloc(g->line_w, (size_t)nc * sizeof *w);
        if (w) g->line_w = w;
        int *t = realloc(g->line_town, (size_t)nc * sizeof *t);
        if (t) g->line_town = t;
        if (!l || !w || !t) {
            OGR_G_DestroyGeometry(line);
            return ts_error(TS_ERR_NOMEM, "demo scene: out of memory");
        }
        g->cap_lines = nc;
    }
    g->lines[g->n_lines] = line;
    g->line_w[g->n_lines] = width;
    g->line_town[g->n_lines++] = town;
    return TS_OK;
}

/* A gently meandering line through a random point of the scene's middle,
 * long enough to leave the scene on both sides. */
static OGRGeometryH meander(gen *g, double amp_lo, double amp_hi)
{
    rng *r = &g->r;
    const double px = g->ox + runif(r, 0.2, 0.8) * g->Wm, py = g->oy - runif(r, 0.2, 0.8) * g->Hm;
    const double th = runif(r, 0, M_PI);
    const double dx = cos(th), dy = sin(th);
    const double a1 = runif(r, amp_lo, amp_hi), a2 = runif(r, amp_lo, amp_hi) * 0.4;
    const double l1 = runif(r, 500, 1100), l2 = runif(r, 150, 350);
    const double p1 = runif(r, 0, 2 * M_PI), p2 = runif(r, 0, 2 * M_PI);
    const double L = hypot(g->Wm, g->Hm) * 0.8;
    OGRGeometryH line = OGR_G_CreateGeometry(wkbLineString);
    for (double t = -L; t <= L; t += 10) {
        double off = a1 * sin(2 * M_PI * t / l1 + p1) + a2 * sin(2 * M_PI * t / l2 + p2);
        OGR_G_AddPoint_2D(line, px + dx * t - dy * off, py + dy * t + dx * off);
    }
    return line;
}

static int inside(const gen *g, double x, double y, double margin)
{
    return x >= g->ox + margin && x <= g->ox + g->Wm - margin && y <= g->oy - margin && y >= g->oy - g->Hm + margin;
}

static ts_status make_roads(gen *g)
{
    rng *r = &g->r;
    ts_status st = TS_OK;
    const int n_main = 2 + (int)lround(g->A);
    for (int i = 0; i < n_main && !st; i++) {
        OGRGeometryH line = meander(g, 5, 40);
        const double w = runif(r, 6.5, 8.0);
        feat *f = NULL;
        st = add_feat(g, C_ROAD, OGR_G_Buffer(line, w / 2, 4), &f);
        if (!st) st = add_line(g, line, w, 0);
        else OGR_G_DestroyGeometry(line);
    }
    /* Branches from points of the main roads. */
    const int n_branch = (int)fmax(1, lround(7 * g->A));
    for (int i = 0; i < n_branch && !st; i++) {
        OGRGeometryH base = g->lines[rint_n(r, n_main)];
        const int nv = OGR_G_GetPointCount(base);
        double x = 0, y = 0, hx = 1, hy = 0;
        int ok = 0;
        for (int tries = 0; tries < 50 && !ok; tries++) {
            int k = 1 + rint_n(r, nv - 2);
            x = OGR_G_GetX(base, k);
            y = OGR_G_GetY(base, k);
            hx = OGR_G_GetX(base, k + 1) - OGR_G_GetX(base, k - 1);
            hy = OGR_G_GetY(base, k + 1) - OGR_G_GetY(base, k - 1);
            ok = inside(g, x, y, 0.1 * g->Sm);
        }
        if (!ok) continue;
        double h = atan2(hy, hx) + (rint_n(r, 2) ? 1 : -1) * (M_PI / 2 + runif(r, -0.3, 0.3));
        const double len = runif(r, 0.2, 0.5) * g->Sm + 100;
        OGRGeometryH line = OGR_G_CreateGeometry(wkbLineString);
        double dh = 0;
        for (double t = 0; t <= len; t += 10) {
            OGR_G_AddPoint_2D(line, x, y);
            dh = 0.8 * dh + runif(r, -0.02, 0.02);
            h += dh;
            x += 10 * cos(h);
            y += 10 * sin(h);
        }
        const double w = runif(r, 4.0, 6.0);
        st = add_feat(g, C_ROAD, OGR_G_Buffer(line, w / 2, 4), NULL);
        if (!st) st = add_line(g, line, w, 0);
        else OGR_G_DestroyGeometry(line);
    }
    /* A town: a rotated street grid. */
    const int n_town = (int)fmax(1, lround(3 * g->A));
    for (int t = 0; t < n_town && !st; t++) {
        const double sp = runif(r, 60, 80);
        const int nx = (int)clampd(floor(0.5 * g->Sm / sp) + 1, 2, 6), ny = (int)clampd(floor(0.4 * g->Sm / sp) + 1, 2, 5);
        const double cx = g->ox + runif(r, 0.3, 0.7) * g->Wm, cy = g->oy - runif(r, 0.3, 0.7) * g->Hm;
        const double a = runif(r, 0, M_PI / 2), c = cos(a), s = sin(a);
        for (int dir = 0; dir < 2 && !st; dir++) {
            const int n = dir ? ny : nx, m = dir ? nx : ny;
            for (int i = 0; i < n && !st; i++) {
                const double u = (i - (n - 1) / 2.0) * sp, half = (m - 1) / 2.0 * sp + 30;
                double p[4];
                if (!dir) p[0] = u, p[1] = -half, p[2] = u, p[3] = half;
                else p[0] = -half, p[1] = u, p[2] = half, p[3] = u;
                OGRGeometryH line = OGR_G_CreateGeometry(wkbLineString);
                for (int k = 0; k < 2; k++) OGR_G_AddPoint_2D(line, cx + p[2 * k] * c - p[2 * k + 1] * s, cy + p[2 * k] * s + p[2 * k + 1] * c);
                OGR_G_Segmentize(line, 10);
                const double w = runif(r, 5.0, 6.5);
                st = add_feat(g, C_ROAD, OGR_G_Buffer(line, w / 2, 4), NULL);
                if (!st) st = add_line(g, line, w, 1);
                else OGR_G_DestroyGeometry(line);
            }
        }
    }
    if (st) return st;
    for (int i = 0; i < g->f[C_ROAD].n; i++) {
        feat *f = &g->f[C_ROAD].v[i];
        if (rint_n(r, 4) == 0) { /* concrete or gravel */
            double v = runif(r, 1700, 2200);
            f->spec[0] = (float)(v * 0.93), f->spec[1] = (float)v, f->spec[2] = (float)(v * 1.05), f->spec[3] = (float)(v * 1.15);
        } else { /* asphalt */
            double v = runif(r, 1050, 1450);
            f->spec[0] = (float)(v * 0.95), f->spec[1] = (float)v, f->spec[2] = (float)(v * 1.04), f->spec[3] = (float)(v * 1.12);
        }
    }
    return TS_OK;
}

static ts_status make_water(gen *g)
{
    rng *r = &g->r;
    OGRGeometryH river = meander(g, 30, 90);
    ts_status st = add_feat(g, C_WATER, OGR_G_Buffer(river, runif(r, 11, 18), 8), NULL);
    OGR_G_DestroyGeometry(river);
    const int n_lakes = (int)fmax(1, lround(3 * g->A));
    for (int i = 0; i < n_lakes && !st; i++) {
        const double R = fmin(runif(r, 40, 110), 0.12 * g->Sm);
        const double cx = g->ox + runif(r, 0.15, 0.85) * g->Wm, cy = g->oy - runif(r, 0.15, 0.85) * g->Hm;
        st = add_feat(g, C_WATER, make_blob(r, cx, cy, R, runif(r, 1, 1.8), runif(r, 0, M_PI)), NULL);
    }
    for (int i = 0; i < g->f[C_WATER].n && !st; i++) {
        feat *f = &g->f[C_WATER].v[i];
        const float clear[4] = {620, 560, 380, 230}, turbid[4] = {800, 860, 660, 420};
        const double t = runif(r, 0, 1), k = runif(r, 0.9, 1.1);
        for (int b = 0; b < 4; b++) f->spec[b] = (float)(k * (clear[b] + t * (turbid[b] - clear[b])));
    }
    return st;
}

static int conflicts(const gen *g, OGRGeometryH cand, const OGREnvelope *e)
{
    static const int against[3] = {C_ROAD, C_WATER, C_BUILDING};
    for (int k = 0; k < 3; k++) {
        const flist *l = &g->f[against[k]];
        for (int i = 0; i < l->n; i++) {
            const OGREnvelope *o = &l->v[i].env;
            if (o->MinX > e->MaxX || o->MaxX < e->MinX || o->MinY > e->MaxY || o->MaxY < e->MinY) continue;
            if (OGR_G_Intersects(cand, l->v[i].g)) return 1;
        }
    }
    return 0;
}

static ts_status make_buildings(gen *g)
{
    rng *r = &g->r;
    static const float roofs[6][4] = {
        {650, 850, 1700, 2300},   /* red tiles */
        {1700, 1800, 1900, 2200}, /* concrete */
        {500, 560, 620, 800},     /* dark */
        {3000, 3150, 3250, 3400}, /* bright metal / white */
        {850, 950, 1250, 1700},   /* brown */
        {700, 1050, 900, 1500},   /* green-grey */
    };
    ts_status st = TS_OK;
    const uint64_t vseed = rnext(r);
    for (int li = 0; li < g->n_lines && !st; li++) {
        OGRGeometryH line = g->lines[li];
        const int town = g->line_town[li];
        const double hw = g->line_w[li] / 2;
        const int nv = OGR_G_GetPointCount(line);
        double acc = 0;
        for (int k = 0; k + 1 < nv && !st; k++) {
            const double x0 = OGR_G_GetX(line, k), y0 = OGR_G_GetY(line, k);
            const double x1 = OGR_G_GetX(line, k + 1), y1 = OGR_G_GetY(line, k + 1);
            const double seg = hypot(x1 - x0, y1 - y0);
            if (seg <= 0) continue;
            const double tx = (x1 - x0) / seg, ty = (y1 - y0) / seg;
            const double step = town ? 16 : 20;
            for (; acc < seg && !st; acc += step) {
                const double px = x0 + tx * acc, py = y0 + ty * acc;
                if (!inside(g, px, py, 10)) continue;
                /* Villages along rural roads: density from a 1-D noise of the position. */
                double dens = town ? 0.85 : clampd(0.2 + 0.9 * vnoise(vseed, px / 250, py / 250), 0.05, 0.85);
                for (int side = -1; side <= 1 && !st; side += 2)
                    for (int row = 0; row < 2; row++) {
                        if (runif(r, 0, 1) > dens * (row ? (town ? 0.55 : 0.3) : 1)) continue;
                        const double a = runif(r, 10, 24), b = runif(r, 9, 16);
                        const double set = hw + runif(r, 3, 8) + row * runif(r, 18, 24);
                        const double nx = -ty * side, ny = tx * side;
                        const double cx = px + nx * (set + b / 2), cy = py + ny * (set + b / 2);
                        const double ang = atan2(ty, tx) + runif(r, -0.06, 0.06);
                        const int notch = runif(r, 0, 1) < 0.3;
                        const double fx = runif(r, 0.35, 0.6), fy = runif(r, 0.35, 0.6);
                        double xy[12], big[8];
                        int n = rect_pts(cx, cy, a, b, ang, notch, fx, fy, xy);
                        rect_pts(cx, cy, a + 4, b + 4, ang, 0, 0, 0, big);
                        OGRGeometryH cand = make_poly(big, 4);
                        OGREnvelope e;
                        OGR_G_GetEnvelope(cand, &e);
                        int bad = !inside(g, cx, cy, 4) || conflicts(g, cand, &e);
                        OGR_G_DestroyGeometry(cand);
                        if (bad) continue;
                        feat *f = NULL;
                        st = add_feat(g, C_BUILDING, make_poly(xy, n), &f);
                        if (st) break;
                        const int kind = rint_n(r, 6);
                        const double kk = runif(r, 0.85, 1.15);
                        for (int bb = 0; bb < 4; bb++) f->spec[bb] = (float)(roofs[kind][bb] * kk * runif(r, 0.95, 1.05));
                        f->kind = kind;
                        f->cx = cx, f->cy = cy, f->angle = ang;
                        f->height = runif(r, 3.5, town ? 12 : 8);
                        f->gable = kind != 3 && runif(r, 0, 1) < 0.55;
                    }
            }
            acc -= seg;
        }
    }
    return st;
}

static void rand_center(gen *g, double m, double *cx, double *cy)
{
    *cx = g->ox + runif(&g->r, m, 1 - m) * g->Wm;
    *cy = g->oy - runif(&g->r, m, 1 - m) * g->Hm;
}

static ts_status make_vegetation_soil(gen *g)
{
    rng *r = &g->r;
    ts_status st = TS_OK;
    double cx, cy, xy[8];
    const int n_forest = (int)fmax(1, lround(7 * g->A));
    for (int i = 0; i < n_forest && !st; i++) {
        rand_center(g, 0.05, &cx, &cy);
        feat *f = NULL;
        st = add_feat(g, C_VEG, make_blob(r, cx, cy, fmin(runif(r, 100, 230), 0.22 * g->Sm), runif(r, 1, 1.7), runif(r, 0, M_PI)), &f);
        if (st) break;
        f->kind = 0;
        const float base[4] = {330, 600, 360, 3300};
        for (int b = 0; b < 4; b++) f->spec[b] = (float)(base[b] * runif(r, 0.88, 1.12));
    }
    const int n_field = (int)fmax(2, lround(26 * g->A));
    for (int i = 0; i < n_field && !st; i++) {
        rand_center(g, 0.05, &cx, &cy);
        const double a = fmin(runif(r, 110, 280), 0.4 * g->Sm), b = fmin(runif(r, 80, 190), 0.3 * g->Sm);
        const double ang = runif(r, 0, M_PI);
        rect_pts(cx, cy, a, b, ang, 0, 0, 0, xy);
        feat *f = NULL;
        st = add_feat(g, C_VEG, make_poly(xy, 4), &f);
        if (st) break;
        f->kind = 1;
        f->spec[0] = (float)runif(r, 400, 520), f->spec[1] = (float)runif(r, 720, 1000);
        f->spec[2] = (float)runif(r, 430, 600), f->spec[3] = (float)runif(r, 3300, 4500);
        f->angle = ang + (rint_n(r, 2) ? M_PI / 2 : 0);
        f->period = runif(r, 3, 6);
    }
    static const float soils[3][4] = {{1150, 1450, 1850, 2400}, {1350, 1650, 2050, 2750}, {900, 1150, 1500, 2050}};
    const int n_sblob = (int)fmax(1, lround(14 * g->A)), n_sfield = (int)fmax(1, lround(12 * g->A));
    for (int i = 0; i < n_sblob + n_sfield && !st; i++) {
        rand_center(g, 0.05, &cx, &cy);
        feat *f = NULL;
        const int field = i >= n_sblob;
        const double ang = runif(r, 0, M_PI);
        if (field) {
            rect_pts(cx, cy, fmin(runif(r, 90, 220), 0.35 * g->Sm), fmin(runif(r, 60, 160), 0.3 * g->Sm), ang, 0, 0, 0, xy);
            st = add_feat(g, C_SOIL, make_poly(xy, 4), &f);
        } else {
            st = add_feat(g, C_SOIL, make_blob(r, cx, cy, fmin(runif(r, 35, 110), 0.15 * g->Sm), runif(r, 1, 1.6), ang), &f);
        }
        if (st) break;
        f->kind = field;
        const int k = rint_n(r, 3);
        const double kk = runif(r, 0.9, 1.1);
        for (int b = 0; b < 4; b++) f->spec[b] = (float)(soils[k][b] * kk);
        f->angle = ang;
        f->period = runif(r, 2.5, 5);
    }
    return st;
}

/* ---- rendering ------------------------------------------------------------ */

typedef struct render {
    const demo_scene_params *p;
    int W, H;
    const int32_t *obj;    /* 0 background, else 1 + index into feats */
    const feat **feats;    /* in burn order */
    const uint8_t *shadow; /* W*H */
    uint64_t s;            /* noise seed base */
} render;

enum { S_ILL = 1, S_BG, S_BGF, S_BGF2, S_TREE, S_TREE2, S_FIELD, S_WAT, S_ROAD, S_ROADL, S_ROOF, S_SOIL, S_SOILF, S_WEED, S_SENS };

static void render_pixel(const render *R, int col, int row, float out[4])
{
    const double ps = R->p->pixel_size;
    const double X = (col + 0.5) * ps, Y = (row + 0.5) * ps; /* metres from the upper-left corner, Y down */
    const uint64_t s = R->s;
    const int32_t o = R->obj[(size_t)row * R->W + col];
    const feat *f = o ? R->feats[o - 1] : NULL;
    const int cls = f ? f->cls : C_BG;
    double v[4], k = 1;
    static const double green[4] = {470, 800, 520, 3100}, dry[4] = {760, 980, 1150, 2250};
    switch (cls) {
    case C_BG:
    default: {
        /* Meadow and rough ground between the mapped features: from moderately
         * green to dry, never as lush as the forest and crops of the vegetation
         * class (red stays above ~650, NIR below ~2900), as in a dry-season
         * scene where the spectral gap is what separates the two. */
        const double t = 0.6 + 0.35 * tanh(1.5 * fbm(s + S_BG, X, Y, 90, 3));
        for (int b = 0; b < 4; b++) v[b] = green[b] + t * (dry[b] - green[b]);
        k = 1 + 0.07 * vnoise(s + S_BGF, X / 2.5, Y / 2.5) + 0.04 * vnoise(s + S_BGF2, X / 1.2, Y / 1.2);
        break;
    }
    case C_VEG:
        for (int b = 0; b < 4; b++) v[b] = f->spec[b];
        if (f->kind == 0) { /* forest crowns with gaps */
            const double c = vnoise(s + S_TREE, X / 3.5, Y / 3.5) + 0.5 * vnoise(s + S_TREE2, X / 1.7, Y / 1.7);
            k = 1 + 0.2 * c;
            if (c < -0.6) k *= 0.55;
        } else { /* crop rows */
            const double u = X * cos(f->angle) - Y * sin(f->angle);
            k = 1 + 0.06 * sin(2 * M_PI * u / f->period) + 0.08 * fbm(s + S_FIELD + (uint64_t)o * 7919, X, Y, 30, 2);
        }
        break;
    case C_WATER:
        for (int b = 0; b < 4; b++) v[b] = f->spec[b];
        k = 1 + 0.05 * fbm(s + S_WAT, X, Y, 40, 2);
        break;
    case C_ROAD:
        for (int b = 0; b < 4; b++) v[b] = f->spec[b];
        k = 1 + 0.05 * vnoise(s + S_ROAD, X / 1.5, Y / 1.5) + 0.05 * fbm(s + S_ROADL, X, Y, 25, 2);
        break;
    case C_BUILDING: {
        for (int b = 0; b < 4; b++) v[b] = f->spec[b];
        k = 1 + 0.03 * vnoise(s + S_ROOF, X / 1.2, Y / 1.2);
        if (f->gable) { /* two roof halves lit differently, ridge along the long side */
            const double wx = R->p->origin_x + X, wy = R->p->origin_y - Y;
            const double d = -(wx - f->cx) * sin(f->angle) + (wy - f->cy) * cos(f->angle);
            k *= d > 0 ? 1.07 : 0.8;
        }
        break;
    }
    case C_SOIL: {
        for (int b = 0; b < 4; b++) v[b] = f->spec[b];
        k = 1 + 0.1 * fbm(s + S_SOIL, X, Y, 12, 3) + 0.05 * vnoise(s + S_SOILF, X / 1.3, Y / 1.3);
        if (f->kind == 1) {
            const double u = X * cos(f->angle) - Y * sin(f->angle);
            k += 0.08 * sin(2 * M_PI * u / f->period);
        }
        const double w = clampd(fbm(s + S_WEED, X, Y, 6, 2) - 0.35, 0, 1) * 0.9; /* sparse weeds */
        for (int b = 0; b < 4; b++) v[b] += w * (green[b] - v[b]);
        break;
    }
    }
    k *= 1 + 0.05 * fbm(s + S_ILL, X, Y, 400, 2);
    if (cls != C_BUILDING && R->shadow[(size_t)row * R->W + col]) {
        static const double sh[4] = {0.5, 0.44, 0.41, 0.37};
        for (int b = 0; b < 4; b++) v[b] *= sh[b];
    }
    for (int b = 0; b < 4; b++) out[b] = (float)(v[b] * k);
}

/* Shadows of buildings, cast away from a sun in the south-east, 50 degrees up. */
static void cast_shadows(const render *R, uint8_t *shadow)
{
    const double dc = -0.70710678, dr = -0.70710678, tan_elev = 1.19175359;
    const int W = R->W, H = R->H;
    for (int row = 0; row < H; row++)
        for (int col = 0; col < W; col++) {
            const int32_t o = R->obj[(size_t)row * W + col];
            if (!o || R->feats[o - 1]->cls != C_BUILDING) continue;
            const double len = R->feats[o - 1]->height / tan_elev / R->p->pixel_size;
            for (double t = 0.5; t <= len; t += 0.5) {
                const int c = (int)lround(col + dc * t), r = (int)lround(row + dr * t);
                if (c < 0 || r < 0 || c >= W || r >= H) break;
                const int32_t q = R->obj[(size_t)r * W + c];
                if (!q || R->feats[q - 1]->cls != C_BUILDING) shadow[(size_t)r * W + c] = 1;
            }
        }
}

/* ---- the whole job -------------------------------------------------------- */

static ts_status check_params(const demo_scene_params *p)
{
    if (p->width < 64 || p->height < 64 || p->width > 32768 || p->height > 32768)
        return ts_error(TS_ERR_INVALID_ARG, "demo scene: size %dx%d is outside 64..32768 pixels a side", p->width,
                        p->height);
    if (!(p->pixel_size >= 0.25 && p->pixel_size <= 10))
        return ts_error(TS_ERR_INVALID_ARG, "demo scene: pixel size %g m is outside 0.25..10", p->pixel_size);
    return TS_OK;
}

static ts_status write_labels(const char *path, OGRSpatialReferenceH srs, const feat **feats, int n)
{
    GDALDriverH drv = GDALGetDriverByName("GPKG");
    GDALDatasetH ds = drv ? GDALCreate(drv, path, 0, 0, 0, GDT_Unknown, NULL) : NULL;
    if (!ds) return ts_gdal_error(TS_ERR_IO, "demo scene: cannot create the labels '%s'", path);
    ts_status st = TS_OK;
    OGRLayerH lay = GDALDatasetCreateLayer(ds, "labels", srs, wkbMultiPolygon, NULL);
    OGRFieldDefnH fc = OGR_Fld_Create("class", OFTInteger), fn = OGR_Fld_Create("class_name", OFTString);
    OGR_Fld_SetWidth(fn, 16);
    if (!lay || OGR_L_CreateField(lay, fc, TRUE) != OGRERR_NONE || OGR_L_CreateField(lay, fn, TRUE) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_IO, "demo scene: cannot create the layer 'labels' in '%s'", path);
    OGR_Fld_Destroy(fc);
    OGR_Fld_Destroy(fn);
    if (!st && GDALDatasetStartTransaction(ds, FALSE) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_IO, "demo scene: cannot start a transaction in '%s'", path);
    OGRFeatureDefnH defn = lay ? OGR_L_GetLayerDefn(lay) : NULL;
    for (int i = 0; i < n && !st; i++) {
        OGRFeatureH f = OGR_F_Create(defn);
        OGR_F_SetFieldInteger(f, 0, feats[i]->cls);
        OGR_F_SetFieldString(f, 1, demo_classes[feats[i]->cls].name);
        OGRGeometryH g = OGR_G_ForceToMultiPolygon(OGR_G_Clone(feats[i]->g));
        OGR_F_SetGeometryDirectly(f, g);
        if (OGR_L_CreateFeature(lay, f) != OGRERR_NONE)
            st = ts_gdal_error(TS_ERR_IO, "demo scene: cannot write feature %d to '%s'", i, path);
        OGR_F_Destroy(f);
    }
    if (!st && GDALDatasetCommitTransaction(ds) != OGRERR_NONE)
        st = ts_gdal_error(TS_ERR_IO, "demo scene: cannot commit the labels '%s'", path);
    GDALClose(ds);
    return st;
}

static ts_status write_image(const render *R, const char *path, const char *wkt)
{
    const int W = R->W, H = R->H;
    const demo_scene_params *p = R->p;
    GDALDriverH drv = GDALGetDriverByName("GTiff");
    char **co = NULL;
    co = CSLSetNameValue(co, "TILED", "YES");
    co = CSLSetNameValue(co, "BLOCKXSIZE", "256");
    co = CSLSetNameValue(co, "BLOCKYSIZE", "256");
    co = CSLSetNameValue(co, "COMPRESS", "DEFLATE");
    co = CSLSetNameValue(co, "PREDICTOR", "2");
    co = CSLSetNameValue(co, "INTERLEAVE", "PIXEL");
    co = CSLSetNameValue(co, "PHOTOMETRIC", "MINISBLACK");
    co = CSLSetNameValue(co, "BIGTIFF", "IF_SAFER");
    GDALDatasetH ds = drv ? GDALCreate(drv, path, W, H, 4, GDT_UInt16, co) : NULL;
    CSLDestroy(co);
    if (!ds) return ts_gdal_error(TS_ERR_IO, "demo scene: cannot create the image '%s'", path);
    double gt[6] = {p->origin_x, p->pixel_size, 0, p->origin_y, 0, -p->pixel_size};
    static const char *names[4] = {"blue", "green", "red", "nir"};
    static const GDALColorInterp ci[4] = {GCI_BlueBand, GCI_GreenBand, GCI_RedBand, GCI_Undefined};
    GDALSetGeoTransform(ds, gt);
    GDALSetProjection(ds, wkt);
    for (int b = 0; b < 4; b++) {
        GDALRasterBandH band = GDALGetRasterBand(ds, b + 1);
        GDALSetDescription(band, names[b]);
        GDALSetRasterColorInterpretation(band, ci[b]);
    }
    enum { STRIP = 256 };
    float *clean = malloc((size_t)(STRIP + 2) * W * 4 * sizeof *clean);
    uint16_t *outb = malloc((size_t)STRIP * W * 4 * sizeof *outb);
    ts_status st = TS_OK;
    if (!clean || !outb) st = ts_error(TS_ERR_NOMEM, "demo scene: out of memory for a strip of %d rows", STRIP);
    for (int r0 = 0; r0 < H && !st; r0 += STRIP) {
        const int n = H - r0 < STRIP ? H - r0 : STRIP;
        /* Rows r0-1 .. r0+n, clamped at the scene's edges. */
#pragma omp parallel for schedule(static)
        for (int i = 0; i < n + 2; i++) {
            int row = r0 - 1 + i;
            row = row < 0 ? 0 : row >= H ? H - 1 : row;
            float *dst = clean + (size_t)i * W * 4;
            for (int col = 0; col < W; col++) render_pixel(R, col, row, dst + (size_t)col * 4);
        }
        /* A [1 2 1]^2 / 16 blur (mixed pixels at edges), then sensor noise. */
#pragma omp parallel for schedule(static)
        for (int i = 0; i < n; i++) {
            const int row = r0 + i;
            for (int col = 0; col < W; col++) {
                const int cl = col > 0 ? col - 1 : 0, cr = col + 1 < W ? col + 1 : W - 1;
                for (int b = 0; b < 4; b++) {
                    double acc = 0;
                    for (int j = 0; j < 3; j++) {
                        const float *line = clean + (size_t)(i + j) * W * 4;
                        const double wj = j == 1 ? 2 : 1;
                        acc += wj * (line[(size_t)cl * 4 + b] + 2.0 * line[(size_t)col * 4 + b] + line[(size_t)cr * 4 + b]);
                    }
                    double v = acc / 16;
                    v += gauss(R->s + S_SENS + (uint64_t)b * 16, col, row) * (12 + 0.02 * v);
                    outb[((size_t)b * n + i) * W + col] = (uint16_t)lround(clampd(v, 1, 10000));
                }
            }
        }
        if (GDALDatasetRasterIO(ds, GF_Write, 0, r0, W, n, outb, W, n, GDT_UInt16, 4, NULL, 0, 0, 0) != CE_None)
            st = ts_gdal_error(TS_ERR_IO, "demo scene: writing rows %d..%d of '%s'", r0, r0 + n - 1, path);
    }
    free(clean);
    free(outb);
    CPLErrorReset();
    GDALClose(ds);
    if (!st && CPLGetLastErrorType() >= CE_Failure) st = ts_gdal_error(TS_ERR_IO, "demo scene: closing '%s'", path);
    return st;
}

ts_status demo_scene_write(const demo_scene_params *p, const char *image_path, const char *labels_path, int overwrite,
                           demo_scene_report *rep)
{
    ts_status st = check_params(p);
    if (st) return st;
    if (rep) {
        const int keep = rep->keep_classes;
        memset(rep, 0, sizeof *rep);
        rep->keep_classes = keep;
    }
    ts_gdal_init();
    OGRSpatialReferenceH srs = OSRNewSpatialReference(NULL);
    char *wkt = NULL;
    if (OSRImportFromEPSG(srs, p->epsg) != OGRERR_NONE || !OSRIsProjected(srs) || OSRExportToWkt(srs, &wkt) != OGRERR_NONE) {
        OSRDestroySpatialReference(srs);
        CPLFree(wkt);
        return ts_gdal_error(TS_ERR_INVALID_ARG, "demo scene: EPSG:%d is not a known projected CRS", p->epsg);
    }
    OSRSetAxisMappingStrategy(srs, OAMS_TRADITIONAL_GIS_ORDER);
    ts_gdal_out oimg = {0}, olab = {0};
    st = ts_gdal_out_begin(&oimg, image_path, overwrite, "demo image");
    if (!st) st = ts_gdal_out_begin(&olab, labels_path, overwrite, "demo labels");
    if (!st && strcmp(oimg.path, olab.path) == 0)
        st = ts_error(TS_ERR_INVALID_ARG, "demo scene: the image and the labels are the same file '%s'", image_path);

    gen g;
    memset(&g, 0, sizeof g);
    g.r.s = mix64(p->seed ^ 0x5deece66dULL);
    g.ox = p->origin_x, g.oy = p->origin_y;
    g.Wm = p->width * p->pixel_size, g.Hm = p->height * p->pixel_size;
    g.Sm = fmin(g.Wm, g.Hm);
    g.A = g.Wm * g.Hm / (2048.0 * 2048.0);
    if (!st) st = make_roads(&g);
    if (!st) st = make_water(&g);
    if (!st) st = make_buildings(&g);
    if (!st) st = make_vegetation_soil(&g);

    /* Features in burn order. */
    int nf = 0;
    for (int c = 0; c < DEMO_NCLASSES; c++) nf += g.f[c].n;
    const feat **feats = malloc((size_t)(nf ? nf : 1) * sizeof *feats);
    if (!feats && !st) st = ts_error(TS_ERR_NOMEM, "demo scene: out of memory");
    if (!st) {
        int k = 0;
        for (int i = 0; i < 5; i++)
            for (int j = 0; j < g.f[burn_order[i]].n; j++) feats[k++] = &g.f[burn_order[i]].v[j];
    }
    if (!st) st = write_labels(olab.tmp, srs, feats, nf);

    /* Object ids on the image grid: the features rasterized in layer order. */
    const size_t npx = (size_t)p->width * p->height;
    int32_t *obj = NULL;
    uint8_t *shadow = NULL;
    if (!st) {
        obj = calloc(npx, sizeof *obj);
        shadow = calloc(npx, 1);
        if (!obj || !shadow) st = ts_error(TS_ERR_NOMEM, "demo scene: out of memory for %dx%d pixels", p->width, p->height);
    }
    if (!st && nf > 0) {
        GDALDriverH mem = GDALGetDriverByName("MEM");
        GDALDatasetH ds = mem ? GDALCreate(mem, "", p->width, p->height, 0, GDT_Int32, NULL) : NULL;
        char opt_ptr[64], opt_pix[32], opt_line[64];
        snprintf(opt_ptr, sizeof opt_ptr, "DATAPOINTER=%p", (void *)obj);
        snprintf(opt_pix, sizeof opt_pix, "PIXELOFFSET=%zu", sizeof(int32_t));
        snprintf(opt_line, sizeof opt_line, "LINEOFFSET=%zu", (size_t)p->width * sizeof(int32_t));
        char *band_opts[] = {opt_ptr, opt_pix, opt_line, NULL};
        double gt[6] = {p->origin_x, p->pixel_size, 0, p->origin_y, 0, -p->pixel_size};
        OGRGeometryH *geoms = malloc((size_t)nf * sizeof *geoms);
        double *vals = malloc((size_t)nf * sizeof *vals);
        if (!ds || !geoms || !vals || GDALAddBand(ds, GDT_Int32, band_opts) != CE_None ||
            GDALSetGeoTransform(ds, gt) != CE_None || GDALSetProjection(ds, wkt) != CE_None) {
            st = ts_gdal_error(TS_ERR_BACKEND, "demo scene: cannot set up the class raster");
        } else {
            for (int i = 0; i < nf; i++) geoms[i] = feats[i]->g, vals[i] = i + 1;
            char *ropts[] = {"ALL_TOUCHED=FALSE", NULL};
            int band = 1;
            if (GDALRasterizeGeometries(ds, 1, &band, nf, geoms, NULL, NULL, vals, ropts, NULL, NULL) != CE_None)
                st = ts_gdal_error(TS_ERR_BACKEND, "demo scene: rasterizing the features");
        }
        if (ds) GDALClose(ds);
        free(geoms);
        free(vals);
    }
    if (!st) {
        render R = {p, p->width, p->height, obj, feats, shadow, mix64(p->seed + 0x1234567ULL)};
        cast_shadows(&R, shadow);
        st = write_image(&R, oimg.tmp, wkt);
    }
    if (!st && rep) {
        if (rep->keep_classes && !(rep->classes = malloc(npx)))
            st = ts_error(TS_ERR_NOMEM, "demo scene: out of memory for the class raster");
        for (size_t i = 0; i < npx && !st; i++) {
            const int c = obj[i] ? feats[obj[i] - 1]->cls : C_BG;
            rep->pixels[c]++;
            if (rep->classes) rep->classes[i] = (uint8_t)c;
        }
        for (int c = 0; c < DEMO_NCLASSES; c++) rep->features[c] = g.f[c].n;
    }
    if (!st) st = ts_gdal_out_commit(&olab);
    if (!st) st = ts_gdal_out_commit(&oimg);
    if (st) {
        ts_gdal_out_abort(&olab);
        ts_gdal_out_abort(&oimg);
        if (rep) {
            free(rep->classes);
            rep->classes = NULL;
        }
    }
    free(obj);
    free(shadow);
    free(feats);
    for (int c = 0; c < DEMO_NCLASSES; c++) {
        for (int i = 0; i < g.f[c].n; i++) OGR_G_DestroyGeometry(g.f[c].v[i].g);
        free(g.f[c].v);
    }
    for (int i = 0; i < g.n_lines; i++) OGR_G_DestroyGeometry(g.lines[i]);
    free(g.lines);
    free(g.line_w);
    free(g.line_town);
    CPLFree(wkt);
    OSRDestroySpatialReference(srs);
    return st;
}
