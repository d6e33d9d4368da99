#!/usr/bin/env python3
"""Writes tests/fixtures/smp/<case>.tsfx: golden values from real
segmentation_models_pytorch `smp.Unet("resnet34")` models, read by
tests/test_unet.c.

Not needed at build or run time: the fixtures are committed. To regenerate
(CPU only; nothing is downloaded, encoder_weights is always None):
    python3 -m venv /tmp/tvenv
    /tmp/tvenv/bin/pip install torch numpy segmentation-models-pytorch
    /tmp/tvenv/bin/python tests/make_smp_fixtures.py [OUTDIR]
OUTDIR defaults to tests/fixtures/smp/. The output is deterministic: two runs
give byte-identical files.

No weights are shipped. Every state_dict entry is filled from the integer hash
of tests/smp_fill.h (reimplemented here with numpy uint64 arithmetic, checked
against a pure-Python version), so the C test rebuilds the same model bit for
bit and only inputs and results are stored.

Records of each case (TSFX format, tests/fixture.h), in file order:
  config        i32 [12]  in_channels, classes, depth, dec0..dec4 (0-padded),
                          use_bn (1/0), N, H, W
  entry_hash    i64 [E]   FNV-1a 64 of each state_dict key, state_dict order
                          (two's-complement bit pattern): checks the C order
  entry_numel   i64 [E]   elements of each state_dict entry
  param_sums    f64 [E]   float64 sum of each filled entry (exact: every value
                          is a small multiple of a power of two); counters:
                          their value
  input         f32 [N,C,H,W]  smp_fill_input
  target        i32 [N,H,W]    smp_fill_target (255 = ignored)
  logits_eval   f32 [N,K,H,W]  model.eval(), torch.no_grad()
  logits_train  f32 [N,K,H,W]  model.train() forward (batch statistics)
  bn_running_after_train f32 [R]  after that forward: every running_mean and
                          running_var entry, state_dict order, flattened,
                          concatenated
  nbt_after_train i64 [B] every num_batches_tracked after that forward
  loss_ce       f64 [1]   nn.CrossEntropyLoss(ignore_index=255)(logits_train)
  loss_dice_smp f64 [1]   smp.losses.DiceLoss("multiclass", from_logits=True,
                          ignore_index=255)
  loss_dice_tutorial f64 [1]  1 - mean_{b,c} (2 S(p t) + 1e-7)/(S(p) + S(t) + 1e-7),
                          p = softmax, sums over pixels of one image, ignored
                          pixels zeroed in both p and t (spec section 6)
  loss_total1   f64 [1]   ce + dice_smp      (the loss that is back-propagated)
  loss_total2   f64 [1]   0.5 ce + 0.5 dice_tutorial
  grad_present  i32 [P]   1 if the parameter got a .grad, else 0 (stages
                          deeper than encoder_depth); P = trainable params in
                          named_parameters order (= state_dict order)
  grad_norm     f64 [P]   float64 L2 norm of each .grad (0 where absent)
  grad_idx      i64 [P,8] flat indices: argmax |grad| (first), 0, n/6, 2n/6,
                          3n/6, 4n/6, 5n/6, n-1
  grad_val      f32 [P,8] .grad at those indices (0 where absent)
  adamw_loss    f64 [3]   from a fresh filled model, 3 steps of
                          {train(); loss = ce + dice_smp; zero_grad();
                          backward(); step()} with torch.optim.AdamW(lr=1e-3,
                          betas=(0.9,0.999), eps=1e-8, weight_decay=1e-2,
                          foreach=False): the loss of each step, before its update
  adamw_param_norm f64 [P] float64 L2 norm of each parameter after step 3
  adamw_idx     i64 [P,8] argmax |param_after - param_initial| (first), then
                          the same 7 spread indices as grad_idx
  adamw_val     f32 [P,8] parameter values after step 3 at those indices
  adamw_running f32 [R]   running_mean/var concatenation after the 3 steps

--full-check DIR TERRASEG_BIN writes full-size models (save_pretrained
directory, torch.save of the state_dict and of the whole model) into DIR and
checks terraseg's info and convert against them with torch and SMP (see
full_check()). Not run by CI.
"""
import argparse
import hashlib
import os
import struct
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "fixtures", "smp")

