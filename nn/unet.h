/* smp.Unet("resnet34"): the model, its parameter table, forward and backward.
 * The architecture is shared/specs/smp-unet.md; key names are SMP's
 * state_dict names (shared/specs/smp_unet_resnet34_keys.tsv).
 *
 * The parameter table is the single source of truth: one entry per
 * state_dict key, in state_dict order, with its shape, kind and offset into
 * one of three contiguous arrays (trainable floats, float buffers, int64
 * counters). Allocation, loading, saving, zeroing gradients and the
 * optimizer all walk this table; the layers only hold offsets into it. */
#ifndef TS_UNET_H
#define TS_UNET_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/arena.h"
#include "kernels/backend.h"

#define TS_UNET_MAX_DEPTH 5

typedef struct ts_unet_config {
    int in_channels;                           /* SMP default 3 */
    int classes;                               /* SMP default 1 */
    int encoder_depth;                         /* 3..5, SMP default 5 */
    int decoder_channels[TS_UNET_MAX_DEPTH];   /* first encoder_depth used; default 256,128,64,32,16 */
    int decoder_use_batchnorm;                 /* 1: conv (no bias) + BN, SMP's default; 0: conv with bias */
} ts_unet_config;

/* SMP's defaults with the given bands and classes. */
ts_unet_config ts_unet_default_config(int in_channels, int classes);
/* Checks ranges and that decoder_channels has encoder_depth entries > 0. */
ts_status ts_unet_config_check(const ts_unet_config *cfg);

typedef enum ts_param_kind {
    TS_PARAM_WEIGHT = 0, /* trainable float: conv weights and biases, BN weight/bias */
    TS_PARAM_BUFFER,     /* float buffer: BN running_mean / running_var */
    TS_PARAM_COUNTER,    /* int64 scalar: BN num_batches_tracked */
} ts_param_kind;

typedef struct ts_param {
    char name[80];   /* SMP state_dict key, e.g. "encoder.layer2.0.downsample.1.running_var" */
    ts_param_kind kind;
    int ndim;        /* 4 for conv weights, 1 for vectors, 0 for counters */
    int shape[4];
    size_t numel;
    size_t offset;   /* into weights/grads (WEIGHT), buffers (BUFFER) or counters (COUNTER) */
    int used;        /* 0 for the stages a shallow encoder never runs: loaded and
                        saved verbatim, never updated (PyTorch's grad is None) */
} ts_param;

typedef struct ts_unet_layers ts_unet_layers; /* private: the layer graph */

typedef struct ts_unet {
    ts_unet_config cfg;
    ts_param *params;  /* the table, state_dict order */
    int n_params;
    float *weights;    /* n_weights trainable floats */
    float *grads;      /* same layout as weights; backward accumulates here */
    size_t n_weights;
    float *buffers;    /* n_buffers floats */
    size_t n_buffers;
    int64_t *counters; /* n_counters int64 */
    size_t n_counters;
    ts_unet_layers *layers;
    ts_arena arena;    /* activations, planned for (plan_n, plan_h, plan_w) */
    int plan_n, plan_h, plan_w;
    char *card;        /* the model card as compact JSON (weights/card.h), or NULL */
} ts_unet;

/* Builds the table for cfg and allocates zeroed parameters (BN weight 1,
 * running_var 1 as PyTorch initialises them). */
ts_status ts_unet_init(ts_unet *m, const ts_unet_config *cfg);
void ts_unet_free(ts_unet *m);
/* PyTorch/SMP's initialisation (smp-unet.md 1.6) from a seed: encoder convs
 * kaiming_normal fan_out, decoder convs kaiming_uniform fan_in, head
 * xavier_uniform, biases 0, BN 1/0. */
ts_status ts_unet_init_random(ts_unet *m, uint64_t seed);

const ts_param *ts_unet_find(const ts_unet *m, const char *name);
/* The data of one table entry (float for WEIGHT and BUFFER). */
float *ts_unet_param_f32(const ts_unet *m, const ts_param *p);
/* Trainable scalars in the table (24,440,230 for in 4, classes 6, depth 5). */
size_t ts_unet_count_trainable(const ts_unet *m);

