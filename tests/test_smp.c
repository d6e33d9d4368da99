/* weights/smp.c: the model's table <-> weight files, SMP config.json, the
 * ImageNet encoder with SMP's first-conv rule, strict key checking, and the
 * `terraseg info` / `terraseg convert` commands on real files. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nn/unet.h"
#include "tests/fixture.h"
#include "tests/smp_fill.h"
#include "tests/testutil.h"
#include "weights/smp.h"

static char tmpdir[] = "/tmp/terraseg-test-smp-XXXXXX";

static int same_config(const ts_unet_config *a, const ts_unet_config *b)
{
    if (a->in_channels != b->in_channels || a->classes != b->classes || a->encoder_depth != b->encoder_depth ||
        a->decoder_use_batchnorm != b->decoder_use_batchnorm)
        return 0;
    for (int i = 0; i < a->encoder_depth; i++)
        if (a->decoder_channels[i] != b->decoder_channels[i]) return 0;
    return 1;
}

/* Bit-exact equality of two models' tables and values. */
static int same_model(const ts_unet *a, const ts_unet *b)
{
    if (!same_config(&a->cfg, &b->cfg) || a->n_params != b->n_params) return 0;
    return memcmp(a->weights, b->weights, a->n_weights * sizeof(float)) == 0 &&
           memcmp(a->buffers, b->buffers, a->n_buffers * sizeof(float)) == 0 &&
           memcmp(a->counters, b->counters, a->n_counters * sizeof(int64_t)) == 0;
}

static int files_equal(const char *p, const char *q)
{
    FILE *a = fopen(p, "rb"), *b = fopen(q, "rb");
    int eq = a && b;
    while (eq) {
        int x = fgetc(a), y = fgetc(b);
        if (x != y) eq = 0;
        if (x == EOF || y == EOF) break;
    }
    if (a) fclose(a);
    if (b) fclose(b);
    return eq;
}

static void test_roundtrip(const ts_unet_config *cfg, const char *tag)
{
    ts_unet m, back;
    if (!tu_expect_ok(ts_unet_init(&m, cfg), "ts_unet_init")) return;
    smp_fill_model(&m);
    const char *exts[] = {".safetensors", ".pth", "_smp"};
    for (int f = 0; f < 3; f++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s%s", tmpdir, tag, exts[f]);
        ts_model_format fmt = ts_model_format_for_output(path);
        tu_expect(fmt == (ts_model_format)(f + 1), "format for %s", path);
        if (!tu_expect_ok(ts_model_save(path, &m, fmt), path)) continue;
        ts_model_format detected;
        tu_expect_ok(ts_model_detect(path, &detected), "detect");
        tu_expect(detected == fmt, "%s detected as %s", path, ts_model_format_name(detected));
        if (tu_expect_ok(ts_model_load(path, &back, NULL), path)) {
            tu_expect(same_model(&m, &back), "%s: %s round trip is bit-exact (config and every value)", tag, exts[f]);
            ts_unet_free(&back);
        }
    }
    /* pth -> safetensors -> pth gives the same bytes: conversion loses nothing. */
    char a[256], b[256], c[256];
    snprintf(a, sizeof a, "%s/%s.pth", tmpdir, tag);
    snprintf(b, sizeof b, "%s/%s-2.safetensors", tmpdir, tag);
    /* Same file name in another folder: torch.save names the archive folder
     * inside the zip after the file. */
    snprintf(c, sizeof c, "%s/rt", tmpdir);
    mkdir(c, 0777);
    snprintf(c, sizeof c, "%s/rt/%s.pth", tmpdir, tag);
    ts_unet t;
    if (tu_expect_ok(ts_model_load(a, &t, NULL), "load pth")) {
        tu_expect_ok(ts_model_save(b, &t, TS_FORMAT_SAFETENSORS), "save safetensors");
        ts_unet_free(&t);
        if (tu_expect_ok(ts_model_load(b, &t, NULL), "load safetensors")) {
            tu_expect_ok(ts_model_save(c, &t, TS_FORMAT_PTH), "save pth");
            ts_unet_free(&t);
            tu_expect(files_equal(a, c), "%s: .pth -> .safetensors -> .pth is byte-identical", tag);
        }
    }
    ts_unet_free(&m);
}

