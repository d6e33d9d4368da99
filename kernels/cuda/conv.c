/* 2-D convolution on the GPU through cuDNN's convolution API (the "legacy"
 * descriptor API, still in cuDNN 9): cudnnConvolutionForward,
 * cudnnConvolutionBackwardData and cudnnConvolutionBackwardFilter,
 * cross-correlation, dilation 1, one group, as the CPU twins in
 * kernels/cpu/conv2d.c and kernels/cpu/half.c (same shape checks, same
 * messages, same semantics):
 *     forward          y   = conv(x, w), then + bias, + add and the fused ReLU
 *     backward data    dx += conv_transpose(dy, w)    (beta = 1)
 *     backward filter  dw += dy (*) x                  (beta = 1)
 *     backward bias    dbias[c] += sum of dy[:, c]    (own kernel, double)
 * The bias gradient is a small kernel in conv_epilogue.cu; see there for
 * why it is not cuDNN's.
 *
 * The forward with a bias and the ReLU (inference: BN folded into the conv,
 * then ReLU, most convs of the model) is one call,
 * cudnnConvolutionBiasActivationForward: y = relu(conv(x, w) + bias) with
 * alpha1 = 1 and alpha2 = 0 (z is y itself with y's descriptor, the usual
 * way to say "no z": with alpha2 = 0 what y held does not enter the result;
 * the GPU tests prefill y with NaN to hold cuDNN to that), the plan's
 * algorithm, math type and workspace (the fused call takes what
 * cudnnGetConvolutionForwardWorkspaceSize gives for the algorithm), and a
 * RELU activation that does not propagate NaN (our ReLU, v > 0 ? v : 0,
 * maps NaN to 0). That saves the second pass over y.
 * With the fused add of ts_conv2d_params (inference's conv2 + folded bn2 +
 * shortcut + ReLU of a ResNet block) the same call takes the add as z:
 * alpha2 = 1, z = the add tensor with y's descriptor (ts_conv2d_check made
 * it y's shape and dtype, and not y), so y = relu(conv + z + bias) and the
 * block's add and ReLU cost no pass over y of their own. cuDNN sums in
 * its own order (conv + z + bias, the CPU (conv + bias) + z): equal up to
 * float rounding, which the GPU tests allow for convolutions anyway.
 * Everything else (a bias without ReLU, a ReLU without bias, with or
 * without the add) stays two passes, cudnnConvolutionForward then our
 * epilogue kernel (conv_epilogue.cu), which adds the bias and the add in
 * the CPU's order: cuDNN's fused call takes an IDENTITY activation with one
 * algorithm only, and always needs a bias. If cuDNN answers
 * CUDNN_STATUS_NOT_SUPPORTED (or one of its sub-codes) for a plan (it
 * checks before it launches anything), the plan remembers it and runs the
 * two passes from then on: a choice between two GPU paths, never a CPU
 * fallback. It remembers the call with z and the call without z
 * separately: alpha2 != 0 makes cuDNN read z, and whether an engine for
 * the plan's algorithm takes that is its own question (the z-less call may
 * be supported where the one with z is not, and the answer for one says
 * nothing certain about the other), so a refusal of one never costs the
 * other its fusion. ts_cuda_conv_fusion_stats counts both paths.
 *
 * Half bias. Per-channel vectors stay float32 in the op table, but cuDNN's
 * half configurations take the bias in y's type, and autocast casts a
 * conv's bias to the half type with its weight. So every half forward with
 * a bias, on both paths (and on the CPU, kernels/cpu/half.c), adds the bias
 * rounded to y's type (to nearest even). On the fused path a small kernel
 * rounds it into the front of the workspace; the half result is rounded
 * once, as the CPU reference rounds it. On the two-pass path cuDNN has
 * already rounded the convolution to the half type before the epilogue adds
 * the bias, so y is rounded twice (compared with a tolerance anyway).
 *
 * Two element types (kernels/tensor.h): float32 NCHW, and the half types
 * (bf16, fp16) channels-last, which is the layout cuDNN's tensor-core
 * kernels run on without transposing. A half call describes x, y and the
 * weight as NHWC of CUDNN_DATA_BFLOAT16 or CUDNN_DATA_HALF (the weight
 * [out, in, kh, kw] is then [out, kh, kw, in] in memory, cuDNN's KRSC) with
 * a float32 compute type: cuDNN's PSEUDO_BFLOAT16 / PSEUDO_HALF
 * configurations, half I/O with float accumulation, as autocast's
 * convolutions. alpha and beta stay float and the beta = 1 blend of the
 * backward ops happens in float inside cuDNN, so dx and dw take
 * old + contribution rounded once, as kernels/backend.h asks. Half results
 * are compared with the CPU reference with a tolerance, not bit for bit.
 *
 * Plans. Everything cuDNN needs for one convolution (the descriptors,
 * the algorithm, its workspace size) is made once per key and cached: the
 * key is the op, the dtype, every shape and parameter, TF32 on/off (float32
 * only: it does not apply to half data, so a half key always has it off and
 * toggling it keeps the half plans), determinism on/off and the workspace
 * limit, so changing a setting makes new plans instead of running a plan
 * chosen under the old one.
 *
 * Choosing the algorithm. By default we take cuDNN's heuristic ranking
 * (cudnnGet*Algorithm_v7, PyTorch's choice when cudnn.benchmark is off), not
 * a timed search: the ranking depends only on the shapes, the device and the
 * cuDNN version, so a resumed run picks the same algorithms and therefore the
 * same bits, and nothing is benchmarked on the first step. In benchmark mode
 * (ts_cuda_set_benchmark, PyTorch's cudnn.benchmark; never with determinism
 * on) the list is cudnnFind*'s instead: every candidate run once on buffers
 * cuDNN allocates itself (the caller's are not touched, so an accumulating
 * backward op keeps what it holds), ranked by measured time. Either way the
 * first candidate in ranked order is taken that
 *  - reports CUDNN_STATUS_SUCCESS,
 *  - needs no more workspace than the limit (asked again with
 *    cudnnGet*WorkspaceSize for the chosen math type),
 *  - is CUDNN_DETERMINISTIC when determinism is on,
 *  - and keeps fp32 honest: with TF32 off the descriptor is CUDNN_FMA_MATH
 *    (no tensor-core rounding) and tensor-op candidates are skipped; with TF32
 *    on it is CUDNN_DEFAULT_MATH and the descriptor takes the candidate's own
 *    math type, as cuDNN asks. Half data is what tensor cores are for: the
 *    descriptor starts as CUDNN_TENSOR_OP_MATH and takes the candidate's
 *    math type (tensor-op, or a plain kernel for a shape the tensor-op ones
 *    do not take, such as few input channels). A candidate that may convert
 *    its inputs to a narrower type (CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION:
 *    fp32 to half, or bf16 to fp16 and its smaller range) is never taken.
 * The workspace is the backend's one grow-only buffer (ts_cuda_workspace). */
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "conv_epilogue.h"
#include "cuda_internal.h"

