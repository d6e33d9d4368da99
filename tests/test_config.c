/* train/config.c: the schema table itself (unique keys, contiguous sections,
 * every default parses), the defaults, every value type from YAML and from
 * --set, exact round trips (format -> parse -> equal, format again ->
 * identical text), every error kind with its message (file, line, key,
 * suggestion), the cross-field checks, the builders the trainer uses, every
 * example in docs/examples, and the generated key reference in
 * docs/training-config.md (which must equal the table's Markdown).
 *
 * `test_config --write-docs` regenerates that part of docs/training-config.md. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/fixture.h"
#include "tests/testutil.h"
#include "train/config.h"

#define DOC_BEGIN "<!-- BEGIN GENERATED KEY REFERENCE (tests/test_config --write-docs) -->\n"
#define DOC_END "<!-- END GENERATED KEY REFERENCE -->"

static const char *tmp_path(const char *name) { return tu_path(name); }

static int write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    fputs(text, f);
    return fclose(f) == 0;
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    if (s && fread(s, 1, (size_t)n, f) != (size_t)n) {
        free(s);
        s = NULL;
    }
    if (s) s[n] = '\0';
    fclose(f);
    return s;
}

static const char *docs_dir(void)
{
    static char buf[1024];
    snprintf(buf, sizeof buf, "%s/../../docs", fx_dir());
    return buf;
}

/* A valid minimal configuration of 6 lines; snippets are appended from line 7. */
static const char *BASE = "output: out\n"
                          "classes: [background, building]\n"
                          "data:\n"
                          "  images: [a.tif]\n"
                          "labels:\n"
                          "  path: a.gpkg\n";

static ts_status parse_with(const char *snippet, ts_train_config *c)
{
    char text[8192];
    snprintf(text, sizeof text, "%s%s", BASE, snippet);
    return ts_train_config_parse_string(text, "t.yaml", c);
}

/* parse error with every given substring (NULLs skipped) */
static void expect_parse_error(const char *snippet, const char *a, const char *b, const char *d)
{
    ts_train_config c;
    ts_status st = parse_with(snippet, &c);
    char what[256];
    snprintf(what, sizeof what, "parse error for \"%.180s\"", snippet);
    tu_expect_error(st, TS_ERR_INVALID_ARG, what, a, b ? b : a, d ? d : a, NULL);
    ts_train_config_free(&c);
}

/* parses, then fails validation with the substrings */
static void expect_invalid(const char *snippet, const char *a, const char *b, const char *d)
{
    ts_train_config c;
    char what[256];
    snprintf(what, sizeof what, "validation error for \"%.180s\"", snippet);
    if (!tu_expect_ok(parse_with(snippet, &c), what)) {
        ts_train_config_free(&c);
        return;
    }
    tu_expect_error(ts_train_config_validate(&c), TS_ERR_INVALID_ARG, what, a, b ? b : a, d ? d : a, NULL);
    ts_train_config_free(&c);
}

static void expect_set_error(ts_train_config *c, const char *set, const char *a, const char *b)
{
    char *before = NULL, *after = NULL;
    ts_train_config_format(c, &before);
    char what[256];
    snprintf(what, sizeof what, "--set %s", set);
    tu_expect_error(ts_train_config_set(c, set), TS_ERR_INVALID_ARG, what, a, b ? b : a, NULL);
    ts_train_config_format(c, &after);
    tu_expect(before && after && !strcmp(before, after), "--set %s: a failed --set changed the configuration", set);
    free(before);
    free(after);
}

/* format -> parse -> equal, and format(parse(format(c))) == format(c) */
static void check_round_trip(const ts_train_config *c, const char *what)
{
    char *y1 = NULL, *y2 = NULL;
    ts_train_config d;
    if (!tu_expect_ok(ts_train_config_format(c, &y1), what)) return;
    if (!tu_expect_ok(ts_train_config_parse_string(y1, "checkpoint", &d), what)) {
        printf("%s\n", y1);
        free(y1);
        return;
    }
    tu_expect(ts_train_config_equal(c, &d), "%s: round trip format -> parse gives another configuration", what);
    tu_expect_ok(ts_train_config_format(&d, &y2), what);
    tu_expect(y2 && !strcmp(y1, y2), "%s: format(parse(format(c))) differs from format(c)", what);
    ts_train_config_free(&d);
    free(y1);
    free(y2);
}

/* ---- the table ------------------------------------------------------------------ */
static void test_schema(void)
{
    int n;
    const ts_cfg_key *s = ts_train_config_schema(&n);
    tu_expect(n > 80, "schema: %d keys", n);
    for (int i = 0; i < n; i++) {
        tu_expect(s[i].help && strlen(s[i].help) > 8, "schema: '%s' has help text", s[i].key);
        tu_expect(s[i].def != NULL, "schema: '%s' has a default", s[i].key);
        tu_expect(s[i].type != TS_CFG_ENUM || s[i].choices, "schema: enum '%s' has choices", s[i].key);
        for (int j = 0; j < i; j++) {
            tu_expect(strcmp(s[i].key, s[j].key) != 0, "schema: '%s' appears twice", s[i].key);
            size_t l = strlen(s[j].key);
            tu_expect(!(strncmp(s[i].key, s[j].key, l) == 0 && s[i].key[l] == '.'),
                      "schema: '%s' is both a key and a section of '%s'", s[j].key, s[i].key);
        }
    }
    /* sections contiguous: once left, a section (any prefix) never comes back */
    for (int i = 1; i < n; i++) {
        const char *k = s[i].key;
        for (const char *dot = strchr(k, '.'); dot; dot = strchr(dot + 1, '.')) {
            size_t l = (size_t)(dot - k);
            int in_prev = strncmp(s[i - 1].key, k, l) == 0 && s[i - 1].key[l] == '.';
            if (in_prev) continue;
            for (int j = 0; j < i - 1; j++)
                tu_expect(!(strncmp(s[j].key, k, l) == 0 && s[j].key[l] == '.'),
                          "schema: section '%.*s' is split (key '%s' comes after another section)", (int)l, k, k);
        }
    }
}