static void test_config_json(void)
{
    ts_unet_config cfg = ts_unet_default_config(4, 6), back;
    char *json = NULL;
    tu_expect_ok(ts_smp_config_format(&cfg, &json), "config format");
    /* What SMP 0.6's save_pretrained writes for Unet("resnet34", in_channels=4,
     * classes=6, encoder_weights=None): json.dumps(sort_keys=True, indent=2). */
    const char *want = "{\n  \"_model_class\": \"Unet\",\n  \"activation\": null,\n  \"aux_params\": null,\n"
                       "  \"classes\": 6,\n  \"decoder_attention_type\": null,\n  \"decoder_channels\": [\n"
                       "    256,\n    128,\n    64,\n    32,\n    16\n  ],\n  \"decoder_interpolation\": \"nearest\",\n"
                       "  \"decoder_use_norm\": \"batchnorm\",\n  \"encoder_depth\": 5,\n  \"encoder_name\": "
                       "\"resnet34\",\n  \"encoder_weights\": null,\n  \"in_channels\": 4\n}";
    tu_expect(json && strcmp(json, want) == 0, "config.json text matches SMP's:\n%s", json ? json : "(null)");
    tu_expect_ok(ts_smp_config_parse(json, "config.json", &back), "parse own config.json");
    tu_expect(same_config(&cfg, &back), "config.json round trip");
    free(json);

    /* SMP 0.3.4 / 0.4 style. */
    const char *old = "{\"_model_class\": \"Unet\", \"activation\": \"sigmoid\", \"aux_params\": null, \"classes\": 1,"
                      " \"decoder_attention_type\": null, \"decoder_channels\": [128, 64, 32, 16],"
                      " \"decoder_use_batchnorm\": false, \"encoder_depth\": 4, \"encoder_name\": \"resnet34\","
                      " \"encoder_weights\": \"imagenet\", \"in_channels\": 3}";
    if (tu_expect_ok(ts_smp_config_parse(old, "old.json", &back), "parse SMP 0.4 config"))
        tu_expect(back.encoder_depth == 4 && back.decoder_channels[3] == 16 && !back.decoder_use_batchnorm &&
                      back.classes == 1,
                  "SMP 0.4 config: depth 4, no batchnorm");
    /* 0.5+ when the user passed decoder_use_batchnorm=False: both keys, the old one wins. */
    const char *both = "{\"decoder_use_batchnorm\": false, \"decoder_use_norm\": \"batchnorm\", \"encoder_name\": "
                       "\"resnet34\"}";
    if (tu_expect_ok(ts_smp_config_parse(both, "both.json", &back), "parse both keys"))
        tu_expect(!back.decoder_use_batchnorm && back.encoder_depth == 5 && back.classes == 1 && back.in_channels == 3,
                  "decoder_use_batchnorm overrides decoder_use_norm; defaults filled");

    struct {
        const char *json, *mention;
        ts_status st;
    } bad[] = {
        {"{\"_model_class\": \"FPN\"}", "FPN", TS_ERR_UNSUPPORTED},
        {"{\"encoder_name\": \"resnet50\"}", "resnet50", TS_ERR_UNSUPPORTED},
        {"{\"decoder_attention_type\": \"scse\"}", "decoder_attention_type", TS_ERR_UNSUPPORTED},
        {"{\"decoder_interpolation\": \"bilinear\"}", "bilinear", TS_ERR_UNSUPPORTED},
        {"{\"decoder_use_norm\": \"layernorm\"}", "layernorm", TS_ERR_UNSUPPORTED},
        {"{\"decoder_use_batchnorm\": \"inplace\"}", "inplace", TS_ERR_UNSUPPORTED},
        {"{\"aux_params\": {\"classes\": 2}}", "aux_params", TS_ERR_UNSUPPORTED},
        {"{\"encoder_depth\": 4, \"decoder_channels\": [256, 128, 64, 32, 16]}", "decoder_channels",
         TS_ERR_INVALID_ARG},
        {"{\"encoder_depth\": 4}", "decoder_channels", TS_ERR_INVALID_ARG},
        {"{\"encoder_depth\": 6}", "encoder_depth", TS_ERR_INVALID_ARG},
        {"{\"in_channels\": 0}", "in_channels", TS_ERR_INVALID_ARG},
        {"{\"classes\": 2.5}", "classes", TS_ERR_INVALID_ARG},
        {"{\"img_size\": 256}", "img_size", TS_ERR_UNSUPPORTED},
        {"{\"classes\": 2, \"classes\": 3}", "twice", TS_ERR_INVALID_ARG},
        {"[1, 2]", "JSON object", TS_ERR_INVALID_ARG},
        {"{\"classes\": ", "JSON object", TS_ERR_INVALID_ARG},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char what[160];
        snprintf(what, sizeof what, "config.json %s", bad[i].json);
        tu_expect_error(ts_smp_config_parse(bad[i].json, "cfg.json", &back), bad[i].st, what, "cfg.json",
                        bad[i].mention, (char *)NULL);
    }
}

