#!/usr/bin/env python3
"""Writes tests/fixtures/train/*.tsfx: golden values from PyTorch for the
training math (train/loss.c, train/optim.c, train/schedule.c), read by
tests/test_train_math.c.

Not needed at build or run time: the fixtures are committed. To regenerate
(CPU only; nothing is downloaded):
    /tmp/tvenv/bin/python tests/make_train_fixtures.py [OUTDIR]
with the venv of tests/make_smp_fixtures.py (torch, numpy,
segmentation-models-pytorch). OUTDIR defaults to tests/fixtures/train/. The
output is deterministic. The fill formula, the TSFX writer and reader, the
model builder and the tutorial Dice come from tests/make_smp_fixtures.py.

sched.tsfx: learning-rate sequences from torch.optim.lr_scheduler, on an
SGD optimizer over one dummy parameter (optimizer.step() then
scheduler.step(), the order PyTorch asks for). For case i (i = 0, 1, ...):
  sched<i>.config  f64 [9]  kind (0 constant, 1 StepLR, 2 CosineAnnealingLR),
                            step_size, gamma, T_max, eta_min, warmup W,
                            start_factor, base_lr, number of steps S
  sched<i>.lr      f64 [S+1]  param_group["lr"] after construction and after
                            each of the S scheduler.step() calls
With W > 0 the scheduler is SequentialLR([LinearLR(start_factor, 1.0, W),
MAIN], milestones=[W]), MAIN = StepLR, CosineAnnealingLR, or
LambdaLR(lambda e: 1.0) for constant.

clip.tsfx: torch.nn.utils.clip_grad_norm_(params, max_norm) (norm_type 2,
the default foreach path on CPU) on tensors filled by the formula:
  clip.sizes       i64 [T]     elements of each tensor
  clip.grads       f32 [sum]   the gradients before, concatenated
  clip<j>.max_norm f64 [1]
  clip<j>.total    f32 [1]     the returned total norm
  clip<j>.after    f32 [sum]   the gradients after
  (j = 0: a max_norm that clips, j = 1: one that does not)

train3.tsfx: three full training steps of smp.Unet("resnet34", in 3,
classes 3, depth 3, decoder (32, 16, 8)) filled by the formula, input
2x3x64x64 = smp_fill_input, target = smp_fill_target (255 = ignored):
    for step in 0..2:
        model.train(); out = model(x)
        loss = 0.5 * CrossEntropyLoss(ignore_index=255)(out, y)
             + 0.5 * dice_tutorial(out, y)        (ignored pixels masked)
        opt.zero_grad(); loss.backward()
        norm = clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step(); sched.step()
  opt   = AdamW([{params: ndim > 1}, {params: ndim <= 1, weight_decay: 0}],
                lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4,
                foreach=False)
  sched = CosineAnnealingLR(opt, T_max=3), stepped per iteration
Records:
  config      i32 [12]  as make_smp_fixtures.py's config
  hparams     f64 [6]   lr, weight_decay, max_norm, T_max, ce weight, dice weight
  input_sum   f64 [1]   float64 sum of the input (checks the fill)
  target_sum  i64 [1]   sum of the labels
  loss        f64 [3]   loss of each step (before its update)
  loss_ce     f64 [3]   its CE part
  loss_dice   f64 [3]   its Dice part
  lr          f64 [3]   param_groups[0]["lr"] used by each step
  grad_norm   f32 [3]   clip_grad_norm_'s returned (pre-clip) total norm
  grad1_norm  f64 [P]   after step 1's clipping: float64 L2 norm of each .grad
                        (0 where None)
  param_norm  f64 [P]   float64 L2 norm of each parameter after step 3
  param_idx   i64 [P,8] argmax |param - initial| (first), 0, n/6, ..., n-1
  param_val   f32 [P,8] parameter values after step 3 at those indices
  running     f32 [R]   running_mean/var concatenation after step 3
  nbt         i64 [B]   num_batches_tracked after step 3
"""
import hashlib
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_smp_fixtures as msf  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "fixtures", "train")