static void test_defaults(void)
{
    ts_train_config c;
    if (!tu_expect_ok(ts_train_config_init(&c), "init (every default parses)")) return;
    tu_expect(c.version == 1 && c.output == NULL && c.seed == 0 && c.device == TS_DEVICE_CPU && c.threads == 0,
              "defaults: top level");
    tu_expect(c.ignore_id == 255 && c.classes.n == 0, "defaults: ignore_id 255");
    tu_expect(c.loss.dice_weight == 0.5 && c.loss.dice == TS_DICE_PER_IMAGE && c.loss.dice_eps == 1e-7 &&
                  c.loss.dice_smooth == 0 && !c.loss.dice_log && c.loss.class_weights.n == 0,
              "defaults: loss 0.5 CE + 0.5 tutorial Dice");
    tu_expect(c.optimizer.lr == 3e-4 && c.optimizer.weight_decay == 1e-4 && c.optimizer.betas.n == 2 &&
                  c.optimizer.betas.v[0] == 0.9 && c.optimizer.betas.v[1] == 0.999 && c.optimizer.eps == 1e-8 &&
                  !c.optimizer.no_decay_bn_bias,
              "defaults: AdamW 3e-4, 1e-4, (0.9, 0.999), 1e-8, decay on every parameter");
    tu_expect(c.schedule.kind == TS_LR_COSINE && c.schedule.interval == TS_LR_PER_EPOCH &&
                  c.schedule.t_max == 0 && c.schedule.eta_min == 0 && c.schedule.warmup_steps == 0,
              "defaults: cosine per epoch over the run");
    tu_expect(c.model.encoder_depth == 5 && c.model.decoder_channels.n == 5 && c.model.decoder_channels.v[0] == 256 &&
                  c.model.decoder_channels.v[4] == 16 && c.model.decoder_batchnorm && c.model.init == TS_INIT_SCRATCH,
              "defaults: SMP's Unet");
    tu_expect(isnan(c.data.nodata) && c.data.normalize.kind == TS_NORM_MEANSTD_STATS &&
                  c.data.normalize.percentiles.n == 2 && c.data.normalize.percentiles.v[1] == 98 &&
                  c.data.warp.resampling && !strcmp(c.data.warp.resampling, "bilinear"),
              "defaults: data");
    tu_expect(c.split.ratios.n == 3 && c.split.ratios.v[0] == 0.8 && c.split.buffer == 1 && c.windows.tile == 256,
              "defaults: windows and split");
    tu_expect(c.train.epochs == 50 && c.train.batch_size == 8 && c.train.accumulate == 1 && c.train.grad_clip == 0 &&
                  c.augment.d4 == 1 && c.loader.workers == 2,
              "defaults: train, augment, loader");
    /* required keys */
    tu_expect_error(ts_train_config_validate(&c), TS_ERR_INVALID_ARG, "defaults alone are incomplete",
                    "missing required key 'output'", NULL);
    check_round_trip(&c, "defaults");
    ts_train_config_free(&c);
    ts_train_config_free(&c); /* twice is fine */
}

/* ---- every type from YAML ----------------------------------------------------------- */
static void test_types(void)
{
    const char *yaml =
        "version: 1\n"
        "output: \"runs/a b: c #1\"\n"
        "seed: 9007199254740991\n"
        "device: cuda\n"
        "classes:\n"
        "  - {id: 1, name: \"true\"}\n"
        "  - name: \"zero: 0\"\n"
        "    id: 0\n"
        "  - {id: 2, name: \"caf\u00e9 \\\"quoted\\\"\"}\n"
        "ignore_id: 254\n"
        "data:\n"
        "  images: single.tif\n" /* a scalar for a list */
        "  bands: [4, 3, 2, 8]\n"
        "  indices: [ndvi, ndwi]\n"
        "  index_bands: {red: 3, green: 2, nir: 4}\n"
        "  nodata: -9999.5\n"
        "  normalize:\n"
        "    kind: scale\n"
        "    scale: [1e-4, 0.0001, 2.5e-4, 1.0e-4, 1, 1]\n"
        "    offset: -0.1\n"
        "  warp: {crs: \"EPSG:32633\", resolution: [10, 10.5], resampling: cubic, tap: true}\n"
        "labels:\n"
        "  path: [l1.gpkg]\n"
        "  attribute: kind\n"
        "  class_map: {\"a,b\": 1, road: 2, \"123\": 0}\n"
        "  layer: ~\n"
        "labels.all_touched: True\n" /* a dotted key at the top level */
        "optimizer:\n"
        "  lr: 0.001\n"
        "  betas: [0.8, 0.99]\n"
        "schedule.t_max: 12\n"
        "train:\n"
        "  epochs: 12\n"
        "augment:\n" /* an empty section */
        "loader: {workers: 0, prefetch: 1, shuffle: false}\n";
    ts_train_config c;
    if (!tu_expect_ok(ts_train_config_parse_string(yaml, "types.yaml", &c), "every type")) return;
    tu_expect(!strcmp(c.output, "runs/a b: c #1") && c.seed == 9007199254740991LL && c.device == TS_DEVICE_CUDA,
              "types: string, int64, enum");
    tu_expect(c.classes.n == 3 && c.classes.v[0].id == 1 && !strcmp(c.classes.v[0].name, "true") &&
                  c.classes.v[1].id == 0 && !strcmp(c.classes.v[1].name, "zero: 0") &&
                  !strcmp(c.classes.v[2].name, "caf\u00e9 \"quoted\""),
              "types: class list");
    tu_expect(c.data.images.n == 1 && !strcmp(c.data.images.v[0], "single.tif"), "types: scalar as a one-item list");
    tu_expect(c.data.bands.n == 4 && c.data.bands.v[3] == 8 && c.data.indices.n == 2 && c.data.index_bands.nir == 4,
              "types: list of int, list of enum names, nested section");
    tu_expect(c.data.nodata == -9999.5 && c.data.normalize.kind == TS_NORM_SCALE && c.data.normalize.scale.n == 6 &&
                  c.data.normalize.scale.v[0] == 1e-4 && c.data.normalize.scale.v[2] == 2.5e-4 &&
                  c.data.normalize.offset.n == 1 && c.data.normalize.offset.v[0] == -0.1,
              "types: floats");
    tu_expect(!strcmp(c.data.warp.crs, "EPSG:32633") && c.data.warp.resolution.v[1] == 10.5 && c.data.warp.tap,
              "types: flow mapping");
    tu_expect(c.labels.class_map.n == 3 && !strcmp(c.labels.class_map.names[0], "a,b") &&
                  c.labels.class_map.ids[1] == 2 &&
                  c.labels.layer == NULL && c.labels.all_touched,
              "types: id map, null, dotted key, True");
    tu_expect(c.optimizer.lr == 0.001 && c.optimizer.betas.v[0] == 0.8 && c.schedule.t_max == 12 &&
                  c.loader.workers == 0 && !c.loader.shuffle && c.augment.d4,
              "types: the rest");
    tu_expect_ok(ts_train_config_validate(&c), "types: validates");
    check_round_trip(&c, "every type");
    char *y = NULL;
    ts_train_config_format(&c, &y);
    tu_expect(y && strstr(y, "\noptimizer:\n  name: adamw\n  lr: 0.001\n") &&
                  strstr(y, "  normalize:\n    kind: scale\n"
                            "    scale: [0.0001, 0.0001, 0.00025, 0.0001, 1.0, 1.0]\n") &&
                  strstr(y, "\nclasses:\n  - {id: 1, name: \"true\"}\n  - {id: 0, name: \"zero: 0\"}\n") &&
                  strstr(y, "  nodata: -9999.5\n") && strstr(y, "  layer: null\n") &&
                  strstr(y, "  images:\n    - single.tif\n") && strstr(y, "  class_map:\n    \"a,b\": 1\n") &&
                  strstr(y, "seed: 9007199254740991\n") && !strstr(y, " \n"),
              "format: nested, shortest numbers, quoting, block lists, no trailing blanks");
    free(y);
    ts_train_config_free(&c);
}

