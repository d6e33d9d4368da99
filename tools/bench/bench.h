/* Benchmarks behind `terraseg bench`. They print their own tables to stdout
 * and return 0 on success, 1 after printing an error to stderr. */
#ifndef TS_BENCH_H
#define TS_BENCH_H

typedef struct ts_bench_opts {
    int batch;       /* images per batch */
    int size;        /* tile height and width in pixels */
    int in_channels; /* input bands (encoder.conv1) */
    int classes;     /* output classes (segmentation head) */
    int iters;       /* timed repetitions per measurement (after one warm-up) */
    const char *csv; /* if not NULL: also write one row per measurement to this file */
} ts_bench_opts;

/* Every conv shape of the U-Net ResNet-34 on a synthetic tile: forward,
 * backward-data and backward-filter GFLOP/s next to this machine's measured
 * sgemm GFLOP/s. */
int ts_bench_conv(const ts_bench_opts *o);

/* The whole model on a synthetic tile: eval forward and train forward +
 * backward time per tile, at o->batch and at batch 4. */
int ts_bench_model(const ts_bench_opts *o);

/* Full training steps (forward, loss, backward, AdamW): ms per step and
 * tiles/s at o->batch and at batch 4. */
int ts_bench_train(const ts_bench_opts *o);

#endif