# (kind, step_size, gamma, T_max, eta_min, warmup, start_factor, base_lr, steps)
SCHED_CASES = [
    (2, 0, 0.0, 7, 1e-6, 0, 0.0, 3e-4, 22),       # cosine over "epochs", past T_max (rises again)
    (2, 0, 0.0, 20, 0.0, 0, 0.0, 1e-3, 24),       # cosine over "iterations", eta_min 0
    (2, 0, 0.0, 1, 0.0, 0, 0.0, 0.01, 6),         # T_max = 1
    (2, 0, 0.0, 12, 1e-6, 4, 0.1, 3e-4, 24),      # warmup 4 then cosine
    (2, 0, 0.0, 5, 2e-5, 1, 0.5, 1e-3, 12),       # warmup 1 (milestone at 1)
    (1, 3, 0.5, 0, 0.0, 0, 0.0, 3e-4, 20),        # StepLR
    (1, 4, 0.1, 0, 0.0, 0, 0.0, 0.1, 20),         # StepLR gamma 0.1
    (1, 3, 0.3, 0, 0.0, 5, 1.0 / 3, 1e-3, 20),    # warmup then StepLR
    (0, 0, 0.0, 0, 0.0, 3, 0.25, 3e-4, 10),       # warmup then constant
    (0, 0, 0.0, 0, 0.0, 0, 0.0, 3e-4, 5),         # constant
]

CLIP_SIZES = [(64, 3, 3, 3), (64,), (5, 7), (1000,), (3, 8, 1, 1)]

TRAIN_CASE = ("train3", 3, 3, 3, (32, 16, 8), True, 64, 64)
LR, WD, T_MAX = 3e-4, 1e-4, 3
MAX_NORM = 0.25  # below the first step's norm (checked below), so every step clips
W_CE, W_DICE = 0.5, 0.5


def make_sched(torch):
    f = msf.Tsfx()
    for i, (kind, step_size, gamma, t_max, eta_min, warmup, start, base, steps) in enumerate(SCHED_CASES):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=base)
        lr_sched = torch.optim.lr_scheduler
        # LinearLR first, as a user writes it: constructing it sets the lr to
        # start * base; MAIN is constructed after it.
        lin = lr_sched.LinearLR(opt, start_factor=start, end_factor=1.0, total_iters=warmup) if warmup else None
        if kind == 0:
            main = lr_sched.LambdaLR(opt, lambda e: 1.0) if warmup else None
        elif kind == 1:
            main = lr_sched.StepLR(opt, step_size=step_size, gamma=gamma)
        else:
            main = lr_sched.CosineAnnealingLR(opt, T_max=t_max, eta_min=eta_min)
        sched = lr_sched.SequentialLR(opt, [lin, main], milestones=[warmup]) if warmup else main
        lrs = [opt.param_groups[0]["lr"]]
        for _ in range(steps):
            opt.step()
            if sched is not None:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert all(isinstance(v, float) for v in lrs)
        f.add(f"sched{i}.config", [kind, step_size, gamma, t_max, eta_min, warmup, start, base, steps], np.float64)
        f.add(f"sched{i}.lr", lrs, np.float64)
    return f


def make_clip(torch):
    f = msf.Tsfx()
    grads = []
    for j, shape in enumerate(CLIP_SIZES):
        n = int(np.prod(shape))
        v = np.ldexp(msf.fill_q(msf.fnv1a(f"clip.g{j}"), n).astype(np.float64), -9 - j).astype(np.float32)
        grads.append(v.reshape(shape))
    f.add("clip.sizes", [g.size for g in grads], np.int64)
    f.add("clip.grads", np.concatenate([g.reshape(-1) for g in grads]), np.float32)
    ref = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    for j, max_norm in enumerate([0.37 * ref, 3.0 * ref]):
        params = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros(g.shape))
            p.grad = torch.from_numpy(g.copy())
            params.append(p)
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        assert total.dtype == torch.float32
        f.add(f"clip{j}.max_norm", [max_norm], np.float64)
        f.add(f"clip{j}.total", [float(total)], np.float32)
        f.add(f"clip{j}.after", np.concatenate([p.grad.numpy().reshape(-1) for p in params]), np.float32)
    return f