/* ---- --set -------------------------------------------------------------------------- */
static void test_set(void)
{
    ts_train_config c;
    if (!tu_expect_ok(parse_with("", &c), "set: base")) return;
    const char *sets[] = {"optimizer.lr=1e-3",
                          "train.epochs = 7",
                          "data.bands=1,2,3",
                          "data.normalize.kind=meanstd",
                          "data.normalize.mean=[0.5]",
                          "data.normalize.std=0.25",
                          "data.images=[x.tif, \"y, z.tif\"]",
                          "labels.path=p.gpkg",
                          "labels.attribute=cls",
                          "labels.class_map=building=1, other=0",
                          "classes=bg,building",
                          "output=runs/set test",
                          "labels.layer=null",
                          "data.nodata=0",
                          "augment.d4=false",
                          "schedule.kind=step",
                          "seed=123",
                          "model.decoder_channels=[128, 64, 32]",
                          "model.encoder_depth=3"};
    for (size_t i = 0; i < sizeof sets / sizeof *sets; i++)
        tu_expect_ok(ts_train_config_set(&c, sets[i]), sets[i]);
    tu_expect(c.optimizer.lr == 1e-3 && c.train.epochs == 7 && c.data.bands.n == 3 && c.data.bands.v[2] == 3,
              "set: scalars and comma lists");
    tu_expect(c.data.normalize.mean.n == 1 && c.data.normalize.std.v[0] == 0.25, "set: flow list and scalar list");
    tu_expect(c.data.images.n == 2 && !strcmp(c.data.images.v[1], "y, z.tif"), "set: quoted item in a flow list");
    tu_expect(c.labels.class_map.n == 2 && !strcmp(c.labels.class_map.names[1], "other") &&
                  c.labels.class_map.ids[0] == 1,
              "set: id map");
    tu_expect(c.classes.n == 2 && !strcmp(c.classes.v[1].name, "building") && c.classes.v[1].id == 1,
              "set: classes by position");
    tu_expect(!strcmp(c.output, "runs/set test") && c.labels.layer == NULL && c.data.nodata == 0 && !c.augment.d4 &&
                  c.schedule.kind == TS_LR_STEP && c.seed == 123 && c.model.encoder_depth == 3,
              "set: the rest");
    tu_expect_ok(ts_train_config_validate(&c), "set: validates");
    tu_expect_ok(ts_train_config_set(&c, "classes=[{id: 0, name: a}, {id: 1, name: b}, {id: 2, name: c}]"),
                 "set: classes as YAML");
    tu_expect(c.classes.n == 3 && !strcmp(c.classes.v[2].name, "c"), "set: classes as YAML");
    tu_expect_ok(ts_train_config_set(&c, "data.bands="), "set: empty list");
    tu_expect(c.data.bands.n == 0, "set: empty list");
    tu_expect_ok(ts_train_config_set(&c, "data.normalize.mean=0.5"), "set");
    check_round_trip(&c, "after --set");

    expect_set_error(&c, "optimizer.lrr=1", "unknown key 'optimizer.lrr' in --set 'optimizer.lrr=1'",
                     "did you mean 'optimizer.lr'?");
    expect_set_error(&c, "lr=1", "unknown key 'lr'", "did you mean 'optimizer.lr'?");
    expect_set_error(&c, "optimizer.lr=abc", "'optimizer.lr' in --set 'optimizer.lr=abc'", "'abc' is not a number");
    expect_set_error(&c, "optimizer.lr=0", "'optimizer.lr'", "0 is out of range; expected a number in (0, 10]");
    expect_set_error(&c, "optimizer=1", "'optimizer' is a section", "optimizer.KEY=VALUE");
    expect_set_error(&c, "optimizer.lr", "expected key=value", NULL);
    expect_set_error(&c, "data.bands=1,x,3", "'data.bands'", "item 2: 'x' is not an integer");
    expect_set_error(&c, "data.bands=1,,3", "'data.bands'", "an empty item");
    expect_set_error(&c, "data.bands=[1, 2", "--set 'data.bands=[1, 2'", "YAML syntax error");
    expect_set_error(&c, "optimizer.betas=0.9", "'optimizer.betas'", "expected exactly 2 values, got 1");
    expect_set_error(&c, "optimizer.betas=0.9,1", "'optimizer.betas'", "expected a list of numbers in [0, 1)");
    expect_set_error(&c, "schedule.kind=cosin", "'cosin' is not one of cosine, constant, step",
                     "did you mean 'cosine'?");
    expect_set_error(&c, "augment.d4=yes", "'augment.d4'", "expected true or false");
    expect_set_error(&c, "train.epochs=null", "'train.epochs'", "null is not allowed");
    expect_set_error(&c, "labels.class_map=building", "not name=id", NULL);
    expect_set_error(&c, "labels.class_map=building=x", "'labels.class_map'", "is not an integer >= 0");
    expect_set_error(&c, "data.indices=ndvi,nvdi", "'nvdi' is not one of ndvi, ndwi", "did you mean 'ndvi'?");
    expect_set_error(&c, "data.indices=ndvi,ndvi", "'ndvi' is listed twice", NULL);
    expect_set_error(&c, "train.epochs=1.5", "'1.5' is not an integer", NULL);
    expect_set_error(&c, "seed=-1", "'seed'", "-1 is out of range");
    ts_train_config_free(&c);
}

