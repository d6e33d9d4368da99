/* smp.Unet("resnet34"): the parameter table, the layer graph, forward and
 * backward (shared/specs/smp-unet.md sections 1, 2, 5, 7.3 and 8).
 *
 * The model is kept as two flat lists built once at init:
 *  - the parameter table (ts_param, state_dict order), built by walking the
 *    module tree exactly as PyTorch registers it;
 *  - the layer graph: a list of nodes (conv, BN, ReLU, add, max-pool,
 *    upsample, concat) in execution order over numbered activation tensors.
 *    Nodes find their parameters in the table by SMP name, so the graph and
 *    the table cannot disagree silently.
 * Forward runs the nodes in order, backward in reverse, every op through
 * ctx->backend. Shapes depend on (N, H, W), so they are inferred and the
 * activation arena is planned when the batch shape changes; the graph itself
 * never changes after init. */
#include "unet.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define BN_EPS 1e-5f
#define BN_MOMENTUM 0.1f

/* ResNet-34: output channels of f1..f5, blocks and widths of layer1..4. */
static const int ENC_CH[TS_UNET_MAX_DEPTH] = {64, 64, 128, 256, 512};
static const int LAYER_BLOCKS[4] = {3, 4, 6, 3};
static const int LAYER_PLANES[4] = {64, 128, 256, 512};

/* ======================================================================
 * Configuration
 * ====================================================================== */

ts_unet_config ts_unet_default_config(int in_channels, int classes)
{
    ts_unet_config c;
    memset(&c, 0, sizeof c);
    c.in_channels = in_channels;
    c.classes = classes;
    c.encoder_depth = 5;
    c.decoder_channels[0] = 256;
    c.decoder_channels[1] = 128;
    c.decoder_channels[2] = 64;
    c.decoder_channels[3] = 32;
    c.decoder_channels[4] = 16;
    c.decoder_use_batchnorm = 1;
    return c;
}

/* Upper bound on decoder widths: far above any real U-Net, low enough that
 * shape products cannot overflow int. */
#define MAX_DECODER_CHANNELS 16384

ts_status ts_unet_config_check(const ts_unet_config *cfg)
{
    if (!cfg) return ts_error(TS_ERR_INVALID_ARG, "unet config: NULL config");
    if (cfg->in_channels < 1 || cfg->in_channels > 1024)
        return ts_error(TS_ERR_INVALID_ARG, "unet config: in_channels must be in 1..1024, got %d", cfg->in_channels);
    if (cfg->classes < 1 || cfg->classes > 1024)
        return ts_error(TS_ERR_INVALID_ARG, "unet config: classes must be in 1..1024, got %d", cfg->classes);
    if (cfg->encoder_depth < 3 || cfg->encoder_depth > TS_UNET_MAX_DEPTH)
        return ts_error(TS_ERR_INVALID_ARG, "unet config: encoder_depth must be 3, 4 or 5, got %d", cfg->encoder_depth);
    for (int i = 0; i < cfg->encoder_depth; i++)
        if (cfg->decoder_channels[i] < 1 || cfg->decoder_channels[i] > MAX_DECODER_CHANNELS)
            return ts_error(TS_ERR_INVALID_ARG,
                            "unet config: decoder_channels[%d] must be in 1..%d, got %d (encoder_depth %d needs %d "
                            "decoder channel entries)",
                            i, MAX_DECODER_CHANNELS, cfg->decoder_channels[i], cfg->encoder_depth, cfg->encoder_depth);
    if (cfg->decoder_use_batchnorm != 0 && cfg->decoder_use_batchnorm != 1)
        return ts_error(TS_ERR_INVALID_ARG, "unet config: decoder_use_batchnorm must be 0 or 1, got %d",
                        cfg->decoder_use_batchnorm);
    return TS_OK;
}

/* ======================================================================
 * The parameter table
 * ====================================================================== */

typedef struct table_builder {
    ts_param *p;
    int n, cap;
    size_t n_weights, n_buffers, n_counters;
} table_builder;

static ts_status tb_add(table_builder *b, const char *prefix, const char *suffix, ts_param_kind kind, int ndim,
                        const int *shape, int used)
{
    if (b->n == b->cap) {
        int cap = b->cap ? 2 * b->cap : 320;
        ts_param *np = realloc(b->p, (size_t)cap * sizeof *np);
        if (!np) return ts_error(TS_ERR_NOMEM, "unet: out of memory for the parameter table");
        b->p = np;
        b->cap = cap;
    }
    ts_param *e = &b->p[b->n];
    memset(e, 0, sizeof *e);
    int k = snprintf(e->name, sizeof e->name, "%s.%s", prefix, suffix);
    if (k < 0 || (size_t)k >= sizeof e->name)
        return ts_error(TS_ERR_INVALID_ARG, "unet: parameter name %s.%s is too long", prefix, suffix);
    e->kind = kind;
    e->ndim = ndim;
    e->numel = 1;
    for (int i = 0; i < ndim; i++) {
        e->shape[i] = shape[i];
        e->numel *= (size_t)shape[i];
    }
    e->used = used;
    size_t *count = kind == TS_PARAM_WEIGHT ? &b->n_weights : kind == TS_PARAM_BUFFER ? &b->n_buffers : &b->n_counters;
    e->offset = *count;
    *count += e->numel;
    b->n++;
    return TS_OK;
}

static ts_status tb_conv(table_builder *b, const char *prefix, int cout, int cin, int k, int bias, int used)
{
    int wshape[4] = {cout, cin, k, k};
    ts_status st = tb_add(b, prefix, "weight", TS_PARAM_WEIGHT, 4, wshape, used);
    if (st == TS_OK && bias) st = tb_add(b, prefix, "bias", TS_PARAM_WEIGHT, 1, &cout, used);
    return st;
}

/* BatchNorm2d registers weight and bias (parameters) before running_mean,
 * running_var and num_batches_tracked (buffers). */
static ts_status tb_bn(table_builder *b, const char *prefix, int c, int used)
{
    ts_status st = tb_add(b, prefix, "weight", TS_PARAM_WEIGHT, 1, &c, used);
    if (st == TS_OK) st = tb_add(b, prefix, "bias", TS_PARAM_WEIGHT, 1, &c, used);
    if (st == TS_OK) st = tb_add(b, prefix, "running_mean", TS_PARAM_BUFFER, 1, &c, used);
    if (st == TS_OK) st = tb_add(b, prefix, "running_var", TS_PARAM_BUFFER, 1, &c, used);
    if (st == TS_OK) st = tb_add(b, prefix, "num_batches_tracked", TS_PARAM_COUNTER, 0, NULL, used);
    return st;
}

/* Decoder block i: conv1 input channels = (head or dec[i-1]) + skip, where
 * the reversed encoder channels are e[j] = ENC_CH[depth-1-j] and the last
 * block has no skip (spec section 5). */
static void decoder_block_channels(const ts_unet_config *cfg, int i, int *in, int *skip, int *out)
{
    int d = cfg->encoder_depth;
    *in = i == 0 ? ENC_CH[d - 1] : cfg->decoder_channels[i - 1];
    *skip = i + 1 < d ? ENC_CH[d - 2 - i] : 0;
    *out = cfg->decoder_channels[i];
}

/* The whole table in state_dict order: encoder (conv1, bn1, layer1..4 with
 * every block's conv1, bn1, conv2, bn2[, downsample.0, downsample.1]), the
 * decoder blocks, the head. The encoder always has all four layers. */
static ts_status build_table(const ts_unet_config *cfg, table_builder *b)
{
    char pre[64];
    int d = cfg->encoder_depth;
    ts_status st = tb_conv(b, "encoder.conv1", 64, cfg->in_channels, 7, 0, 1);
    if (st == TS_OK) st = tb_bn(b, "encoder.bn1", 64, 1);
    int inplanes = 64;
    for (int l = 0; l < 4 && st == TS_OK; l++) {
        /* layer l+1 produces f(l+2), which depth >= l+2 uses. */
        int used = d >= l + 2;
        int planes = LAYER_PLANES[l];
        for (int blk = 0; blk < LAYER_BLOCKS[l] && st == TS_OK; blk++) {
            int cin = blk == 0 ? inplanes : planes;
            snprintf(pre, sizeof pre, "encoder.layer%d.%d.conv1", l + 1, blk);
            st = tb_conv(b, pre, planes, cin, 3, 0, used);
            snprintf(pre, sizeof pre, "encoder.layer%d.%d.bn1", l + 1, blk);
            if (st == TS_OK) st = tb_bn(b, pre, planes, used);
            snprintf(pre, sizeof pre, "encoder.layer%d.%d.conv2", l + 1, blk);
            if (st == TS_OK) st = tb_conv(b, pre, planes, planes, 3, 0, used);
            snprintf(pre, sizeof pre, "encoder.layer%d.%d.bn2", l + 1, blk);
            if (st == TS_OK) st = tb_bn(b, pre, planes, used);
            if (blk == 0 && l > 0 && st == TS_OK) {
                snprintf(pre, sizeof pre, "encoder.layer%d.0.downsample.0", l + 1);
                st = tb_conv(b, pre, planes, cin, 1, 0, used);
                snprintf(pre, sizeof pre, "encoder.layer%d.0.downsample.1", l + 1);
                if (st == TS_OK) st = tb_bn(b, pre, planes, used);
            }
        }
        inplanes = planes;
    }
    for (int i = 0; i < d && st == TS_OK; i++) {
        int in, skip, out;
        decoder_block_channels(cfg, i, &in, &skip, &out);
        int bn = cfg->decoder_use_batchnorm;
        snprintf(pre, sizeof pre, "decoder.blocks.%d.conv1.0", i);
        st = tb_conv(b, pre, out, in + skip, 3, !bn, 1);
        snprintf(pre, sizeof pre, "decoder.blocks.%d.conv1.1", i);
        if (st == TS_OK && bn) st = tb_bn(b, pre, out, 1);
        snprintf(pre, sizeof pre, "decoder.blocks.%d.conv2.0", i);
        if (st == TS_OK) st = tb_conv(b, pre, out, out, 3, !bn, 1);
        snprintf(pre, sizeof pre, "decoder.blocks.%d.conv2.1", i);
        if (st == TS_OK && bn) st = tb_bn(b, pre, out, 1);
    }
    if (st == TS_OK) st = tb_conv(b, "segmentation_head.0", cfg->classes, cfg->decoder_channels[d - 1], 3, 1, 1);
    return st;
}

static int table_find(const ts_param *p, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(p[i].name, name) == 0) return i;
    return -1;
}

/* ======================================================================
 * The layer graph
 * ====================================================================== */

typedef enum node_kind { OP_CONV, OP_BN, OP_RELU, OP_ADD, OP_MAXPOOL, OP_UPSAMPLE, OP_CONCAT } node_kind;