/* Forward pass of a batch x [N, in_channels, H, W], any H, W >= 1 (SMP >= 0.5's
 * size-based upsampling when not divisible by 32). train = 1: BN uses batch
 * statistics and updates running stats and num_batches_tracked, and
 * everything backward needs is kept. train = 0: BN uses running statistics.
 * *logits is a view [N, classes, H, W] valid until the next call. Plans the
 * activation arena on the first call and when (N, H, W) changes; an eval
 * forward gets a smaller plan that reuses storage, which a later train
 * forward replaces (a train plan also serves eval forwards). Errors name the
 * layer (e.g. "encoder.layer4.0.bn1") and leave the model usable. */
ts_status ts_unet_forward(ts_unet *m, ts_ctx *ctx, const ts_tensor *x, int train, ts_tensor *logits);
/* Backward of the last train-mode forward: dlogits [N, classes, H, W];
 * accumulates into m->grads (call ts_unet_zero_grad once per step). The
 * forward's input x is read again (conv1's weight gradient), so its data
 * must stay unchanged until backward returns. An eval forward in between
 * discards the train activations (backward then fails). */
ts_status ts_unet_backward(ts_unet *m, ts_ctx *ctx, const ts_tensor *dlogits);
ts_status ts_unet_zero_grad(ts_unet *m, ts_ctx *ctx);
/* Bytes of activation memory a (n, h, w) batch needs in train or eval mode.
 * Train mode gives every activation and activation gradient its own slot;
 * eval mode reuses storage once the last reader of a tensor has run. */
ts_status ts_unet_activation_bytes(const ts_unet_config *cfg, int n, int h, int w, int train, size_t *bytes);

/* Inference with every BatchNorm folded into the conv before it (encoder
 * convs, decoder convs when decoder_use_batchnorm): w' = w * s, b' = beta +
 * (b - running_mean) * s with s = gamma / sqrt(running_var + eps), computed
 * in double from the current weights and running statistics. Call
 * ts_unet_fold_bn again whenever they change (loading, training): the folded
 * copy is not tracked. ts_unet_forward_folded is then an eval forward that
 * skips the BN ops; it agrees with ts_unet_forward(train = 0) to float
 * rounding. */
ts_status ts_unet_fold_bn(ts_unet *m);
ts_status ts_unet_forward_folded(ts_unet *m, ts_ctx *ctx, const ts_tensor *x, ts_tensor *logits);

/* The ts_unet functions above keep the model in host memory and run only on
 * a backend whose memory is host memory (ts_backend_is_host; another is an
 * error). For inference on a backend with its own memory (CUDA), make a
 * device copy: the BN-folded weights in the backend's memory, uploaded once,
 * and the model's layer graph with its own eval plan, whose arena is
 * allocated in the backend's memory too. Its forward is
 * ts_unet_forward_folded's own code over these pointers, so on the CPU
 * backend it gives the same logits bit for bit. The copy does not refer to
 * the host model after init: free it, or train it, and call init again for
 * new weights. */
/* What a recorded forward depends on: the batch shape, the activation
 * type, and the buffers its ops read and write. Equal keys mean the same
 * ops on the same pointers (the plan is a function of shape and type). */
typedef struct ts_unet_graph_key {
    const void *x, *arena, *weights, *wh;
    int n, h, w;
    ts_dtype act;
} ts_unet_graph_key;

