/* Benchmarks behind `terraseg bench`. They print their own tables to stdout
 * and return 0 on success, 1 after printing an error to stderr, 2 for a
 * request this build or benchmark cannot serve (a device it lacks, --tf32
 * without CUDA), also with a message on stderr. */
#ifndef TS_BENCH_H
#define TS_BENCH_H

#include <stddef.h>

#include "kernels/tensor.h"

typedef struct ts_bench_opts {
    int batch;       /* images per batch */
    int size;        /* tile height and width in pixels */
    int in_channels; /* input bands (encoder.conv1) */
    int classes;     /* output classes (segmentation head) */
    int iters;       /* timed repetitions per measurement (after one warm-up) */
    const char *csv; /* if not NULL: also write one row per measurement to this file */
    const char *device; /* "cpu" (or NULL), "cuda" or "cuda:N" */
    int tf32;           /* CUDA only: TF32 tensor-core math for fp32 convs and GEMMs (ts_cuda_set_tf32) */
    int cudnn_benchmark; /* CUDA only: conv algorithms chosen by timing (ts_cuda_set_benchmark) */
    ts_dtype precision; /* model and train: the activations (TS_F32, or TS_BF16 / TS_F16 mixed precision) */
    int no_graphs;      /* model: every op called directly, no recorded forward (ts_unet_device_set_graphs) */
} ts_bench_opts;

/* Checks o->device, o->tf32 and o->cudnn_benchmark for benchmark `what`
 * ("conv", "model", "train") before anything runs; touches no GPU. 0 if the
 * benchmark can run on that device, else prints why to stderr and returns 2:
 * an unknown device name, a build without CUDA, --tf32 or
 * --cudnn-benchmark on the CPU. */
int ts_bench_check_device(const ts_bench_opts *o, const char *what);
/* ts_bench_check_device, then the backend (CUDA: TF32 and the benchmark mode set first): 0, or 1
 * (the device could not be opened) / 2 with the reason on stderr. */
struct ts_backend;
int ts_bench_backend(const ts_bench_opts *o, const char *what, const struct ts_backend **b);
/* One line about what runs the benchmark: the BLAS library on the CPU, the
 * GPU, driver and libraries on CUDA. */
void ts_bench_describe(const ts_bench_opts *o, const struct ts_backend *b, char *buf, size_t size);
/* 1 if o->device names a CUDA device ("cuda" or "cuda:N"), else 0. */
int ts_bench_is_cuda(const ts_bench_opts *o);

/* Every conv shape of the U-Net ResNet-34 on a synthetic tile: forward,
 * backward-data and backward-filter GFLOP/s next to this machine's measured
 * sgemm GFLOP/s: OpenBLAS on the CPU, cuBLAS with o->device a CUDA device
 * (the convs then run on the CUDA backend, on device memory). */
int ts_bench_conv(const ts_bench_opts *o);

/* The whole model on a synthetic tile: eval forward and train forward +
 * backward time per tile, at o->batch and at batch 4. */
int ts_bench_model(const ts_bench_opts *o);

/* Full training steps (forward, loss, backward, AdamW): ms per step and
 * tiles/s at o->batch and at batch 4. */
int ts_bench_train(const ts_bench_opts *o);

#endif
