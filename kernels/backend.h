/* The backend interface: one function pointer per op.
 *
 * nn/ and train/ call ops only through a ts_backend table, so they never know
 * whether the CPU (OpenBLAS) or the CUDA (cuDNN/cuBLAS) backend runs them.
 * Both backends implement the same signatures; a backend that lacks an op
 * leaves its pointer NULL and ts_backend_check() reports it by name, so a
 * missing GPU path fails loudly instead of falling back to the CPU.
 *
 * Conventions, kept by every op:
 *  - Outputs come first, then inputs, then a small parameter struct.
 *  - Shapes are checked; a mismatch returns TS_ERR_INVALID_ARG with a message
 *    naming the op and the shapes. Nothing a caller passes aborts the process.
 *  - Forward ops overwrite their outputs.
 *  - Backward ops ACCUMULATE (+=) into every gradient they write, input
 *    gradients as well as parameter gradients, so a tensor that feeds several
 *    consumers (a residual, a skip) just collects their contributions. The
 *    caller zeroes gradient buffers once per step.
 *  - Gradients have their true sign; the batch-mean scaling is done in the loss.
 *  - Per-channel vectors (bias, gamma, beta, BN statistics) are float arrays of
 *    the channel count of the tensor they belong to.
 *  - Class labels are int32 [n, h, w]; a label equal to ignore_index is
 *    skipped. Labels are >= 0, so a negative ignore_index (PyTorch's default is
 *    -100) ignores nothing.
 *  - Mixed precision: the activation ops (conv, batch norm, ReLU, pooling,
 *    upsampling, concat, add) take float32 NCHW tensors or half tensors
 *    (bf16 or fp16, NHWC; kernels/tensor.h), all the tensors of one call of
 *    one dtype (a conv's weight too: the graph casts the float32 master
 *    weights with convert, as autocast does). Per-channel vectors, dbias,
 *    BN statistics, losses, AdamW and the gradient-clipping ops stay float32.
 *    A half op computes what the float32 op computes on the widened inputs
 *    (accumulating in float32) and rounds each output element once to the
 *    half type, an accumulating op once after its add. A half conv2d_forward
 *    adds its float32 bias rounded to the half type (as autocast casts a
 *    conv's bias), on every backend and path. The CPU backend does
 *    exactly that (kernels/cpu/half.c): it is the reference the GPU's
 *    tensor-core kernels are compared with. */
#ifndef TS_BACKEND_H
#define TS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"
#include "tensor.h"

/* C linkage for the CUDA backend's .cu files, which nvcc compiles as C++. */
#ifdef __cplusplus
extern "C" {
#endif

typedef struct ts_backend ts_backend;

/* Per-run state an op may need: the backend and a bounded scratch buffer
 * (the conv column buffer), grown on first use and then reused. */
typedef struct ts_ctx {
    const ts_backend *backend;
    void *scratch;
    size_t scratch_bytes;
} ts_ctx;

ts_status ts_ctx_init(ts_ctx *ctx, const ts_backend *backend);
void ts_ctx_free(ts_ctx *ctx);
/* A scratch buffer of at least `bytes`; valid until the next call. */
ts_status ts_ctx_scratch(ts_ctx *ctx, size_t bytes, void **out);

/* ---- op parameters ---------------------------------------------------- */

/* 2-D cross-correlation as torch.nn.Conv2d, dilation 1, groups 1. The kernel
 * size comes from the weight tensor [out, in, kh, kw]. */
typedef struct ts_conv2d_params {
    int stride_h, stride_w;
    int pad_h, pad_w;
    /* Forward only: y = max(conv + bias, 0) in the same pass over y, the
     * fused epilogue of inference (conv + folded BN + ReLU). The backward ops
     * refuse it: training keeps ReLU as its own op, whose backward needs it. */
    int relu;
    /* Forward only, NULL otherwise: a tensor of y's shape and dtype (not y
     * itself), added before the ReLU: y = max(conv + bias + add, 0), or
     * conv + bias + add without relu. A ResNet block's conv2 + bn2 +
     * shortcut + ReLU in inference, in one pass (cuDNN's z). The sum is in
     * float32 and a half y is rounded once, after the ReLU. */
    const ts_tensor *add;
} ts_conv2d_params;

/* floor((in + 2 pad - k) / stride) + 1, or 0 when the kernel does not fit. */
int ts_conv_out_size(int in, int kernel, int stride, int pad);

/* The shape and parameter checks of conv2d, shared by the backends: x is the
 * input (or dx), w the weight (or dw), y the output (or dy); xn, wn, yn name
 * them in the error. On TS_OK, y is [x->n, w->n, ho, wo] with ho and wo the
 * output size. A backend's own limits report through ts_conv2d_error, which
 * formats the same message: op, the three shapes, stride and padding, then
 * the printf-style reason. */
ts_status ts_conv2d_check(const char *op, const ts_tensor *x, const char *xn, const ts_tensor *w, const char *wn,
                          const ts_tensor *y, const char *yn, const ts_conv2d_params *p);
ts_status ts_conv2d_error(const char *op, const ts_tensor *x, const char *xn, const ts_tensor *w, const char *wn,
                          const ts_tensor *y, const char *yn, const ts_conv2d_params *p, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 9, 10)))
