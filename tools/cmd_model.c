/* terraseg info and terraseg convert: model files. */
#include <stdio.h>
#include <string.h>

#include "kernels/threads.h"
#include "nn/unet.h"
#include "tools/commands.h"
#include "weights/dict.h"
#include "weights/smp.h"

/* ---- terraseg info MODEL ---- */
static int info_tile = 256;
static int info_batch = 1;

cli_option info_options[] = {
    {"tile", 0, CLI_INT, &info_tile, "PX", "tile size for the activation-memory estimate", 32, 16384},
    {"batch", 'b', CLI_INT, &info_batch, "N", "batch size for the activation-memory estimate", 1, 4096},
    {0},
};

static double mib(size_t bytes) { return (double)bytes / (1 << 20); }

int run_info(int argc, char **argv)
{
    if (argc != 1) {
        fprintf(stderr, "terraseg info: expected one MODEL (a .safetensors, .pth/.ckpt or SMP directory)\n");
        return 2;
    }
    const char *path = argv[0];
    ts_model_format f;
    if (ts_model_detect(path, &f) != TS_OK) {
        fprintf(stderr, "terraseg info: %s\n", ts_last_error());
        return 1;
    }
    ts_unet m;
    if (ts_model_load(path, &m, NULL) != TS_OK) {
        fprintf(stderr, "terraseg info: %s\n", ts_last_error());
        return 1;
    }
    const ts_unet_config *c = &m.cfg;
    printf("model: %s\nformat: %s\n", path, ts_model_format_name(f));
    printf("architecture: smp.Unet(\"resnet34\", in_channels=%d, classes=%d, encoder_depth=%d, decoder_channels=(",
           c->in_channels, c->classes, c->encoder_depth);
    for (int i = 0; i < c->encoder_depth; i++) printf("%s%d", i ? ", " : "", c->decoder_channels[i]);
    printf("), decoder_use_batchnorm=%s)\n", c->decoder_use_batchnorm ? "True" : "False");
    size_t unused = 0;
    for (int k = 0; k < m.n_params; k++)
        if (m.params[k].kind == TS_PARAM_WEIGHT && !m.params[k].used) unused += m.params[k].numel;
    printf("state_dict entries: %d\n", m.n_params);
    printf("trainable parameters: %zu", ts_unet_count_trainable(&m));
    if (unused) printf(" (%zu in encoder stages this depth never runs)", unused);
    printf("\nbuffers: %zu floats, %zu counters\n", m.n_buffers, m.n_counters);

    ts_model_card card;
    if (ts_unet_get_card(&m, &card) == TS_OK && m.card) {
        printf("model card:\n");
        if (card.n_classes) {
            printf("  classes:");
            for (int i = 0; i < card.n_classes; i++) printf(" %d=%s", card.classes[i].id, card.classes[i].name);
            printf("\n");
        }
        for (int i = 0; i < card.n_bands; i++) {
            const ts_card_band *b = &card.bands[i];
            printf("  band %d: source band %d%s%s%s, (x - %g) / %g", i + 1, b->index, b->name ? " (" : "",
                   b->name ? b->name : "", b->name ? ")" : "", b->offset, b->scale);
            if (b->has_clip) printf(" after clipping to [%g, %g]", b->clip_lo, b->clip_hi);
            printf("\n");
        }
        if (card.tile_size) printf("  tile size: %d\n", card.tile_size);
        if (card.ignore_index >= 0) printf("  ignore id: %d\n", card.ignore_index);
        ts_card_free(&card);
    } else {
        printf("model card: none (no classes, bands or normalization recorded)\n");
    }

    int tiles[] = {info_tile, 256, 512};
    for (int i = 0; i < 3; i++) {
        if (i > 0 && tiles[i] == info_tile) continue;
        size_t train = 0, eval = 0;
        if (ts_unet_activation_bytes(c, info_batch, tiles[i], tiles[i], 1, &train) != TS_OK ||
            ts_unet_activation_bytes(c, info_batch, tiles[i], tiles[i], 0, &eval) != TS_OK) {
            fprintf(stderr, "terraseg info: %s\n", ts_last_error());
            ts_unet_free(&m);
            return 1;
        }
        printf("activation memory, batch %d at %dx%d: training %.1f MiB, inference %.1f MiB\n", info_batch, tiles[i],
               tiles[i], mib(train), mib(eval));
    }
    printf("weights memory: %.1f MiB (+ %.1f MiB gradients when training)\n",
           mib((m.n_weights + m.n_buffers) * sizeof(float)), mib(m.n_weights * sizeof(float)));
    ts_unet_free(&m);
    return 0;
}

/* ---- terraseg convert IN OUT ---- */
static const char *convert_format = NULL;

cli_option convert_options[] = {
    {"format", 'f', CLI_STRING, &convert_format, "FMT",
     "output format: safetensors, pth or smp (default: from OUT: .safetensors, .pth/.pt/.ckpt, else an SMP directory)",
     0, 0},
    {0},
};

int run_convert(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "terraseg convert: expected IN and OUT\n");
        return 2;
    }
    ts_model_format out_format = ts_model_format_for_output(argv[1]);
    if (convert_format) {
        if (strcmp(convert_format, "safetensors") == 0)
            out_format = TS_FORMAT_SAFETENSORS;
        else if (strcmp(convert_format, "pth") == 0)
            out_format = TS_FORMAT_PTH;
        else if (strcmp(convert_format, "smp") == 0)
            out_format = TS_FORMAT_SMP_DIR;
        else {
            fprintf(stderr, "terraseg convert: --format must be safetensors, pth or smp, got \"%s\"\n", convert_format);
            return 2;
        }
    }
    ts_unet m;
    if (ts_model_load(argv[0], &m, NULL) != TS_OK) {
        fprintf(stderr, "terraseg convert: %s\n", ts_last_error());
        return 1;
    }
    if (m.card && out_format == TS_FORMAT_PTH)
        fprintf(stderr, "terraseg convert: note: %s holds weights only; the model card (classes, bands, "
                        "normalization) is not written to it\n", argv[1]);
    ts_status st = ts_model_save(argv[1], &m, out_format);
    ts_unet_free(&m);
    if (st != TS_OK) {
        fprintf(stderr, "terraseg convert: %s\n", ts_last_error());
        return 1;
    }
    printf("wrote %s (%s)\n", argv[1], ts_model_format_name(out_format));
    return 0;
}
