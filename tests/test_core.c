/* The runtime's plumbing: status messages, tensors, the arena, the backend
 * table check, output-size arithmetic and the host half of AdamW. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kernels/arena.h"
#include "kernels/backend.h"
#include "tests/testutil.h"

static void test_status(void)
{
    ts_clear_error();
    tu_expect(strcmp(ts_last_error(), "") == 0, "status: cleared error is empty");
    ts_status st = ts_error(TS_ERR_IO, "file %s: %d", "a.tif", 3);
    tu_expect(st == TS_ERR_IO && strcmp(ts_last_error(), "file a.tif: 3") == 0, "status: message formatted, got \"%s\"",
              ts_last_error());
    /* The idiom that puts context in front of a callee's message: the
     * message is an argument of the call that replaces it. */
    st = ts_error(TS_ERR_NOMEM, "%s: %s", "outer context", ts_last_error());
    tu_expect(st == TS_ERR_NOMEM && strcmp(ts_last_error(), "outer context: file a.tif: 3") == 0,
              "status: a message wrapping the last one, got \"%s\"", ts_last_error());
    for (int s = 0; s < TS_STATUS_COUNT; s++)
        tu_expect(ts_status_name((ts_status)s) != NULL && strlen(ts_status_name((ts_status)s)) > 0,
                  "status: name of %d", s);
    tu_expect(strcmp(ts_status_name((ts_status)99), "unknown status") == 0, "status: out-of-range name");
}

static void test_tensor(void)
{
    ts_tensor t;
    tu_expect_ok(ts_tensor_alloc(&t, 2, 3, 5, 7), "ts_tensor_alloc [2,3,5,7]");
    tu_expect(t.owned && ts_tensor_numel(&t) == 210 && ((uintptr_t)t.data % TS_ALIGN) == 0,
              "tensor: owned, 210 elements, aligned");
    int zero = 1;
    for (size_t i = 0; i < ts_tensor_numel(&t); i++) zero &= t.data[i] == 0.0f;
    tu_expect(zero, "tensor: zero-filled");
    ts_tensor s = ts_tensor_batch_slice(&t, 1, 1);
    tu_expect(!s.owned && s.data == t.data + 105 && s.n == 1 && s.c == 3, "tensor: batch slice view");
    char buf[TS_SHAPE_STR];
    tu_expect(strcmp(ts_shape_str(&t, buf), "[2,3,5,7]") == 0, "tensor: shape string %s", buf);
    ts_tensor_free(&s); /* a view: must not free t's data */
    t.data[209] = 1.0f; /* still valid (ASan would catch a free above) */
    ts_tensor_free(&t);
    tu_expect(t.data == NULL, "tensor: free clears the struct");
    tu_expect_error(ts_tensor_alloc(&t, 1, 0, 4, 4), TS_ERR_INVALID_ARG, "ts_tensor_alloc with c=0", "[1,0,4,4]",
                    (char *)NULL);
}

static void test_arena(void)
{
    ts_arena a;
    ts_arena_init(&a);
    size_t o1, o2, o3;
    tu_expect_ok(ts_arena_plan_tensor(&a, 1, 3, 5, 7, &o1), "arena plan 1");
    tu_expect_ok(ts_arena_plan(&a, 1, &o2), "arena plan 2");
    tu_expect_ok(ts_arena_plan_tensor(&a, 2, 1, 1, 1, &o3), "arena plan 3");
    tu_expect(o1 == 0 && o2 % TS_ALIGN == 0 && o2 >= 105 * 4 && o3 == o2 + TS_ALIGN, "arena: aligned offsets %zu %zu %zu",
              o1, o2, o3);
    tu_expect_ok(ts_arena_commit(&a), "arena commit");
    ts_tensor t1 = ts_arena_tensor(&a, o1, 1, 3, 5, 7);
    ts_tensor t3 = ts_arena_tensor(&a, o3, 2, 1, 1, 1);
    for (int i = 0; i < 105; i++) t1.data[i] = (float)i;
    t3.data[0] = -1;
    t3.data[1] = -2;
    tu_expect(t1.data[104] == 104 && ((uintptr_t)ts_arena_at(&a, o2) % TS_ALIGN) == 0, "arena: slots usable, aligned");
    size_t o4;
    tu_expect_error(ts_arena_plan(&a, 16, &o4), TS_ERR_INVALID_ARG, "arena plan after commit", "reset", (char *)NULL);
    ts_arena_reset(&a);
    tu_expect(a.base == NULL && a.planned == 0, "arena: reset forgets the plan");
    tu_expect_error(ts_arena_plan_tensor(&a, 1, 1, 0, 1, &o4), TS_ERR_INVALID_ARG, "arena plan of empty tensor",
                    "[1,1,0,1]", (char *)NULL);
}