#endif
    ;
/* conv2d_backward_bias: dbias non-NULL and dy a valid tensor. */
ts_status ts_conv2d_backward_bias_check(const float *dbias, const ts_tensor *dy);

/* Max pooling as torch.nn.MaxPool2d, dilation 1, ceil_mode False. */
typedef struct ts_pool2d_params {
    int kernel_h, kernel_w;
    int stride_h, stride_w;
    int pad_h, pad_w;
} ts_pool2d_params;

/* The shape and parameter checks of max pooling (PyTorch's rules), shared by
 * the backends: `in` [N,C,H,W] is the pooled input, `out` the pooled output;
 * op, inname and outname name them in the error. */
ts_status ts_pool2d_check(const char *op, const ts_tensor *in, const char *inname, const ts_tensor *out,
                          const char *outname, const ts_pool2d_params *p);

/* a and b non-NULL, with data and dimensions >= 1, and of one shape; op, an
 * and bn name them in the error (elementwise ops and batch norm). */
ts_status ts_same_shape_check(const char *op, const char *an, const ts_tensor *a, const char *bn, const ts_tensor *b);
/* The whole argument checks of relu_backward, add_forward and add_backward
 * (shapes, and the aliasing the ops refuse). */
ts_status ts_relu_backward_check(const ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y);
ts_status ts_add_forward_check(const ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
ts_status ts_add_backward_check(const ts_tensor *da, const ts_tensor *db, const ts_tensor *dy);
/* y [N, Ca + Cb, H, W] against a [N, Ca, H, W] and b [N, Cb, H, W] (concat
 * forward; backward passes dy, da, db); yn, an, bn name them in the error. */
ts_status ts_concat_check(const char *op, const char *yn, const ts_tensor *y, const char *an, const ts_tensor *a,
                          const char *bn, const ts_tensor *b);
/* p must not be NULL when n > 0 (zero, scale). */
ts_status ts_float_buffer_check(const char *op, const float *p, size_t n);
/* sum_squares: sumsq non-NULL, then *sumsq = 0 (the result for n == 0 and
 * after a NULL x), and x non-NULL when n > 0. */
ts_status ts_sum_squares_check(double *sumsq, const float *x, size_t n);
/* sum_squares_multi: count >= 0; for count > 0, sumsq, x and n non-NULL,
 * every sumsq[i] = 0, and each x[i] non-NULL when n[i] > 0. */
ts_status ts_sum_squares_multi_check(double *sumsq, const float *const *x, const size_t *n, int count);
/* Nearest upsampling: big is the tensor at the output resolution (y or dy),
 * small the one at the input resolution (x or dx); both valid, same n and c. */
ts_status ts_upsample_check(const char *op, const ts_tensor *big, const char *bigname, const ts_tensor *small,
                            const char *smallname);

/* BatchNorm2d: eps 1e-5 and momentum 0.1 are PyTorch's defaults. */
typedef struct ts_bn_params {
    float eps;
    float momentum;
} ts_bn_params;

/* The argument checks of the three batch-norm ops, shared by the backends
 * (shapes, NULL pointers, eps, aliasing, and PyTorch's one-value-per-channel
 * rule in training). */
ts_status ts_batchnorm_forward_train_check(const ts_tensor *y, const float *save_mean, const float *save_invstd,
                                           const ts_tensor *x, const float *gamma, const float *beta,
                                           const float *running_mean, const float *running_var, const ts_bn_params *p);
ts_status ts_batchnorm_forward_eval_check(const ts_tensor *y, const ts_tensor *x, const float *gamma, const float *beta,
                                          const float *running_mean, const float *running_var, const ts_bn_params *p);
ts_status ts_batchnorm_backward_check(const ts_tensor *dx, const float *dgamma, const float *dbeta, const ts_tensor *dy,
                                      const ts_tensor *x, const float *gamma, const float *save_mean,
                                      const float *save_invstd);

/* Softmax cross-entropy, reduction "mean" as torch.nn.CrossEntropyLoss:
 * -sum_valid w[y] log softmax(z)[y] / sum_valid w[y] (w = 1 without weights). */
typedef struct ts_ce_params {
    int ignore_index;
    const float *class_weights; /* [C] or NULL */
} ts_ce_params;

/* The two Dice losses of shared/specs/smp-unet.md section 6. */
typedef enum ts_dice_mode {
    /* smp.losses.DiceLoss(mode="multiclass"), SMP >= 0.4: one dice per class
     * over batch and pixels together, dice_c = (I + smooth) /
     * max(I + fp/2 + fn/2 + smooth, eps), classes absent from the target are
     * masked to 0, then the mean over all C (or the class-weighted mean). */
    TS_DICE_SMP = 0,
    /* The tutorial's per-image dice: dice_bc = (2 sum p t + eps) /
     * (sum p + sum t + eps) over pixels, loss = 1 - mean over (b, c).
     * smooth, log_loss and class_weights are not used. */
    TS_DICE_PER_IMAGE = 1,
} ts_dice_mode;

typedef struct ts_dice_params {
    ts_dice_mode mode;
    int ignore_index;
    float smooth;               /* SMP: 0 by default */
    float eps;                  /* 1e-7 in both forms */
    int log_loss;               /* SMP: loss_c = -log(max(dice_c, eps)) instead of 1 - dice_c */
    const float *class_weights; /* SMP: [C] or NULL */
} ts_dice_params;

/* The Dice losses' sums per (image, class), TS_DICE_SUMS doubles each, in
 * this order: sum of p, sum of t, sum of p t over the image's valid pixels.
 * Both backends form them; ts_dice_reduce (host code, kernels/ops_common.c)
 * turns N*C of them into the loss and, when gp is not NULL, the gradient of
 * dloss * loss per image and class: dL/dp_c = gp[n*C + c] + t_c gi[n*C + c]. */
enum { TS_DICE_SUM_P = 0, TS_DICE_SUM_T = 1, TS_DICE_SUM_I = 2, TS_DICE_SUMS = 3 };
double ts_dice_reduce(const ts_dice_params *p, int N, int C, const double *sums, double dloss, double *gp,
                      double *gi);

/* The loss checks, shared by the backends. ts_loss_check: logits (with data),
 * target, params and out (the loss or dlogits) non-NULL, logits dimensions
 * >= 1. ts_loss_dlogits_check: dlogits non-NULL, of logits' shape.
 * ts_dice_params_check: mode, eps, smooth, and SMP class weights that do not
 * sum to 0 (class_weights is read on the host). ts_loss_label_error: the error
 * for a label outside [0, C) that is not ignore_index, at flat pixel index
 * pixel of target [N,H,W]. */
ts_status ts_loss_check(const char *op, const ts_tensor *logits, const int32_t *target, const void *params,
                        const void *out);
ts_status ts_loss_dlogits_check(const char *op, const ts_tensor *dlogits, const ts_tensor *logits);
ts_status ts_dice_params_check(const char *op, const ts_dice_params *p, int C);
ts_status ts_loss_label_error(const char *op, const ts_tensor *logits, int32_t label, size_t pixel, int ignore_index);

/* The user's AdamW settings (torch.optim.AdamW defaults: 1e-3, 0.9, 0.999,
 * 1e-8, 1e-2). */
typedef struct ts_adamw_hparams {
    double lr, beta1, beta2, eps, weight_decay;
} ts_adamw_hparams;

/* Everything one AdamW step needs per element, computed once on the host in
 * double by ts_adamw_prepare() exactly where PyTorch uses Python floats, then
 * rounded to float as PyTorch's kernels do. */
typedef struct ts_adamw_step {
    float decay;           /* 1 - lr * weight_decay */
    float beta1_weight;    /* 1 - beta1: the lerp weight for exp_avg */
    float beta2;           /* exp_avg_sq *= beta2 */
    float one_minus_beta2; /* exp_avg_sq += (1 - beta2) g^2 */
    float bc2_sqrt;        /* sqrt(1 - beta2^t) */
    float eps;             /* added after the bias-corrected square root */
    float neg_step_size;   /* -lr / (1 - beta1^t) */
} ts_adamw_step;

/* t is the 1-based step number after increment, as PyTorch's state["step"]. */
ts_status ts_adamw_prepare(ts_adamw_step *s, const ts_adamw_hparams *h, long t);
/* adamw_update's checks, shared by the backends: s non-NULL, and for n > 0
 * four non-NULL, distinct buffers. */
ts_status ts_adamw_update_check(const float *param, const float *grad, const float *exp_avg, const float *exp_avg_sq,
                                size_t n, const ts_adamw_step *s);

/* convert's checks, shared by the backends: y and x valid tensors of one
 * shape, any dtypes, and y not overlapping x unless both are the same
 * tensor of one dtype (an in-place copy or doubling). */
ts_status ts_convert_check(const ts_tensor *y, const ts_tensor *x);
/* The tensors of one op call share a dtype: a and b (named an and bn in
 * the error) have one dtype, and a known one. */
ts_status ts_dtype_check(const char *op, const char *an, const ts_tensor *a, const char *bn, const ts_tensor *b);

/* ---- memory ---------------------------------------------------------- */

/* Where a backend's ops expect their tensors, and how to get data there. The
 * CPU backend works on host memory (host = 1: alloc is an aligned malloc,
 * upload and download are memcpy); the CUDA backend on device memory
 * (kernels/cuda/cuda_backend.h), which host code must never dereference.
 * Code that keeps its own tensors (ts_unet's weights and arena) runs only on
 * a backend with host = 1; ts_unet_device is the model's copy for the others.
 * Every function returns an error naming the call and the size. */
typedef struct ts_backend_memory {
    int host; /* 1: the memory is host memory (host code may read and write it) */
    /* *p = bytes of backend memory (contents undefined), or NULL and
     * TS_ERR_NOMEM; bytes == 0 may give NULL. */
    ts_status (*alloc)(void **p, size_t bytes);
    void (*free)(void *p); /* NULL is a no-op */
    /* Synchronous copies: they return when the data has arrived. */
    ts_status (*upload)(void *dst_backend, const void *src_host, size_t bytes);
    ts_status (*download)(void *dst_host, const void *src_backend, size_t bytes);
    /* Waits for every op queued so far and reports an asynchronous error. */
    ts_status (*sync)(void);

    /* Optional (NULL where the backend does not offer them; the CPU, whose
     * ops are plain calls, has nothing to overlap): asynchronous downloads
     * and fences, so that the host can work on one batch's results while
     * the device computes the next. Like the copies above they cannot be
     * recorded in a graph (an error while recording).
     *
     * Page-locked host memory: a device copies it by DMA, at full speed and
     * without a staging copy, which is what lets download_async return at
     * once. *p = bytes of it (contents undefined), or NULL and an error;
     * pinning is a scarce resource: a few buffers, allocated once. */
    ts_status (*host_alloc)(void **p, size_t bytes);
    void (*host_free)(void *p); /* NULL is a no-op; the caller has waited for the copies to and from p */
    /* Queues a copy after every op called so far and returns at once;
     * dst_host must lie in host_alloc memory. Its contents are undefined
     * until a fence recorded after this call has been waited for (an error
     * of the copy, too, surfaces at that wait). */
    ts_status (*download_async)(void *dst_host, const void *src_backend, size_t bytes);
    /* The other way: queues a copy from host_alloc memory after every op
     * called so far (so it may overwrite a buffer those ops read) and before
     * every op called later (which see the data); returns at once. src_host
     * must not change, nor be freed, until a fence recorded after this call
     * has been waited for: the device reads it when the queue gets there. */
    ts_status (*upload_async)(void *dst_backend, const void *src_host, size_t bytes);
    /* A fence is a point in the backend's queue. fence_record moves it to
     * after everything queued so far (may be called again: the latest
     * point counts); fence_wait returns when everything before that point
     * is done and reports an asynchronous error; a fence never recorded is
     * passed at once. */
    ts_status (*fence_new)(void **f);
    ts_status (*fence_record)(void *f);
    ts_status (*fence_wait)(void *f);
    void (*fence_free)(void *f); /* NULL is a no-op */
} ts_backend_memory;

/* 1 when the memory offers every asynchronous member above (host_alloc,
 * host_free, download_async, upload_async and the four fence calls). */
int ts_backend_memory_async(const ts_backend_memory *m);

/* ---- graphs: record a run of ops once, replay it -------------------------
 * Launching an op on a GPU costs a few microseconds of host time; a U-Net
 * forward is ~100 launches, which at batch 1 is as long as the arithmetic.
 * A backend that can record the ops it is given and replay the recording
 * in one launch (CUDA graphs) offers these; a backend whose ops are plain
 * function calls (the CPU) leaves `graphs` NULL, and callers run the ops
 * directly.
 *
 * Between begin and end the backend's ops are RECORDED, not run: each
 * checks its arguments and returns TS_OK (or its error) without touching
 * memory. A recording replays the very same ops on the very same pointers
 * and shapes, reading whatever the memory holds when it is launched; so the
 * caller must record again whenever a buffer the ops use moves. Ops that
 * hand a result to the host (the losses, sum_squares) and the memory
 * interface (alloc, copies, sync) cannot be recorded: they fail with an
 * error saying so. An op's first call for a new shape may need to allocate
 * (cuDNN's plans and workspace): run the ops once directly before recording
 * them. */
typedef struct ts_backend_graphs {
    /* Starts recording the ops called from this thread. */
    ts_status (*begin)(void);
    /* Ends the recording begun by begin; call it also when an op failed
     * while recording. On TS_OK *graph is the replayable recording (free it
     * with free); on an error *graph is NULL. */
    ts_status (*end)(void **graph);
    /* Replays a recording, queued like one op. *stale = 1 and nothing runs
     * when memory the backend itself owns and the recording points into was
     * replaced since (the conv workspace grew): free it and record again. */
    ts_status (*launch)(void *graph, int *stale);
    void (*free)(void *graph); /* NULL is a no-op */
} ts_backend_graphs;

/* ---- the table ------------------------------------------------------- */

struct ts_backend {
    const char *name;
    /* The memory the ops below take pointers into (never NULL in a table
     * terraseg builds; ts_backend_check reports it missing). */
    const ts_backend_memory *memory;
    /* Recording and replaying ops (see above), or NULL where direct calls
     * are as cheap (the CPU backend). */
    const ts_backend_graphs *graphs;

    /* y = conv(x, w) (+ bias). x [N,Cin,H,W], w [Cout,Cin,kh,kw], bias [Cout] or NULL. */
    ts_status (*conv2d_forward)(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w,
                                const float *bias, const ts_conv2d_params *p);
    /* dx += conv_transpose(dy, w). */
    ts_status (*conv2d_backward_data)(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                      const ts_conv2d_params *p);
    /* dw += dy (*) x. */
    ts_status (*conv2d_backward_filter)(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                        const ts_conv2d_params *p);
    /* dbias[c] += sum over n, h, w of dy[n, c]. */
    ts_status (*conv2d_backward_bias)(ts_ctx *ctx, float *dbias, const ts_tensor *dy);

    /* Training mode: normalizes with the batch statistics, saves the batch
     * mean and 1/sqrt(var_biased + eps) per channel for backward, and updates
     * running_mean/running_var (unbiased variance) unless they are NULL. */
    ts_status (*batchnorm_forward_train)(ts_ctx *ctx, ts_tensor *y, float *save_mean, float *save_invstd,
                                         const ts_tensor *x, const float *gamma, const float *beta,
                                         float *running_mean, float *running_var, const ts_bn_params *p);
    /* Eval mode: normalizes with the running statistics. */
    ts_status (*batchnorm_forward_eval)(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const float *gamma,
                                        const float *beta, const float *running_mean, const float *running_var,
                                        const ts_bn_params *p);
    /* Training-mode backward: dx, dgamma, dbeta += ... */
    ts_status (*batchnorm_backward)(ts_ctx *ctx, ts_tensor *dx, float *dgamma, float *dbeta, const ts_tensor *dy,
                                    const ts_tensor *x, const float *gamma, const float *save_mean,
                                    const float *save_invstd);

    /* y = max(x, 0); y may be x (in place). */
    ts_status (*relu_forward)(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
    /* dx += dy * (y > 0), with y the forward output; dx must not alias dy. */
    ts_status (*relu_backward)(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *y);

    /* Max pooling; index[i] is the arg-max of output i within its (n, c)
     * plane (ih * W + iw), PyTorch's first-in-scan-order tie rule. */
    ts_status (*maxpool2d_forward)(ts_ctx *ctx, ts_tensor *y, int32_t *index, const ts_tensor *x,
                                   const ts_pool2d_params *p);
    /* dx[index] += dy: the whole gradient goes to the one arg-max. */
    ts_status (*maxpool2d_backward)(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const int32_t *index,
                                    const ts_pool2d_params *p);

    /* Nearest upsampling to the size of y, with PyTorch's "nearest" index
     * rule: out == in copies, out == 2 in takes dst >> 1 (the exact 2x of
     * scale_factor=2), otherwise min(floor(dst * (float)in / out), in - 1)
     * (SMP >= 0.5's size= path). */
    ts_status (*upsample_nearest_forward)(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x);
    ts_status (*upsample_nearest_backward)(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy);

    /* y = cat([a, b], dim=1); backward splits dy back: da += dy[:, :Ca], db += dy[:, Ca:]. */
    ts_status (*concat_forward)(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
    ts_status (*concat_backward)(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);

    /* y = a + b (y may be a or b); backward: da += dy, db += dy. */
    ts_status (*add_forward)(ts_ctx *ctx, ts_tensor *y, const ts_tensor *a, const ts_tensor *b);
    ts_status (*add_backward)(ts_ctx *ctx, ts_tensor *da, ts_tensor *db, const ts_tensor *dy);

    /* Losses take logits [N,C,H,W] and labels [N,H,W]. forward returns the
     * loss; backward adds dloss * d(loss)/d(logits) into dlogits. */
    ts_status (*cross_entropy_forward)(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                                       const ts_ce_params *p);
    ts_status (*cross_entropy_backward)(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits,
                                        const int32_t *target, const ts_ce_params *p, float dloss);
    ts_status (*dice_forward)(ts_ctx *ctx, double *loss, const ts_tensor *logits, const int32_t *target,
                              const ts_dice_params *p);
    ts_status (*dice_backward)(ts_ctx *ctx, ts_tensor *dlogits, const ts_tensor *logits, const int32_t *target,
                               const ts_dice_params *p, float dloss);

    /* One AdamW step over n parameters, in place. */
    ts_status (*adamw_update)(ts_ctx *ctx, float *param, const float *grad, float *exp_avg, float *exp_avg_sq,
                              size_t n, const ts_adamw_step *s);

    /* p[0..n) = 0 (gradient buffers, once per step). */
    ts_status (*zero)(ts_ctx *ctx, float *p, size_t n);

    /* *sumsq = sum of x[i]^2 over x[0..n), accumulated in double over fixed
     * blocks (the same bits for any thread count): gradient-norm clipping. */
    ts_status (*sum_squares)(ts_ctx *ctx, double *sumsq, const float *x, size_t n);
    /* sumsq[i] = sum_squares of x[i][0..n[i]) for i < count, the same bits as
     * count sum_squares calls, in one call: on a device one synchronization
     * instead of one per tensor (clip_grad_norm's per-tensor norms, the loss
     * scaler's overflow check over every gradient of the model). */
    ts_status (*sum_squares_multi)(ts_ctx *ctx, double *sumsq, const float *const *x, const size_t *n, int count);
    /* x[0..n) *= a, in float32 (torch's Tensor.mul_ with a float scalar). */
    ts_status (*scale)(ts_ctx *ctx, float *x, size_t n, float a);

    /* y = x (accumulate 0) or y += x (accumulate 1), element by element
     * between any two dtypes, each tensor in its own layout (float32 NCHW,
     * half NHWC): Tensor.to(dtype, memory_format) and the cast's backward.
     * Widening is exact; the sum and the narrowing are float32 math rounded
     * once to y's dtype (to nearest, ties to even; out of range gives inf).
     * The graph casts the input image, the master weights and the logits
     * with it, and adds half weight gradients into the float32 ones. */
    ts_status (*convert)(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, int accumulate);
};

/* Every op of struct ts_backend, in order: the list that builds the CPU table
 * and lets ts_backend_check() name a missing op. The static_assert keeps it in
 * step with the struct. */
#define TS_BACKEND_OPS(X) \
    X(conv2d_forward) \
    X(conv2d_backward_data) \
    X(conv2d_backward_filter) \
    X(conv2d_backward_bias) \
    X(batchnorm_forward_train) \
    X(batchnorm_forward_eval) \
    X(batchnorm_backward) \
    X(relu_forward) \
    X(relu_backward) \
    X(maxpool2d_forward) \
    X(maxpool2d_backward) \
    X(upsample_nearest_forward) \
    X(upsample_nearest_backward) \
    X(concat_forward) \
    X(concat_backward) \
    X(add_forward) \
    X(add_backward) \
    X(cross_entropy_forward) \
    X(cross_entropy_backward) \
    X(dice_forward) \
    X(dice_backward) \
    X(adamw_update) \
    X(zero) \
    X(sum_squares) \
    X(sum_squares_multi) \
    X(scale) \
    X(convert)

#define TS_BACKEND_COUNT_OP(op) +1
enum { TS_BACKEND_OP_COUNT = 0 TS_BACKEND_OPS(TS_BACKEND_COUNT_OP) };
/* static_assert is C23 and C++; _Static_assert is C11. */
#ifdef __cplusplus
#define TS_STATIC_ASSERT static_assert
#else
#define TS_STATIC_ASSERT _Static_assert
#endif
/* The name, the memory interface and the graphs are the only members that
 * are not ops. */
TS_STATIC_ASSERT(sizeof(struct ts_backend) == sizeof(const char *) + sizeof(const ts_backend_memory *) +
                                                  sizeof(const ts_backend_graphs *) +
                                                  TS_BACKEND_OP_COUNT * sizeof(void (*)(void)),
                 "TS_BACKEND_OPS must list every op of struct ts_backend");

/* The CPU backend (always built). */
const ts_backend *ts_backend_cpu(void);
/* A device name: "cpu" (*cuda = 0), "cuda" or "cuda:N" (*cuda = 1, *index =
 * N, 0 for "cuda"); anything else is an error naming the accepted forms.
 * Touches no device. */
ts_status ts_device_parse(const char *name, int *cuda, int *index);
/* Looks a backend up by name (ts_device_parse's forms); an unknown or
 * unbuilt one is an error that says which backends this build has. */
ts_status ts_backend_get(const char *name, const ts_backend **out);
/* How a GPU backend does its math, process-wide like torch.backends.cudnn's
 * flags (and read by every later op, so set them before a run): deterministic
 * algorithms only (the same bits on every run, a resumed run continuing bit
 * for bit), TF32 tensor-core math for float32 convolutions and GEMMs, and
 * cuDNN's benchmark mode (algorithms chosen by timing; ignored under
 * determinism). All 0 is the default. The CPU backend is always
 * deterministic and exact float32, so all 0 is TS_OK in any build; anything
 * else in a build without CUDA is an error saying so. */
typedef struct ts_device_math {
    int deterministic, tf32, benchmark;
} ts_device_math;
ts_status ts_device_math_set(const ts_device_math *m);

/* TS_OK if every op of the table and the memory interface are implemented,
 * else an error listing the missing ones. */
ts_status ts_backend_check(const ts_backend *b);
/* 1 when the backend's ops take host memory (see ts_backend_memory). */
int ts_backend_is_host(const ts_backend *b);

#ifdef __cplusplus
}
#endif

#endif