/* ---- shape checks (as kernels/cpu/conv2d.c) ---------------------------------- */

typedef struct conv_geom {
    int n, cin, h, w; /* input */
    int cout, kh, kw; /* weight */
    int ho, wo;       /* output */
    int sh, sw, ph, pw;
} conv_geom;

static size_t numel(const ts_tensor *t) { return (size_t)t->n * t->c * t->h * t->w; }

/* The CPU's conv_check: the backends' shared ts_conv2d_check, then cuDNN's
 * limits (in place of the CPU's BLAS one), in the same message format. */
static ts_status conv_check(const char *op, conv_geom *g, const ts_tensor *x, const char *xn, const ts_tensor *w,
                            const char *wn, const ts_tensor *y, const char *yn, const ts_conv2d_params *p)
{
    ts_status st = ts_conv2d_check(op, x, xn, w, wn, y, yn, p);
    if (st != TS_OK) return st;
    const int ho = y->h, wo = y->w; /* the output size, checked */
    /* cuDNN's descriptor API takes int dimensions and tensors of fewer than
     * 2^31 elements. */
    if (numel(x) > INT_MAX || numel(w) > INT_MAX || numel(y) > INT_MAX)
        return ts_conv2d_error(op, x, xn, w, wn, y, yn, p,
                               "a tensor has 2^31 or more elements, more than cuDNN takes; use a smaller batch or tile");
    if (x->data == y->data)
        return ts_conv2d_error(op, x, xn, w, wn, y, yn, p,
                               "%s and %s share memory; cuDNN convolutions cannot run in place", xn, yn);

    *g = (conv_geom){.n = x->n, .cin = x->c, .h = x->h, .w = x->w, .cout = w->n, .kh = w->h, .kw = w->w,
                     .ho = ho, .wo = wo, .sh = p->stride_h, .sw = p->stride_w, .ph = p->pad_h, .pw = p->pad_w};
    return TS_OK;
}

/* ---- plans ------------------------------------------------------------------------ */

typedef enum conv_kind { CONV_FWD = 0, CONV_BWD_DATA = 1, CONV_BWD_FILTER = 2 } conv_kind;
static const char *const kind_name[] = {"conv2d_forward", "conv2d_backward_data", "conv2d_backward_filter"};

typedef struct conv_key {
    int kind;
    ts_dtype dtype; /* of x, w and y alike (ts_conv2d_check) */
    conv_geom g;
    int tf32, deterministic; /* tf32 is 0 for a half dtype */
    int benchmark;           /* cudnnFind* ranking; 0 whenever deterministic */
    size_t workspace_limit;
} conv_key;

typedef struct conv_plan {
    int used;
    conv_key key;
    cudnnTensorDescriptor_t x, y; /* x [n,cin,h,w], y [n,cout,ho,wo]: NCHW, or NHWC for half */
    cudnnFilterDescriptor_t w;    /* [cout,cin,kh,kw]: KCRS, or KRSC for half */
    cudnnConvolutionDescriptor_t conv;
    /* Forward plans only: the bias [1,cout,1,1] of the fused call, of y's
     * data type and format (cuDNN's FLOAT / PSEUDO_HALF / PSEUDO_BFLOAT16
     * configurations take the bias in y's type). */
    cudnnTensorDescriptor_t bias;
    int algo;         /* a cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t, by key.kind */
    size_t workspace; /* bytes that algorithm needs */
    /* cudnnConvolutionBiasActivationForward answered NOT_SUPPORTED for this
     * plan without z (alpha2 = 0) or with the fused add as z (alpha2 = 1):
     * those bias + ReLU forwards run the two passes, without asking again.
     * Two flags, as the top of the file says why. */
    int fused_unsupported, fused_add_unsupported;
} conv_plan;