typedef struct unet_node {
    node_kind kind;
    int in0, in1; /* input tensors; in1 for add/concat; for upsample, in1 is the size reference */
    int out;
    char name[64]; /* module path for messages, e.g. "encoder.layer4.0.bn1" */
    /* conv */
    int w, b;      /* table indices of weight and bias (-1: no bias) */
    int stride, pad;
    /* bn: table indices */
    int gamma, beta, rmean, rvar, counter;
    /* planned per shape */
    size_t save_mean, save_invstd; /* bn (train plan) */
    size_t index;                  /* maxpool arg-max, int32 */
    /* Folded inference (fold_layout): every conv's weight and bias in the
     * folded block, BN folded in when folded (a BN reads its output). */
    size_t fold_w, fold_b; /* fold_b is NO_BIAS for a conv with neither bias nor BN */
    int folded;
} unet_node;

#define NO_BIAS ((size_t)-1)

typedef struct unet_tensor {
    int n, c, h, w;
    int alias;      /* in-place output: the tensor whose storage it reuses (a root), or -1 */
    size_t val;     /* arena offset of the value */
    size_t grad;    /* arena offset of the gradient (train plan) */
} unet_tensor;

struct ts_unet_layers {
    unet_node *nodes;
    int n_nodes, cap_nodes;
    unet_tensor *tensors; /* tensor 0 is the input image, which lives outside the arena */
    int n_tensors, cap_tensors;
    int logits;

    int planned;            /* the arena holds a plan for (plan_n, plan_h, plan_w) */
    int planned_train;      /* that plan has gradients and saved statistics */
    int have_train;         /* the last forward was a train forward: backward may run */
    const float *x_data;    /* the input of that forward (conv1's backward reads it) */
    size_t grad_begin, grad_bytes;

    float *folded; /* host model only: every conv's weights and biases, BN folded in (ts_unet_fold_bn) */
    size_t n_folded;
    int have_folded;

    /* Mixed precision (device copies, ts_unet_device_set_precision): the
     * activations' dtype. With a half type the input image gets a half copy
     * in the arena (tensor 0's val), the logits a float32 copy (logits32),
     * and the logits a gradient slot the caller's float32 dlogits are cast
     * into. */
    ts_dtype act;
    size_t logits32;
};

typedef struct graph_builder {
    ts_unet_layers *g;
    const ts_param *p;
    int np;
} graph_builder;

static ts_status gb_tensor(graph_builder *b, int c, int alias, int *id)
{
    ts_unet_layers *g = b->g;
    if (g->n_tensors == g->cap_tensors) {
        int cap = g->cap_tensors ? 2 * g->cap_tensors : 256;
        unet_tensor *nt = realloc(g->tensors, (size_t)cap * sizeof *nt);
        if (!nt) return ts_error(TS_ERR_NOMEM, "unet: out of memory for the layer graph");
        g->tensors = nt;
        g->cap_tensors = cap;
    }
    unet_tensor *t = &g->tensors[g->n_tensors];
    memset(t, 0, sizeof *t);
    t->c = c;
    /* Aliases always point at a root, so storage lookups are one step. */
    t->alias = alias < 0 ? -1 : g->tensors[alias].alias >= 0 ? g->tensors[alias].alias : alias;
    *id = g->n_tensors++;
    return TS_OK;
}

static ts_status gb_node(graph_builder *b, node_kind kind, const char *name, unet_node **out)
{
    ts_unet_layers *g = b->g;
    if (g->n_nodes == g->cap_nodes) {
        int cap = g->cap_nodes ? 2 * g->cap_nodes : 256;
        unet_node *nn = realloc(g->nodes, (size_t)cap * sizeof *nn);
        if (!nn) return ts_error(TS_ERR_NOMEM, "unet: out of memory for the layer graph");
        g->nodes = nn;
        g->cap_nodes = cap;
    }
    unet_node *n = &g->nodes[g->n_nodes++];
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->in0 = n->in1 = n->out = -1;
    n->w = n->b = -1;
    snprintf(n->name, sizeof n->name, "%s", name);
    *out = n;
    return TS_OK;
}

static ts_status gb_find(graph_builder *b, const char *prefix, const char *suffix, int required, int *idx)
{
    char name[96];
    snprintf(name, sizeof name, "%s.%s", prefix, suffix);
    *idx = table_find(b->p, b->np, name);
    if (*idx < 0 && required)
        return ts_error(TS_ERR_INVALID_ARG, "unet: internal error: the layer graph needs %s, which the table lacks",
                        name);
    return TS_OK;
}

static ts_status gb_conv(graph_builder *b, int in, const char *prefix, int stride, int pad, int *out)
{
    int w, bias;
    ts_status st = gb_find(b, prefix, "weight", 1, &w);
    if (st == TS_OK) st = gb_find(b, prefix, "bias", 0, &bias);
    if (st != TS_OK) return st;
    if (b->p[w].shape[1] != b->g->tensors[in].c)
        return ts_error(TS_ERR_INVALID_ARG, "unet: internal error: %s.weight expects %d input channels, the graph has %d",
                        prefix, b->p[w].shape[1], b->g->tensors[in].c);
    st = gb_tensor(b, b->p[w].shape[0], -1, out);
    unet_node *n;
    if (st == TS_OK) st = gb_node(b, OP_CONV, prefix, &n);
    if (st != TS_OK) return st;
    n->in0 = in;
    n->out = *out;
    n->w = w;
    n->b = bias;
    n->stride = stride;
    n->pad = pad;
    return TS_OK;
}

static ts_status gb_bn(graph_builder *b, int in, const char *prefix, int *out)
{
    int idx[5];
    static const char *const sfx[5] = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"};
    for (int i = 0; i < 5; i++) {
        ts_status st = gb_find(b, prefix, sfx[i], 1, &idx[i]);
        if (st != TS_OK) return st;
    }
    ts_status st = gb_tensor(b, b->g->tensors[in].c, -1, out);
    unet_node *n;
    if (st == TS_OK) st = gb_node(b, OP_BN, prefix, &n);
    if (st != TS_OK) return st;
    n->in0 = in;
    n->out = *out;
    n->gamma = idx[0];
    n->beta = idx[1];
    n->rmean = idx[2];
    n->rvar = idx[3];
    n->counter = idx[4];
    return TS_OK;
}

/* In place: the output shares the input's storage (it has its own gradient).
 * Safe because no backward reads a ReLU's input: BN backward reads the BN
 * input, the ReLU backward reads the ReLU output. */
static ts_status gb_relu(graph_builder *b, int in, const char *name, int *out)
{
    ts_status st = gb_tensor(b, b->g->tensors[in].c, in, out);
    unet_node *n;
    if (st == TS_OK) st = gb_node(b, OP_RELU, name, &n);
    if (st != TS_OK) return st;
    n->in0 = in;
    n->out = *out;
    return TS_OK;
}

/* kind OP_ADD writes into a's storage (a is a BN output nobody reads again);
 * OP_CONCAT and OP_UPSAMPLE get fresh storage. For OP_UPSAMPLE, b is only
 * the size reference. */
static ts_status gb_binary(graph_builder *b, node_kind kind, int a, int bb, const char *name, int *out)
{
    int c = kind == OP_CONCAT ? b->g->tensors[a].c + b->g->tensors[bb].c : b->g->tensors[a].c;
    ts_status st = gb_tensor(b, c, kind == OP_ADD ? a : -1, out);
    unet_node *n;
    if (st == TS_OK) st = gb_node(b, kind, name, &n);
    if (st != TS_OK) return st;
    n->in0 = a;
    n->in1 = bb;
    n->out = *out;
    return TS_OK;
}

static ts_status gb_maxpool(graph_builder *b, int in, int *out)
{
    ts_status st = gb_tensor(b, b->g->tensors[in].c, -1, out);
    unet_node *n;
    if (st == TS_OK) st = gb_node(b, OP_MAXPOOL, "encoder.maxpool", &n);
    if (st != TS_OK) return st;
    n->in0 = in;
    n->out = *out;
    return TS_OK;
}

/* torchvision BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + identity),
 * identity = downsample(x) (1x1 stride-s conv + BN) in block 0 of layer2..4. */
static ts_status gb_basic_block(graph_builder *b, int in, int layer, int blk, int stride, int downsample, int *out)
{
    char pre[32], name[96];
    int t = 0, id = in;
    snprintf(pre, sizeof pre, "encoder.layer%d.%d", layer, blk);
    snprintf(name, sizeof name, "%s.conv1", pre);
    ts_status st = gb_conv(b, in, name, stride, 1, &t);
    snprintf(name, sizeof name, "%s.bn1", pre);
    if (st == TS_OK) st = gb_bn(b, t, name, &t);
    snprintf(name, sizeof name, "%s.relu (after bn1)", pre);
    if (st == TS_OK) st = gb_relu(b, t, name, &t);
    /* The shortcut before conv2, so that in inference conv2 + bn2 + add +
     * ReLU can run as one op with the shortcut ready (run_forward). The
     * backward, in reverse, still adds downsample's input gradient before
     * conv1's, as when it came after bn2. */
    if (downsample && st == TS_OK) {
        snprintf(name, sizeof name, "%s.downsample.0", pre);
        st = gb_conv(b, in, name, stride, 0, &id);
        snprintf(name, sizeof name, "%s.downsample.1", pre);
        if (st == TS_OK) st = gb_bn(b, id, name, &id);
    }
    snprintf(name, sizeof name, "%s.conv2", pre);
    if (st == TS_OK) st = gb_conv(b, t, name, 1, 1, &t);
    snprintf(name, sizeof name, "%s.bn2", pre);
    if (st == TS_OK) st = gb_bn(b, t, name, &t);
    snprintf(name, sizeof name, "%s (residual add)", pre);
    if (st == TS_OK) st = gb_binary(b, OP_ADD, t, id, name, &t);
    snprintf(name, sizeof name, "%s.relu (after add)", pre);
    if (st == TS_OK) st = gb_relu(b, t, name, &t);
    *out = t;
    return st;
}

/* Conv2dReLU: conv -> BN -> ReLU, or conv (with bias) -> ReLU without BN. */
static ts_status gb_conv_relu(graph_builder *b, int in, int blk, int which, int use_bn, int *out)
{
    char name[80];
    int t = 0;
    snprintf(name, sizeof name, "decoder.blocks.%d.conv%d.0", blk, which);
    ts_status st = gb_conv(b, in, name, 1, 1, &t);
    if (use_bn && st == TS_OK) {
        snprintf(name, sizeof name, "decoder.blocks.%d.conv%d.1", blk, which);
        st = gb_bn(b, t, name, &t);
    }
    snprintf(name, sizeof name, "decoder.blocks.%d.conv%d.2 (relu)", blk, which);
    if (st == TS_OK) st = gb_relu(b, t, name, &t);
    *out = t;
    return st;
}