/* ---- every error kind from a file --------------------------------------------------- */
static void test_errors(void)
{
    /* unknown keys, with the closest valid one */
    expect_parse_error("optimizer:\n  lrr: 0.1\n", "unknown key 'optimizer.lrr' in t.yaml line 8",
                       "did you mean 'optimizer.lr'?", NULL);
    expect_parse_error("lr: 0.1\n", "unknown key 'lr' in t.yaml line 7", "did you mean 'optimizer.lr'?", NULL);
    expect_parse_error("optimiser:\n  lr: 0.1\n", "unknown key 'optimiser' in t.yaml line 7",
                       "did you mean 'optimizer'?", NULL);
    expect_parse_error("data.normalise.kind: none\n", "unknown key 'data.normalise.kind'",
                       "did you mean 'data.normalize.kind'?", NULL);
    expect_parse_error("train:\n  batchsize: 4\n", "unknown key 'train.batchsize'", "did you mean 'train.batch_size'?",
                       NULL);
    expect_parse_error("zzzzzzzzzzzzzzzzzzzz: 1\n", "unknown key 'zzzzzzzzzzzzzzzzzzzz'",
                       "docs/training-config.md", NULL);
    /* wrong types and ranges, with file, line and key */
    expect_parse_error("optimizer:\n  lr: fast\n", "'optimizer.lr' in t.yaml line 8", "'fast' is not a number",
                       "expected a number in (0, 10]");
    expect_parse_error("train: {epochs: 0}\n", "'train.epochs' in t.yaml line 7", "0 is out of range",
                       "an integer in [1, 1000000]");
    expect_parse_error("train:\n  epochs: [1]\n", "'train.epochs' in t.yaml line 8",
                       "expected a single value, got a list",
                       NULL);
    expect_parse_error("augment:\n  d4: yes\n", "'augment.d4' in t.yaml line 8", "expected true or false", NULL);
    expect_parse_error("schedule:\n  kind: cosin\n", "'schedule.kind' in t.yaml line 8", "did you mean 'cosine'?",
                       NULL);
    expect_parse_error("data.bands:\n  - 1\n  - two\n", "'data.bands' in t.yaml line 9", "item 2: 'two'", NULL);
    expect_parse_error("data.bands: [0]\n", "'data.bands'", "0 is out of range", NULL);
    expect_parse_error("data.warp.resampling: bilinaer\n", "'bilinaer' is not one of near, bilinear",
                       "did you mean 'bilinear'?", NULL);
    expect_parse_error("optimizer.betas: [0.9]\n", "'optimizer.betas' in t.yaml line 7", "expected exactly 2 values",
                       NULL);
    expect_parse_error("labels.class_map: [a, b]\n", "'labels.class_map'", "expected a mapping of names to ids", NULL);
    expect_parse_error("labels.class_map: {a: 1, a: 2}\n", "'labels.class_map'", "'a' is given twice", NULL);
    expect_parse_error("train.epochs: ~\n", "'train.epochs'", "null is not allowed", NULL);
    expect_parse_error("optimizer: 3\n", "'optimizer' in t.yaml line 7 is a section", "e.g. name: ...", NULL);
    expect_parse_error("optimizer: {lr: 1e-3}\nseed: 99999999999999999999\n", "'seed' in t.yaml line 8",
                       "is not an integer", NULL);
    expect_parse_error("labels.layer: \"\"\n", "'labels.layer'", "an empty string; use null", NULL);
    /* classes */
    expect_parse_error("classes.x: 1\n", "unknown key 'classes.x'", NULL, NULL);
    expect_parse_error("optimizer.lr: 1e-3\nclasses: [{id: 0}]\n", "duplicate key 'classes'", NULL, NULL);
    /* duplicates: same mapping, and dotted + nested */
    expect_parse_error("train:\n  epochs: 3\n  epochs: 4\n", "duplicate key 'train.epochs' in t.yaml lines 8 and 9",
                       NULL, NULL);
    expect_parse_error("train:\n  epochs: 3\ntrain.epochs: 4\n", "'train.epochs' is set twice in t.yaml: lines 8 and 9",
                       NULL, NULL);
    expect_parse_error("output: again\n", "duplicate key 'output' in t.yaml lines 1 and 7", NULL, NULL);
    /* YAML itself */
    expect_parse_error("train:\n  epochs: [1, 2\n", "t.yaml line", "YAML syntax error", NULL);
    expect_parse_error("train:\n epochs: 3\n  batch_size: 2\n", "t.yaml line 9 column", "YAML syntax error", NULL);
    expect_parse_error("train:\n\tepochs: 3\n", "t.yaml line 8 column 1", "YAML indents with spaces, not tabs", NULL);
    expect_parse_error("seed: !!int 3\n", "'seed' in t.yaml line 7",
                       "YAML tags (tag:yaml.org,2002:int) are not supported",
                       NULL);
    expect_parse_error("seed: !python/object:os.system 3\n", "YAML tags", "not supported", NULL);
    expect_parse_error("x: &a [1, 2]\ndata.bands: *a\n", "unknown key 'x'", NULL, NULL);
    expect_parse_error("optimizer:\n  betas: &b [0.9, 0.99]\nsplit:\n  ratios: *b\n",
                       "YAML anchors and aliases are not supported", "line 8", NULL);
    expect_parse_error("---\nseed: 1\n", "a second YAML document", NULL, NULL);
    {
        ts_train_config c;
        tu_expect_error(ts_train_config_parse_string("- a\n- b\n", "list.yaml", &c), TS_ERR_INVALID_ARG,
                        "top level list", "list.yaml line 1: the configuration must be a mapping", NULL);
        ts_train_config_free(&c);
        char nul[] = "seed: 1\n";
        tu_expect_ok(ts_train_config_parse_string(nul, NULL, &c), "parse without a source name");
        ts_train_config_free(&c);
        tu_expect_ok(ts_train_config_parse_string("", "empty.yaml", &c), "empty text = defaults");
        tu_expect_error(ts_train_config_validate(&c), TS_ERR_INVALID_ARG, "empty", "missing required key 'output'",
                        NULL);
        ts_train_config_free(&c);
        tu_expect_error(ts_train_config_parse_string("output: \"a\\0b\"\n", "nul.yaml", &c), TS_ERR_INVALID_ARG,
                        "NUL in a string", "'output' in nul.yaml line 1: the value contains a NUL character", NULL);
        ts_train_config_free(&c);
    }
    /* files */
    {
        ts_train_config c;
        tu_expect_error(ts_train_config_load(tmp_path("missing.yaml"), &c), TS_ERR_IO, "missing file",
                        "cannot open the configuration", "missing.yaml", NULL);
        ts_train_config_free(&c);
        size_t big = (1u << 20) + 10;
        char *s = malloc(big + 1);
        memset(s, '#', big);
        s[big] = '\0';
        write_text(tmp_path("big.yaml"), s);
        free(s);
        tu_expect_error(ts_train_config_load(tmp_path("big.yaml"), &c), TS_ERR_INVALID_ARG, "big file",
                        "larger than", NULL);
        ts_train_config_free(&c);
        write_text(tmp_path("bad.yaml"), "output: o\noptimizer:\n  weight_decay: -1\n");
        tu_expect_error(ts_train_config_load(tmp_path("bad.yaml"), &c), TS_ERR_INVALID_ARG, "file error",
                        "bad.yaml line 3", "'optimizer.weight_decay'", NULL);
        ts_train_config_free(&c);
    }
}