static void test_sizes(void)
{
    /* The model's strided ops all give ceil(L/2) (smp-unet.md 1.3). */
    int ok = 1;
    for (int L = 1; L <= 300; L++) {
        int want = (L + 1) / 2;
        ok &= ts_conv_out_size(L, 7, 2, 3) == want && ts_conv_out_size(L, 3, 2, 1) == want &&
              ts_conv_out_size(L, 1, 2, 0) == want && ts_conv_out_size(L, 3, 1, 1) == L;
    }
    tu_expect(ok, "conv out size: 7/2/3, 3/2/1, 1/2/0 give ceil(L/2); 3/1/1 keeps L");
    tu_expect(ts_conv_out_size(2, 7, 1, 0) == 0 && ts_conv_out_size(5, 3, 0, 1) == 0,
              "conv out size: 0 when the kernel does not fit or stride is 0");
}

static void test_adamw_prepare(void)
{
    ts_adamw_hparams h = {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 1e-2};
    ts_adamw_step s;
    tu_expect_ok(ts_adamw_prepare(&s, &h, 1), "adamw prepare step 1");
    /* Step 1: bc1 = 0.1, bc2 = 0.001 (computed in double, then rounded). */
    tu_expect(s.neg_step_size == (float)(-(1e-3 / (1.0 - 0.9))) && s.bc2_sqrt == (float)sqrt(1.0 - 0.999) &&
                  s.decay == (float)(1.0 - 1e-5) && s.beta1_weight == (float)(1.0 - 0.9) && s.eps == 1e-8f,
              "adamw prepare: step-1 values");
    tu_expect_ok(ts_adamw_prepare(&s, &h, 1000), "adamw prepare step 1000");
    tu_expect(s.neg_step_size == (float)(-(1e-3 / (1.0 - pow(0.9, 1000.0)))), "adamw prepare: step-1000 size");
    tu_expect_error(ts_adamw_prepare(&s, &h, 0), TS_ERR_INVALID_ARG, "adamw step 0", "adamw", (char *)NULL);
    h.beta2 = 1.0;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw beta2 = 1", "betas", (char *)NULL);
    h.beta2 = 0.999;
    h.lr = -1;
    tu_expect_error(ts_adamw_prepare(&s, &h, 1), TS_ERR_INVALID_ARG, "adamw lr < 0", "lr", (char *)NULL);
}

static void test_scratch(void)
{
    ts_ctx ctx;
    ts_ctx_init(&ctx, NULL);
    void *p1, *p2, *p3;
    tu_expect_ok(ts_ctx_scratch(&ctx, 1000, &p1), "scratch 1000");
    tu_expect_ok(ts_ctx_scratch(&ctx, 10, &p2), "scratch 10");
    tu_expect(p1 == p2 && ctx.scratch_bytes == 1000, "scratch: smaller request reuses the buffer");
    tu_expect_ok(ts_ctx_scratch(&ctx, 5000, &p3), "scratch 5000");
    tu_expect(ctx.scratch_bytes == 5000 && ((uintptr_t)p3 % TS_ALIGN) == 0, "scratch: grows, aligned");
    memset(p3, 1, 5000);
    ts_ctx_free(&ctx);
}

int main(void)
{
    test_status();
    test_tensor();
    test_arena();
    test_sizes();
    test_adamw_prepare();
    test_scratch();
    return tu_finish("test_core");
}