static ts_status build_graph(const ts_unet_config *cfg, const ts_param *p, int np, ts_unet_layers *g)
{
    graph_builder b = {g, p, np};
    int d = cfg->encoder_depth;
    int x = 0, t = 0, feats[TS_UNET_MAX_DEPTH] = {0}; /* f1..f_depth */
    ts_status st = gb_tensor(&b, cfg->in_channels, -1, &x);
    if (st == TS_OK) st = gb_conv(&b, x, "encoder.conv1", 2, 3, &t);
    if (st == TS_OK) st = gb_bn(&b, t, "encoder.bn1", &t);
    if (st == TS_OK) st = gb_relu(&b, t, "encoder.relu", &t);
    feats[0] = t;
    if (st == TS_OK) st = gb_maxpool(&b, t, &t);
    for (int l = 0; l < 4 && l + 2 <= d && st == TS_OK; l++) {
        for (int blk = 0; blk < LAYER_BLOCKS[l] && st == TS_OK; blk++) {
            int first_strided = blk == 0 && l > 0;
            st = gb_basic_block(&b, t, l + 1, blk, first_strided ? 2 : 1, first_strided, &t);
        }
        feats[l + 1] = t;
    }
    /* Decoder: head = f_depth; block i upsamples to the next-shallower
     * feature's size (the input's for the last block) and concatenates it,
     * upsampled tensor first. */
    int y = feats[d - 1];
    for (int i = 0; i < d && st == TS_OK; i++) {
        char name[80];
        int has_skip = i + 1 < d;
        int ref = has_skip ? feats[d - 2 - i] : x;
        snprintf(name, sizeof name, "decoder.blocks.%d (upsample)", i);
        st = gb_binary(&b, OP_UPSAMPLE, y, ref, name, &y);
        if (has_skip && st == TS_OK) {
            snprintf(name, sizeof name, "decoder.blocks.%d (concat skip)", i);
            st = gb_binary(&b, OP_CONCAT, y, ref, name, &y);
        }
        if (st == TS_OK) st = gb_conv_relu(&b, y, i, 1, cfg->decoder_use_batchnorm, &y);
        if (st == TS_OK) st = gb_conv_relu(&b, y, i, 2, cfg->decoder_use_batchnorm, &y);
    }
    if (st == TS_OK) st = gb_conv(&b, y, "segmentation_head.0", 1, 1, &g->logits);
    return st;
}

static void layers_free(ts_unet_layers *g)
{
    if (!g) return;
    free(g->nodes);
    free(g->tensors);
    ts_aligned_free(g->folded);
    free(g);
}

/* ======================================================================
 * Shapes and the activation plan
 * ====================================================================== */

static ts_status infer_shapes(ts_unet_layers *g, const ts_param *p, int n, int h, int w)
{
    unet_tensor *T = g->tensors;
    T[0].n = n;
    T[0].h = h;
    T[0].w = w;
    for (int i = 0; i < g->n_nodes; i++) {
        const unet_node *nd = &g->nodes[i];
        const unet_tensor *a = &T[nd->in0];
        unet_tensor *o = &T[nd->out];
        o->n = a->n;
        o->h = a->h;
        o->w = a->w;
        if (nd->kind == OP_CONV) {
            int k = p[nd->w].shape[2];
            o->h = ts_conv_out_size(a->h, k, nd->stride, nd->pad);
            o->w = ts_conv_out_size(a->w, k, nd->stride, nd->pad);
        } else if (nd->kind == OP_MAXPOOL) {
            o->h = ts_conv_out_size(a->h, 3, 2, 1);
            o->w = ts_conv_out_size(a->w, 3, 2, 1);
        } else if (nd->kind == OP_UPSAMPLE) {
            o->h = T[nd->in1].h;
            o->w = T[nd->in1].w;
        }
        /* Every stride-2 op maps L >= 1 to ceil(L/2) >= 1, so this only
         * guards against a graph bug. */
        if (o->h < 1 || o->w < 1)
            return ts_error(TS_ERR_INVALID_ARG, "unet: input %dx%d is too small at %s", h, w, nd->name);
    }
    return TS_OK;
}

static size_t tensor_numel(const unet_tensor *t) { return (size_t)t->n * t->c * t->h * t->w; }
static size_t tensor_bytes(const ts_unet_layers *g, const unet_tensor *t)
{
    return tensor_numel(t) * ts_dtype_size(g->act);
}
static size_t round_align(size_t b) { return (b + TS_ALIGN - 1) / TS_ALIGN * TS_ALIGN; }

/* Train plan: every activation and every activation gradient has its own
 * slot (skips and everything backward reads stay alive by construction),
 * gradients last and contiguous so one zero() clears them all. */
static ts_status plan_train(ts_unet_layers *g, ts_arena *a)
{
    ts_status st = TS_OK;
    const int half = g->act != TS_F32;
    /* With half activations the input image is cast into the arena. */
    for (int t = half ? 0 : 1; t < g->n_tensors && st == TS_OK; t++) {
        unet_tensor *T = &g->tensors[t];
        if (T->alias < 0)
            st = ts_arena_plan(a, tensor_bytes(g, T), &T->val);
        else
            T->val = g->tensors[T->alias].val;
    }
    if (half && st == TS_OK)
        st = ts_arena_plan(a, tensor_numel(&g->tensors[g->logits]) * sizeof(float), &g->logits32);
    for (int i = 0; i < g->n_nodes && st == TS_OK; i++) {
        unet_node *nd = &g->nodes[i];
        const unet_tensor *o = &g->tensors[nd->out];
        if (nd->kind == OP_BN) {
            st = ts_arena_plan(a, (size_t)o->c * sizeof(float), &nd->save_mean);
            if (st == TS_OK) st = ts_arena_plan(a, (size_t)o->c * sizeof(float), &nd->save_invstd);
        } else if (nd->kind == OP_MAXPOOL) {
            st = ts_arena_plan(a, (size_t)o->n * o->c * o->h * o->w * sizeof(int32_t), &nd->index);
        }
    }
    g->grad_begin = a->planned;
    /* The input image gets no gradient; the logits' gradient is the caller's
     * dlogits, or with half activations their cast. */
    for (int t = 1; t < g->n_tensors && st == TS_OK; t++)
        if (t != g->logits || half) st = ts_arena_plan(a, tensor_bytes(g, &g->tensors[t]), &g->tensors[t].grad);
    g->grad_bytes = a->planned - g->grad_begin;
    return st;
}

/* Eval plan: storage is reused once its last reader has run. Each storage
 * root lives from the node that first writes it to the last node that reads
 * it (or writes it in place); blocks are placed first-fit by offset among the
 * blocks live at that moment, inside one arena slot. */
typedef struct live_block {
    size_t off, size;
    int first, last;
} live_block;

static int cmp_off(const void *x, const void *y)
{
    const live_block *a = *(const live_block *const *)x, *b = *(const live_block *const *)y;
    return a->off < b->off ? -1 : a->off > b->off;
}

static ts_status plan_eval(ts_unet_layers *g, ts_arena *a)
{
    int nt = g->n_tensors, nn = g->n_nodes;
    /* one block per storage root (by tensor id) and one per max-pool index */
    int nblocks = nt + nn;
    live_block *blk = calloc((size_t)nblocks, sizeof *blk);
    live_block **act = calloc((size_t)nblocks, sizeof *act);
    if (!blk || !act) {
        free(blk);
        free(act);
        return ts_error(TS_ERR_NOMEM, "unet: out of memory planning activations");
    }
    for (int t = 0; t < nblocks; t++) blk[t].first = -1;
    for (int i = 0; i < nn; i++) {
        const unet_node *nd = &g->nodes[i];
        int ins[2] = {nd->in0, nd->kind == OP_UPSAMPLE ? -1 : nd->in1};
        for (int k = 0; k < 2; k++) {
            if (ins[k] < 0) continue;
            int r = g->tensors[ins[k]].alias >= 0 ? g->tensors[ins[k]].alias : ins[k];
            if (blk[r].last < i) blk[r].last = i;
        }
        int r = g->tensors[nd->out].alias >= 0 ? g->tensors[nd->out].alias : nd->out;
        if (blk[r].first < 0) {
            blk[r].first = i;
            blk[r].size = round_align(tensor_bytes(g, &g->tensors[r]));
        }
        if (blk[r].last < i) blk[r].last = i;
        /* A BN-folded conv writes straight into the BN's output, one node
         * early: keep the conv's input alive through the BN node and let the
         * BN output exist from the conv node on. */
        if (nd->kind == OP_BN && i > 0 && g->nodes[i - 1].kind == OP_CONV && g->nodes[i - 1].out == nd->in0) {
            int cin = g->nodes[i - 1].in0;
            int rc = g->tensors[cin].alias >= 0 ? g->tensors[cin].alias : cin;
            if (blk[rc].last < i) blk[rc].last = i;
            if (blk[r].first == i) blk[r].first = i - 1;
        }
        if (nd->kind == OP_MAXPOOL) {
            const unet_tensor *o = &g->tensors[nd->out];
            live_block *ib = &blk[nt + i];
            ib->first = ib->last = i;
            ib->size = round_align((size_t)o->n * o->c * o->h * o->w * sizeof(int32_t));
        }
    }
    blk[g->logits].last = nn; /* returned to the caller */
    const int half = g->act != TS_F32;
    blk[0].first = -1; /* the input image is the caller's */
    if (half) {
        /* ... but its half cast lives in the arena from the start. */
        blk[0].first = 0;
        blk[0].size = round_align(tensor_bytes(g, &g->tensors[0]));
    }

    size_t peak = 0;
    for (int i = 0; i < nn; i++) {
        /* live at i: blocks already placed whose last >= i */
        for (int b = 0; b < nblocks; b++) {
            if (blk[b].first != i) continue;
            int na = 0;
            for (int c = 0; c < nblocks; c++)
                if (c != b && blk[c].first >= 0 && blk[c].first < i + (c < b) && blk[c].last >= i) act[na++] = &blk[c];
            qsort(act, (size_t)na, sizeof *act, cmp_off);
            size_t off = 0;
            for (int k = 0; k < na; k++) {
                if (act[k]->off >= off + blk[b].size) break;
                if (act[k]->off + act[k]->size > off) off = act[k]->off + act[k]->size;
            }
            blk[b].off = off;
            if (off + blk[b].size > peak) peak = off + blk[b].size;
        }
    }
    size_t base;
    ts_status st = ts_arena_plan(a, peak ? peak : TS_ALIGN, &base);
    if (st == TS_OK && half)
        st = ts_arena_plan(a, tensor_numel(&g->tensors[g->logits]) * sizeof(float), &g->logits32);
    if (st == TS_OK) {
        for (int t = half ? 0 : 1; t < nt; t++) {
            int r = g->tensors[t].alias >= 0 ? g->tensors[t].alias : t;
            g->tensors[t].val = base + blk[r].off;
        }
        for (int i = 0; i < nn; i++)
            if (g->nodes[i].kind == OP_MAXPOOL) g->nodes[i].index = base + blk[nt + i].off;
    }
    g->grad_begin = g->grad_bytes = 0;
    free(blk);
    free(act);
    return st;
}

static ts_status plan(ts_unet_layers *g, const ts_param *p, ts_arena *a, int n, int h, int w, int train)
{
    ts_status st = infer_shapes(g, p, n, h, w);
    if (st != TS_OK) return st;
    return train ? plan_train(g, a) : plan_eval(g, a);
}