/* One model has a few dozen distinct conv shapes per input shape and op, so
 * 256 plans hold a training run's train and validation shapes; past that the
 * oldest slot is recycled (a linear scan over 256 small keys costs nothing
 * next to a convolution). */
#define PLAN_CACHE 256
static conv_plan g_plans[PLAN_CACHE];
static int g_next_slot;

/* Members compared one by one: the struct has no guaranteed-zero padding. */
static int key_equal(const conv_key *a, const conv_key *b)
{
    const conv_geom *p = &a->g, *q = &b->g;
    return a->kind == b->kind && a->dtype == b->dtype && a->tf32 == b->tf32 && a->deterministic == b->deterministic &&
           a->benchmark == b->benchmark && a->workspace_limit == b->workspace_limit && p->n == q->n && p->cin == q->cin && p->h == q->h &&
           p->w == q->w && p->cout == q->cout && p->kh == q->kh && p->kw == q->kw && p->ho == q->ho &&
           p->wo == q->wo && p->sh == q->sh && p->sw == q->sw && p->ph == q->ph && p->pw == q->pw;
}

/* Destroys a plan's descriptors. Destroy calls fail only for a bad handle;
 * if one does, it is reported, but the slot is cleared anyway so it can never
 * be used half-built. */
static ts_status plan_clear(conv_plan *pl)
{
    cudnnStatus_t first = CUDNN_STATUS_SUCCESS, e;
    const char *call = "";
    if (pl->x && (e = cudnnDestroyTensorDescriptor(pl->x)) != CUDNN_STATUS_SUCCESS && !call[0])
        first = e, call = "cudnnDestroyTensorDescriptor(x)";
    if (pl->y && (e = cudnnDestroyTensorDescriptor(pl->y)) != CUDNN_STATUS_SUCCESS && !call[0])
        first = e, call = "cudnnDestroyTensorDescriptor(y)";
    if (pl->w && (e = cudnnDestroyFilterDescriptor(pl->w)) != CUDNN_STATUS_SUCCESS && !call[0])
        first = e, call = "cudnnDestroyFilterDescriptor";
    if (pl->bias && (e = cudnnDestroyTensorDescriptor(pl->bias)) != CUDNN_STATUS_SUCCESS && !call[0])
        first = e, call = "cudnnDestroyTensorDescriptor(bias)";
    if (pl->conv && (e = cudnnDestroyConvolutionDescriptor(pl->conv)) != CUDNN_STATUS_SUCCESS && !call[0])
        first = e, call = "cudnnDestroyConvolutionDescriptor";
    memset(pl, 0, sizeof *pl);
    if (call[0]) return ts_cudnn_error(first, call, __FILE__, __LINE__);
    return TS_OK;
}

/* The math type a plan's descriptor starts with (see the top of the file). */
static cudnnMathType_t base_math(const conv_key *k)
{
    if (ts_dtype_is_half(k->dtype)) return CUDNN_TENSOR_OP_MATH;
    return k->tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH;
}

/* "float32", or "bf16 NHWC" / "f16 NHWC", for the messages. */
static const char *layout_name(ts_dtype t)
{
    switch (t) {
    case TS_BF16: return "bf16 NHWC";
    case TS_F16: return "f16 NHWC";
    default: return "float32";
    }
}

/* The descriptors of a plan, with the math type the dtype and the TF32
 * setting ask for. The dimensions are always the logical (n, c, h, w) and
 * (k, c, r, s); the format says where they live in memory. */
static ts_status plan_descriptors(conv_plan *pl)
{
    const conv_geom *g = &pl->key.g;
    const int half = ts_dtype_is_half(pl->key.dtype);
    const cudnnDataType_t type = !half ? CUDNN_DATA_FLOAT
                                 : pl->key.dtype == TS_BF16 ? CUDNN_DATA_BFLOAT16
                                                            : CUDNN_DATA_HALF;
    const cudnnTensorFormat_t format = half ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    TS_CUDNN_CHECK(cudnnCreateTensorDescriptor(&pl->x));
    TS_CUDNN_CHECK(cudnnCreateTensorDescriptor(&pl->y));
    TS_CUDNN_CHECK(cudnnCreateFilterDescriptor(&pl->w));
    TS_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&pl->conv));
    TS_CUDNN_CHECK(cudnnSetTensor4dDescriptor(pl->x, format, type, g->n, g->cin, g->h, g->w));
    TS_CUDNN_CHECK(cudnnSetTensor4dDescriptor(pl->y, format, type, g->n, g->cout, g->ho, g->wo));
    TS_CUDNN_CHECK(cudnnSetFilter4dDescriptor(pl->w, type, format, g->cout, g->cin, g->kh, g->kw));
    if (pl->key.kind == CONV_FWD) {
        /* [1,cout,1,1] is contiguous in either format; y's keeps it simple. */
        TS_CUDNN_CHECK(cudnnCreateTensorDescriptor(&pl->bias));
        TS_CUDNN_CHECK(cudnnSetTensor4dDescriptor(pl->bias, format, type, 1, g->cout, 1, 1));
    }
    /* Cross-correlation is what torch.nn.Conv2d computes; float accumulation,
     * for half data too (cuDNN's PSEUDO_* configurations: half storage,
     * float arithmetic, as autocast). */
    TS_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(pl->conv, g->ph, g->pw, g->sh, g->sw, 1, 1,
                                                   CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    TS_CUDNN_CHECK(cudnnSetConvolutionMathType(pl->conv, base_math(&pl->key)));
    /* Our output size rule and cuDNN's must agree, or every op would read or
     * write out of bounds; a cheap guard against a descriptor mistake. */
    int on, oc, oh, ow;
    TS_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(pl->conv, pl->x, pl->w, &on, &oc, &oh, &ow));
    if (on != g->n || oc != g->cout || oh != g->ho || ow != g->wo)
        return ts_error(TS_ERR_BACKEND, "%s: cuDNN computes output [%d,%d,%d,%d], terraseg [%d,%d,%d,%d]",
                        kind_name[pl->key.kind], on, oc, oh, ow, g->n, g->cout, g->ho, g->wo);
    return TS_OK;
}