def make_train(torch, smp):
    name, cin, k, depth, dec, use_bn, H, W = TRAIN_CASE
    N = msf.N
    model = msf.build_model(smp, cin, k, depth, dec, use_bn)
    msf.fill_model(torch, model)
    init = {pn: p.detach().clone() for pn, p in model.named_parameters()}
    x_np = msf.fill_input(N * cin * H * W).reshape(N, cin, H, W)
    y_np = msf.fill_target(N * H * W, k).reshape(N, H, W)
    x = torch.from_numpy(x_np.copy())
    y = torch.from_numpy(y_np.astype(np.int64))
    ce_fn = torch.nn.CrossEntropyLoss(ignore_index=msf.IGNORE)
    decay = [p for _, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for _, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, foreach=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=T_MAX)
    losses, ces, dices, lrs, norms = [], [], [], [], []
    grad1 = None
    for step in range(3):
        model.train()
        out = model(x)
        ce = ce_fn(out, y)
        dt = msf.dice_tutorial(torch, out, y)
        loss = W_CE * ce + W_DICE * dt
        opt.zero_grad()
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        assert float(total) > MAX_NORM, (step, float(total))  # it clips
        if step == 0:
            grad1 = [0.0 if p.grad is None else float(np.sqrt(np.sum(p.grad.numpy().astype(np.float64) ** 2)))
                     for _, p in model.named_parameters()]
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == lrs[-1]
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        ces.append(float(ce.detach()))
        dices.append(float(dt.detach()))
        norms.append(float(total))

    f = msf.Tsfx()
    f.add("config", [cin, k, depth] + list(dec) + [0] * (5 - len(dec)) + [1 if use_bn else 0, N, H, W], np.int32)
    f.add("hparams", [LR, WD, MAX_NORM, T_MAX, W_CE, W_DICE], np.float64)
    f.add("input_sum", [float(np.sum(x_np.astype(np.float64)))], np.float64)
    f.add("target_sum", [int(np.sum(y_np.astype(np.int64)))], np.int64)
    f.add("loss", losses, np.float64)
    f.add("loss_ce", ces, np.float64)
    f.add("loss_dice", dices, np.float64)
    f.add("lr", lrs, np.float64)
    f.add("grad_norm", norms, np.float32)
    f.add("grad1_norm", grad1, np.float64)
    pn_, idxs, vals = [], [], []
    for pn, p in model.named_parameters():
        v = p.detach().reshape(-1).numpy()
        pn_.append(float(np.sqrt(np.sum(v.astype(np.float64) ** 2))))
        d = np.abs(v.astype(np.float64) - init[pn].reshape(-1).numpy().astype(np.float64))
        ix = msf.pick_idx(d)
        idxs.append(ix)
        vals.append(v[ix])
    f.add("param_norm", pn_, np.float64)
    f.add("param_idx", idxs, np.int64)
    f.add("param_val", vals, np.float32)
    f.add("running", msf.running_concat(model), np.float32)
    f.add("nbt", [int(v) for key, v in model.state_dict().items() if key.endswith(".num_batches_tracked")], np.int64)
    info = f"losses {losses}, lrs {lrs}, grad norms {norms}"
    return f, info


def write(f, path):
    data = f.bytes()
    with open(path, "wb") as fp:
        fp.write(data)
    r = msf.read_tsfx(path)
    assert [n for n, _ in f.records] == list(r.keys())
    print(f"wrote {path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}, {len(r)} records")


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    msf.self_check_fill()
    torch = msf.setup_torch()
    import segmentation_models_pytorch as smp

    print(f"torch {torch.__version__}, segmentation_models_pytorch {smp.__version__}, numpy {np.__version__}")
    os.makedirs(outdir, exist_ok=True)
    write(make_sched(torch), os.path.join(outdir, "sched.tsfx"))
    write(make_clip(torch), os.path.join(outdir, "clip.tsfx"))
    f, info = make_train(torch, smp)
    write(f, os.path.join(outdir, "train3.tsfx"))
    print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