typedef struct ts_unet_device {
    const ts_backend *backend;
    ts_unet_config cfg;
    ts_param *params;       /* a copy of the table: the graph's shapes */
    int n_params;
    ts_unet_layers *layers; /* a graph of its own (the plan lives in it) */
    int train;              /* 0: an inference copy (ts_unet_device_init); 1: a training copy */
    float *weights;         /* backend memory: the folded block (inference), or the
                               trainable weights in the table's layout (training) */
    size_t n_weights;       /* floats in it */
    float *grads;           /* training: backend memory, n_weights floats */
    float *buffers;         /* training: backend memory, the BN running statistics */
    size_t n_buffers;
    int64_t *counters;      /* training: HOST memory, num_batches_tracked (only the host counts) */
    size_t n_counters;
    ts_arena arena;         /* backend memory: activations for (plan_n, plan_h, plan_w) */
    int plan_n, plan_h, plan_w;
    float *x;               /* backend memory: the input batch (unused on a host backend's training copy) */
    size_t x_bytes;
    uint16_t *wh;           /* half activations: the conv weights cast (backend memory, n_weights halves) */
    uint16_t *gh;           /* half activations, training: their gradients before the float32 add */
    /* Inference on a backend with graphs (kernels/backend.h): the forward
     * recorded once and replayed in one launch while the batch shape and
     * every buffer it touches stay put (see ts_unet_device_set_graphs). */
    int graphs_off;         /* 1: run every op directly */
    void *graph;            /* the recording, or NULL */
    ts_unet_graph_key graph_key; /* what it was recorded for */
    ts_tensor graph_logits; /* its output, a view into the arena */
    int warm;               /* warm_key has run directly (plans and workspace exist) */
    ts_unet_graph_key warm_key;
    long graph_records, graph_launches; /* counts, for tests and benchmarks */
    char graph_error[1024]; /* why recording failed and graphs_off was set, or "" */
} ts_unet_device;

/* Folds m's BN as ts_unet_fold_bn does (from its current weights and running
 * statistics; m is not changed) and uploads the folded weights to b's memory
 * in one copy. On error nothing is left allocated. */
ts_status ts_unet_device_init(ts_unet_device *d, const ts_unet *m, const ts_backend *b);
/* Logits of a batch: x_host [N, in_channels, H, W] (host memory) is uploaded
 * in one copy, the folded forward runs on ctx's backend (which must be the
 * copy's), and the logits are downloaded into logits_host, a host tensor the
 * caller allocates with shape [N, classes, H, W]. Plans (and allocates) the
 * arena when (N, H, W) changes. Errors leave the copy usable. */
ts_status ts_unet_device_forward(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x_host, ts_tensor *logits_host);
/* The same forward, returning before its logits are on the host, so that
 * the caller can work (softmax, blending the previous batch, reading the
 * next) while the device computes: the upload of x_host, the forward, an
 * asynchronous download of the logits into logits_host and
 * fence_record(fence) are queued, and the call returns without waiting for
 * any of them. x_host and logits_host must lie in the backend's host_alloc
 * (page-locked) memory. x_host must not change until the caller has waited
 * with the backend's fence_wait(fence), and logits_host's contents are
 * undefined until then; an error of the queued work surfaces at that wait.
 * Needs a backend whose memory offers the asynchronous members
 * (ts_backend_memory_async); another is refused, use ts_unet_device_forward.
 * A second start before the first is waited for is fine: the device's input
 * buffer and arena are reused in the backend's queue order, after the first
 * forward and its download; only its x_host, logits_host and fence must be
 * others, until the first has been waited for. */
ts_status ts_unet_device_forward_start(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x_host,
                                       ts_tensor *logits_host, void *fence);
/* The same forward on a batch already in the backend's memory: x_dev
 * [N, in_channels, H, W] float32 there, and *logits_dev a float32 view
 * [N, classes, H, W] into the copy's arena, in the backend's memory, valid
 * until the next call. For callers that keep their data on the device, and
 * for timing the model as frameworks time theirs (input already on the
 * GPU); ts_unet_device_forward is this plus the two copies. */
ts_status ts_unet_device_forward_resident(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x_dev, ts_tensor *logits_dev);
void ts_unet_device_free(ts_unet_device *d);
/* Graphs (on by default; a backend without them runs the ops directly):
 * an inference copy runs the first forward of a batch shape directly, so
 * that every plan and buffer exists, records the second and launches the
 * recording, and from then on replays it while the shape, the input
 * buffer and the arena stay the same; anything else runs directly once
 * and is recorded on its next call. Logits are the same bits either way.
 * Off: every forward calls the ops one by one (for comparisons and
 * debugging). Training copies always call the ops directly. */