static void test_strict(void)
{
    ts_unet_config cfg = ts_unet_default_config(3, 2);
    ts_unet m, m2;
    if (!tu_expect_ok(ts_unet_init(&m, &cfg), "init") || !tu_expect_ok(ts_unet_init(&m2, &cfg), "init 2")) return;
    smp_fill_model(&m);
    ts_dict d;
    ts_dict_init(&d);
    tu_expect_ok(ts_unet_to_dict(&m, &d), "to_dict");
    tu_expect(d.count == 278 && ts_dict_get_meta(&d, "terraseg.config") != NULL, "to_dict: 278 entries and a model card");
    tu_expect_ok(ts_unet_load_dict(&m2, &d, NULL, "full.pth"), "load full dict");
    tu_expect(same_model(&m, &m2), "load_dict copies every value");

    /* A missing key, an unexpected one, a wrong shape. */
    ts_named_tensor *w = NULL;
    for (size_t i = 0; i < d.count; i++)
        if (strcmp(d.items[i].name, "decoder.blocks.2.conv1.0.weight") == 0) w = &d.items[i];
    char saved = w->name[0];
    w->name[0] = 'X';
    tu_expect_error(ts_unet_load_dict(&m2, &d, NULL, "m.pth"), TS_ERR_INVALID_ARG, "missing and unexpected key",
                    "m.pth", "missing", "decoder.blocks.2.conv1.0.weight", "Xecoder.blocks.2.conv1.0.weight",
                    (char *)NULL);
    w->name[0] = saved;
    int64_t one = 1;
    float f = 0;
    ts_dict_add(&d, "encoder.fc.weight", TS_F32, 1, &one, &f);
    tu_expect_error(ts_unet_load_dict(&m2, &d, NULL, "m.pth"), TS_ERR_INVALID_ARG, "unexpected key", "unexpected",
                    "encoder.fc.weight", (char *)NULL);
    ts_dict_free(&d);

    /* A head for 6 classes into a 2-class model: an error that suggests the
     * option, and with the option the head is left alone. */
    ts_unet_config cfg6 = ts_unet_default_config(3, 6);
    ts_unet m6;
    tu_expect_ok(ts_unet_init(&m6, &cfg6), "init k6");
    smp_fill_model(&m6);
    ts_dict_init(&d);
    tu_expect_ok(ts_unet_to_dict(&m6, &d), "to_dict k6");
    ts_unet_free(&m6);
    tu_expect_error(ts_unet_load_dict(&m2, &d, NULL, "k6.pth"), TS_ERR_INVALID_ARG, "head shape mismatch",
                    "segmentation_head.0.weight", "[6, 16, 3, 3]", "[2, 16, 3, 3]", "new head", (char *)NULL);
    ts_unet_free(&m2);
    ts_unet_init(&m2, &cfg);
    const ts_param *hb = ts_unet_find(&m2, "segmentation_head.0.bias");
    float *hbd = ts_unet_param_f32(&m2, hb);
    hbd[0] = 42.0f;
    ts_load_opts opts = {.allow_new_head = 1};
    tu_expect_ok(ts_unet_load_dict(&m2, &d, &opts, "k6.pth"), "load with allow_new_head");
    const ts_param *c1 = ts_unet_find(&m2, "encoder.conv1.weight");
    tu_expect(hbd[0] == 42.0f && memcmp(ts_unet_param_f32(&m2, c1), ts_unet_param_f32(&m, c1), c1->numel * 4) == 0,
              "allow_new_head: head untouched, encoder loaded");
    ts_dict_free(&d);

    /* "module." prefixes (DataParallel), missing num_batches_tracked, F16 values. */
    ts_dict_init(&d);
    for (int k = 0; k < m.n_params; k++) {
        const ts_param *p = &m.params[k];
        if (p->kind == TS_PARAM_COUNTER) continue;
        char name[128];
        snprintf(name, sizeof name, "module.%s", p->name);
        int64_t shape[4];
        for (int i = 0; i < p->ndim; i++) shape[i] = p->shape[i];
        if (strcmp(p->name, "segmentation_head.0.bias") == 0) {
            uint16_t half[2] = {0x3c00, 0xc000}; /* 1.0, -2.0 */
            ts_dict_add(&d, name, TS_F16, 1, shape, half);
        } else {
            ts_dict_add(&d, name, TS_F32, p->ndim, shape, ts_unet_param_f32(&m, p));
        }
    }
    m2.counters[0] = 99;
    if (tu_expect_ok(ts_unet_load_dict(&m2, &d, NULL, "dp.pth"), "load module.-prefixed dict without counters")) {
        const float *b = ts_unet_param_f32(&m2, ts_unet_find(&m2, "segmentation_head.0.bias"));
        tu_expect(m2.counters[0] == 0 && b[0] == 1.0f && b[1] == -2.0f,
                  "missing num_batches_tracked -> 0; F16 converted exactly");
    }
    ts_dict_free(&d);

    /* The architecture from shapes alone. */
    ts_unet_config c3 = ts_unet_default_config(4, 5), got;
    c3.encoder_depth = 3;
    c3.decoder_channels[0] = 64;
    c3.decoder_channels[1] = 32;
    c3.decoder_channels[2] = 16;
    c3.decoder_channels[3] = c3.decoder_channels[4] = 0;
    c3.decoder_use_batchnorm = 0;
    ts_unet m3;
    tu_expect_ok(ts_unet_init(&m3, &c3), "init depth 3");
    ts_dict_init(&d);
    ts_unet_to_dict(&m3, &d);
    tu_expect_ok(ts_unet_config_from_dict(&d, &got, "d3.pth"), "config from shapes");
    tu_expect(same_config(&c3, &got), "config from shapes: in 4, classes 5, depth 3 (64,32,16), no batchnorm");
    ts_dict_free(&d);
    ts_dict_init(&d);
    tu_expect_error(ts_unet_config_from_dict(&d, &got, "empty.pth"), TS_ERR_INVALID_ARG, "config from empty dict",
                    "empty.pth", "encoder.conv1.weight", (char *)NULL);
    ts_dict_free(&d);
    ts_unet_free(&m3);
    ts_unet_free(&m2);
    ts_unet_free(&m);
}