/* ---- cross-field checks --------------------------------------------------------------- */
static void test_validate(void)
{
    expect_invalid("split:\n  ratios: [0.8, 0.1, 0.2]\n", "'split.ratios' (t.yaml line 8) sums to 1.1", "sum to 1",
                   NULL);
    expect_invalid("split.ratios: [0, 1]\n", "train fraction must be > 0", NULL, NULL);
    expect_invalid("model:\n  encoder_depth: 4\n", "'model.decoder_channels' (the default) has 5 entries",
                   "model.encoder_depth (t.yaml line 8) is 4", NULL);
    {
        ts_train_config c;
        tu_expect_ok(parse_with("", &c), "base");
        tu_expect_ok(ts_train_config_validate(&c), "base validates");
        tu_expect_ok(ts_train_config_set(&c, "model.encoder_depth=4"), "set");
        tu_expect_error(ts_train_config_validate(&c), TS_ERR_INVALID_ARG, "origin --set",
                        "model.encoder_depth (--set) is 4", NULL);
        ts_train_config_free(&c);
    }
    expect_invalid("ignore_id: 1\n", "'ignore_id' (t.yaml line 7) is 1, which is a class id", NULL, NULL);
    expect_invalid("schedule:\n  warmup_epochs: 50\n", "'schedule.warmup_epochs' (t.yaml line 8) is 50",
                   "50 epochs", NULL);
    expect_invalid("schedule: {warmup_epochs: 1, warmup_steps: 10}\n", "use one", NULL, NULL);
    expect_invalid("model.init: model\n", "'model.init' (t.yaml line 7) is model but model.weights is not set", NULL,
                   NULL);
    expect_invalid("model.weights: w.pth\n", "'model.weights' (t.yaml line 7) is set but model.init is scratch", NULL,
                   NULL);
    expect_invalid("model.allow_new_head: true\n", "only applies to model.init: model", NULL, NULL);
    expect_invalid("loss.class_weights: [1, 2, 3]\n", "'loss.class_weights' (t.yaml line 7) has 3 values for 2 classes",
                   NULL, NULL);
    expect_invalid("loss.dice_log: true\n", "'loss.dice_log'", "only applies to loss.dice: smp", NULL);
    expect_parse_error("labels.path: [a.gpkg, b.gpkg]\n", "'labels.path' is set twice in t.yaml: lines 6 and 7", NULL,
                       NULL);
    expect_invalid("data.normalize.kind: meanstd\n", "data.normalize.kind is meanstd", "needs 'data.normalize.mean'",
                   NULL);
    expect_invalid("data.normalize.mean: [1]\n", "'data.normalize.mean' (t.yaml line 7) is set",
                   "data.normalize.kind is meanstd_stats (the default), which does not use it", NULL);
    expect_invalid("data.bands: [1, 2, 3]\ndata.normalize: {kind: meanstd, mean: [1, 2], std: 1}\n",
                   "'data.normalize.mean' (t.yaml line 8) has 2 values but there are 3 channels", NULL, NULL);
    expect_invalid("data.normalize: {kind: minmax, min: [0, 5], max: [10, 5]}\n", "channel 2 has min 5 >= max 5", NULL,
                   NULL);
    expect_invalid("data.normalize: {kind: scale, scale: 0}\n", "a scale of 0", NULL, NULL);
    expect_invalid("data.normalize.percentiles: [98, 2]\n", "must be below the high one", NULL, NULL);
    expect_invalid("data.indices: [ndvi]\n", "'data.indices' (t.yaml line 7) needs 'data.bands'", NULL, NULL);
    expect_invalid("data.bands: [1, 2]\nmodel.in_channels: 3\n", "'model.in_channels' (t.yaml line 8) is 3",
                   "give 2 channels", NULL);
    expect_invalid("labels.class_map: {a: 1}\n", "'labels.class_map' (t.yaml line 7)", "labels.attribute is not set",
                   NULL);
    expect_invalid("labels.class_map: {a: 7}\nlabels.attribute: t\n", "'a' maps to 7", "neither a class id", NULL);
    expect_invalid("labels.color_map: {red: 1}\n", "'red' is not a colour", NULL, NULL);
    expect_invalid("labels.burn: 3\n", "'labels.burn' (t.yaml line 7) is 3", NULL, NULL);
    expect_invalid("windows: {tile: 64, overlap: 64}\n", "'windows.overlap' (t.yaml line 7) is 64", NULL, NULL);
    expect_invalid("split.method: csv\n", "'split.method' (t.yaml line 7) is csv", "windows.csv is empty", NULL);
    expect_invalid("windows.csv: [a.csv, b.csv]\n", "'windows.csv' (t.yaml line 7) has 2 entries for 1 images", NULL,
                   NULL);
    expect_invalid("split.ratios: [1, 0]\ntrain.patience: 3\n", "'train.patience' (t.yaml line 8)",
                   "no validation windows", NULL);
    expect_invalid("schedule.eta_min: 0.01\n", "'schedule.eta_min' (t.yaml line 7) is 0.01, not below optimizer.lr",
                   NULL, NULL);
    expect_invalid("schedule.warmup_steps: 100\n", "'schedule.warmup_steps' (t.yaml line 7) counts optimizer steps",
                   "schedule.interval (the default) is epoch", NULL);
    expect_invalid("loss.class_weights: [0, 0]\n", "'loss.class_weights' (t.yaml line 7) are all 0", NULL, NULL);
    /* The GPU math settings: tf32 and cudnn_benchmark would be silently
     * ignored on the CPU, so they are refused there; deterministic is not
     * (the CPU always is). */
    expect_invalid("tf32: true\n", "'tf32' (t.yaml line 7) is for device cuda", "'device' (the default) is cpu", NULL);
    expect_invalid("device: cpu\ncudnn_benchmark: true\n", "'cudnn_benchmark' (t.yaml line 8) is for device cuda",
                   "'device' (t.yaml line 7) is cpu", NULL);
    {
        const char *ok[] = {"deterministic: true\n",
                            "device: cuda\ntf32: true\ncudnn_benchmark: true\ndeterministic: true\n"};
        for (int i = 0; i < 2; i++) {
            ts_train_config c;
            if (tu_expect_ok(parse_with(ok[i], &c), ok[i]))
                tu_expect_ok(ts_train_config_validate(&c), ok[i]);
            ts_train_config_free(&c);
        }
    }
    /* classes: ids 0..K-1, unique ids and names, K >= 2 */
    {
        const char *cases[][2] = {
            {"classes: [only]\n", "lists 1 class; the model needs at least 2"},
            {"classes: [{id: 0, name: a}, {id: 2, name: b}]\n",
             "class 'b' has id 2, but with 2 classes the ids must be 0..1"},
            {"classes: [{id: 1, name: a}, {id: 1, name: b}]\n", "id 1 is used by both 'a' and 'b'"},
            {"classes: [a, a]\n", "the name 'a' is used twice"},
            {"classes: [{id: 0, name: a}, {name: b}]\n", "class 2: needs both id and name"},
            {"classes: [{id: 0, name: a}, {id: 1, nmae: b}]\n", "unknown key 'nmae'; did you mean 'name'?"},
            {"classes: [{id: -1, name: a}, b]\n", "id must be an integer >= 0"},
            {"classes: [a, [b]]\n", "class 2: expected a name or {id: N, name: TEXT}"},
            {"classes: {a: 1}\n", "expected a list of class names"},
            {"classes: [a, \"\"]\n", "class 2: the name is empty"},
        };
        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
            char text[1024];
            ts_train_config c;
            snprintf(text, sizeof text, "output: o\ndata.images: a.tif\nlabels.path: l.tif\n%s", cases[i][0]);
            ts_status st = ts_train_config_parse_string(text, "c.yaml", &c);
            if (!st) st = ts_train_config_validate(&c);
            tu_expect_error(st, TS_ERR_INVALID_ARG, cases[i][0], cases[i][1], "classes", NULL);
            ts_train_config_free(&c);
        }
    }
    {
        ts_train_config c;
        const char *t = "output: o\ndata.images: [a.tif, b.tif]\nlabels.path: [a.gpkg, b.gpkg, c.gpkg]\n"
                        "classes: [a, b, c]\nlabels.binary: true\n";
        tu_expect_ok(ts_train_config_parse_string(t, "m.yaml", &c), "parse");
        tu_expect_error(ts_train_config_validate(&c), TS_ERR_INVALID_ARG, "labels count",
                        "'labels.path' (m.yaml line 3) has 3 entries for 2 images", NULL);
        ts_train_config_set(&c, "labels.path=l.gpkg");
        tu_expect_error(ts_train_config_validate(&c), TS_ERR_INVALID_ARG, "binary",
                        "'labels.binary' (m.yaml line 5) makes labels 0/1", "lists 3 classes", NULL);
        ts_train_config_set(&c, "labels.binary=false");
        tu_expect_ok(ts_train_config_validate(&c), "fixed");
        /* steps known at run time */
        ts_train_config_set(&c, "schedule.interval=step");
        ts_train_config_set(&c, "schedule.warmup_steps=1000");
        ts_train_config_set(&c, "train.epochs=10");
        tu_expect_ok(ts_train_config_check_steps(&c, 101), "warmup 1000 < 1010 steps");
        tu_expect_error(ts_train_config_check_steps(&c, 100), TS_ERR_INVALID_ARG, "warmup",
                        "the warmup (1000 steps, --set) is not shorter than the run (1000 steps", NULL);
        tu_expect_error(ts_train_config_check_steps(&c, 0), TS_ERR_INVALID_ARG, "no steps", "no optimizer step", NULL);
        /* the schedule in the unit it steps in */
        ts_sched_config sc;
        if (tu_expect_ok(ts_train_config_schedule(&c, 101, &sc), "schedule: warmup steps"))
            tu_expect(sc.kind == TS_LR_COSINE && sc.interval == TS_LR_PER_ITERATION && sc.warmup == 1000 &&
                          sc.t_max == 1010 - 1000 && sc.eta_min == 0 && sc.warmup_start_factor == 1.0 / 3,
                      "schedule: cosine per step after 1000 warmup steps");
        tu_expect_error(ts_train_config_schedule(&c, 100, &sc), TS_ERR_INVALID_ARG, "schedule: too long a warmup",
                        "the warmup (1000 steps", NULL);
        ts_train_config_set(&c, "schedule.warmup_steps=0");
        ts_train_config_set(&c, "schedule.warmup_epochs=2");
        if (tu_expect_ok(ts_train_config_schedule(&c, 100, &sc), "schedule: warmup epochs in steps"))
            tu_expect(sc.warmup == 200 && sc.t_max == 800, "schedule: 2 warmup epochs = 200 steps, t_max 800");
        ts_train_config_set(&c, "schedule.interval=epoch");
        ts_train_config_set(&c, "schedule.t_max=5");
        if (tu_expect_ok(ts_train_config_schedule(&c, 100, &sc), "schedule: per epoch"))
            tu_expect(sc.interval == TS_LR_PER_EPOCH && sc.warmup == 2 && sc.t_max == 5, "schedule: per epoch");
        ts_train_config_set(&c, "schedule.kind=step");
        ts_train_config_set(&c, "schedule.step_size=3");
        ts_train_config_set(&c, "schedule.gamma=0.5");
        if (tu_expect_ok(ts_train_config_schedule(&c, 100, &sc), "schedule: step"))
            tu_expect(sc.kind == TS_LR_STEP && sc.step_size == 3 && sc.gamma == 0.5, "schedule: step");
        ts_train_config_free(&c);
    }
}