IGNORE = 255
N = 2

# name: (in_channels, classes, depth, decoder_channels, use_bn, H, W)
CASES = [
    ("in3_k1_d5_64x64", 3, 1, 5, (256, 128, 64, 32, 16), True, 64, 64),
    ("in4_k6_d5_100x76", 4, 6, 5, (256, 128, 64, 32, 16), True, 100, 76),
    ("in4_k6_d3_64x64", 4, 6, 3, (64, 32, 16), True, 64, 64),
    ("in3_k6_d4_nobn_64x48", 3, 6, 4, (128, 64, 32, 16), False, 64, 48),
]

# ---------------------------------------------------------------------------
# The fill of tests/smp_fill.h

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB


def fnv1a(name):
    h = 0xCBF29CE484222325
    for b in name.encode("utf-8"):
        h ^= b
        h = (h * 0x100000001B3) & M64
    return h


def fill_u(h, n):
    """u for elements 0..n-1 of a tensor whose name hashes to h (numpy uint64,
    every operation wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = np.uint64(h) + i * np.uint64(GOLDEN)
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(MIX1)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(MIX2)
        z = z ^ (z >> np.uint64(31))
    return z


def fill_q(h, n):
    return (fill_u(h, n) % np.uint64(2001)).astype(np.int64) - 1000


def ref_u(h, i):
    """Pure-Python ints: the second implementation, for the self-check."""
    z = (h + (i + 1) * GOLDEN) & M64
    z ^= z >> 30
    z = (z * MIX1) & M64
    z ^= z >> 27
    z = (z * MIX2) & M64
    z ^= z >> 31
    return z


def scale_of(name, shape):
    """(offset, exponent) of the value rule for a float entry."""
    if len(shape) == 4:
        fan = shape[1] * shape[2] * shape[3]
        return 0.0, -(10 + (fan.bit_length() - 1) // 2)
    if len(shape) != 1:
        raise ValueError(f"{name}: no fill rule for a {len(shape)}-D tensor")
    if name.endswith(".running_var"):
        return 1.0, -11
    if name.endswith(".bias") or name.endswith(".running_mean"):
        return 0.0, -13
    if name.endswith(".weight"):
        return 1.0, -12
    raise ValueError(f"{name}: no fill rule")


def fill_f32(name, shape):
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    offset, e = scale_of(name, tuple(int(s) for s in shape))
    q = fill_q(fnv1a(name), n).astype(np.float64)
    v = offset + np.ldexp(q, e)  # exact in float64 and in float32
    out = v.astype(np.float32)
    assert np.array_equal(out.astype(np.float64), v), name
    return out.reshape(shape)


def ref_f32(name, shape, i):
    offset, e = scale_of(name, tuple(int(s) for s in shape))
    q = ref_u(fnv1a(name), i) % 2001 - 1000
    return offset + q * 2.0**e


def fill_counter(name):
    return fnv1a(name) % 1000


def fill_input(n):
    return np.ldexp(fill_q(fnv1a("input"), n).astype(np.float64), -10).astype(np.float32)


def fill_target(n, classes):
    u = fill_u(fnv1a("target"), n)
    return np.where(u % np.uint64(17) == 0, np.uint64(IGNORE), u % np.uint64(classes)).astype(np.int32)


def self_check_fill():
    """The numpy fill against pure-Python ints on sampled elements, and a few
    values pinned by hand-checkable properties."""
    assert fnv1a("") == 0xCBF29CE484222325
    assert fnv1a("a") == 0xAF63DC4C8601EC8C  # published FNV-1a 64 test vector
    rng_names = ["encoder.conv1.weight", "decoder.blocks.0.conv1.0.weight", "encoder.bn1.running_var",
                 "encoder.layer4.2.bn2.weight", "segmentation_head.0.bias", "input", "target"]
    for name in rng_names:
        h = fnv1a(name)
        n = 5000
        u = fill_u(h, n)
        for i in list(range(20)) + list(range(n - 20, n)) + [1234, 2047, 4095]:
            assert int(u[i]) == ref_u(h, i), (name, i)
    for name, shape in [("encoder.conv1.weight", (64, 4, 7, 7)), ("decoder.blocks.0.conv1.0.weight", (256, 768, 3, 3)),
                        ("encoder.bn1.running_var", (64,)), ("encoder.bn1.running_mean", (64,)),
                        ("encoder.bn1.weight", (64,)), ("segmentation_head.0.bias", (6,))]:
        v = fill_f32(name, shape).reshape(-1)
        for i in [0, 1, 2, v.size // 3, v.size - 1]:
            assert float(v[i]) == ref_f32(name, shape, i), (name, i)
    x = fill_input(100)
    t = fill_target(1000, 6)
    hx, ht = fnv1a("input"), fnv1a("target")
    for i in range(100):
        assert float(x[i]) == (ref_u(hx, i) % 2001 - 1000) / 1024.0
    for i in range(1000):
        u = ref_u(ht, i)
        assert int(t[i]) == (255 if u % 17 == 0 else u % 6)


# ---------------------------------------------------------------------------
# TSFX writer and an independent reader


DT_CODE = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.int64): 2, np.dtype(np.int32): 3}


class Tsfx:
    def __init__(self):
        self.records = []

    def add(self, name, array, dtype):
        a = np.ascontiguousarray(np.asarray(array, dtype=dtype))
        if a.ndim == 0:
            a = a.reshape(1)
        assert a.ndim <= 8 and all(d < 2**32 for d in a.shape)
        assert name not in [r[0] for r in self.records], name
        self.records.append((name, a))

    def bytes(self):
        out = [b"TSFX0001", struct.pack("<I", len(self.records))]
        for name, a in self.records:
            nb = name.encode("ascii")
            out.append(struct.pack("<H", len(nb)) + nb)
            out.append(struct.pack("<BB", DT_CODE[a.dtype], a.ndim))
            out.append(struct.pack("<%dI" % a.ndim, *a.shape))
            out.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C"))
        return b"".join(out)


def read_tsfx(path):
    """Independent reader (struct only, no numpy): {name: (dtype, dims, values)}."""
    fmt = {0: ("f", 4), 1: ("d", 8), 2: ("q", 8), 3: ("i", 4)}
    with open(path, "rb") as fp:
        data = fp.read()
    assert data[:8] == b"TSFX0001", path
    (count,) = struct.unpack_from("<I", data, 8)
    off = 12
    recs = {}
    for _ in range(count):
        (ln,) = struct.unpack_from("<H", data, off)
        off += 2
        name = data[off:off + ln].decode("ascii")
        off += ln
        dtype, ndim = struct.unpack_from("<BB", data, off)
        off += 2
        dims = struct.unpack_from("<%dI" % ndim, data, off)
        off += 4 * ndim
        n = 1
        for d in dims:
            n *= d
        ch, sz = fmt[dtype]
        vals = struct.unpack_from("<%d%s" % (n, ch), data, off)
        off += n * sz
        assert name not in recs
        recs[name] = (dtype, tuple(dims), vals)
    assert off == len(data), "trailing bytes"
    return recs


# ---------------------------------------------------------------------------
# Models


def setup_torch():
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


def build_model(smp, in_channels, classes, depth, dec, use_bn):
    import inspect

    params = inspect.signature(smp.Unet.__init__).parameters
    kw = dict(encoder_weights=None, in_channels=in_channels, classes=classes, encoder_depth=depth,
              decoder_channels=tuple(dec), decoder_interpolation="nearest")
    if "decoder_use_norm" in params:  # SMP >= 0.5
        kw["decoder_use_norm"] = "batchnorm" if use_bn else False
    else:
        kw["decoder_use_batchnorm"] = use_bn
    return smp.Unet("resnet34", **kw)


def fill_model(torch, model):
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        if k.endswith(".num_batches_tracked"):
            assert v.dtype == torch.int64 and v.dim() == 0
            new[k] = torch.tensor(fill_counter(k), dtype=torch.int64)
        else:
            assert v.dtype == torch.float32, k
            new[k] = torch.from_numpy(fill_f32(k, tuple(v.shape)).copy())
    model.load_state_dict(new, strict=True)
    return new


def running_concat(model):
    parts = [v.detach().reshape(-1).numpy().astype(np.float32) for k, v in model.state_dict().items()
             if k.endswith(".running_mean") or k.endswith(".running_var")]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def pick_idx(flat_abs_key):
    n = flat_abs_key.size
    am = int(np.argmax(flat_abs_key))  # first maximum
    return [am, 0, n // 6, 2 * n // 6, 3 * n // 6, 4 * n // 6, 5 * n // 6, n - 1]


def dice_tutorial(torch, logits, y):
    C = logits.shape[1]
    m = (y != IGNORE)
    p = torch.softmax(logits, dim=1) * m[:, None]
    t = torch.nn.functional.one_hot(y * m, C).permute(0, 3, 1, 2).to(logits.dtype) * m[:, None]
    inter = (p * t).sum(dim=(2, 3))
    dice = (2 * inter + 1e-7) / (p.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1e-7)
    return 1 - dice.mean()


def make_case(torch, smp, case):
    name, cin, k, depth, dec, use_bn, H, W = case
    model = build_model(smp, cin, k, depth, dec, use_bn)
    filled = fill_model(torch, model)
    sd_keys = list(filled.keys())
    pnames = [n for n, _ in model.named_parameters()]
    assert pnames == [key for key in sd_keys if not key.endswith((".running_mean", ".running_var",
                                                                  ".num_batches_tracked"))]
    f = Tsfx()
    dec5 = list(dec) + [0] * (5 - len(dec))
    f.add("config", [cin, k, depth] + dec5 + [1 if use_bn else 0, N, H, W], np.int32)
    f.add("entry_hash", np.array([fnv1a(key) for key in sd_keys], dtype=np.uint64).view(np.int64), np.int64)
    f.add("entry_numel", [filled[key].numel() for key in sd_keys], np.int64)
    sums = []
    for key in sd_keys:
        v = filled[key]
        if key.endswith(".num_batches_tracked"):
            sums.append(float(int(v)))
        else:
            sums.append(float(np.sum(v.numpy().astype(np.float64))))
    f.add("param_sums", sums, np.float64)

    x_np = fill_input(N * cin * H * W).reshape(N, cin, H, W)
    y_np = fill_target(N * H * W, k).reshape(N, H, W)
    f.add("input", x_np, np.float32)
    f.add("target", y_np, np.int32)
    x = torch.from_numpy(x_np.copy())
    y = torch.from_numpy(y_np.astype(np.int64))

    ce_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    dice_fn = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)

    model.eval()
    with torch.no_grad():
        logits_eval = model(x)
    f.add("logits_eval", logits_eval.numpy(), np.float32)

    model.train()
    logits = model(x)
    f.add("logits_train", logits.detach().numpy(), np.float32)
    f.add("bn_running_after_train", running_concat(model), np.float32)
    f.add("nbt_after_train", [int(v) for key, v in model.state_dict().items()
                              if key.endswith(".num_batches_tracked")], np.int64)
    ce = ce_fn(logits, y)
    dsmp = dice_fn(logits, y)
    dtut = dice_tutorial(torch, logits, y)
    total1 = ce + dsmp
    total2 = 0.5 * ce + 0.5 * dtut
    for rec, v in [("loss_ce", ce), ("loss_dice_smp", dsmp), ("loss_dice_tutorial", dtut),
                   ("loss_total1", total1), ("loss_total2", total2)]:
        f.add(rec, [float(v.detach())], np.float64)
    model.zero_grad(set_to_none=True)
    total1.backward()

    present, norms, idxs, vals = [], [], [], []
    for pn, p in model.named_parameters():
        n = p.numel()
        if p.grad is None:
            present.append(0)
            norms.append(0.0)
            idxs.append(pick_idx(np.zeros(n)))
            vals.append([0.0] * 8)
        else:
            g = p.grad.detach().reshape(-1).numpy()
            present.append(1)
            norms.append(float(np.sqrt(np.sum(g.astype(np.float64) ** 2))))
            ix = pick_idx(np.abs(g))
            idxs.append(ix)
            vals.append(g[ix])
    f.add("grad_present", present, np.int32)
    f.add("grad_norm", norms, np.float64)
    f.add("grad_idx", idxs, np.int64)
    f.add("grad_val", vals, np.float32)

    # AdamW from a fresh filled model
    model = build_model(smp, cin, k, depth, dec, use_bn)
    fill_model(torch, model)
    init = {pn: p.detach().clone() for pn, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=1e-2, foreach=False)
    losses = []
    for _ in range(3):
        model.train()
        out = model(x)
        loss = ce_fn(out, y) + dice_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    f.add("adamw_loss", losses, np.float64)
    norms, idxs, vals = [], [], []
    for pn, p in model.named_parameters():
        v = p.detach().reshape(-1).numpy()
        norms.append(float(np.sqrt(np.sum(v.astype(np.float64) ** 2))))
        d = np.abs(v.astype(np.float64) - init[pn].reshape(-1).numpy().astype(np.float64))
        ix = pick_idx(d)
        idxs.append(ix)
        vals.append(v[ix])
    f.add("adamw_param_norm", norms, np.float64)
    f.add("adamw_idx", idxs, np.int64)
    f.add("adamw_val", vals, np.float32)
    f.add("adamw_running", running_concat(model), np.float32)

    info = dict(entries=len(sd_keys), params=len(pnames), n_params=sum(p.numel() for p in model.parameters()),
                loss=dict(ce=float(ce.detach()), dice_smp=float(dsmp.detach()), dice_tut=float(dtut.detach())),
                grads_absent=present.count(0), entry_numel=[filled[key].numel() for key in sd_keys],
                param_numel=[p.numel() for p in model.parameters()])
    return f, info


def check_file(path, case, info):
    name, cin, k, depth, dec, use_bn, H, W = case
    r = read_tsfx(path)
    cfg = r["config"][2]
    assert list(cfg) == [cin, k, depth] + list(dec) + [0] * (5 - len(dec)) + [int(use_bn), N, H, W]
    E = r["entry_hash"][1][0]
    P = r["grad_norm"][1][0]
    R = r["bn_running_after_train"][1][0]
    expect = {
        "config": (3, (12,)), "entry_hash": (2, (E,)), "entry_numel": (2, (E,)), "param_sums": (1, (E,)),
        "input": (0, (N, cin, H, W)), "target": (3, (N, H, W)),
        "logits_eval": (0, (N, k, H, W)), "logits_train": (0, (N, k, H, W)),
        "bn_running_after_train": (0, (R,)), "nbt_after_train": (2, r["nbt_after_train"][1]),
        "loss_ce": (1, (1,)), "loss_dice_smp": (1, (1,)), "loss_dice_tutorial": (1, (1,)),
        "loss_total1": (1, (1,)), "loss_total2": (1, (1,)),
        "grad_present": (3, (P,)), "grad_norm": (1, (P,)), "grad_idx": (2, (P, 8)), "grad_val": (0, (P, 8)),
        "adamw_loss": (1, (3,)), "adamw_param_norm": (1, (P,)), "adamw_idx": (2, (P, 8)),
        "adamw_val": (0, (P, 8)), "adamw_running": (0, (R,)),
    }
    assert set(r) == set(expect), set(r) ^ set(expect)
    for key, (dt, dims) in expect.items():
        assert r[key][0] == dt and r[key][1] == dims, (path, key, r[key][:2], dt, dims)
    # entries: 216 encoder + 12 (BN) or 4 (no BN) per decoder block + 2 head
    assert E == 216 + depth * (12 if use_bn else 4) + 2, E
    l = {key: r[key][2][0] for key in ("loss_ce", "loss_dice_smp", "loss_dice_tutorial", "loss_total1", "loss_total2")}
    assert abs(l["loss_total1"] - (l["loss_ce"] + l["loss_dice_smp"])) < 1e-6
    assert abs(l["loss_total2"] - 0.5 * (l["loss_ce"] + l["loss_dice_tutorial"])) < 1e-6
    assert list(r["entry_numel"][2]) == info["entry_numel"]
    for rec in ("grad_idx", "adamw_idx"):
        ix = r[rec][2]
        for j, n in enumerate(info["param_numel"]):
            assert all(0 <= v < n for v in ix[8 * j:8 * j + 8]), (rec, j)
    for j, present in enumerate(r["grad_present"][2]):
        if not present:
            assert r["grad_norm"][2][j] == 0.0 and not any(r["grad_val"][2][8 * j:8 * j + 8])
    assert all(v == v for v in r["logits_eval"][2] + r["logits_train"][2]), "NaN in logits"
    return E, P, R


# ---------------------------------------------------------------------------
# Optional full-size check


def full_check(torch, smp, outdir, terraseg):
    """Checks terraseg against full-size files written by real SMP and PyTorch
    (for anyone with torch and SMP installed; CI runs the C parity tests
    instead). For each architecture it writes save_pretrained, torch.save of
    the state_dict and of the whole model, then asserts:
      - `terraseg info` reads the SMP directory and the state_dict;
      - `terraseg convert` to .pth: torch.load(weights_only=True) gives the
        same keys, in order, with bit-identical values;
      - `terraseg convert` to an SMP directory: smp.from_pretrained loads it
        and gives bit-identical eval logits;
      - `terraseg convert` to .safetensors: safetensors' load_file gives the
        same tensors;
      - a whole pickled model is refused, naming state_dict as the fix.
    Logit parity for the same weights is what tests/test_unet.c checks."""
    from safetensors.torch import load_file
    os.makedirs(outdir, exist_ok=True)
    failures = []

    def run(*cmd):
        p = subprocess.run([terraseg, *cmd], capture_output=True, text=True)
        print("$ terraseg", " ".join(cmd), "->", p.returncode)
        return p

    def same_state(a, b, what, ordered=True):
        if (list(a.keys()) if ordered else sorted(a.keys())) != (list(b.keys()) if ordered else sorted(b.keys())):
            failures.append(f"{what}: keys differ")
            return
        for k in a:
            if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
                failures.append(f"{what}: {k} differs")
                return
        print(f"  {what}: {len(a)} entries bit-identical")

    for tag, cin, k, depth, dec, use_bn in [("in4_k6_d5", 4, 6, 5, (256, 128, 64, 32, 16), True),
                                            ("in3_k1_d5", 3, 1, 5, (256, 128, 64, 32, 16), True),
                                            ("in3_k6_d4_nobn", 3, 6, 4, (128, 64, 32, 16), False)]:
        model = build_model(smp, cin, k, depth, dec, use_bn)
        fill_model(torch, model)
        model.eval()
        ref = model.state_dict()
        d = os.path.join(outdir, tag)
        model.save_pretrained(d)
        sd = os.path.join(outdir, tag + ".state_dict.pth")
        torch.save(ref, sd)
        whole = os.path.join(outdir, tag + ".model.pth")
        torch.save(model, whole)

        for path in (d, sd):
            p = run("info", path)
            if p.returncode != 0 or f"in_channels={cin}, classes={k}, encoder_depth={depth}" not in p.stdout:
                failures.append(f"info {path}: {p.stdout}{p.stderr}")

        out_pth = os.path.join(outdir, tag + ".terraseg.pth")
        if run("convert", d, out_pth).returncode == 0:
            same_state(ref, torch.load(out_pth, weights_only=True), f"{tag}: SMP dir -> .pth -> torch.load")
        else:
            failures.append(f"convert {d} -> {out_pth}")

        out_dir = os.path.join(outdir, tag + ".terraseg_smp")
        if run("convert", sd, out_dir, "--format", "smp").returncode == 0:
            back = smp.from_pretrained(out_dir).eval()
            same_state(ref, back.state_dict(), f"{tag}: .pth -> SMP dir -> smp.from_pretrained")
            x = torch.from_numpy(fill_input(2 * cin * 64 * 64).reshape(2, cin, 64, 64))
            with torch.no_grad():
                if not torch.equal(model(x), back(x)):
                    failures.append(f"{tag}: logits differ after the SMP directory round trip")
                else:
                    print(f"  {tag}: eval logits identical after smp.from_pretrained")
        else:
            failures.append(f"convert {sd} -> {out_dir}")

        out_st = os.path.join(outdir, tag + ".terraseg.safetensors")
        if run("convert", sd, out_st).returncode == 0:
            # safetensors stores tensors sorted by dtype, then name: compare as a mapping.
            same_state(ref, load_file(out_st), f"{tag}: .pth -> .safetensors -> load_file", ordered=False)
        else:
            failures.append(f"convert {sd} -> {out_st}")

        p = run("info", whole)
        if p.returncode == 0 or "state_dict" not in p.stderr:
            failures.append(f"info {whole} should refuse a pickled model: {p.stdout}{p.stderr}")

    for f in failures:
        print("FAIL", f)
    print(f"full check: {len(failures)} failure(s)")
    return 1 if failures else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", nargs="?", default=DEFAULT_OUT)
    ap.add_argument("--full-check", nargs=2, metavar=("DIR", "TERRASEG_BIN"),
                    help="write full-size models to DIR and check TERRASEG_BIN info/convert against them")
    ap.add_argument("--self-check", action="store_true", help="only check the fill formula and exit")
    args = ap.parse_args()

    self_check_fill()
    print("fill: numpy uint64 matches pure-Python ints")
    if args.self_check:
        return 0
    torch = setup_torch()
    import segmentation_models_pytorch as smp

    print(f"torch {torch.__version__}, segmentation_models_pytorch {smp.__version__}, numpy {np.__version__}")
    if args.full_check:
        return full_check(torch, smp, *args.full_check)

    os.makedirs(args.outdir, exist_ok=True)
    for case in CASES:
        torch.manual_seed(0)  # unused (everything is filled), kept for safety
        f, info = make_case(torch, smp, case)
        path = os.path.join(args.outdir, case[0] + ".tsfx")
        data = f.bytes()
        with open(path, "wb") as fp:
            fp.write(data)
        E, P, R = check_file(path, case, info)
        print(f"wrote {path}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}, "
              f"{len(f.records)} records, {E} entries, {P} params ({info['n_params']} values, "
              f"{info['grads_absent']} without grad), {R} running values, "
              f"ce {info['loss']['ce']:.6g} dice_smp {info['loss']['dice_smp']:.6g} "
              f"dice_tut {info['loss']['dice_tut']:.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