/* One ranked candidate, whatever the op. */
typedef struct conv_candidate {
    int algo;
    cudnnStatus_t status;
    size_t memory;
    cudnnDeterminism_t determinism;
    cudnnMathType_t math;
} conv_candidate;

/* cuDNN 9 has 8 forward, 6 backward-data and 7 backward-filter algorithms;
 * the lists are ranked, so the first 16 are all we could want. */
#define MAX_CANDIDATES 16

/* The candidates in cuDNN's order: its heuristic ranking, or in benchmark
 * mode the measured one (cudnnFind*: each candidate run and timed on buffers
 * cuDNN allocates, which waits for the device; plans are only made by calls
 * run directly, never while a graph is recorded). */
static ts_status ranked_candidates(const conv_plan *pl, conv_candidate *out, int *count)
{
    cudnnHandle_t h = ts_cuda_state_get()->cudnn;
    const int find = pl->key.benchmark;
    int max = 0, got = 0;
    *count = 0;
    switch ((conv_kind)pl->key.kind) {
    case CONV_FWD: {
        cudnnConvolutionFwdAlgoPerf_t perf[MAX_CANDIDATES];
        TS_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithmMaxCount(h, &max));
        if (max > MAX_CANDIDATES) max = MAX_CANDIDATES;
        if (max < 1) break;
        if (find)
            TS_CUDNN_CHECK(cudnnFindConvolutionForwardAlgorithm(h, pl->x, pl->w, pl->conv, pl->y, max, &got, perf));
        else
            TS_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(h, pl->x, pl->w, pl->conv, pl->y, max, &got, perf));
        for (int i = 0; i < got && i < max; i++)
            out[i] = (conv_candidate){(int)perf[i].algo, perf[i].status, perf[i].memory, perf[i].determinism,
                                      perf[i].mathType};
        break;
    }
    case CONV_BWD_DATA: {
        cudnnConvolutionBwdDataAlgoPerf_t perf[MAX_CANDIDATES];
        TS_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithmMaxCount(h, &max));
        if (max > MAX_CANDIDATES) max = MAX_CANDIDATES;
        if (max < 1) break;
        if (find)
            TS_CUDNN_CHECK(
                cudnnFindConvolutionBackwardDataAlgorithm(h, pl->w, pl->y, pl->conv, pl->x, max, &got, perf));
        else
            TS_CUDNN_CHECK(
                cudnnGetConvolutionBackwardDataAlgorithm_v7(h, pl->w, pl->y, pl->conv, pl->x, max, &got, perf));
        for (int i = 0; i < got && i < max; i++)
            out[i] = (conv_candidate){(int)perf[i].algo, perf[i].status, perf[i].memory, perf[i].determinism,
                                      perf[i].mathType};
        break;
    }
    case CONV_BWD_FILTER: {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[MAX_CANDIDATES];
        TS_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(h, &max));
        if (max > MAX_CANDIDATES) max = MAX_CANDIDATES;
        if (max < 1) break;
        if (find)
            TS_CUDNN_CHECK(
                cudnnFindConvolutionBackwardFilterAlgorithm(h, pl->x, pl->y, pl->conv, pl->w, max, &got, perf));
        else
            TS_CUDNN_CHECK(
                cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, pl->x, pl->y, pl->conv, pl->w, max, &got, perf));
        for (int i = 0; i < got && i < max; i++)
            out[i] = (conv_candidate){(int)perf[i].algo, perf[i].status, perf[i].memory, perf[i].determinism,
                                      perf[i].mathType};
        break;
    }
    }
    *count = got < max ? got : max;
    return TS_OK;
}

/* The workspace the algorithm needs with the descriptor's current math type,
 * or a failed status when cuDNN cannot run it for these shapes. */