/* A torchvision resnet34 state_dict (conv1, bn1, layer1..4, fc) filled by the
 * shared formula, from the encoder entries of a 3-band model. */
static void make_torchvision(ts_dict *d)
{
    ts_unet_config cfg = ts_unet_default_config(3, 2);
    ts_unet m;
    ts_unet_init(&m, &cfg);
    smp_fill_model(&m);
    ts_dict_init(d);
    for (int k = 0; k < m.n_params; k++) {
        const ts_param *p = &m.params[k];
        if (strncmp(p->name, "encoder.", 8) != 0) continue;
        int64_t shape[4];
        for (int i = 0; i < p->ndim; i++) shape[i] = p->shape[i];
        if (p->kind == TS_PARAM_COUNTER)
            ts_dict_add(d, p->name + 8, TS_I64, 0, shape, &m.counters[p->offset]);
        else
            ts_dict_add(d, p->name + 8, TS_F32, p->ndim, shape, ts_unet_param_f32(&m, p));
    }
    int64_t fcw[2] = {1000, 512}, fcb = 1000;
    float *zeros = calloc(512000, sizeof(float));
    ts_dict_add(d, "fc.weight", TS_F32, 2, fcw, zeros);
    ts_dict_add(d, "fc.bias", TS_F32, 1, &fcb, zeros);
    free(zeros);
    ts_unet_free(&m);
}