void ts_unet_device_set_graphs(ts_unet_device *d, int on);
/* A recording that fails (the backend or a library it calls does something
 * a graph cannot hold) turns graphs off for the copy: that forward and every
 * later one run the ops directly, with the same logits. This returns why, or
 * NULL while graphs work (or were never tried); set_graphs clears it. */
const char *ts_unet_device_graph_error(const ts_unet_device *d);

/* ---- training on a backend ---------------------------------------------
 * A training copy keeps the trainable weights, their gradients and the BN
 * running statistics in the backend's memory, in the host model's layouts,
 * so one step never crosses to the host except for the input batch (and the
 * scalars ops return). The host model stays the copy that files are read
 * into and written from: upload after loading, download before saving. The
 * graph code is the host model's (train forward, eval forward, backward),
 * so on the CPU backend the copy computes the same bits as ts_unet_forward
 * and ts_unet_backward on the host model. */

/* Uploads m's weights and running statistics (counters are copied on the
 * host) and zeroes the gradients. On error nothing is left allocated. */
ts_status ts_unet_device_init_train(ts_unet_device *d, const ts_unet *m, const ts_backend *b);
/* Host model -> training copy (after loading a checkpoint into m), and back
 * (before saving, validating on the host or handing m to a caller). The
 * download invalidates m's folded weights (call ts_unet_fold_bn again). */
ts_status ts_unet_device_upload_params(ts_unet_device *d, const ts_unet *m);
ts_status ts_unet_device_download_params(const ts_unet_device *d, ts_unet *m);
/* The unfolded forward of a training copy: train = 1 as ts_unet_forward's
 * train mode (batch statistics, running statistics and counters updated,
 * activations kept for backward), train = 0 its eval mode. x_host
 * [N, in_channels, H, W] is host memory: it is uploaded to the copy's input
 * buffer, or on a host backend read in place, so it must stay unchanged
 * until ts_unet_device_backward returns. *logits_dev is a view
 * [N, classes, H, W] into the arena, in the backend's memory, valid until
 * the next call. */
ts_status ts_unet_device_run(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x_host, int train,
                             ts_tensor *logits_dev);
/* Backward of the last train-mode run; dlogits_dev lies in the backend's
 * memory. Accumulates into d->grads as ts_unet_backward does. */
ts_status ts_unet_device_backward(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *dlogits_dev);
ts_status ts_unet_device_zero_grad(ts_unet_device *d, ts_ctx *ctx);

/* ---- mixed precision ----------------------------------------------------
 * A device copy runs float32 activations until this says otherwise. With
 * act = TS_BF16 or TS_F16 every activation (and activation gradient) is
 * that type, channels-last, as under torch.autocast with channels_last:
 * the input batch is cast on arrival, every conv weight is cast from the
 * float32 master weights (once for an inference copy; before every forward
 * of a training copy, as autocast does), the logits are cast back to float32
 * for the caller and the losses, dlogits are cast to the half type, and
 * each conv weight's half gradient is added into the float32 gradients.
 * The weights, gradients, BN parameters and statistics and the optimizer
 * stay float32 ("master weights"). Loss scaling for fp16 is the trainer's
 * (it scales dloss and unscales the gradients). Call it after init, before
 * running; it discards the plan. On error the copy is back at float32. */
ts_status ts_unet_device_set_precision(ts_unet_device *d, ts_ctx *ctx, ts_dtype act);
ts_dtype ts_unet_device_precision(const ts_unet_device *d);

/* The trainable block of a model wherever it lives: what the optimizer
 * (train/optim.h) updates. mem is the memory weights and grads live in
 * (NULL: host memory). */
typedef struct ts_unet_trainable {
    const ts_param *params;
    int n_params;
    float *weights, *grads;
    size_t n_weights;
    const ts_backend_memory *mem;
} ts_unet_trainable;

ts_unet_trainable ts_unet_host_trainable(ts_unet *m);
/* A training copy's block (zeroed pointers for an inference copy). */
ts_unet_trainable ts_unet_device_trainable(ts_unet_device *d);

#endif