/* ---- what the trainer builds ------------------------------------------------------------ */
static void test_builders(void)
{
    ts_train_config c;
    const char *t = "output: o\nclasses: [bg, road, water]\nignore_id: 200\n"
                    "data:\n  images: a.tif\n  bands: [4, 3, 2]\n  indices: [ndvi, ndwi]\n"
                    "  index_bands: {red: 3, green: 2, nir: 4}\n  nodata: 0\n"
                    "  normalize: {kind: meanstd, mean: [1, 2, 3, 0, 0], std: 2}\n"
                    "  warp: {crs: \"EPSG:3857\", resolution: [2]}\n"
                    "labels:\n  path: l.gpkg\n  attribute: kind\n  class_map: {\"paved, new\": 1, lake: 2}\n"
                    "  color_map: {\"#ff0000\": 1, \"00ff0080\": 200}\n  assume_crs: image\n"
                    "model: {encoder_depth: 4, decoder_channels: [128, 64, 32, 16], decoder_batchnorm: false}\n"
                    "loss: {dice: smp, class_weights: [0.5, 1, 2], dice_smooth: 1}\n"
                    "optimizer: {lr: 0.002, betas: [0.8, 0.9], eps: 1e-6, weight_decay: 0.01}\n"
                    "split: {block: 512, ratios: [0.7, 0.3], seed: 5, buffer: 2}\n"
                    "augment: {d4: false, contrast: 0.2, brightness: 0.1, noise_std: 0.05}\n"
                    "train: {batch_size: 4, drop_last: false}\nwindows.tile: 128\nseed: 77\n";
    if (!tu_expect_ok(ts_train_config_parse_string(t, "b.yaml", &c), "builders: parse")) return;
    if (!tu_expect_ok(ts_train_config_validate(&c), "builders: validate")) {
        ts_train_config_free(&c);
        return;
    }
    tu_expect(ts_train_config_channels(&c) == 5, "channels = 3 bands + 2 indices");
    ts_label_opts lo;
    ts_label_class *cmap;
    ts_label_color *colors;
    if (tu_expect_ok(ts_train_config_label_opts(&c, &lo, &cmap, &colors), "label opts")) {
        tu_expect(lo.ignore_id == 200 && lo.classes == 3 && lo.n_class_map == 2 &&
                      !strcmp(lo.class_map[0].name, "paved, new") && lo.class_map[1].id == 2 && lo.n_colors == 2 &&
                      lo.colors[0].r == 255 && lo.colors[1].a == 0x80 && lo.colors[1].match_alpha &&
                      lo.colors[1].id == 200 && lo.assume_image_crs && !lo.assume_crs && !strcmp(lo.attribute, "kind"),
                  "label opts: maps, ids, assume_crs image");
        free(cmap);
        free(colors);
    }
    ts_raster_opts ro;
    ts_band_norm *norm;
    ts_index_spec *ix;
    if (tu_expect_ok(ts_train_config_raster_opts(&c, &ro, &norm, &ix), "raster opts")) {
        tu_expect(ro.nbands == 3 && ro.bands[0] == 4 && ro.nindices == 2 && ix[0].kind == TS_INDEX_NDVI &&
                      ix[1].kind == TS_INDEX_NDWI && ix[1].nir.band == 4 && ro.nnorm == 5 &&
                      norm[2].kind == TS_NORM_MEANSTD && norm[2].mean == 3 && norm[4].std == 2 && ro.has_nodata &&
                      ro.nodata == 0 && !strcmp(ro.warp_crs, "EPSG:3857") && ro.warp_res_x == 2 && ro.warp_res_y == 2 &&
                      !strcmp(ro.resampling, "bilinear"),
                  "raster opts: bands, indices, per-channel norm, nodata, warp");
        free(norm);
        free(ix);
    }
    ts_unet_config u;
    if (tu_expect_ok(ts_train_config_unet(&c, 5, &u), "unet"))
        tu_expect(u.in_channels == 5 && u.classes == 3 && u.encoder_depth == 4 && u.decoder_channels[3] == 16 &&
                      !u.decoder_use_batchnorm,
                  "unet config");
    ts_train_config_set(&c, "model.in_channels=5");
    tu_expect_error(ts_train_config_unet(&c, 6, &u), TS_ERR_INVALID_ARG, "unet channels",
                    "'model.in_channels' (--set) is 5 but the images give 6", NULL);
    ts_loader_opts lopt;
    ts_train_config_loader(&c, 5, &lopt);
    tu_expect(lopt.channels == 5 && lopt.height == 128 && lopt.width == 128 && lopt.batch_size == 4 &&
                  !lopt.drop_last && lopt.shuffle && lopt.seed == 77 && lopt.workers == 2 && !lopt.aug.d4 &&
                  lopt.aug.contrast == 0.2f && lopt.aug.noise_std == 0.05f,
              "loader opts");
    ts_split_params sp;
    ts_train_config_split(&c, &sp);
    tu_expect(sp.block == 512 && sp.ratios[1] == 0.3 && sp.ratios[2] == 0 && sp.seed == 5 && sp.buffer == 2,
              "split params");
    ts_optim_config oc;
    ts_train_config_optim(&c, &oc);
    tu_expect(oc.lr == 0.002 && oc.beta1 == 0.8 && oc.beta2 == 0.9 && oc.eps == 1e-6 && oc.weight_decay == 0.01 &&
                  !oc.no_decay_1d && oc.clip_grad_norm == 0 && oc.accum_steps == 1,
              "optimizer config");
    tu_expect_ok(ts_optim_config_check(&oc), "optimizer config check");
    ts_loss_config lc;
    float *lw;
    if (tu_expect_ok(ts_train_config_loss_config(&c, &lc, &lw), "loss config")) {
        tu_expect(lc.dice_weight == 0.5 && lc.ce.class_weights == lw && lc.dice.mode == TS_DICE_SMP, "loss config");
        free(lw);
    }
    ts_ce_params ce;
    ts_dice_params dp;
    float *w;
    if (tu_expect_ok(ts_train_config_loss(&c, &ce, &dp, &w), "loss")) {
        tu_expect(ce.ignore_index == 200 && ce.class_weights == w && w[2] == 2 && dp.mode == TS_DICE_SMP &&
                      dp.class_weights == w && dp.smooth == 1 && dp.eps == 1e-7f && dp.ignore_index == 200,
                  "loss params");
        free(w);
    }
    ts_model_card card;
    if (tu_expect_ok(ts_train_config_card(&c, &card), "card")) {
        tu_expect(card.n_classes == 3 && !strcmp(card.classes[2].name, "water") && card.tile_size == 128 &&
                      card.ignore_index == 200,
                  "card");
        ts_card_free(&card);
    }
    /* one norm for every channel; kind none -> no norm */
    ts_train_config_set(&c, "data.normalize.mean=0");
    ts_train_config_set(&c, "data.normalize.kind=percentile");
    ts_train_config_set(&c, "data.normalize.mean=");
    ts_train_config_set(&c, "data.normalize.std=");
    ts_train_config_set(&c, "data.normalize.percentiles=1,99");
    if (tu_expect_ok(ts_train_config_raster_opts(&c, &ro, &norm, &ix), "raster opts percentile")) {
        tu_expect(ro.nnorm == 1 && norm[0].kind == TS_NORM_PERCENTILE_STATS && norm[0].pct_lo == 1 &&
                      norm[0].pct_hi == 99,
                  "percentile norm");
        free(norm);
        free(ix);
    }
    ts_train_config_free(&c);
}