static void test_imagenet(void)
{
    ts_dict tv;
    make_torchvision(&tv);
    const ts_named_tensor *w = ts_dict_find(&tv, "conv1.weight");
    const float *W = w->data;
    int bands[] = {1, 3, 4, 6};
    for (int b = 0; b < 4; b++) {
        int N = bands[b];
        ts_unet_config cfg = ts_unet_default_config(N, 2);
        ts_unet m;
        ts_unet_init(&m, &cfg);
        const ts_param *hb = ts_unet_find(&m, "segmentation_head.0.bias");
        ts_unet_param_f32(&m, hb)[1] = 7.0f;
        char what[64];
        snprintf(what, sizeof what, "imagenet encoder into %d bands", N);
        if (!tu_expect_ok(ts_unet_load_imagenet_encoder(&m, &tv, "resnet34.pth"), what)) {
            ts_unet_free(&m);
            continue;
        }
        const float *c1 = ts_unet_param_f32(&m, ts_unet_find(&m, "encoder.conv1.weight"));
        int ok = 1;
        const float scale = (float)(3.0 / N);
        for (int o = 0; o < 64; o++)
            for (int c = 0; c < N; c++)
                for (int k = 0; k < 49; k++) {
                    const float *src = W + o * 147;
                    float want = N == 3   ? src[c * 49 + k]
                                 : N == 1 ? (src[k] + src[49 + k]) + src[98 + k]
                                          : src[(c % 3) * 49 + k] * scale;
                    ok &= c1[(o * N + c) * 49 + k] == want;
                }
        tu_expect(ok, "first-conv rule for %d bands (SMP patch_first_conv, pretrained)", N);
        const ts_named_tensor *l4 = ts_dict_find(&tv, "layer4.2.bn2.running_var");
        tu_expect(memcmp(ts_unet_param_f32(&m, ts_unet_find(&m, "encoder.layer4.2.bn2.running_var")), l4->data, 512 * 4) ==
                          0 &&
                      ts_unet_param_f32(&m, hb)[1] == 7.0f,
                  "%d bands: other encoder entries copied, decoder and head untouched", N);
        ts_unet_free(&m);
    }
    /* A missing encoder key is named. */
    ts_named_tensor *t = (ts_named_tensor *)ts_dict_find(&tv, "layer3.4.conv2.weight");
    t->name[0] = 'X';
    ts_unet_config cfg = ts_unet_default_config(3, 2);
    ts_unet m;
    ts_unet_init(&m, &cfg);
    tu_expect_error(ts_unet_load_imagenet_encoder(&m, &tv, "resnet34.pth"), TS_ERR_INVALID_ARG,
                    "imagenet encoder with a missing key", "encoder.layer3.4.conv2.weight", (char *)NULL);
    ts_unet_free(&m);
    ts_dict_free(&tv);
}