static cudnnStatus_t workspace_size(const conv_plan *pl, int algo, size_t *bytes)
{
    cudnnHandle_t h = ts_cuda_state_get()->cudnn;
    switch ((conv_kind)pl->key.kind) {
    case CONV_FWD:
        return cudnnGetConvolutionForwardWorkspaceSize(h, pl->x, pl->w, pl->conv, pl->y,
                                                       (cudnnConvolutionFwdAlgo_t)algo, bytes);
    case CONV_BWD_DATA:
        return cudnnGetConvolutionBackwardDataWorkspaceSize(h, pl->w, pl->y, pl->conv, pl->x,
                                                            (cudnnConvolutionBwdDataAlgo_t)algo, bytes);
    case CONV_BWD_FILTER:
        return cudnnGetConvolutionBackwardFilterWorkspaceSize(h, pl->x, pl->y, pl->conv, pl->w,
                                                              (cudnnConvolutionBwdFilterAlgo_t)algo, bytes);
    }
    return CUDNN_STATUS_BAD_PARAM;
}

static const char *math_name(cudnnMathType_t m)
{
    switch (m) {
    case CUDNN_DEFAULT_MATH: return "default";
    case CUDNN_TENSOR_OP_MATH: return "tensor-op";
    case CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION: return "tensor-op-with-conversion";
    case CUDNN_FMA_MATH: return "fma";
    }
    return "unknown";
}

/* Picks the algorithm (see the top of the file) and leaves the descriptor's
 * math type set for it. */
static ts_status plan_choose(conv_plan *pl)
{
    const conv_key *k = &pl->key;
    const int half = ts_dtype_is_half(k->dtype);
    const cudnnMathType_t base = base_math(k);
    conv_candidate cand[MAX_CANDIDATES];
    int count = 0;
    ts_status st = ranked_candidates(pl, cand, &count);
    if (st != TS_OK) return st;

    /* Why each candidate was passed over, for the message if none is left. */
    char skipped[512] = "";
    size_t len = 0;
    for (int i = 0; i < count; i++) {
        const conv_candidate *c = &cand[i];
        const char *why = NULL;
        size_t need = c->memory;
        if (c->status != CUDNN_STATUS_SUCCESS)
            why = "not supported";
        else if (k->deterministic && c->determinism != CUDNN_DETERMINISTIC)
            why = "not deterministic";
        else if (c->math == CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION ||
                 (!half && !k->tf32 && c->math == CUDNN_TENSOR_OP_MATH))
            why = "tensor-op math";
        else if (c->memory > k->workspace_limit)
            why = "workspace";
        if (!why) {
            /* cuDNN asks for the descriptor to carry the candidate's math type
             * when tensor cores are allowed (half data, or float32 with TF32
             * on); float32 with TF32 off stays FMA. */
            const cudnnMathType_t m = (half || k->tf32) ? c->math : CUDNN_FMA_MATH;
            TS_CUDNN_CHECK(cudnnSetConvolutionMathType(pl->conv, m));
            size_t bytes = 0;
            if (workspace_size(pl, c->algo, &bytes) != CUDNN_STATUS_SUCCESS)
                why = "no workspace size";
            else if (bytes > k->workspace_limit)
                why = "workspace";
            if (bytes > need) need = bytes;
            if (!why) {
                pl->algo = c->algo;
                pl->workspace = need;
                return TS_OK;
            }
            TS_CUDNN_CHECK(cudnnSetConvolutionMathType(pl->conv, base));
        }
        int n = snprintf(skipped + len, sizeof skipped - len, "%salgo %d (%s, %s math, %zu bytes)", i ? "; " : "",
                         c->algo, why, math_name(c->math), need);
        if (n > 0 && (size_t)n < sizeof skipped - len)
            len += (size_t)n;
        else
            len = sizeof skipped - 1; /* full: the message keeps what fitted */
    }
    const conv_geom *g = &k->g;
    return ts_error(TS_ERR_UNSUPPORTED,
                    "%s: x [%d,%d,%d,%d], w [%d,%d,%d,%d] %s, stride (%d,%d), pad (%d,%d): no cuDNN algorithm "
                    "fits (deterministic %s, %s, workspace limit %zu bytes); cuDNN %s: %s. Raise the workspace "
                    "limit or turn determinism off",
                    kind_name[k->kind], g->n, g->cin, g->h, g->w, g->cout, g->cin, g->kh, g->kw,
                    layout_name(k->dtype), g->sh, g->sw, g->ph, g->pw, k->deterministic ? "on" : "off",
                    half ? "tensor-op math" : k->tf32 ? "TF32 on" : "TF32 off", k->workspace_limit,
                    k->benchmark ? "measured" : "ranked", count ? skipped : "nothing");
}