/* ======================================================================
 * Init, free, lookup
 * ====================================================================== */

static void set_default_values(ts_unet *m)
{
    memset(m->weights, 0, m->n_weights * sizeof(float));
    memset(m->buffers, 0, m->n_buffers * sizeof(float));
    memset(m->counters, 0, m->n_counters * sizeof(int64_t));
    size_t len;
    for (int i = 0; i < m->n_params; i++) {
        const ts_param *e = &m->params[i];
        len = strlen(e->name);
        int bn_weight = e->kind == TS_PARAM_WEIGHT && e->ndim == 1 && len > 7 && strcmp(e->name + len - 7, ".weight") == 0;
        int rvar = e->kind == TS_PARAM_BUFFER && len > 12 && strcmp(e->name + len - 12, ".running_var") == 0;
        if (bn_weight || rvar) {
            float *d = ts_unet_param_f32(m, e);
            for (size_t k = 0; k < e->numel; k++) d[k] = 1.0f;
        }
    }
}

/* Gradients come from an anonymous mapping: zero-filled pages the kernel
 * only backs when first written, so a model loaded for inference never
 * pays the ~93 MiB of gradients it does not use. */
static float *grads_alloc(size_t n)
{
    void *p = mmap(NULL, (n ? n : 1) * sizeof(float), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void grads_free(float *g, size_t n)
{
    if (g) munmap(g, (n ? n : 1) * sizeof(float));
}

ts_status ts_unet_init(ts_unet *m, const ts_unet_config *cfg)
{
    if (!m) return ts_error(TS_ERR_INVALID_ARG, "unet init: NULL model");
    memset(m, 0, sizeof *m);
    ts_arena_init(&m->arena);
    ts_status st = ts_unet_config_check(cfg);
    if (st != TS_OK) return st;
    m->cfg = *cfg;
    table_builder tb = {0};
    st = build_table(cfg, &tb);
    if (st != TS_OK) {
        free(tb.p);
        return st;
    }
    m->params = tb.p;
    m->n_params = tb.n;
    m->n_weights = tb.n_weights;
    m->n_buffers = tb.n_buffers;
    m->n_counters = tb.n_counters;
    /* One aligned block each, so the optimizer, zero_grad and the loaders
     * see flat arrays. */
    m->weights = ts_aligned_alloc(m->n_weights * sizeof(float));
    m->grads = grads_alloc(m->n_weights);
    m->buffers = ts_aligned_alloc(m->n_buffers * sizeof(float));
    m->counters = ts_aligned_alloc(m->n_counters * sizeof(int64_t));
    m->layers = calloc(1, sizeof *m->layers);
    if (!m->weights || !m->grads || !m->buffers || !m->counters || !m->layers) {
        ts_unet_free(m);
        return ts_error(TS_ERR_NOMEM, "unet init: out of memory for %zu parameters (%.1f MiB with gradients)",
                        tb.n_weights, (double)tb.n_weights * 8.0 / (1 << 20));
    }
    set_default_values(m);
    st = build_graph(cfg, m->params, m->n_params, m->layers);
    if (st != TS_OK) {
        ts_unet_free(m);
        return st;
    }
    return TS_OK;
}

void ts_unet_free(ts_unet *m)
{
    if (!m) return;
    free(m->params);
    ts_aligned_free(m->weights);
    grads_free(m->grads, m->n_weights);
    ts_aligned_free(m->buffers);
    ts_aligned_free(m->counters);
    layers_free(m->layers);
    ts_arena_reset(&m->arena);
    free(m->card);
    memset(m, 0, sizeof *m);
}

const ts_param *ts_unet_find(const ts_unet *m, const char *name)
{
    if (!m || !name) return NULL;
    int i = table_find(m->params, m->n_params, name);
    return i < 0 ? NULL : &m->params[i];
}

float *ts_unet_param_f32(const ts_unet *m, const ts_param *p)
{
    if (!m || !p) return NULL;
    if (p->kind == TS_PARAM_WEIGHT) return m->weights + p->offset;
    if (p->kind == TS_PARAM_BUFFER) return m->buffers + p->offset;
    return NULL;
}

size_t ts_unet_count_trainable(const ts_unet *m)
{
    size_t n = 0;
    for (int i = 0; m && i < m->n_params; i++)
        if (m->params[i].kind == TS_PARAM_WEIGHT) n += m->params[i].numel;
    return n;
}

/* ---- random initialisation (spec 1.6) ---- */

typedef struct init_rng {
    uint64_t s;
} init_rng;

static uint64_t rng_next(init_rng *r)
{
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) with 53 random bits */
static double rng_unit(init_rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

static double rng_normal(init_rng *r)
{
    /* Box-Muller; 1 - u is in (0, 1], so the log is finite. */
    double u1 = 1.0 - rng_unit(r), u2 = rng_unit(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static int has_prefix(const char *s, const char *p) { return strncmp(s, p, strlen(p)) == 0; }

ts_status ts_unet_init_random(ts_unet *m, uint64_t seed)
{
    if (!m || !m->params) return ts_error(TS_ERR_INVALID_ARG, "unet init_random: model is not initialised");
    set_default_values(m); /* BN 1/0, running stats 0/1, counters 0, biases 0 */
    init_rng r = {seed};
    for (int i = 0; i < m->n_params; i++) {
        const ts_param *e = &m->params[i];
        if (e->ndim != 4) continue;
        float *w = m->weights + e->offset;
        double k2 = (double)e->shape[2] * e->shape[3];
        double fan_in = e->shape[1] * k2, fan_out = e->shape[0] * k2;
        if (strcmp(e->name, "encoder.conv1.weight") == 0 && m->cfg.in_channels != 3) {
            /* patch_first_conv (not pretrained) rebuilds conv1 and calls
             * reset_parameters: kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)). */
            double bound = 1.0 / sqrt(fan_in);
            for (size_t k = 0; k < e->numel; k++) w[k] = (float)(bound * (2.0 * rng_unit(&r) - 1.0));
        } else if (has_prefix(e->name, "encoder.")) {
            /* torchvision: kaiming_normal(fan_out, relu) */
            double sd = sqrt(2.0 / fan_out);
            for (size_t k = 0; k < e->numel; k++) w[k] = (float)(sd * rng_normal(&r));
        } else if (has_prefix(e->name, "decoder.")) {
            /* initialize_decoder: kaiming_uniform(fan_in, relu) */
            double bound = sqrt(6.0 / fan_in);
            for (size_t k = 0; k < e->numel; k++) w[k] = (float)(bound * (2.0 * rng_unit(&r) - 1.0));
        } else {
            /* initialize_head: xavier_uniform */
            double bound = sqrt(6.0 / (fan_in + fan_out));
            for (size_t k = 0; k < e->numel; k++) w[k] = (float)(bound * (2.0 * rng_unit(&r) - 1.0));
        }
    }
    return TS_OK;
}

/* ======================================================================
 * Forward and backward
 * ====================================================================== */

ts_status ts_unet_activation_bytes(const ts_unet_config *cfg, int n, int h, int w, int train, size_t *bytes)
{
    if (!bytes) return ts_error(TS_ERR_INVALID_ARG, "unet activation_bytes: NULL result pointer");
    *bytes = 0;
    ts_status st = ts_unet_config_check(cfg);
    if (st != TS_OK) return st;
    if (n < 1 || h < 1 || w < 1)
        return ts_error(TS_ERR_INVALID_ARG, "unet activation_bytes: batch %d and size %dx%d must be >= 1", n, h, w);
    table_builder tb = {0};
    ts_unet_layers g;
    memset(&g, 0, sizeof g);
    ts_arena a;
    ts_arena_init(&a);
    st = build_table(cfg, &tb);
    if (st == TS_OK) st = build_graph(cfg, tb.p, tb.n, &g);
    if (st == TS_OK) st = plan(&g, tb.p, &a, n, h, w, train);
    if (st == TS_OK) *bytes = a.planned;
    free(tb.p);
    free(g.nodes);
    free(g.tensors);
    return st;
}

/* What a forward or backward runs on: a layer graph with its plan, the
 * table (shapes), an arena and the parameter bases. The host model and its
 * device copy (ts_unet_device) each make one, so both run the same graph
 * code. That code only does arithmetic on these pointers and hands the
 * results to the backend's ops; it reads host memory only through the
 * parameter bases, which the device copy leaves NULL (it runs folded
 * forwards only, which read every conv from `folded` and nothing else). */
typedef struct unet_exec {
    ts_unet_layers *g;
    const ts_param *params;
    ts_arena *arena;
    int *plan_n, *plan_h, *plan_w;
    const ts_backend_memory *mem; /* the arena's memory: NULL for host memory */
    float *weights, *grads, *buffers; /* host model only */
    int64_t *counters;                /* host model only */
    const float *folded;              /* the folded block (host or backend memory) */
    /* Half activations (g->act): the conv weights cast to that type, at the
     * offsets of `weights` (training) or `folded` (inference), and in
     * training their gradients before they are added into `grads`. */
    uint16_t *wh, *gh;
    size_t n_wh; /* halves in each */
} unet_exec;

static unet_exec host_exec(ts_unet *m)
{
    unet_exec e = {m->layers, m->params, &m->arena, &m->plan_n, &m->plan_h, &m->plan_w, NULL,
                   m->weights, m->grads, m->buffers, m->counters, m->layers ? m->layers->folded : NULL,
                   NULL, NULL, 0};
    return e;
}

/* Makes the arena hold a plan for this batch shape; a train plan serves eval
 * forwards too (it is a superset), an eval plan is replaced for training. */
static ts_status ensure_plan(const unet_exec *e, int n, int h, int w, int train)
{
    ts_unet_layers *g = e->g;
    if (g->planned && *e->plan_n == n && *e->plan_h == h && *e->plan_w == w && (g->planned_train || !train))
        return TS_OK;
    ts_arena_reset(e->arena);
    g->planned = 0;
    g->have_train = 0;
    ts_status st = plan(g, e->params, e->arena, n, h, w, train);
    if (st == TS_OK) st = e->mem ? ts_arena_commit_on(e->arena, e->mem) : ts_arena_commit(e->arena);
    if (st != TS_OK) {
        ts_arena_reset(e->arena);
        return st;
    }
    g->planned = 1;
    g->planned_train = train;
    *e->plan_n = n;
    *e->plan_h = h;
    *e->plan_w = w;
    return TS_OK;
}

static ts_tensor tval(const unet_exec *e, int t)
{
    const unet_tensor *T = &e->g->tensors[t];
    if (t == 0 && e->g->act == TS_F32) return ts_tensor_view((float *)e->g->x_data, T->n, T->c, T->h, T->w);
    return ts_arena_tensor_as(e->arena, T->val, e->g->act, T->n, T->c, T->h, T->w);
}

static ts_tensor tgrad(const unet_exec *e, int t)
{
    const unet_tensor *T = &e->g->tensors[t];
    return ts_arena_tensor_as(e->arena, T->grad, e->g->act, T->n, T->c, T->h, T->w);
}

static ts_tensor pweight(const unet_exec *e, int idx, float *base)
{
    const ts_param *p = &e->params[idx];
    return ts_tensor_view(base + p->offset, p->shape[0], p->shape[1], p->shape[2], p->shape[3]);
}

/* A conv weight in the activations' type: its half cast (wh or gh, at
 * element offset `at`), or with float32 activations the float32 weight. */
static ts_tensor conv_weight(const unet_exec *e, int idx, uint16_t *half_base, float *base, size_t at)
{
    const ts_param *p = &e->params[idx];
    if (e->g->act == TS_F32)
        return ts_tensor_view(base + at, p->shape[0], p->shape[1], p->shape[2], p->shape[3]);
    return ts_tensor_view_as(half_base + at, e->g->act, p->shape[0], p->shape[1], p->shape[2], p->shape[3]);
}


/* Adds the layer's module path to the op's message, so a user sees where in
 * the model it failed (e.g. a BN with one value per channel). */
static ts_status wrap_error(ts_status st, const char *phase, const unet_node *nd)
{
    char msg[768];
    snprintf(msg, sizeof msg, "%s", ts_last_error());
    if (nd->kind == OP_BN && strstr(msg, "more than 1 value per channel"))
        return ts_error(st,
                        "unet %s at %s: %s (BatchNorm in training needs batch*height*width > 1 at every layer: use "
                        "a larger batch or tile, or eval mode)",
                        phase, nd->name, msg);
    return ts_error(st, "unet %s at %s: %s", phase, nd->name, msg);
}

/* Mixed precision: every conv weight of the training copy cast to the
 * activations' type, as autocast casts them once per forward (the optimizer
 * changed them since the last one). */
static ts_status cast_weights(const unet_exec *e, ts_ctx *ctx)
{
    const ts_unet_layers *g = e->g;
    for (int i = 0; i < g->n_nodes; i++) {
        const unet_node *nd = &g->nodes[i];
        if (nd->kind != OP_CONV) continue;
        size_t at = e->params[nd->w].offset;
        ts_tensor w32 = pweight(e, nd->w, e->weights);
        ts_tensor wh = conv_weight(e, nd->w, e->wh, e->weights, at);
        ts_status st = ctx->backend->convert(ctx, &wh, &w32, 0);
        if (st != TS_OK) return wrap_error(st, "weight cast", nd);
    }
    return TS_OK;
}

static ts_status check_ctx(const ts_unet *m, const ts_ctx *ctx, const char *what)
{
    if (!m || !m->layers || !m->params)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: model is not initialised (call ts_unet_init)", what);
    if (!ctx || !ctx->backend)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: no backend in the context (ts_ctx_init with a backend)", what);
    /* The model's weights and arena are host memory: a backend with its own
     * memory would be handed host pointers as if they were its own. */
    if (!ts_backend_is_host(ctx->backend))
        return ts_error(TS_ERR_INVALID_ARG,
                        "unet %s: backend \"%s\" works on its own memory, and this model lives in host memory; run "
                        "inference on it through a device copy (ts_unet_device_init)",
                        what, ctx->backend->name ? ctx->backend->name : "?");
    return TS_OK;
}

static ts_status check_input(const ts_unet_config *cfg, const ts_tensor *x, const ts_tensor *logits, const char *what)
{
    if (!x || !x->data || x->n < 1 || x->c < 1 || x->h < 1 || x->w < 1)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: input must be a non-NULL tensor with dimensions >= 1", what);
    if (x->c != cfg->in_channels) {
        char s[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: input %s has %d channels but the model has in_channels %d", what,
                        ts_shape_str(x, s), x->c, cfg->in_channels);
    }
    if (!logits) return ts_error(TS_ERR_INVALID_ARG, "unet %s: NULL logits pointer", what);
    return TS_OK;
}

/* The forward over e. folded = 1 (inference with BN folded, ts_unet_fold_bn
 * or ts_unet_device_init): every conv reads its weight and bias from
 * e->folded, BN nodes are skipped, and nothing but x, e->folded and the arena
 * is touched, all through the backend's ops, so e may live in a backend's
 * own memory. folded = 0 (host model only) reads e->weights and e->buffers,
 * and in train mode updates e->counters on the host. */
static ts_status run_forward(const unet_exec *e, ts_ctx *ctx, const ts_tensor *x, int train, int folded,
                             ts_tensor *logits)
{
    ts_unet_layers *g = e->g;
    const ts_backend *B = ctx->backend;
    ts_status st = ensure_plan(e, x->n, x->h, x->w, train);
    if (st != TS_OK) return st;
    g->have_train = 0;
    g->x_data = x->data;
    const ts_bn_params bnp = {BN_EPS, BN_MOMENTUM};
    const int half = g->act != TS_F32;
    if (half) {
        ts_tensor xh = tval(e, 0);
        st = B->convert(ctx, &xh, x, 0);
        if (st != TS_OK) return ts_error(st, "unet forward: casting the input: %s", ts_last_error());
        if (!folded && (st = cast_weights(e, ctx)) != TS_OK) return st;
    }
    for (int i = 0; i < g->n_nodes; i++) {
        unet_node *nd = &g->nodes[i];
        ts_tensor a = tval(e, nd->in0), y = tval(e, nd->out);
        switch (nd->kind) {
        case OP_CONV: {
            ts_conv2d_params cp = {.stride_h = nd->stride, .stride_w = nd->stride, .pad_h = nd->pad, .pad_w = nd->pad};
            if (folded) {
                ts_tensor fw = conv_weight(e, nd->w, e->wh, (float *)e->folded, nd->fold_w);
                const float *fb = nd->fold_b == NO_BIAS ? NULL : e->folded + nd->fold_b;
                if (!nd->folded) {
                    /* a conv with its own bias (the head, a decoder without BN) */
                    st = B->conv2d_forward(ctx, &y, &a, &fw, fb, &cp);
                    break;
                }
                /* conv + BN in one: write the BN's output and skip the BN node. */
                const unet_node *bn = &g->nodes[i + 1];
                ts_tensor yb = tval(e, bn->out);
                /* A residual add into the BN's output (a block's shortcut,
                 * computed before conv2: gb_basic_block) and an in-place
                 * ReLU after it, or after the BN, run in the conv's
                 * epilogue: bias + shortcut + ReLU in one pass over the
                 * output (cuDNN's fused call with z on CUDA). */
                const int bn_root = g->tensors[bn->out].alias >= 0 ? g->tensors[bn->out].alias : bn->out;
                int next = i + 2, t = bn->out;
                const unet_node *ad = next < g->n_nodes ? &g->nodes[next] : NULL;
                ts_tensor z;
                if (ad && ad->kind == OP_ADD && ad->in0 == bn->out && g->tensors[ad->out].alias == bn_root) {
                    z = tval(e, ad->in1);
                    cp.add = &z;
                    t = ad->out;
                    next++;
                }
                const unet_node *rl = next < g->n_nodes ? &g->nodes[next] : NULL;
                if (rl && rl->kind == OP_RELU && rl->in0 == t && (rl->out == t || g->tensors[rl->out].alias == bn_root)) {
                    cp.relu = 1;
                    next++;
                }
                st = B->conv2d_forward(ctx, &yb, &a, &fw, fb, &cp);
                if (st != TS_OK) return wrap_error(st, "forward", nd);
                i = next - 1;
                continue;
            }
            ts_tensor wt = conv_weight(e, nd->w, e->wh, e->weights, e->params[nd->w].offset);
            st = B->conv2d_forward(ctx, &y, &a, &wt, nd->b >= 0 ? e->weights + e->params[nd->b].offset : NULL, &cp);
            break;
        }
        case OP_BN: {
            /* fold_layout folds every BN that follows a conv, which is every
             * BN of the U-Net: one left over would read host parameters. */
            if (folded)
                return ts_error(TS_ERR_INVALID_ARG, "unet forward: internal error: %s was not folded into its conv",
                                nd->name);
            const float *gamma = e->weights + e->params[nd->gamma].offset;
            const float *beta = e->weights + e->params[nd->beta].offset;
            float *rm = e->buffers + e->params[nd->rmean].offset;
            float *rv = e->buffers + e->params[nd->rvar].offset;
            if (train) {
                /* PyTorch counts the batch before normalising it. */
                e->counters[e->params[nd->counter].offset] += 1;
                st = B->batchnorm_forward_train(ctx, &y, ts_arena_at(e->arena, nd->save_mean),
                                                ts_arena_at(e->arena, nd->save_invstd), &a, gamma, beta, rm, rv, &bnp);
            } else {
                st = B->batchnorm_forward_eval(ctx, &y, &a, gamma, beta, rm, rv, &bnp);
            }
            break;
        }
        case OP_RELU: st = B->relu_forward(ctx, &y, &a); break;
        case OP_ADD: {
            ts_tensor b = tval(e, nd->in1);
            st = B->add_forward(ctx, &y, &a, &b);
            break;
        }
        case OP_MAXPOOL: {
            ts_pool2d_params pp = {3, 3, 2, 2, 1, 1};
            st = B->maxpool2d_forward(ctx, &y, ts_arena_at(e->arena, nd->index), &a, &pp);
            break;
        }
        case OP_UPSAMPLE: st = B->upsample_nearest_forward(ctx, &y, &a); break;
        case OP_CONCAT: {
            ts_tensor b = tval(e, nd->in1);
            st = B->concat_forward(ctx, &y, &a, &b);
            break;
        }
        }
        if (st != TS_OK) return wrap_error(st, "forward", nd);
    }
    *logits = tval(e, g->logits);
    if (half) {
        /* Losses and callers take float32 NCHW logits (autocast's losses
         * run in float32 too). */
        const unet_tensor *L = &g->tensors[g->logits];
        ts_tensor l32 = ts_arena_tensor(e->arena, g->logits32, L->n, L->c, L->h, L->w);
        st = B->convert(ctx, &l32, logits, 0);
        if (st != TS_OK) return ts_error(st, "unet forward: casting the logits: %s", ts_last_error());
        *logits = l32;
    }
    g->have_train = train;
    return TS_OK;
}

ts_status ts_unet_forward(ts_unet *m, ts_ctx *ctx, const ts_tensor *x, int train, ts_tensor *logits)
{
    ts_status st = check_ctx(m, ctx, "forward");
    if (st == TS_OK) st = check_input(&m->cfg, x, logits, "forward");
    if (st != TS_OK) return st;
    unet_exec e = host_exec(m);
    return run_forward(&e, ctx, x, train ? 1 : 0, 0, logits);
}

/* The backward over e (train plan, unfolded weights): accumulates into
 * e->grads. Reads e->weights, e->grads and the arena only through the
 * backend's ops, so e may live in a backend's own memory. */
static ts_status run_backward(const unet_exec *e, ts_ctx *ctx, const ts_tensor *dlogits)
{
    ts_unet_layers *g = e->g;
    if (!g->have_train)
        return ts_error(TS_ERR_INVALID_ARG,
                        "unet backward: no train-mode forward to differentiate (call ts_unet_forward with train = 1 "
                        "first; an eval forward in between discards its activations)");
    const unet_tensor *L = &g->tensors[g->logits];
    if (!dlogits || !dlogits->data || dlogits->n != L->n || dlogits->c != L->c || dlogits->h != L->h ||
        dlogits->w != L->w) {
        char s[TS_SHAPE_STR] = "NULL";
        if (dlogits) ts_shape_str(dlogits, s);
        return ts_error(TS_ERR_INVALID_ARG, "unet backward: dlogits %s must have the logits' shape [%d,%d,%d,%d]", s,
                        L->n, L->c, L->h, L->w);
    }
    const ts_backend *B = ctx->backend;
    const ts_param *P = e->params;
    ts_status st = B->zero(ctx, ts_arena_at(e->arena, g->grad_begin), g->grad_bytes / sizeof(float));
    if (st != TS_OK) return st;
    const int half = g->act != TS_F32;
    if (half) {
        /* The caller's float32 dlogits, cast; the conv weights' half
         * gradients start from 0 (an even count of halves: see set_precision). */
        ts_tensor dl = tgrad(e, g->logits);
        st = B->convert(ctx, &dl, dlogits, 0);
        if (st == TS_OK) st = B->zero(ctx, (float *)e->gh, (e->n_wh + 1) / 2);
        if (st != TS_OK) return ts_error(st, "unet backward: casting dlogits: %s", ts_last_error());
    }
    for (int i = g->n_nodes - 1; i >= 0; i--) {
        const unet_node *nd = &g->nodes[i];
        ts_tensor dy = nd->out == g->logits && !half ? *dlogits : tgrad(e, nd->out);
        int need_dx = nd->in0 != 0; /* no gradient for the input image */
        ts_tensor dx = need_dx ? tgrad(e, nd->in0) : dy;
        switch (nd->kind) {
        case OP_CONV: {
            ts_conv2d_params cp = {.stride_h = nd->stride, .stride_w = nd->stride, .pad_h = nd->pad, .pad_w = nd->pad};
            ts_tensor x = tval(e, nd->in0);
            size_t at = P[nd->w].offset;
            ts_tensor dw = conv_weight(e, nd->w, e->gh, e->grads, at);
            st = B->conv2d_backward_filter(ctx, &dw, &dy, &x, &cp);
            if (st == TS_OK && half) {
                /* The cast's backward: the half gradient added into the
                 * float32 master gradient (which accumulates micro-batches). */
                ts_tensor dw32 = pweight(e, nd->w, e->grads);
                st = B->convert(ctx, &dw32, &dw, 1);
            }
            if (st == TS_OK && nd->b >= 0) st = B->conv2d_backward_bias(ctx, e->grads + P[nd->b].offset, &dy);
            if (st == TS_OK && need_dx) {
                ts_tensor wt = conv_weight(e, nd->w, e->wh, e->weights, at);
                st = B->conv2d_backward_data(ctx, &dx, &dy, &wt, &cp);
            }
            break;
        }
        case OP_BN: {
            ts_tensor x = tval(e, nd->in0);
            st = B->batchnorm_backward(ctx, &dx, e->grads + P[nd->gamma].offset, e->grads + P[nd->beta].offset, &dy,
                                       &x, e->weights + P[nd->gamma].offset, ts_arena_at(e->arena, nd->save_mean),
                                       ts_arena_at(e->arena, nd->save_invstd));
            break;
        }
        case OP_RELU: {
            ts_tensor y = tval(e, nd->out);
            st = B->relu_backward(ctx, &dx, &dy, &y);
            break;
        }
        case OP_ADD: {
            ts_tensor db = tgrad(e, nd->in1);
            st = B->add_backward(ctx, &dx, &db, &dy);
            break;
        }
        case OP_MAXPOOL: {
            ts_pool2d_params pp = {3, 3, 2, 2, 1, 1};
            st = B->maxpool2d_backward(ctx, &dx, &dy, ts_arena_at(e->arena, nd->index), &pp);
            break;
        }
        case OP_UPSAMPLE: st = B->upsample_nearest_backward(ctx, &dx, &dy); break;
        case OP_CONCAT: {
            ts_tensor db = tgrad(e, nd->in1);
            st = B->concat_backward(ctx, &dx, &db, &dy);
            break;
        }
        }
        if (st != TS_OK) return wrap_error(st, "backward", nd);
    }
    return TS_OK;
}

ts_status ts_unet_backward(ts_unet *m, ts_ctx *ctx, const ts_tensor *dlogits)
{
    ts_status st = check_ctx(m, ctx, "backward");
    if (st != TS_OK) return st;
    unet_exec e = host_exec(m);
    return run_backward(&e, ctx, dlogits);
}

ts_status ts_unet_zero_grad(ts_unet *m, ts_ctx *ctx)
{
    ts_status st = check_ctx(m, ctx, "zero_grad");
    if (st != TS_OK) return st;
    return ctx->backend->zero(ctx, m->grads, m->n_weights);
}

/* ======================================================================
 * Inference with BatchNorm folded into the convs
 * ====================================================================== */

/* Lays the folded block out over the graph g: every conv gets its weight and,
 * when it has a bias or a BN is folded into it, a bias, each starting on a
 * TS_ALIGN boundary (backend libraries such as cuDNN prefer aligned
 * operands); a conv whose output only a BN reads becomes folded. A folded
 * forward then reads every conv from the block and no other parameter, so
 * the block is all a device copy needs. Returns the size in floats. */
static size_t fold_layout(ts_unet_layers *g, const ts_param *p)
{
    const size_t A = TS_ALIGN / sizeof(float);
    size_t at = 0;
    for (int i = 0; i < g->n_nodes; i++) {
        unet_node *nd = &g->nodes[i];
        nd->folded = 0;
        if (nd->kind != OP_CONV) continue;
        nd->folded = i + 1 < g->n_nodes && g->nodes[i + 1].kind == OP_BN && g->nodes[i + 1].in0 == nd->out;
        const ts_param *wp = &p[nd->w];
        nd->fold_w = at;
        at = (at + wp->numel + A - 1) / A * A;
        nd->fold_b = NO_BIAS;
        if (nd->folded || nd->b >= 0) {
            nd->fold_b = at;
            at = (at + (size_t)wp->shape[0] + A - 1) / A * A;
        }
    }
    return at;
}

/* Fills the block fold_layout planned (total floats, padding zeroed) from m's
 * current weights and running statistics. g is m's graph or a copy of it
 * built from the same table (the device copy's). */
static void fold_fill(const ts_unet_layers *g, const ts_unet *m, float *blk, size_t total)
{
    memset(blk, 0, total * sizeof(float));
    for (int i = 0; i < g->n_nodes; i++) {
        const unet_node *nd = &g->nodes[i];
        if (nd->kind != OP_CONV) continue;
        const ts_param *wp = &m->params[nd->w];
        const float *w = m->weights + wp->offset;
        const float *bias = nd->b >= 0 ? m->weights + m->params[nd->b].offset : NULL;
        float *fw = blk + nd->fold_w, *fb = nd->fold_b == NO_BIAS ? NULL : blk + nd->fold_b;
        int cout = wp->shape[0];
        if (!nd->folded) {
            memcpy(fw, w, wp->numel * sizeof(float));
            if (bias) memcpy(fb, bias, (size_t)cout * sizeof(float));
            continue;
        }
        const unet_node *bn = &g->nodes[i + 1];
        size_t per = wp->numel / (size_t)cout;
        const float *gamma = m->weights + m->params[bn->gamma].offset;
        const float *beta = m->weights + m->params[bn->beta].offset;
        const float *rm = m->buffers + m->params[bn->rmean].offset;
        const float *rv = m->buffers + m->params[bn->rvar].offset;
        for (int o = 0; o < cout; o++) {
            /* eval BN: (z - mean) * gamma / sqrt(var + eps) + beta, z = conv + bias */
            double scale = (double)gamma[o] / sqrt((double)rv[o] + (double)BN_EPS);
            for (size_t k = 0; k < per; k++) fw[(size_t)o * per + k] = (float)((double)w[(size_t)o * per + k] * scale);
            double b0 = bias ? bias[o] : 0.0;
            fb[o] = (float)((double)beta[o] + (b0 - (double)rm[o]) * scale);
        }
    }
}

ts_status ts_unet_fold_bn(ts_unet *m)
{
    if (!m || !m->layers || !m->params)
        return ts_error(TS_ERR_INVALID_ARG, "unet fold_bn: model is not initialised (call ts_unet_init)");
    ts_unet_layers *g = m->layers;
    size_t total = fold_layout(g, m->params);
    if (!g->folded || g->n_folded < total) {
        ts_aligned_free(g->folded);
        g->n_folded = 0;
        g->have_folded = 0;
        g->folded = ts_aligned_alloc((total ? total : 1) * sizeof(float));
        if (!g->folded) return ts_error(TS_ERR_NOMEM, "unet fold_bn: out of memory for %zu folded weights", total);
        g->n_folded = total;
    }
    fold_fill(g, m, g->folded, total);
    g->have_folded = 1;
    return TS_OK;
}

ts_status ts_unet_forward_folded(ts_unet *m, ts_ctx *ctx, const ts_tensor *x, ts_tensor *logits)
{
    ts_status st = check_ctx(m, ctx, "forward_folded");
    if (st == TS_OK) st = check_input(&m->cfg, x, logits, "forward_folded");
    if (st != TS_OK) return st;
    if (!m->layers->have_folded)
        return ts_error(TS_ERR_INVALID_ARG, "unet forward_folded: call ts_unet_fold_bn first (and again after the "
                                            "weights or running statistics change)");
    unet_exec e = host_exec(m);
    return run_forward(&e, ctx, x, 0, 1, logits);
}

/* ======================================================================
 * The device copy for inference
 * ====================================================================== */

/* Forgets the recorded forward and which key ran directly. */
static void graph_drop(ts_unet_device *d)
{
    if (d->graph && d->backend && d->backend->graphs) d->backend->graphs->free(d->graph);
    d->graph = NULL;
    d->warm = 0;
}

void ts_unet_device_free(ts_unet_device *d)
{
    if (!d) return;
    graph_drop(d);
    /* Through the backend that allocated them (the arena remembers its own). */
    const ts_backend_memory *mem = d->backend ? d->backend->memory : NULL;
    ts_arena_reset(&d->arena);
    if (mem) {
        mem->free(d->weights);
        mem->free(d->grads);
        mem->free(d->buffers);
        mem->free(d->x);
        mem->free(d->wh);
        mem->free(d->gh);
    }
    free(d->counters);
    layers_free(d->layers);
    free(d->params);
    memset(d, 0, sizeof *d);
}

/* What both kinds of copy start with: the backend checked, a copy of m's
 * table and a graph of its own. The plan lives in the graph, so the copy and
 * the host model can run different shapes, and the host model may be freed
 * or go on training after init returns. */
static ts_status device_begin(ts_unet_device *d, const ts_unet *m, const ts_backend *b, const char *what)
{
    if (!d) return ts_error(TS_ERR_INVALID_ARG, "unet %s: NULL device copy", what);
    memset(d, 0, sizeof *d);
    ts_arena_init(&d->arena);
    if (!m || !m->layers || !m->params)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: model is not initialised (call ts_unet_init)", what);
    if (!b) return ts_error(TS_ERR_INVALID_ARG, "unet %s: no backend", what);
    ts_status st = ts_backend_check(b);
    if (st != TS_OK) return st;
    d->backend = b;
    d->cfg = m->cfg;
    d->params = malloc((size_t)m->n_params * sizeof *d->params);
    d->layers = calloc(1, sizeof *d->layers);
    if (!d->params || !d->layers) {
        ts_unet_device_free(d);
        return ts_error(TS_ERR_NOMEM, "unet %s: out of memory for the layer graph", what);
    }
    memcpy(d->params, m->params, (size_t)m->n_params * sizeof *d->params);
    d->n_params = m->n_params;
    st = build_graph(&d->cfg, d->params, d->n_params, d->layers);
    if (st != TS_OK) ts_unet_device_free(d);
    return st;
}

/* *p = bytes of the backend's memory, with an error naming what it is for. */
static ts_status device_alloc(const ts_backend *b, void **p, size_t bytes, const char *what, const char *name)
{
    *p = NULL;
    ts_status st = b->memory->alloc(p, bytes ? bytes : 1);
    if (st == TS_OK && !*p) st = ts_error(TS_ERR_NOMEM, "backend gave no memory");
    if (st != TS_OK) {
        char why[512];
        snprintf(why, sizeof why, "%s", ts_last_error());
        return ts_error(st, "unet %s: %.1f MiB for the %s on backend \"%s\": %s", what, (double)bytes / (1 << 20),
                        name, b->name, why);
    }
    return TS_OK;
}

ts_status ts_unet_device_init(ts_unet_device *d, const ts_unet *m, const ts_backend *b)
{
    ts_status st = device_begin(d, m, b, "device init");
    if (st != TS_OK) return st;
    const ts_backend_memory *mem = b->memory;
    /* Folded on the host in a temporary block, then uploaded in one copy. */
    size_t total = fold_layout(d->layers, d->params);
    size_t bytes = total * sizeof(float);
    float *blk = ts_aligned_alloc(bytes ? bytes : 1);
    if (!blk) {
        ts_unet_device_free(d);
        return ts_error(TS_ERR_NOMEM, "unet device init: out of memory for %zu folded weights", total);
    }
    fold_fill(d->layers, m, blk, total);
    void *dw = NULL;
    st = device_alloc(b, &dw, bytes, "device init", "folded weights");
    d->weights = dw;
    d->n_weights = total;
    if (st == TS_OK) st = mem->upload(d->weights, blk, bytes);
    ts_aligned_free(blk);
    if (st != TS_OK) {
        char why[512];
        snprintf(why, sizeof why, "%s", ts_last_error());
        ts_unet_device_free(d);
        return ts_error(st, "unet device init: %.1f MiB of folded weights on backend \"%s\": %s",
                        (double)bytes / (1 << 20), b->name, why);
    }
    return TS_OK;
}

/* Zeroes bytes of backend memory by uploading zeros: the memory interface
 * has no memset, and this runs once per training copy. */
static ts_status device_zero(const ts_backend_memory *mem, void *dst, size_t bytes)
{
    const size_t chunk = (size_t)1 << 22;
    void *z = calloc(1, bytes < chunk ? (bytes ? bytes : 1) : chunk);
    if (!z) return ts_error(TS_ERR_NOMEM, "unet: out of memory zeroing gradients");
    ts_status st = TS_OK;
    for (size_t at = 0; at < bytes && st == TS_OK; at += chunk)
        st = mem->upload((unsigned char *)dst + at, z, bytes - at < chunk ? bytes - at : chunk);
    free(z);
    return st;
}

ts_status ts_unet_device_init_train(ts_unet_device *d, const ts_unet *m, const ts_backend *b)
{
    ts_status st = device_begin(d, m, b, "device init_train");
    if (st != TS_OK) return st;
    d->train = 1;
    d->n_weights = m->n_weights;
    d->n_buffers = m->n_buffers;
    d->n_counters = m->n_counters;
    void *w = NULL, *g = NULL, *bu = NULL;
    st = device_alloc(b, &w, d->n_weights * sizeof(float), "device init_train", "weights");
    d->weights = w;
    if (st == TS_OK) st = device_alloc(b, &g, d->n_weights * sizeof(float), "device init_train", "gradients");
    d->grads = g;
    if (st == TS_OK) st = device_alloc(b, &bu, d->n_buffers * sizeof(float), "device init_train", "BN statistics");
    d->buffers = bu;
    if (st == TS_OK) {
        d->counters = malloc((d->n_counters ? d->n_counters : 1) * sizeof(int64_t));
        if (!d->counters) st = ts_error(TS_ERR_NOMEM, "unet device init_train: out of memory for the counters");
    }
    if (st == TS_OK) st = device_zero(b->memory, d->grads, d->n_weights * sizeof(float));
    if (st == TS_OK) st = ts_unet_device_upload_params(d, m);
    if (st != TS_OK) ts_unet_device_free(d);
    return st;
}

/* The host model and a training copy made from a model of the same table. */
static ts_status check_pair(const ts_unet_device *d, const ts_unet *m, const char *what)
{
    if (!d || !d->train || !d->weights)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: not a training copy (call ts_unet_device_init_train)", what);
    if (!m || !m->weights || m->n_weights != d->n_weights || m->n_buffers != d->n_buffers ||
        m->n_counters != d->n_counters || m->n_params != d->n_params)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: the host model is not the one the training copy was made from",
                        what);
    return TS_OK;
}

ts_status ts_unet_device_upload_params(ts_unet_device *d, const ts_unet *m)
{
    ts_status st = check_pair(d, m, "device upload_params");
    if (st != TS_OK) return st;
    const ts_backend_memory *mem = d->backend->memory;
    st = mem->upload(d->weights, m->weights, d->n_weights * sizeof(float));
    if (st == TS_OK && d->n_buffers) st = mem->upload(d->buffers, m->buffers, d->n_buffers * sizeof(float));
    if (st != TS_OK) return st;
    memcpy(d->counters, m->counters, d->n_counters * sizeof(int64_t));
    return TS_OK;
}

ts_status ts_unet_device_download_params(const ts_unet_device *d, ts_unet *m)
{
    ts_status st = check_pair(d, m, "device download_params");
    if (st != TS_OK) return st;
    const ts_backend_memory *mem = d->backend->memory;
    m->layers->have_folded = 0; /* the folded copy no longer matches */
    st = mem->download(m->weights, d->weights, d->n_weights * sizeof(float));
    if (st == TS_OK && d->n_buffers) st = mem->download(m->buffers, d->buffers, d->n_buffers * sizeof(float));
    if (st != TS_OK) return st;
    memcpy(m->counters, d->counters, d->n_counters * sizeof(int64_t));
    return TS_OK;
}

static ts_status check_device_ctx(const ts_unet_device *d, const ts_ctx *ctx, int train, const char *what)
{
    if (!d || !d->layers || !d->weights)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: not initialised (call ts_unet_device_init%s)", what,
                        train ? "_train" : "");
    if (d->train != train)
        return ts_error(TS_ERR_INVALID_ARG,
                        train ? "unet %s: this is an inference copy (folded weights); make a training copy with "
                                "ts_unet_device_init_train"
                              : "unet %s: this is a training copy (unfolded weights); run it with ts_unet_device_run",
                        what);
    if (!ctx || ctx->backend != d->backend)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: the context's backend (%s) is not the one the device copy lives on (%s)",
                        what, ctx && ctx->backend ? ctx->backend->name : "none", d->backend->name);
    return TS_OK;
}

/* Puts a host batch where the copy's ops can read it: uploaded into the
 * input buffer (grown to the largest batch seen, then reused), or on a host
 * backend, read in place when in_place is set. */
/* x into the copy's input buffer: in place on a host backend when allowed,
 * else uploaded, synchronously or (async, x in the backend's host_alloc
 * memory) queued behind the ops before it, which may still read the buffer. */
static ts_status stage_input(ts_unet_device *d, const ts_tensor *x, int in_place, int async, ts_tensor *xd)
{
    const ts_backend_memory *mem = d->backend->memory;
    if (in_place && mem->host) {
        *xd = *x;
        return TS_OK;
    }
    const size_t in_bytes = ts_tensor_numel(x) * sizeof(float);
    if (in_bytes > d->x_bytes) {
        mem->free(d->x);
        d->x = NULL;
        d->x_bytes = 0;
        void *p = NULL;
        ts_status st = device_alloc(d->backend, &p, in_bytes, "device forward", "input batch");
        if (st != TS_OK) return st;
        d->x = p;
        d->x_bytes = in_bytes;
    }
    ts_status st = async ? mem->upload_async(d->x, x->data, in_bytes) : mem->upload(d->x, x->data, in_bytes);
    if (st != TS_OK) return st;
    *xd = ts_tensor_view(d->x, x->n, x->c, x->h, x->w);
    return TS_OK;
}

static unet_exec device_exec(ts_unet_device *d)
{
    unet_exec e = {d->layers, d->params, &d->arena, &d->plan_n, &d->plan_h, &d->plan_w, d->backend->memory,
                   NULL, NULL, NULL, NULL, NULL, d->wh, d->gh, d->wh ? d->n_weights : 0};
    if (d->train) {
        e.weights = d->weights;
        e.grads = d->grads;
        e.buffers = d->buffers;
        e.counters = d->counters;
    } else {
        e.folded = d->weights;
    }
    return e;
}

void ts_unet_device_set_graphs(ts_unet_device *d, int on)
{
    if (!d) return;
    graph_drop(d);
    d->graphs_off = !on;
    d->graph_error[0] = 0;
}

const char *ts_unet_device_graph_error(const ts_unet_device *d)
{
    return d && d->graph_error[0] ? d->graph_error : NULL;
}

static ts_unet_graph_key graph_key_of(const ts_unet_device *d, const ts_tensor *x)
{
    ts_unet_graph_key k;
    memset(&k, 0, sizeof k);
    k.x = x->data;
    k.arena = d->arena.base;
    k.weights = d->weights;
    k.wh = d->wh;
    k.n = x->n;
    k.h = x->h;
    k.w = x->w;
    k.act = d->layers->act;
    return k;
}

static int graph_key_equal(const ts_unet_graph_key *a, const ts_unet_graph_key *b)
{
    return a->x == b->x && a->arena == b->arena && a->weights == b->weights && a->wh == b->wh && a->n == b->n &&
           a->h == b->h && a->w == b->w && a->act == b->act;
}

/* The folded forward of an inference copy on x (in the backend's memory),
 * replayed from a recording when the backend has graphs (see
 * ts_unet_device_set_graphs). Why a direct run comes before every
 * recording: an op's first call for a shape may allocate (cuDNN plans, the
 * workspace), which a recording cannot hold. */
static ts_status device_infer(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x, ts_tensor *logits)
{
    unet_exec e = device_exec(d);
    const ts_backend_graphs *G = d->backend->graphs;
    if (!G || d->graphs_off) return run_forward(&e, ctx, x, 0, 1, logits);
    ts_status st = ensure_plan(&e, x->n, x->h, x->w, 0);
    if (st != TS_OK) return st;
    const ts_unet_graph_key key = graph_key_of(d, x);
    if (d->graph && graph_key_equal(&d->graph_key, &key)) {
        int stale = 0;
        st = G->launch(d->graph, &stale);
        if (st != TS_OK) return ts_error(st, "unet forward: replaying the recorded forward: %s", ts_last_error());
        if (!stale) {
            d->graph_launches++;
            d->layers->have_train = 0;
            *logits = d->graph_logits;
            return TS_OK;
        }
        /* The backend replaced a buffer of its own since (its workspace
         * grew for another shape): run directly, record on the next call. */
        graph_drop(d);
    }
    if (!d->warm || !graph_key_equal(&d->warm_key, &key)) {
        st = run_forward(&e, ctx, x, 0, 1, logits);
        if (st != TS_OK) return st;
        d->warm = 1;
        d->warm_key = key;
        return TS_OK;
    }
    /* Record this key (dropping the recording of another), then launch it. */
    if (d->graph) G->free(d->graph);
    d->graph = NULL;
    char why[1024] = "";
    void *graph = NULL;
    ts_tensor out;
    st = G->begin();
    if (st != TS_OK) {
        snprintf(why, sizeof why, "starting the recording: %s", ts_last_error());
    } else {
        const ts_status run = run_forward(&e, ctx, x, 0, 1, &out);
        if (run != TS_OK) snprintf(why, sizeof why, "an op while recording: %s", ts_last_error());
        st = G->end(&graph); /* also after a failed op: the backend must stop recording */
        if (run == TS_OK && st != TS_OK) snprintf(why, sizeof why, "ending the recording: %s", ts_last_error());
        if (run != TS_OK) {
            G->free(graph);
            graph = NULL;
            st = run;
        }
    }
    if (st != TS_OK) {
        /* The same forward ran directly just before (d->warm), so what failed
         * is the recording itself: a call the backend or a library it uses
         * makes that a graph cannot hold. Nothing of this forward ran. The
         * copy stops recording, keeps why (ts_unet_device_graph_error: the
         * benchmarks and predict print it) and runs the ops directly, now
         * and from now on: the same logits, only without the one launch. */
        snprintf(d->graph_error, sizeof d->graph_error, "%s", why);
        d->graphs_off = 1;
        return run_forward(&e, ctx, x, 0, 1, logits);
    }
    d->graph = graph;
    d->graph_key = key;
    d->graph_logits = out;
    d->graph_records++;
    int stale = 0;
    st = G->launch(graph, &stale);
    if (st == TS_OK && stale)
        st = ts_error(TS_ERR_BACKEND, "unet forward: internal error: the forward recorded just now is stale");
    if (st != TS_OK) {
        graph_drop(d);
        return st;
    }
    d->graph_launches++;
    *logits = out;
    return TS_OK;
}

/* The part of ts_unet_device_forward and _start before the logits leave
 * the device: checks, plan, upload (async: queued), forward; *ld is the
 * logits in the arena. */
static ts_status device_forward_host(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x, const ts_tensor *logits,
                                    const char *what, int async, ts_tensor *ld)
{
    ts_status st = check_device_ctx(d, ctx, 0, what);
    if (st == TS_OK) st = check_input(&d->cfg, x, logits, what);
    if (st != TS_OK) return st;
    const int K = d->cfg.classes;
    if (!logits->data || logits->n != x->n || logits->c != K || logits->h != x->h || logits->w != x->w) {
        char s[TS_SHAPE_STR] = "no data";
        if (logits->data) ts_shape_str(logits, s);
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: logits %s must be a host tensor [%d,%d,%d,%d]", what, s, x->n,
                        K, x->h, x->w);
    }
    unet_exec e = device_exec(d);
    /* Planned before the input is staged, so a shape the plan refuses costs no copy. */
    st = ensure_plan(&e, x->n, x->h, x->w, 0);
    ts_tensor xd;
    if (st == TS_OK) st = stage_input(d, x, 0, async, &xd);
    if (st == TS_OK) st = device_infer(d, ctx, &xd, ld);
    return st;
}

ts_status ts_unet_device_forward(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x, ts_tensor *logits)
{
    ts_tensor ld;
    ts_status st = device_forward_host(d, ctx, x, logits, "device forward", 0, &ld);
    if (st != TS_OK) return st;
    return d->backend->memory->download(logits->data, ld.data, ts_tensor_numel(&ld) * sizeof(float));
}

ts_status ts_unet_device_forward_start(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x, ts_tensor *logits,
                                       void *fence)
{
    static const char what[] = "device forward_start";
    const ts_backend_memory *mem = d && d->backend ? d->backend->memory : NULL;
    if (mem && !ts_backend_memory_async(mem))
        return ts_error(TS_ERR_UNSUPPORTED,
                        "unet %s: backend \"%s\" has no asynchronous copies and fences (host_alloc, "
                        "upload_async, download_async, fence_*); use ts_unet_device_forward",
                        what, d->backend->name);
    if (!fence) return ts_error(TS_ERR_INVALID_ARG, "unet %s: NULL fence (make one with the backend's fence_new)", what);
    ts_tensor ld;
    ts_status st = device_forward_host(d, ctx, x, logits, what, 1, &ld);
    if (st == TS_OK) st = mem->download_async(logits->data, ld.data, ts_tensor_numel(&ld) * sizeof(float));
    if (st == TS_OK) st = mem->fence_record(fence);
    return st;
}

ts_status ts_unet_device_forward_resident(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x, ts_tensor *logits)
{
    ts_status st = check_device_ctx(d, ctx, 0, "device forward_resident");
    if (st == TS_OK) st = check_input(&d->cfg, x, logits, "device forward_resident");
    if (st != TS_OK) return st;
    if (x->dtype != TS_F32) {
        char s[TS_SHAPE_STR];
        return ts_error(TS_ERR_INVALID_ARG, "unet device forward_resident: the input %s must be float32",
                        ts_shape_str(x, s));
    }
    return device_infer(d, ctx, x, logits);
}

ts_status ts_unet_device_run(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *x, int train, ts_tensor *logits)
{
    ts_status st = check_device_ctx(d, ctx, 1, "device run");
    if (st == TS_OK) st = check_input(&d->cfg, x, logits, "device run");
    if (st != TS_OK) return st;
    unet_exec e = device_exec(d);
    train = train ? 1 : 0;
    st = ensure_plan(&e, x->n, x->h, x->w, train);
    ts_tensor xd;
    if (st == TS_OK) st = stage_input(d, x, 1, 0, &xd);
    if (st != TS_OK) return st;
    return run_forward(&e, ctx, &xd, train, 0, logits);
}

ts_status ts_unet_device_backward(ts_unet_device *d, ts_ctx *ctx, const ts_tensor *dlogits)
{
    ts_status st = check_device_ctx(d, ctx, 1, "device backward");
    if (st != TS_OK) return st;
    unet_exec e = device_exec(d);
    return run_backward(&e, ctx, dlogits);
}

ts_status ts_unet_device_zero_grad(ts_unet_device *d, ts_ctx *ctx)
{
    ts_status st = check_device_ctx(d, ctx, 1, "device zero_grad");
    if (st != TS_OK) return st;
    return ctx->backend->zero(ctx, d->grads, d->n_weights);
}

ts_status ts_unet_device_set_precision(ts_unet_device *d, ts_ctx *ctx, ts_dtype act)
{
    static const char what[] = "device set_precision";
    if (!d || !d->layers || !d->weights)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: the device copy is not initialised", what);
    if (act != TS_F32 && !ts_dtype_is_half(act))
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: activations can be f32, bf16 or f16, not %s", what,
                        ts_dtype_name(act));
    if (!ctx || ctx->backend != d->backend)
        return ts_error(TS_ERR_INVALID_ARG, "unet %s: the context's backend (%s) is not the device copy's (%s)", what,
                        ctx && ctx->backend ? ctx->backend->name : "none", d->backend->name);
    const ts_backend_memory *mem = d->backend->memory;
    /* Drop the old type's plan and casts: the arena's slot sizes depend on it. */
    graph_drop(d);
    ts_arena_reset(&d->arena);
    d->layers->planned = 0;
    d->layers->have_train = 0;
    mem->free(d->wh);
    mem->free(d->gh);
    d->wh = d->gh = NULL;
    d->layers->act = TS_F32;
    if (act == TS_F32) return TS_OK;
    /* One half per weight float at the same offsets, rounded up to an even
     * count so the float-wise zero() clears a gradient block exactly. */
    size_t bytes = (d->n_weights + 1) / 2 * 2 * sizeof(uint16_t);
    void *p = NULL;
    ts_status st = device_alloc(d->backend, &p, bytes, what, "half weights");
    d->wh = p;
    if (st == TS_OK && d->train) {
        st = device_alloc(d->backend, &p, bytes, what, "half weight gradients");
        d->gh = p;
    }
    d->layers->act = act;
    if (st == TS_OK && !d->train) {
        /* The folded weights never change: cast them once. */
        unet_exec e = device_exec(d);
        const ts_unet_layers *g = d->layers;
        for (int i = 0; i < g->n_nodes && st == TS_OK; i++) {
            const unet_node *nd = &g->nodes[i];
            if (nd->kind != OP_CONV) continue;
            const ts_param *wp = &d->params[nd->w];
            ts_tensor w32 = ts_tensor_view(d->weights + nd->fold_w, wp->shape[0], wp->shape[1], wp->shape[2],
                                           wp->shape[3]);
            ts_tensor wh = conv_weight(&e, nd->w, d->wh, d->weights, nd->fold_w);
            st = d->backend->convert(ctx, &wh, &w32, 0);
            if (st != TS_OK) st = wrap_error(st, "weight cast", nd);
        }
    }
    if (st != TS_OK) {
        char why[768];
        snprintf(why, sizeof why, "%s", ts_last_error());
        mem->free(d->wh);
        mem->free(d->gh);
        d->wh = d->gh = NULL;
        d->layers->act = TS_F32;
        return ts_error(st, "%s", why);
    }
    return TS_OK;
}

ts_dtype ts_unet_device_precision(const ts_unet_device *d) { return d && d->layers ? d->layers->act : TS_F32; }

ts_unet_trainable ts_unet_host_trainable(ts_unet *m)
{
    ts_unet_trainable t = {m->params, m->n_params, m->weights, m->grads, m->n_weights, NULL};
    return t;
}

ts_unet_trainable ts_unet_device_trainable(ts_unet_device *d)
{
    ts_unet_trainable t;
    memset(&t, 0, sizeof t);
    if (!d || !d->train) return t;
    t.params = d->params;
    t.n_params = d->n_params;
    t.weights = d->weights;
    t.grads = d->grads;
    t.n_weights = d->n_weights;
    t.mem = d->backend->memory;
    return t;
}