static void test_detect(void)
{
    char path[256];
    snprintf(path, sizeof path, "%s/notes.txt", tmpdir);
    FILE *fp = fopen(path, "w");
    fputs("hello, not weights", fp);
    fclose(fp);
    ts_model_format f;
    tu_expect_error(ts_model_detect(path, &f), TS_ERR_INVALID_ARG, "detect a text file", "notes.txt", "safetensors",
                    (char *)NULL);
    ts_unet m;
    tu_expect_error(ts_model_load(path, &m, NULL), TS_ERR_INVALID_ARG, "load a text file", "notes.txt", (char *)NULL);
    tu_expect_error(ts_model_detect("/nonexistent/x.pth", &f), TS_ERR_IO, "detect a missing file", "/nonexistent/x.pth",
                    (char *)NULL);
    tu_expect_error(ts_model_detect(tmpdir, &f), TS_ERR_IO, "detect a directory without config.json", "config.json",
                    (char *)NULL);
    /* A config.json for another architecture refuses the whole directory. */
    char dir[256], cfgp[300];
    snprintf(dir, sizeof dir, "%s/fpn", tmpdir);
    mkdir(dir, 0777);
    snprintf(cfgp, sizeof cfgp, "%s/config.json", dir);
    fp = fopen(cfgp, "w");
    fputs("{\"_model_class\": \"FPN\", \"encoder_name\": \"resnet34\"}", fp);
    fclose(fp);
    tu_expect_error(ts_model_load(dir, &m, NULL), TS_ERR_UNSUPPORTED, "load an FPN directory", "FPN", (char *)NULL);
}