/* The cached plan for (kind, dtype, g, current settings), made on first use. */
static ts_status get_plan(conv_kind kind, ts_dtype dtype, const conv_geom *g, conv_plan **out)
{
    const ts_cuda_state *s = ts_cuda_state_get();
    *out = NULL;
    if (!s->initialized)
        return ts_error(TS_ERR_INVALID_ARG, "%s: the CUDA backend is not initialized; call ts_cuda_backend first",
                        kind_name[kind]);
    /* The current device is per host thread; an op may be called from
     * another thread than the one that chose the device. */
    TS_CUDA_USE_DEVICE(s->device);
    conv_key key;
    memset(&key, 0, sizeof key);
    key.kind = kind;
    key.dtype = dtype;
    key.g = *g;
    key.tf32 = dtype == TS_F32 && s->tf32 != 0; /* TF32 is a float32 setting */
    key.deterministic = s->deterministic != 0;
    key.benchmark = s->benchmark != 0 && !key.deterministic;
    key.workspace_limit = s->workspace_limit;
    for (int i = 0; i < PLAN_CACHE; i++)
        if (g_plans[i].used && key_equal(&g_plans[i].key, &key)) {
            *out = &g_plans[i];
            return TS_OK;
        }

    conv_plan *pl = NULL;
    for (int i = 0; i < PLAN_CACHE && !pl; i++)
        if (!g_plans[i].used) pl = &g_plans[i];
    if (!pl) {
        pl = &g_plans[g_next_slot];
        g_next_slot = (g_next_slot + 1) % PLAN_CACHE;
        ts_status st = plan_clear(pl);
        if (st != TS_OK) return st;
    }
    pl->key = key;
    ts_status st = plan_descriptors(pl);
    if (st == TS_OK) st = plan_choose(pl);
    if (st != TS_OK) {
        /* Keep the message of the failure, not of the cleanup. */
        (void)plan_clear(pl);
        return st;
    }
    pl->used = 1;
    *out = pl;
    return TS_OK;
}

/* The shared workspace for a plan: `extra` bytes of our own (a multiple of
 * 256, so cuDNN's part keeps the buffer's alignment), then the plan's
 * workspace; *ws is the start of the whole buffer. The op is named in a
 * failure. */
static ts_status plan_workspace(const conv_plan *pl, size_t extra, void **ws)
{
    ts_status st = ts_cuda_workspace(extra + pl->workspace, ws);
    if (st != TS_OK) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", ts_last_error());
        return ts_error(st, "%s: %s", kind_name[pl->key.kind], msg);
    }
    return TS_OK;
}

/* ---- the ops ------------------------------------------------------------------------ */

/* A tensor's device memory as cuDNN takes it: `data` and `half` are one
 * pointer (kernels/tensor.h), the descriptors say what it holds. */
static void *dev(const ts_tensor *t) { return t->dtype == TS_F32 ? (void *)t->data : (void *)t->half; }

/* The fused call's activation: ReLU without NaN propagation (NaN gives 0, as
 * the CPU's v > 0 ? v : 0), coef unused. Made once, on first use, and kept
 * for the life of the process like the plans (a few bytes of host memory;
 * nothing on the device). */
static cudnnActivationDescriptor_t g_relu;

static ts_status relu_descriptor(cudnnActivationDescriptor_t *out)
{
    if (!g_relu) {
        cudnnActivationDescriptor_t d = NULL;
        TS_CUDNN_CHECK(cudnnCreateActivationDescriptor(&d));
        cudnnStatus_t e = cudnnSetActivationDescriptor(d, CUDNN_ACTIVATION_RELU, CUDNN_NOT_PROPAGATE_NAN, 0.0);
        if (e != CUDNN_STATUS_SUCCESS) {
            (void)cudnnDestroyActivationDescriptor(d); /* keep the message of the failure */
            return ts_cudnn_error(e, "cudnnSetActivationDescriptor(RELU)", __FILE__, __LINE__);
        }
        g_relu = d;
    }
    *out = g_relu;
    return TS_OK;
}

/* Forward calls that ran as one fused cuDNN call (with or without the
 * add), and forward calls with a bias, a ReLU or an add that ran as two
 * passes. Ops run from one thread at a time (one stream, the plan cache),
 * so plain counters do. */
static long g_fused_calls, g_unfused_calls;

/* The first refusal of the fused call in this process, for the benchmarks
 * and the GPU tests to print: which status, for which plan. */
static char g_first_refusal[512];

void ts_cuda_conv_fusion_stats(long *fused, long *unfused)
{
    if (fused) *fused = g_fused_calls;
    if (unfused) *unfused = g_unfused_calls;
}

const char *ts_cuda_conv_fusion_refusal(void) { return g_first_refusal[0] ? g_first_refusal : NULL; }

/* "x [..], w [..] dtype, stride (..), pad (..), bias and ReLU fused" for a
 * plan's fused call (with_add: it took the fused add as z). */
static void fused_desc(const conv_plan *pl, int with_add, char *buf, size_t n)
{
    const conv_geom *g = &pl->key.g;
    snprintf(buf, n, "x [%d,%d,%d,%d], w [%d,%d,%d,%d] %s, stride (%d,%d), pad (%d,%d), %s fused", g->n, g->cin, g->h,
             g->w, g->cout, g->cin, g->kh, g->kw, layout_name(pl->key.dtype), g->sh, g->sw, g->ph, g->pw,
             with_add ? "bias, add (as cuDNN's z) and ReLU" : "bias and ReLU");
}

/* "conv2d_forward: <fused_desc>: " + the pending message, for a failure of
 * the fused call. */
static ts_status forward_error(ts_status st, const conv_plan *pl, int with_add)
{
    char msg[1024], desc[256];
    snprintf(msg, sizeof msg, "%s", ts_last_error());
    fused_desc(pl, with_add, desc, sizeof desc);
    return ts_error(st, "conv2d_forward: %s: %s", desc, msg);
}