/* ---- docs/examples --------------------------------------------------------------------- */
static void test_examples(void)
{
    char dir[1100];
    snprintf(dir, sizeof dir, "%s/examples", docs_dir());
    DIR *d = opendir(dir);
    if (!tu_expect(d != NULL, "examples: cannot open %s", dir)) return;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (l < 6 || strcmp(e->d_name + l - 5, ".yaml")) continue;
        char path[1400];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        ts_train_config c;
        if (tu_expect_ok(ts_train_config_load(path, &c), path)) {
            char what[1500];
            snprintf(what, sizeof what, "%s validates", e->d_name);
            tu_expect_ok(ts_train_config_validate(&c), what);
            check_round_trip(&c, e->d_name);
        }
        ts_train_config_free(&c);
        n++;
    }
    closedir(d);
    tu_expect(n >= 4, "examples: %d found in %s (binary vector, colour map, fine-tuning, multispectral)", n, dir);
}

/* ---- docs/training-config.md ----------------------------------------------------------- */
static void test_docs(int write)
{
    char path[1100];
    snprintf(path, sizeof path, "%s/training-config.md", docs_dir());
    char *doc = read_text(path), *md = NULL;
    if (!tu_expect(doc != NULL, "docs: cannot read %s", path)) return;
    if (!tu_expect_ok(ts_train_config_schema_markdown(&md), "schema markdown")) {
        free(doc);
        return;
    }
    char *b = strstr(doc, DOC_BEGIN), *e = b ? strstr(b, DOC_END) : NULL;
    if (tu_expect(b && e, "docs: %s lacks the markers %s...%s", path, DOC_BEGIN, DOC_END)) {
        b += strlen(DOC_BEGIN);
        size_t have = (size_t)(e - b), want = strlen(md);
        int same = have == want && !memcmp(b, md, want);
        if (write && !same) {
            FILE *f = fopen(path, "wb");
            if (f) {
                fwrite(doc, 1, (size_t)(b - doc), f);
                fputs(md, f);
                fputs(e, f);
                fclose(f);
                printf("rewrote the key reference in %s\n", path);
            }
            same = 1;
        }
        tu_expect(same, "docs: the key reference in %s differs from the schema table; regenerate it with "
                        "`test_config --write-docs`",
                  path);
    }
    /* and, independently of the markers, every key is named */
    int n;
    const ts_cfg_key *s = ts_train_config_schema(&n);
    for (int i = 0; i < n; i++) {
        char q[300];
        snprintf(q, sizeof q, "`%s`", s[i].key);
        tu_expect(strstr(doc, q) != NULL, "docs: %s does not mention %s", path, q);
    }
    free(doc);
    free(md);
}

int main(int argc, char **argv)
{
    int write_docs = argc > 1 && !strcmp(argv[1], "--write-docs");
    if (!tu_tmpdir("test_config")) return 1;
    test_schema();
    test_defaults();
    test_types();
    test_set();
    test_errors();
    test_validate();
    test_builders();
    test_examples();
    test_docs(write_docs);
    tu_tmpdir_remove();
    return tu_finish("config");
}