static void test_card(void)
{
    const char *json = "{\"classes\":[{\"id\":0,\"name\":\"background\"},{\"id\":1,\"name\":\"building\"},"
                       "{\"id\":2,\"name\":\"road\"},{\"id\":3,\"name\":\"water\"},{\"id\":4,\"name\":\"tree\"},"
                       "{\"id\":5,\"name\":\"crop\"}],\"bands\":[{\"index\":4,\"name\":\"red\",\"offset\":0,"
                       "\"scale\":10000},{\"index\":3,\"name\":\"green\",\"offset\":0.125,\"scale\":0.5,\"clip\":[0,"
                       "3000]},{\"index\":2,\"offset\":-1.5,\"scale\":2.25},{\"index\":8,\"name\":\"nir\",\"offset\":0,"
                       "\"scale\":1}],\"tile_size\":256,\"ignore_index\":255}";
    ts_model_card c;
    if (!tu_expect_ok(ts_card_parse(json, "card.json", &c), "parse a full model card")) return;
    tu_expect(c.n_classes == 6 && c.n_bands == 4 && c.tile_size == 256 && c.ignore_index == 255 &&
                  strcmp(c.classes[3].name, "water") == 0 && c.bands[1].has_clip && c.bands[1].clip_hi == 3000 &&
                  c.bands[2].name == NULL && c.bands[2].scale == 2.25,
              "card: fields parsed");
    char *back = NULL;
    tu_expect_ok(ts_card_format(&c, &back), "format card");
    tu_expect(back && strcmp(back, json) == 0, "card: parse -> format gives the same text:\n%s\n%s", json,
              back ? back : "(null)");
    free(back);

    /* Stored with the model: safetensors metadata and the SMP directory keep
     * it; a .pth cannot. */
    ts_unet_config cfg = ts_unet_default_config(4, 6);
    ts_unet m, r;
    ts_unet_init(&m, &cfg);
    tu_expect_ok(ts_unet_set_card(&m, &c), "set card");
    const char *outs[] = {"card.safetensors", "card_smp", "card.pth"};
    for (int i = 0; i < 3; i++) {
        char path[256];
        snprintf(path, sizeof path, "%s/%s", tmpdir, outs[i]);
        tu_expect_ok(ts_model_save(path, &m, ts_model_format_for_output(path)), path);
        if (!tu_expect_ok(ts_model_load(path, &r, NULL), path)) continue;
        if (i < 2)
            tu_expect(r.card && strcmp(r.card, m.card) == 0, "%s keeps the model card", outs[i]);
        else
            tu_expect(r.card == NULL, "%s holds weights only", outs[i]);
        ts_unet_free(&r);
    }
    ts_card_free(&c);

    /* Against the model: bands must match in_channels, names the classes. */
    ts_card_parse("{\"bands\":[{\"index\":1},{\"index\":2},{\"index\":3}]}", "c", &c);
    tu_expect_error(ts_unet_set_card(&m, &c), TS_ERR_INVALID_ARG, "card with 3 bands on a 4-band model", "3 bands",
                    "4 input channels", (char *)NULL);
    ts_card_free(&c);
    ts_card_parse("{\"classes\":[{\"id\":0,\"name\":\"a\"},{\"id\":1,\"name\":\"b\"}]}", "c", &c);
    tu_expect_error(ts_unet_set_card(&m, &c), TS_ERR_INVALID_ARG, "card with 2 classes on a 6-class model",
                    "2 classes", "6 outputs", (char *)NULL);
    ts_unet_free(&m);
    ts_unet_config bin = ts_unet_default_config(3, 1);
    ts_unet_init(&m, &bin);
    tu_expect_ok(ts_unet_set_card(&m, &c), "two class names on a one-output binary model");
    ts_unet_free(&m);
    ts_card_free(&c);

    struct {
        const char *json, *mention;
    } bad[] = {
        {"{\"colour\": 1}", "colour"},
        {"{\"classes\": [{\"id\": 0, \"name\": \"a\"}, {\"id\": 0, \"name\": \"b\"}]}", "repeats"},
        {"{\"classes\": [{\"id\": -1, \"name\": \"a\"}]}", "classes[0]"},
        {"{\"classes\": [{\"id\": 1}]}", "classes[0]"},
        {"{\"bands\": [{\"scale\": 0}]}", "scale"},
        {"{\"bands\": [{\"clip\": [5, 5]}]}", "clip"},
        {"{\"bands\": [{\"index\": 0}]}", "index"},
        {"{\"bands\": [{\"gain\": 2}]}", "gain"},
        {"{\"tile_size\": 0}", "tile_size"},
        {"{\"ignore_index\": 2.5}", "ignore_index"},
        {"{\"tile_size\": 256, \"tile_size\": 512}", "twice"},
        {"[]", "JSON object"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char what[160];
        snprintf(what, sizeof what, "model card %s", bad[i].json);
        tu_expect_error(ts_card_parse(bad[i].json, "m.safetensors", &c), TS_ERR_INVALID_ARG, what, "m.safetensors",
                        bad[i].mention, (char *)NULL);
    }
}

/* The commands, as a user runs them. */
static void test_cli(void)
{
    const char *bin = getenv("TERRASEG_BIN");
    if (!tu_expect(bin != NULL, "TERRASEG_BIN is set by CTest to the terraseg command")) return;
    char cmd[1024], out[256];
    snprintf(out, sizeof out, "%s/cli.txt", tmpdir);
    snprintf(cmd, sizeof cmd, "%s convert %s/d5.pth %s/cli.safetensors > %s 2>&1", bin, tmpdir, tmpdir, out);
    tu_expect(system(cmd) == 0, "terraseg convert .pth -> .safetensors");
    snprintf(cmd, sizeof cmd, "%s info %s/cli.safetensors > %s 2>&1", bin, tmpdir, out);
    int rc = system(cmd);
    char text[8192] = "";
    FILE *fp = fopen(out, "r");
    if (fp) {
        size_t n = fread(text, 1, sizeof text - 1, fp);
        text[n] = '\0';
        fclose(fp);
    }
    tu_expect(rc == 0 && strstr(text, "in_channels=4, classes=6, encoder_depth=5") &&
                  strstr(text, "trainable parameters: 24440230") && strstr(text, "activation memory"),
              "terraseg info reports the architecture and 24,440,230 parameters; got:\n%s", text);
    snprintf(cmd, sizeof cmd, "%s convert %s/cli.safetensors %s/cli_smp --format smp > %s 2>&1 && %s info %s/cli_smp > %s 2>&1",
             bin, tmpdir, tmpdir, out, bin, tmpdir, out);
    tu_expect(system(cmd) == 0, "terraseg convert to an SMP directory, then info on it");
    snprintf(cmd, sizeof cmd, "%s info %s/card.safetensors > %s 2>&1", bin, tmpdir, out);
    rc = system(cmd);
    fp = fopen(out, "r");
    size_t nr = fp ? fread(text, 1, sizeof text - 1, fp) : 0;
    text[nr] = '\0';
    if (fp) fclose(fp);
    tu_expect(rc == 0 && strstr(text, "classes: 0=background 1=building") && strstr(text, "tile size: 256") &&
                  strstr(text, "after clipping to [0, 3000]"),
              "terraseg info prints the model card; got:\n%s", text);
    snprintf(cmd, sizeof cmd, "%s convert %s/card.safetensors %s/card2.pth > %s 2>&1", bin, tmpdir, tmpdir, out);
    rc = system(cmd);
    fp = fopen(out, "r");
    nr = fp ? fread(text, 1, sizeof text - 1, fp) : 0;
    text[nr] = '\0';
    if (fp) fclose(fp);
    tu_expect(rc == 0 && strstr(text, "model card") && strstr(text, "weights only"),
              "terraseg convert says when a .pth drops the model card; got:\n%s", text);
    snprintf(cmd, sizeof cmd, "%s info %s/notes.txt > %s 2>&1", bin, tmpdir, out);
    rc = system(cmd);
    fp = fopen(out, "r");
    size_t n = fp ? fread(text, 1, sizeof text - 1, fp) : 0;
    text[n] = '\0';
    if (fp) fclose(fp);
    tu_expect(rc != 0 && strstr(text, "notes.txt"), "terraseg info on a text file fails naming it; got:\n%s", text);
}

/* config.json files written by SMP 0.6.0's save_pretrained
 * (tests/fixtures/make_smp_configs.py): parsed right, and written back byte
 * for byte. */
static void test_real_configs(void)
{
    struct {
        const char *file;
        int in, classes, depth, dec_last, bn, byte_exact;
    } cases[] = {
        {"in4_k6_d5", 4, 6, 5, 16, 1, 1},
        {"in3_k1_d3", 3, 1, 3, 16, 1, 1},
        {"in3_k6_d4_nobn", 3, 6, 4, 16, 0, 1},
        /* activation "sigmoid" and the deprecated decoder_use_batchnorm key:
         * read, but terraseg writes its own canonical config. */
        {"in3_k2_sigmoid_old", 3, 2, 5, 16, 1, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[1024], *text = NULL;
        snprintf(path, sizeof path, "%s/smp_config/%s.config.json", fx_dir(), cases[i].file);
        FILE *fp = fopen(path, "rb");
        if (!tu_expect(fp != NULL, "open %s", path)) continue;
        text = calloc(1, 65536);
        size_t n = fread(text, 1, 65535, fp);
        fclose(fp);
        text[n] = '\0';
        ts_unet_config cfg;
        if (tu_expect_ok(ts_smp_config_parse(text, path, &cfg), path)) {
            tu_expect(cfg.in_channels == cases[i].in && cfg.classes == cases[i].classes &&
                          cfg.encoder_depth == cases[i].depth && cfg.decoder_channels[cfg.encoder_depth - 1] ==
                          cases[i].dec_last && cfg.decoder_use_batchnorm == cases[i].bn,
                      "%s: architecture read from SMP's config.json", cases[i].file);
            char *mine = NULL;
            if (cases[i].byte_exact && tu_expect_ok(ts_smp_config_format(&cfg, &mine), "format"))
                tu_expect(strcmp(mine, text) == 0, "%s: terraseg writes SMP's config.json byte for byte:\n%s",
                          cases[i].file, mine);
            free(mine);
        }
        free(text);
    }
}

int main(void)
{
    ts_ctx ctx;
    tu_init(&ctx);
    if (!mkdtemp(tmpdir)) {
        printf("FAIL cannot create a temporary directory\n");
        return 1;
    }
    ts_unet_config d5 = ts_unet_default_config(4, 6);
    test_roundtrip(&d5, "d5");
    ts_unet_config d3 = ts_unet_default_config(3, 1);
    d3.encoder_depth = 3;
    d3.decoder_channels[0] = 64;
    d3.decoder_channels[1] = 32;
    d3.decoder_channels[2] = 16;
    d3.decoder_use_batchnorm = 0;
    test_roundtrip(&d3, "d3nobn");
    test_config_json();
    test_real_configs();
    test_strict();
    test_imagenet();
    test_detect();
    test_card();
    test_cli();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0) printf("note: could not remove %s\n", tmpdir);
    ts_ctx_free(&ctx);
    return tu_finish("test_smp");
}