/* Statuses of the fused call that mean "not this call for this plan": cuDNN
 * 9's NOT_SUPPORTED category (its sub-codes: _SHAPE, _DATA_TYPE, _LAYOUT,
 * ...), its BAD_PARAM category (the documented refusals of this legacy call
 * for a bias type, an activation or a z it does not take come as either,
 * depending on the version), and a runtime-compiled engine that failed to
 * compile. The two passes then run the same convolution through
 * cudnnConvolutionForward, whose own errors are real errors. */
static int fused_refused(cudnnStatus_t e)
{
    const int category = CUDNN_STATUS_CATEGORY(e);
    return category == CUDNN_STATUS_NOT_SUPPORTED || category == CUDNN_STATUS_BAD_PARAM ||
           e == CUDNN_STATUS_INTERNAL_ERROR_COMPILATION_FAILED;
}

/* y = relu(conv(x, w) + bias [+ add]) in one cuDNN call. *done = 1 when it
 * ran; *done = 0 (and TS_OK) when cuDNN does not support it for this plan,
 * which the plan then remembers (for the call with add or without, as it
 * was). bias16 is the bias in y's half type for a half call, NULL for
 * float32 (bias is used then). add is NULL or a tensor of y's shape and
 * dtype other than y. */
static ts_status forward_fused(conv_plan *pl, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                               const void *bias16, const ts_tensor *add, void *ws, int *done)
{
    *done = 0;
    cudnnActivationDescriptor_t relu = NULL;
    ts_status st = relu_descriptor(&relu);
    if (st != TS_OK) return forward_error(st, pl, add != NULL);
    /* alpha1 = 1. Without add, alpha2 = 0 and z is y with y's descriptor:
     * what y held does not enter the result. With add, alpha2 = 1 and z is
     * the add tensor, described by pl->y (its shape, type and layout are
     * y's). All scaling factors are float, as for cudnnConvolutionForward
     * (the compute type). */
    const float one = 1.0f, zero = 0.0f;
    const void *z = add ? (const void *)dev(add) : (const void *)dev(y);
    cudnnStatus_t e = cudnnConvolutionBiasActivationForward(
        ts_cuda_state_get()->cudnn, &one, pl->x, dev(x), pl->w, dev(w), pl->conv, (cudnnConvolutionFwdAlgo_t)pl->algo,
        ws, pl->workspace, add ? &one : &zero, pl->y, z, pl->bias, bias16 ? bias16 : (const void *)bias, relu, pl->y,
        dev(y));
    if (fused_refused(e)) {
        if (!g_first_refusal[0]) {
            char desc[256];
            fused_desc(pl, add != NULL, desc, sizeof desc);
            snprintf(g_first_refusal, sizeof g_first_refusal,
                     "cudnnConvolutionBiasActivationForward: %s (status %d) for %s", cudnnGetErrorString(e), (int)e,
                     desc);
        }
        if (add)
            pl->fused_add_unsupported = 1;
        else
            pl->fused_unsupported = 1;
        return TS_OK;
    }
    if (e != CUDNN_STATUS_SUCCESS)
        return forward_error(ts_cudnn_error(e, "cudnnConvolutionBiasActivationForward", __FILE__, __LINE__), pl,
                             add != NULL);
    *done = 1;
    return TS_OK;
}

/* The bytes in front of cuDNN's workspace that hold a half call's bias in
 * y's type: 2 per channel, rounded up to 256 so cuDNN's part stays aligned. */
static size_t half_bias_bytes(int cout) { return ((size_t)cout * 2 + 255) / 256 * 256; }

ts_status ts_cuda_conv2d_forward(ts_ctx *ctx, ts_tensor *y, const ts_tensor *x, const ts_tensor *w, const float *bias,
                                 const ts_conv2d_params *p)
{
    (void)ctx; /* the CPU's column buffer; cuDNN uses the backend's workspace */
    conv_geom g;
    conv_plan *pl = NULL;
    void *ws = NULL;
    ts_status st = conv_check("conv2d_forward", &g, x, "x", w, "w", y, "y", p);
    if (st == TS_OK) st = get_plan(CONV_FWD, x->dtype, &g, &pl);
    if (st != TS_OK) return st;
    const int half = ts_dtype_is_half(y->dtype);
    const ts_tensor *add = p->add; /* checked by conv_check: y's shape and dtype, not y */
    int fuse = bias && p->relu && !(add ? pl->fused_add_unsupported : pl->fused_unsupported);
    /* A fused half call converts the bias into the front of the workspace;
     * cuDNN gets the rest. The buffer only grows, so after the first call
     * of a shape nothing here allocates or waits (CUDA graphs record it).
     * An algorithm that needs nearly the whole workspace limit leaves no
     * room for the bias: that plan runs the two passes. */
    if (fuse && half && half_bias_bytes(g.cout) > ts_cuda_state_get()->workspace_limit - pl->workspace) fuse = 0;
    const size_t front = fuse && half ? half_bias_bytes(g.cout) : 0;
    st = plan_workspace(pl, front, &ws);
    if (st != TS_OK) return st;
    void *conv_ws = front ? (void *)((char *)ws + front) : ws;

    if (fuse) {
        if (half) {
            st = ts_cuda_conv_bias_to_half((uint16_t *)ws, y->dtype, bias, g.cout);
            if (st != TS_OK) return st;
        }
        int done = 0;
        st = forward_fused(pl, y, x, w, bias, half ? ws : NULL, add, conv_ws, &done);
        if (st != TS_OK) return st;
        if (done) {
            g_fused_calls++;
            return TS_OK;
        }
        /* Not supported for this plan: the two passes below, now and from
         * now on (the converted bias is simply not used). */
    }

    /* beta = 0: y is overwritten and never read, whatever it held. alpha
     * and beta are float for every data type (cuDNN's scaling parameters
     * follow the compute type, float here). */
    const float one = 1.0f, zero = 0.0f;
    TS_CUDNN_CHECK(cudnnConvolutionForward(ts_cuda_state_get()->cudnn, &one, pl->x, dev(x), pl->w, dev(w), pl->conv,
                                           (cudnnConvolutionFwdAlgo_t)pl->algo, conv_ws, pl->workspace, &zero, pl->y,
                                           dev(y)));
    if (bias || p->relu || add) g_unfused_calls++;
    if (half)
        return ts_cuda_conv_epilogue_half(y->half, y->dtype, bias, add ? add->half : NULL, (size_t)g.n * g.ho * g.wo,
                                          g.cout, p->relu);
    return ts_cuda_conv_epilogue(y->data, bias, add ? add->data : NULL, g.n, g.cout, (size_t)g.ho * g.wo, p->relu);
}

ts_status ts_cuda_conv2d_backward_data(ts_ctx *ctx, ts_tensor *dx, const ts_tensor *dy, const ts_tensor *w,
                                       const ts_conv2d_params *p)
{
    (void)ctx;
    conv_geom g;
    conv_plan *pl = NULL;
    void *ws = NULL;
    ts_status st = conv_check("conv2d_backward_data", &g, dx, "dx", w, "w", dy, "dy", p);
    if (st == TS_OK) st = get_plan(CONV_BWD_DATA, dx->dtype, &g, &pl);
    if (st == TS_OK) st = plan_workspace(pl, 0, &ws);
    if (st != TS_OK) return st;
    /* beta = 1: dx += ..., the accumulate convention of every backward op. */
    const float one = 1.0f;
    TS_CUDNN_CHECK(cudnnConvolutionBackwardData(ts_cuda_state_get()->cudnn, &one, pl->w, dev(w), pl->y, dev(dy),
                                                pl->conv, (cudnnConvolutionBwdDataAlgo_t)pl->algo, ws, pl->workspace,
                                                &one, pl->x, dev(dx)));
    return TS_OK;
}

ts_status ts_cuda_conv2d_backward_filter(ts_ctx *ctx, ts_tensor *dw, const ts_tensor *dy, const ts_tensor *x,
                                         const ts_conv2d_params *p)
{
    (void)ctx;
    conv_geom g;
    conv_plan *pl = NULL;
    void *ws = NULL;
    ts_status st = conv_check("conv2d_backward_filter", &g, x, "x", dw, "dw", dy, "dy", p);
    if (st == TS_OK) st = get_plan(CONV_BWD_FILTER, x->dtype, &g, &pl);
    if (st == TS_OK) st = plan_workspace(pl, 0, &ws);
    if (st != TS_OK) return st;
    const float one = 1.0f; /* alpha 1, beta 1: dw += dy (*) x */
    TS_CUDNN_CHECK(cudnnConvolutionBackwardFilter(ts_cuda_state_get()->cudnn, &one, pl->x, dev(x), pl->y, dev(dy),
                                                  pl->conv, (cudnnConvolutionBwdFilterAlgo_t)pl->algo, ws,
                                                  pl->workspace, &one, pl->w, dev(dw)));
    return TS_OK;
}

ts_status ts_cuda_conv2d_backward_bias(ts_ctx *ctx, float *dbias, const ts_tensor *dy)
{
    (void)ctx;
    ts_status st = ts_conv2d_backward_bias_check(dbias, dy);
    if (st != TS_OK) return st;
    if (dy->dtype != TS_F32 && !ts_dtype_is_half(dy->dtype)) {
        char sh[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "conv2d_backward_bias: dy %s has dtype %s; float32, bf16 or f16 expected",
                        ts_shape_str(dy, sh), ts_dtype_name(dy->dtype));
    }
    const ts_cuda_state *s = ts_cuda_state_get();
    if (!s->initialized)
        return ts_error(TS_ERR_INVALID_ARG,
                        "conv2d_backward_bias: the CUDA backend is not initialized; call ts_cuda_backend first");
    TS_CUDA_USE_DEVICE(s->device); /* per host thread, as in get_plan */
    if (ts_dtype_is_half(dy->dtype))
        return ts_cuda_conv_bias_grad_half(dbias, dy->half, dy->dtype, (size_t)dy->n * dy->h * dy->w, dy->c);
    return ts_cuda_conv_bias_grad(dbias, dy->data, dy->n, dy->c, (size_t)dy->h * dy->w);
}
