#!/usr/bin/env python3
"""Times smp.Unet("resnet34") on a CUDA GPU in PyTorch (several modes) and in
terraseg (several precisions), on the same synthetic tiles, and prints one
Markdown table of tiles/s per phase (inference, training) with ratios and the
two done-when verdicts of the GPU issue, ready for docs/benchmarks.md.

    python3 tools/bench/gpu_compare.py [TERRASEG_BIN] [--sizes 256,512]
        [--batches 1,2,4,8,16,32] [--modes fp32,tf32,bf16,compile]
        [--ts-modes fp32,tf32,bf16] [--phases infer,train] [--iters N]
        [--warmup N] [--device cuda[:N]] [--save-csv FILE] [--resume FILE]
        [--budget-s S] ...
    python3 tools/bench/gpu_compare.py --from-csv FILE [FILE ...]

Run it through tools/bench/gpu_compare.sh, which makes the venv (a CUDA build
of torch and segmentation-models-pytorch; terraseg itself never needs Python)
and builds terraseg with CUDA. --from-csv needs neither torch nor a GPU: it
prints the report of saved measurements (--save-csv of one or more runs).

PyTorch modes (--modes; all on the same model, same data, same step):
  fp32     eager, float32, NCHW, TF32 off for cuDNN convs and cuBLAS matmuls
  tf32     eager, float32, NCHW, TF32 on
  bf16     eager, channels_last model and input, torch.autocast(bfloat16), TF32 on
  compile  torch.compile (--compile-mode, dynamic=False) of the channels_last
           model, called under the same bf16 autocast, TF32 on; compiled afresh
           (torch._dynamo.reset()) for every size, batch and phase; its first
           call (the compilation) is reported separately and never timed
cudnn.benchmark is on (PyTorch's fastest eager setting) unless
--no-cudnn-benchmark. CUDA graphs are not used.

terraseg modes (--ts-modes; `terraseg bench model|train --device DEV` with):
  fp32     nothing: float32 NCHW activations, TF32 off
  tf32     --tf32: float32 activations, TF32 tensor-core math in cuDNN/cuBLAS
  bf16     --precision bf16: bfloat16 channels-last activations, float32 master
           weights (cast per forward in training, as autocast); every conv is a
           bf16 tensor-op conv whatever --tf32 says (TF32 is a float32 setting)
  fp16     --precision fp16: float16 likewise; training adds dynamic loss
           scaling (GradScaler's rule). Not run by default.
  none     no terraseg runs (PyTorch only, e.g. to add torch.compile cells to a
           saved run with --resume or --from-csv)

Phases:
  infer  PyTorch: model.eval(), torch.inference_mode(), forward to logits (no
         softmax). terraseg: `bench model`'s "resident" column: the inference
         copy's forward with BN folded on a batch already on the GPU, logits
         left there, then a sync, as PyTorch's input is already on the GPU.
         (Builds before that column: its "eval fwd" column, the forward as
         predict runs it, which ADDS the float32 batch upload and logits
         download.)
  train  PyTorch: model.train(); zero_grad(set_to_none); forward; loss = 0.5
         CE + 0.5 Dice in float32 (per-image soft Dice over softmax, eps 1e-7,
         the default loss of `terraseg bench train`); backward; AdamW step (lr
         3e-4, weight decay 1e-4, fused=True). The loss and the optimizer are
         eager in every mode (torch.compile compiles the model only).
         terraseg: `bench train`: labels upload, forward, the same loss,
         backward, AdamW, then a device sync, as the trainer runs it

Timing: PyTorch: the input tensor (and labels) already on the GPU; --warmup
steps, then --iters steps, each between two torch.cuda.synchronize() calls;
the median step time gives tiles/s = batch / median. terraseg: its own median
of --iters after one warm-up, each ending with the backend's sync. bench model
prints milliseconds with one decimal, so its inference rate carries a
rounding error of up to 0.05 ms / its time (kept in the CSV as rate_rel_err
and named in the verdict where it could matter). A batch that runs out of
memory is reported as OOM (and larger batches of that mode and size are
skipped). bench model and bench train also print a batch-4 row; it is used
for batch 4 when --batches has it (no second run).

Order and time budget: the cells run in order of what the verdicts need:
terraseg inference (every --ts-modes), terraseg bf16 training, PyTorch eager
inference, PyTorch bf16 training, torch.compile inference, then the rest of
training (terraseg's other modes, PyTorch fp32/tf32, torch.compile). With
--budget-s S no cell starts that is not expected to finish within S seconds
of the start; such cells, and those left by SIGTERM/SIGINT, say "skipped",
and the report is printed with what was measured. --save-csv writes every
cell as it finishes (so a killed run still leaves its measurements);
--resume FILE takes the cells of a saved CSV as measured and runs only the
missing or skipped ones (the new --save-csv holds both).

Done-when (printed after the tables, PASS / FAIL / INCOMPLETE / NOT MEASURED):
  1. inference: terraseg's best mode / PyTorch's best mode >= 1 in every row
  2. training:  terraseg bf16 / PyTorch bf16 autocast >= 1 in every row
A row where PyTorch ran and terraseg failed or ran out of memory fails; a
row with cells not measured (skipped, or a mode not run) leaves the verdict
INCOMPLETE unless another row already fails it.

Progress goes to stderr; the header, tables and verdicts go to stdout.
"""
import argparse
import contextlib
import csv
import datetime
import gc
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

MODES = ("fp32", "tf32", "bf16", "compile")
MODE_TITLES = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16 cl", "compile": "compile"}
TS_MODES = ("fp32", "tf32", "bf16", "fp16")
TS_DEFAULT = ("fp32", "tf32", "bf16")
TS_TITLES = {m: f"ts {m}" for m in TS_MODES}
TS_FLAGS = {"fp32": [], "tf32": ["--tf32"], "bf16": ["--precision", "bf16"], "fp16": ["--precision", "fp16"]}
PHASES = ("infer", "train")
SIDES = ("terraseg", "torch")
# Statuses of a cell that ran: a --resume keeps them. "skipped" (time budget,
# interrupted) is run again.
DONE = ("ok", "oom", "error", "unavailable", "timeout")
CSV_FIELDS = ["run", "side", "phase", "mode", "size", "batch", "status", "tiles_per_s", "ms_per_step",
              "first_call_s", "rate_rel_err", "detail"]


def int_list(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {s!r}")
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 1, got {s!r}")
    return v


def name_list(allowed, allow_none=False):
    def parse(s):
        v = [x.strip() for x in s.split(",") if x.strip()]
        if allow_none and v == ["none"]:
            return []
        bad = [x for x in v if x not in allowed]
        if not v or bad:
            extra = " or none" if allow_none else ""
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (comma-separated){extra}, got {s!r}")
        return [m for m in allowed if m in v]  # canonical order, no repeats
    return parse


def device_arg(s):
    if not re.fullmatch(r"cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"write cuda or cuda:N, got {s!r}")
    return s


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("terraseg", nargs="?", help="the terraseg binary (a CUDA build); without it the terraseg "
                    "columns say n/a")
    ap.add_argument("--sizes", type=int_list, help="tile sizes in pixels (default 256,512)")
    ap.add_argument("--batches", type=int_list, help="batch sizes (default 1,2,4,8,16,32)")
    ap.add_argument("--modes", type=name_list(MODES), help="PyTorch modes (default fp32,tf32,bf16,compile)")
    ap.add_argument("--ts-modes", type=name_list(TS_MODES, allow_none=True),
                    help="terraseg modes: fp32,tf32,bf16,fp16 or none (default fp32,tf32,bf16)")
    ap.add_argument("--phases", type=name_list(PHASES), help="infer and/or train (default both)")
    ap.add_argument("--iters", type=int, default=20, help="timed steps per measurement (median; default 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5; compile: after the "
                    "compiling call)")
    ap.add_argument("--in-channels", type=int, default=3, help="input bands (default 3)")
    ap.add_argument("--classes", type=int, default=2, help="output classes (default 2)")
    ap.add_argument("--device", type=device_arg, default="cuda", help="cuda or cuda:N, for both (default cuda)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs "
                    "(default: default)")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave torch.backends.cudnn.benchmark off (cuDNN's heuristic choice, as terraseg makes)")
    ap.add_argument("--ts-tf32", action="store_true", help="the same as --ts-modes tf32 (older command lines)")
    ap.add_argument("--ts-args", default="", help="more options for every `terraseg bench model/train`, one "
                    "string (not --tf32 or --precision: those are --ts-modes)")
    ap.add_argument("--ts-timeout", type=float, default=1800, help="seconds per terraseg run (default 1800)")
    ap.add_argument("--budget-s", type=float, default=0,
                    help="start no cell that is not expected to end within this many seconds of the start; "
                    "the rest say skipped (default 0: no budget)")
    ap.add_argument("--save-csv", metavar="FILE", help="write every cell to FILE as it finishes (with the "
                    "header as # lines): input for --from-csv and --resume")
    ap.add_argument("--resume", metavar="FILE", help="take the cells of this saved CSV as measured; run only "
                    "the missing or skipped ones")
    ap.add_argument("--from-csv", metavar="FILE", nargs="+",
                    help="run nothing: print the report of these saved CSVs (later files win for a cell they "
                    "measured); --sizes, --batches, --modes, --ts-modes, --phases then pick the rows and columns "
                    "shown (default: whatever the files hold; the verdicts use every mode the files hold for "
                    "the rows shown). Needs no torch and no GPU")
    # Development only: runs the PyTorch side on the CPU at whatever sizes are
    # given, to check this script without a GPU. Its numbers are no benchmark.
    ap.add_argument("--cpu-smoke-test", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.iters < 1 or a.warmup < 0 or a.in_channels < 1 or a.classes < 1 or a.budget_s < 0:
        ap.error("--iters >= 1, --warmup >= 0, --in-channels >= 1, --classes >= 1 and --budget-s >= 0")
    if a.sizes and any(s % 32 for s in a.sizes):
        ap.error("--sizes must be multiples of 32 (the U-Net's encoder divides by 32)")
    ts_args = shlex.split(a.ts_args)
    if any(x.split("=")[0] in ("--tf32", "--precision") for x in ts_args):
        ap.error("--ts-args: choose terraseg's precision with --ts-modes (fp32, tf32, bf16, fp16), not --tf32 or "
                 "--precision")
    if a.ts_tf32:
        if a.ts_modes is not None and a.ts_modes != ["tf32"]:
            ap.error("--ts-tf32 is --ts-modes tf32; give one or the other")
        a.ts_modes = ["tf32"]
    if a.from_csv and (a.terraseg or a.resume or a.save_csv):
        ap.error("--from-csv runs nothing: no TERRASEG_BIN, --resume or --save-csv with it")
    if not a.from_csv:
        a.sizes = a.sizes or [256, 512]
        a.batches = a.batches or [1, 2, 4, 8, 16, 32]
        a.modes = list(MODES) if a.modes is None else a.modes
        a.ts_modes = list(TS_DEFAULT) if a.ts_modes is None else a.ts_modes
        a.phases = a.phases or list(PHASES)
    return a


# ---- the cells and their CSV -------------------------------------------------------------

def new_cell(status, rate=None, ms=None, first=None, relerr=None, detail="", run=""):
    return {"status": status, "rate": rate, "ms": ms, "first": first, "relerr": relerr, "detail": detail,
            "run": run}


def num(s):
    return float(s) if s not in (None, "") else None


def read_csv(path):
    """(meta, cells): meta = [(run id, [header lines])] in file order; cells =
    {(side, phase, mode, size, batch): cell}."""
    meta, cells, cur = [], {}, None
    with open(path, newline="") as f:
        data_lines = []
        for line in f:
            if line.startswith("#"):
                text = line[1:].rstrip("\n")
                text = text[1:] if text.startswith(" ") else text
                m = re.fullmatch(r"run (\S+)", text)
                if m:
                    cur = (m.group(1), [])
                    meta.append(cur)
                elif cur is not None:
                    cur[1].append(text)
                else:
                    cur = ("?", [text])
                    meta.append(cur)
            elif line.strip():
                data_lines.append(line)
    rows = list(csv.DictReader(data_lines))
    if rows and set(CSV_FIELDS) - set(rows[0]):
        raise ValueError(f"{path}: not a gpu_compare CSV (columns {', '.join(CSV_FIELDS)} expected)")
    for r in rows:
        if r["side"] not in SIDES or r["phase"] not in PHASES:
            raise ValueError(f"{path}: unknown side or phase in row {r}")
        key = (r["side"], r["phase"], r["mode"], int(r["size"]), int(r["batch"]))
        cells[key] = new_cell(r["status"], num(r["tiles_per_s"]), num(r["ms_per_step"]), num(r["first_call_s"]),
                              num(r["rate_rel_err"]), r["detail"], r["run"])
    return meta, cells


def merge_cells(into, cells):
    """Later cells win, except that a skipped cell never replaces one that ran."""
    for k, c in cells.items():
        old = into.get(k)
        if old is None or c["status"] != "skipped" or old["status"] == "skipped":
            into[k] = c


class CsvOut:
    """--save-csv: header lines as '#' comments, one row per cell, flushed as it
    comes, so that a run killed half-way leaves what it measured."""

    def __init__(self, path):
        self.f = open(path, "w", newline="") if path else None
        self.w = csv.DictWriter(self.f, CSV_FIELDS, lineterminator="\n") if self.f else None
        self.header_written = False

    def meta(self, run, lines):
        if not self.f:
            return
        self.f.write(f"# run {run}\n")
        for l in lines:
            for sub in str(l).splitlines() or [""]:
                self.f.write(f"# {sub}\n")
        self.f.flush()

    def row(self, key, c):
        if not self.f:
            return
        if not self.header_written:
            self.w.writeheader()
            self.header_written = True
        side, phase, mode, size, batch = key

        def f(v, fmt):
            return "" if v is None else format(v, fmt)
        self.w.writerow({"run": c["run"], "side": side, "phase": phase, "mode": mode, "size": size, "batch": batch,
                         "status": c["status"], "tiles_per_s": f(c["rate"], ".6g"), "ms_per_step": f(c["ms"], ".6g"),
                         "first_call_s": f(c["first"], ".4g"), "rate_rel_err": f(c["relerr"], ".3g"),
                         "detail": c["detail"]})
        self.f.flush()

    def close(self):
        if self.f:
            self.f.close()


# ---- terraseg --------------------------------------------------------------------------

# bench model's rows; the last column (the resident forward) is absent in
# builds before it was added.
MODEL_ROW = re.compile(r"^(\d+)\s+(\d+)x(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)(?:\s+([\d.]+))?$")
TRAIN_ROW = re.compile(r"^(\d+)\s+(\d+)x(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$")


def terraseg_version(binary):
    if not binary:
        return "no terraseg binary given"
    try:
        r = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary}: {e}"
    return (r.stdout + r.stderr).strip()


def terraseg_command(binary, a, phase, mode, size, batch):
    bench = "model" if phase == "infer" else "train"
    return ([binary, "bench", bench, "--device", a.device, "--size", str(size), "--batch", str(batch),
             "--iters", str(a.iters), "--in-channels", str(a.in_channels), "--classes", str(a.classes)]
            + TS_FLAGS[mode] + shlex.split(a.ts_args))


def parse_terraseg(phase, size, stdout):
    """{batch: (tiles/s, ms per step, relative rounding error of the rate)} of
    every row of `bench model` / `bench train` output at this size."""
    rows = {}
    for line in stdout.splitlines():
        line = line.strip()
        if phase == "infer":
            m = MODEL_ROW.match(line)
            if m and int(m.group(2)) == size and int(m.group(3)) == size:
                b = int(m.group(1))
                # Like for like: PyTorch's input is already on the GPU, so the
                # resident forward (3 decimals: +-0.0005 ms) when the build
                # prints it, else the predict-like one with both copies (one
                # decimal: +-0.05 ms).
                ms, half_unit = (float(m.group(8)), 0.0005) if m.group(8) else (float(m.group(4)), 0.05)
                if ms > 0:
                    rows[b] = (b / (ms * 1e-3), ms, half_unit / ms)
        else:
            m = TRAIN_ROW.match(line)
            if m and int(m.group(2)) == size and int(m.group(3)) == size:
                b, ms, rate = int(m.group(1)), float(m.group(4)), float(m.group(6))
                if rate > 0:
                    rows[b] = (rate, ms, 0.005 / rate)
    return rows


def terraseg_run(binary, a, phase, mode, size, batch):
    """(cell for this batch, {other batch: cell} from the same output)."""
    if not binary:
        return new_cell("unavailable", detail="no terraseg binary given"), {}
    if not os.access(binary, os.X_OK):
        return new_cell("unavailable", detail=f"{binary} is not an executable"), {}
    cmd = terraseg_command(binary, a, phase, mode, size, batch)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.ts_timeout)
    except subprocess.TimeoutExpired:
        return new_cell("timeout", detail=f"timeout after {a.ts_timeout:.0f} s"), {}
    except OSError as e:
        return new_cell("unavailable", detail=str(e)), {}
    if r.returncode in (-signal.SIGTERM, -signal.SIGINT):
        # timeout(1) or ^C signals the whole process group: terraseg may die
        # before this process's own handler runs. Not a result: stop here.
        raise Interrupted(signal.Signals(-r.returncode).name)
    if r.returncode != 0:
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()] or [f"exit status {r.returncode}"]
        why = lines[-1].strip()
        if r.returncode == 2:  # refused as such: not built, not implemented, a bad option
            return new_cell("unavailable", detail=why), {}
        if re.search(r"out of memory|CUDNN_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation", r.stderr, re.I):
            return new_cell("oom", detail=why), {}
        return new_cell("error", detail=why), {}
    rows = parse_terraseg(phase, size, r.stdout)
    if batch not in rows:
        return new_cell("error", detail=f"no batch-{batch} row in the output of: {shlex.join(cmd)}"), {}
    cells = {b: new_cell("ok", rate, ms, None, err) for b, (rate, ms, err) in rows.items()}
    return cells.pop(batch), cells


# ---- PyTorch -----------------------------------------------------------------------------

class Torch:
    """The PyTorch side: imports, settings and one measurement per call."""

    def __init__(self, a):
        import torch
        import torch.nn.functional as F
        import segmentation_models_pytorch as smp
        self.torch, self.F, self.smp, self.a = torch, F, smp, a
        self.cpu = a.cpu_smoke_test
        self.dev = torch.device("cpu" if self.cpu else a.device)
        self.oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
        self.new_tf32_api = hasattr(torch.backends.cudnn, "conv") and hasattr(torch.backends.cudnn.conv,
                                                                             "fp32_precision")
        if not self.cpu:
            torch.cuda.set_device(self.dev)

    def sync(self):
        if not self.cpu:
            self.torch.cuda.synchronize(self.dev)

    def set_tf32(self, on):
        """TF32 for cuDNN convs and cuBLAS matmuls, through the one API this
        torch prefers (2.9+: fp32_precision; before: allow_tf32)."""
        t = self.torch
        if self.new_tf32_api:
            t.backends.cuda.matmul.fp32_precision = "tf32" if on else "ieee"
            t.backends.cudnn.conv.fp32_precision = "tf32" if on else "ieee"
        else:
            t.backends.cuda.matmul.allow_tf32 = on
            t.backends.cudnn.allow_tf32 = on

    def autocast(self, mode):
        if mode in ("bf16", "compile"):
            return self.torch.autocast(device_type=self.dev.type, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, logits, target, onehot):
        """0.5 CE + 0.5 per-image soft Dice (terraseg's default loss), float32."""
        F = self.F
        logits = logits.float()
        ce = F.cross_entropy(logits, target)
        p = logits.softmax(dim=1)
        inter = (p * onehot).sum(dim=(2, 3))
        denom = p.sum(dim=(2, 3)) + onehot.sum(dim=(2, 3))
        dice = (2 * inter + 1e-7) / (denom + 1e-7)
        return 0.5 * ce + 0.5 * (1 - dice.mean())

    def measure(self, phase, mode, size, batch):
        """(median seconds per step, seconds of the first call). Raises the
        torch OOM error when the batch does not fit."""
        t, a = self.torch, self.a
        if mode == "compile":
            t._dynamo.reset()
        self.set_tf32(mode != "fp32")
        t.manual_seed(0)
        model = self.smp.Unet("resnet34", encoder_weights=None, in_channels=a.in_channels,
                              classes=a.classes).to(self.dev)
        x = t.randn(batch, a.in_channels, size, size, device=self.dev)
        if mode in ("bf16", "compile"):
            model = model.to(memory_format=t.channels_last)
            x = x.contiguous(memory_format=t.channels_last)
        fn = t.compile(model, mode=a.compile_mode, dynamic=False) if mode == "compile" else model
        state = {}
        try:
            if phase == "infer":
                model.eval()

                def step():
                    with t.inference_mode(), self.autocast(mode):
                        fn(x)
            else:
                model.train()
                opt = t.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-4, fused=True)
                target = t.randint(0, a.classes, (batch, size, size), device=self.dev)
                onehot = self.F.one_hot(target, a.classes).permute(0, 3, 1, 2).float()
                state.update(opt=opt, target=target, onehot=onehot)

                def step():
                    opt.zero_grad(set_to_none=True)
                    with self.autocast(mode):
                        logits = fn(x)
                    self.loss(logits, target, onehot).backward()
                    opt.step()

            self.sync()
            t0 = time.perf_counter()
            step()
            self.sync()
            first = time.perf_counter() - t0
            for _ in range(a.warmup):
                step()
            self.sync()
            times = []
            for _ in range(a.iters):
                self.sync()
                t0 = time.perf_counter()
                step()
                self.sync()
                times.append(time.perf_counter() - t0)
            return statistics.median(times), first
        finally:
            del fn, model, x
            state.clear()
            self.release()

    def release(self):
        gc.collect()
        if not self.cpu:
            self.torch.cuda.empty_cache()


# ---- the run -------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def on_signal(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def plan(a):
    """Every cell to measure, in the order the verdicts need them (see the
    module doc); within a group size by size, batches ascending, so that an
    OOM skips the larger batches of its group."""
    groups = []
    ts_first = [m for m in a.ts_modes] if "infer" in a.phases else []
    groups += [("terraseg", "infer", m) for m in ts_first]
    if "train" in a.phases and "bf16" in a.ts_modes:
        groups.append(("terraseg", "train", "bf16"))
    if "infer" in a.phases:
        groups += [("torch", "infer", m) for m in a.modes if m != "compile"]
    if "train" in a.phases and "bf16" in a.modes:
        groups.append(("torch", "train", "bf16"))
    if "infer" in a.phases and "compile" in a.modes:
        groups.append(("torch", "infer", "compile"))
    if "train" in a.phases:
        groups += [("terraseg", "train", m) for m in a.ts_modes if m != "bf16"]
        groups += [("torch", "train", m) for m in a.modes if m not in ("bf16", "compile")]
        if "compile" in a.modes:
            groups.append(("torch", "train", "compile"))
    return [(side, phase, mode, size, batch) for side, phase, mode in groups for size in a.sizes
            for batch in a.batches]


class Budget:
    """--budget-s: an estimate of each cell's wall time from the cells of its
    group measured so far (scaled by pixels per batch, generously); a first
    compile is taken as 150 s (training) or 90 s (inference), any other first
    cell as 20 s."""

    FIRST = 20.0
    FIRST_COMPILE = {"infer": 90.0, "train": 150.0}

    def __init__(self, seconds):
        self.seconds, self.t0, self.seen = seconds, time.monotonic(), {}

    def elapsed(self):
        return time.monotonic() - self.t0

    def estimate(self, key):
        side, phase, mode, size, batch = key
        last = self.seen.get((side, phase, mode))
        if mode == "compile" and side == "torch":
            return last[0] * 1.25 if last else self.FIRST_COMPILE[phase]
        if not last:
            return self.FIRST
        dur, lsize, lbatch = last
        overhead = min(dur, 3.0)
        return overhead + (dur - overhead) * max(1.0, (batch * size * size) / (lbatch * lsize * lsize)) * 1.25

    def allows(self, key):
        if not self.seconds:
            return True, ""
        need, left = self.estimate(key), self.seconds - self.elapsed()
        if need <= left:
            return True, ""
        return False, f"about {need:.0f} s needed, {max(left, 0):.0f} s left"

    def record(self, key, dur):
        side, phase, mode, size, batch = key
        if mode == "compile" and side == "torch":
            prev = self.seen.get((side, phase, mode))
            self.seen[(side, phase, mode)] = (max(dur, prev[0]) if prev else dur, size, batch)
        else:
            self.seen[(side, phase, mode)] = (dur, size, batch)


def run_cells(a, side_torch, cells, out, run_id, progress):
    """Measures every planned cell that cells does not hold already (from
    --resume), in order; writes each to out as it finishes."""
    budget = Budget(a.budget_s)
    todo = [k for k in plan(a) if k not in cells or cells[k]["status"] not in DONE]
    if len(todo) < len(plan(a)):
        progress(f"--resume: {len(plan(a)) - len(todo)} cells already measured, {len(todo)} to run")
    blocked = {}  # (side, phase, mode, size) -> (status, detail) for the larger batches after an OOM
    unavailable = {}  # (side, phase, mode) -> detail: terraseg refused the mode as such; ask once
    interrupted = None

    def put(key, c):
        c["run"] = c["run"] or run_id
        cells[key] = c
        out.row(key, c)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for key in todo:
            side, phase, mode, size, batch = key
            if interrupted:
                put(key, new_cell("skipped", detail=f"interrupted ({interrupted})"))
                continue
            if key in cells and cells[key]["status"] in DONE:  # filled by an earlier output's extra row
                continue
            if (side, phase, mode) in unavailable:
                put(key, new_cell("unavailable", detail=unavailable[(side, phase, mode)]))
                continue
            if (side, phase, mode, size) in blocked:
                put(key, new_cell("oom", detail=blocked[(side, phase, mode, size)]))
                continue
            ok, why = budget.allows(key)
            if not ok:
                put(key, new_cell("skipped", detail=f"not started: time budget (--budget-s {a.budget_s:.0f})"))
                progress(f"{side} {phase} {mode} {size}x{size} batch {batch}: skipped for the time budget ({why})")
                continue
            progress(f"{side} {phase} {mode} {size}x{size} batch {batch}")
            t0 = time.monotonic()
            try:
                if side == "terraseg":
                    c, extra = terraseg_run(a.terraseg, a, phase, mode, size, batch)
                    for b, ec in extra.items():
                        ek = (side, phase, mode, size, b)
                        if b in a.batches and ek not in cells:
                            put(ek, ec)
                else:
                    if side_torch is None:
                        c = new_cell("unavailable", detail="no torch")
                    else:
                        try:
                            med, first = side_torch.measure(phase, mode, size, batch)
                            c = new_cell("ok", batch / med, med * 1e3, first)
                        except side_torch.oom:
                            side_torch.release()
                            c = new_cell("oom", detail="torch.OutOfMemoryError")
                        except Interrupted:
                            raise
                        except Exception as e:  # a failed compile, say: report it in the table, go on
                            side_torch.release()
                            msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                            c = new_cell("error", detail=msg)
            except Interrupted as e:
                interrupted = str(e)
                put(key, new_cell("skipped", detail=f"interrupted ({interrupted})"))
                progress(f"  interrupted ({interrupted}): the remaining cells are skipped")
                continue
            budget.record(key, time.monotonic() - t0)
            put(key, c)
            if c["status"] == "ok":
                msg = f"  {c['rate']:.1f} tiles/s (median {c['ms']:.2f} ms/step"
                msg += f", first call {c['first']:.1f} s)" if c["first"] is not None else ")"
                progress(msg)
            else:
                progress(f"  {c['status']}: {c['detail']}")
            if c["status"] == "oom":
                blocked[(side, phase, mode, size)] = f"batch {batch} already ran out of memory"
            if c["status"] == "unavailable" and side == "terraseg":
                unavailable[(side, phase, mode)] = c["detail"]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return interrupted


# ---- the report --------------------------------------------------------------------------------

def fmt_rate(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def md_cell(s):
    return s.replace("|", "\\|")


def header(a, tv, torch_side):
    t = torch_side.torch
    out = []
    cmd = os.environ.get("BENCH_COMMAND") or shlex.join([sys.executable] + sys.argv)
    out.append(f"gpu compare: terraseg vs PyTorch, smp.Unet(\"resnet34\", encoder_weights=None, "
               f"in_channels={a.in_channels}, classes={a.classes}), synthetic tiles")
    out.append(f"  command:  {cmd}")
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        out.append(f"  CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']}")
    out.append(f"  date:     {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, "
               f"host {platform.node()}")
    if torch_side.cpu:
        out.append("  CPU SMOKE TEST (--cpu-smoke-test): the PyTorch side ran on the CPU; these numbers are not a "
                   "benchmark")
    else:
        p = t.cuda.get_device_properties(torch_side.dev)
        driver, mode = "unknown (no nvidia-smi)", None
        if shutil.which("nvidia-smi"):
            idx = a.device.split(":")[1] if ":" in a.device else "0"
            r = subprocess.run(["nvidia-smi", "-i", idx, "--query-gpu=driver_version,compute_mode",
                                "--format=csv,noheader"], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                f = [x.strip() for x in r.stdout.strip().splitlines()[0].split(",")]
                driver, mode = f[0], f[1] if len(f) > 1 else None
        out.append(f"  device:   {a.device} = {p.name}, compute capability {p.major}.{p.minor}, "
                   f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs; NVIDIA driver {driver}"
                   + (f"; compute mode {mode}" if mode else ""))
        if mode and "exclusive" in mode.lower():
            # This process holds a context from here on; terraseg runs as other processes.
            out.append("  WARNING:  the GPU is in an exclusive compute mode: terraseg's runs (other processes) "
                       "may be refused the device while this one holds it")
            print("gpu_compare: warning: exclusive compute mode (" + mode + "): terraseg's runs may be refused "
                  "the device", file=sys.stderr)
    cudnn = t.backends.cudnn.version() if t.backends.cudnn.is_available() else None
    cudnn_s = f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}" if cudnn else "none"
    import importlib.metadata as md
    try:
        smp_v = md.version("segmentation-models-pytorch")
    except md.PackageNotFoundError:
        smp_v = getattr(torch_side.smp, "__version__", "?")
    out.append(f"  PyTorch:  {t.__version__} (CUDA {t.version.cuda}, cuDNN {cudnn_s}), segmentation-models-pytorch "
               f"{smp_v}, Python {platform.python_version()}")
    out.append(f"            cudnn.benchmark = {t.backends.cudnn.benchmark}; TF32 per mode below, set through "
               f"{'fp32_precision' if torch_side.new_tf32_api else 'allow_tf32'}")
    for i, line in enumerate(tv.splitlines()):
        out.append(("  terraseg: " if i == 0 else "            ") + line.strip())
    modes = {
        "fp32": "eager float32, NCHW, TF32 off",
        "tf32": "eager float32, NCHW, TF32 on",
        "bf16": "eager, channels_last, autocast bfloat16, TF32 on",
        "compile": f"torch.compile(channels_last model, mode={a.compile_mode!r}, dynamic=False) under autocast "
                   "bfloat16, TF32 on",
    }
    ts_modes = {
        "fp32": "float32 NCHW, TF32 off",
        "tf32": "float32 NCHW, --tf32",
        "bf16": "--precision bf16 (bfloat16 channels-last activations, float32 master weights, tensor-op convs)",
        "fp16": "--precision fp16 (float16 likewise; training with dynamic loss scaling)",
    }
    out.append("  PyTorch modes:  " + "; ".join(f"{MODE_TITLES[m]} = {modes[m]}" for m in a.modes))
    out.append("  terraseg modes: " + ("; ".join(f"{TS_TITLES[m]} = {ts_modes[m]}" for m in a.ts_modes)
                                       or "none run"))
    out.append("  infer:    PyTorch: model.eval(), torch.inference_mode(), forward to logits, input already on the "
               "GPU; terraseg: `terraseg bench model`'s resident column (BN folded, batch already on the GPU, logits "
               "left there; its eval fwd column, which adds predict's copies, only for builds without it)")
    out.append("  train:    model.train(), zero_grad, forward, 0.5 CE + 0.5 per-image Dice (float32), backward, "
               "AdamW(lr 3e-4, wd 1e-4; PyTorch fused) step; terraseg: `terraseg bench train` (labels upload "
               "included)")
    ts_extra = f" {a.ts_args}" if a.ts_args else ""
    out.append(f"  terraseg: `terraseg bench model|train --device {a.device} --iters {a.iters}{ts_extra}` plus each "
               "mode's options, one run per cell")
    out.append(f"  timing:   PyTorch: {a.warmup} warm-up steps, then the median of {a.iters} steps, each between two "
               f"synchronizations; terraseg: its own median of {a.iters} after one warm-up, each ending with a "
               "device sync; tiles/s = batch / median step")
    if a.budget_s:
        out.append(f"  budget:   --budget-s {a.budget_s:.0f}: cells that would not have finished in time say skipped")
    return out


class Notes:
    """Footnotes for the cells that hold no number."""

    def __init__(self):
        self.items = []

    def ref(self, text):
        if text not in self.items:
            self.items.append(text)
        return self.items.index(text) + 1


def cell_text(c, notes, what):
    if c is None:
        return "-"
    if c["status"] == "ok":
        return fmt_rate(c["rate"])
    label = {"oom": "OOM", "error": "error", "unavailable": "n/a", "timeout": "timeout", "skipped": "skipped"}.get(
        c["status"], c["status"])
    if c["status"] == "oom" and what.startswith("torch"):
        return "OOM"
    detail = c["detail"] or c["status"]
    # One footnote per distinct reason: a refusal, a skip or the same error
    # (bench model / bench train alike) hits many cells.
    text = detail if c["status"] in ("unavailable", "skipped") else f"{what}: {re.sub(r'^bench (model|train): ', '', detail)}"
    return f"{label} [{notes.ref(text)}]"


def best_of(cells, side, phase, modes, size, batch):
    vals = {m: cells[(side, phase, m, size, batch)]["rate"] for m in modes
            if (side, phase, m, size, batch) in cells and cells[(side, phase, m, size, batch)]["status"] == "ok"}
    if not vals:
        return None, None
    m = max(vals, key=vals.get)
    return m, vals[m]


def table(a, phase, cells, notes):
    cols = (["size", "batch"] + [MODE_TITLES[m] for m in a.modes] + ["PyTorch best"]
            + [TS_TITLES[m] for m in a.ts_modes] + ["ts best", "ts best / PyTorch best"])
    if phase == "train":
        cols.append("ts bf16 / bf16 cl")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for size in a.sizes:
        for batch in a.batches:
            cells_row = [str(size), str(batch)]
            for m in a.modes:
                cells_row.append(cell_text(cells.get(("torch", phase, m, size, batch)), notes, f"torch {MODE_TITLES[m]}"))
            pm, pv = best_of(cells, "torch", phase, a.modes, size, batch)
            partial = [m for m in MODES if cells.get(("torch", phase, m, size, batch)) is None
                       or cells[("torch", phase, m, size, batch)]["status"] == "skipped"]
            best = MODE_TITLES[pm] if pm else "-"
            if pm and partial:
                best += f" [{notes.ref('PyTorch best: of the modes measured in that row (' + ', '.join(MODE_TITLES[m] for m in partial) + ' not measured)')}]"
            cells_row.append(best)
            for m in a.ts_modes:
                cells_row.append(cell_text(cells.get(("terraseg", phase, m, size, batch)), notes, "terraseg"))
            tm, tv = best_of(cells, "terraseg", phase, a.ts_modes, size, batch)
            cells_row.append(TS_TITLES[tm] if tm else "-")
            cells_row.append(f"{tv / pv:.2f}" if tv and pv else "-")
            if phase == "train":
                t = cells.get(("terraseg", phase, "bf16", size, batch))
                p = cells.get(("torch", phase, "bf16", size, batch))
                ok = t and p and t["status"] == "ok" and p["status"] == "ok"
                cells_row.append(f"{t['rate'] / p['rate']:.2f}" if ok else "-")
            lines.append("| " + " | ".join(md_cell(c) for c in cells_row) + " |")
    return lines


def row_verdict(cells, phase, ts_modes, pt_modes, size, batch, ts_required=None):
    """One row of a done-when: ('pass'|'fail'|'open'|'none', ratio or None,
    words). The best of ts_modes / pt_modes counts. 'open': cells not
    measured (not run or skipped) that could change the answer: any PyTorch
    mode, a terraseg mode of ts_required (default ts_modes); 'none': PyTorch
    itself ran in no mode (out of memory or failed in each), so there is
    nothing to compare with."""
    def state(side, modes, required, unknown):
        got = {m: cells.get((side, phase, m, size, batch)) for m in modes}
        vals = {m: c["rate"] for m, c in got.items() if c and c["status"] == "ok"}
        missing = [m for m, c in got.items() if (c is None or c["status"] in unknown) and m in required]
        failed = {m: c for m, c in got.items() if c and c["status"] not in ("ok", "skipped")}
        return vals, missing, failed

    # PyTorch: a mode that failed other than by running out of memory (a
    # torch.compile without its compiler, say) is a mode not measured: it
    # might have been the best. terraseg: a failure is terraseg's.
    pv, pmiss, pfail = state("torch", pt_modes, pt_modes, ("skipped", "error", "timeout", "unavailable"))
    tv, tmiss, tfail = state("terraseg", ts_modes, ts_required or ts_modes, ("skipped",))
    where = f"{size}/b{batch}"

    def why_missing(side, m):
        c = cells.get((side, phase, m, size, batch))
        return "not run" if c is None else c["status"]
    pmiss_s = ", ".join(f"{MODE_TITLES[m]} {why_missing('torch', m)}" for m in pmiss)
    tmiss_s = ", ".join(f"{TS_TITLES[m]} {why_missing('terraseg', m)}" for m in tmiss)
    pfail_s = "; ".join(f"{MODE_TITLES[m]} {c['status']}" for m, c in pfail.items() if m not in pmiss)
    tfail_s = "; ".join(f"{TS_TITLES[m]} {c['status']}" for m, c in tfail.items()
                        if m in (ts_required or ts_modes))
    if not pv:
        if pmiss:
            return "open", None, f"{where}: PyTorch not measured ({pmiss_s})"
        return "none", None, f"{where}: PyTorch ran in no mode ({pfail_s})"
    pm = max(pv, key=pv.get)
    if not tv:
        if tmiss:
            return "open", None, f"{where}: terraseg not measured ({tmiss_s})"
        return "fail", None, f"{where}: terraseg failed ({tfail_s}) where PyTorch {MODE_TITLES[pm]} ran"
    tm = max(tv, key=tv.get)
    ratio = tv[tm] / pv[pm]
    err = cells[("terraseg", phase, tm, size, batch)]["relerr"] or 0.0
    words = f"{where}: {ratio:.3f} ({TS_TITLES[tm]} {fmt_rate(tv[tm])} vs {MODE_TITLES[pm]} {fmt_rate(pv[pm])} tiles/s)"
    if abs(ratio - 1) <= err:
        words += f" [within terraseg's print rounding, +-{100 * err:.1f} %]"
    if pfail_s:
        words += f" [PyTorch {pfail_s}]"
    if tfail_s:
        words += f" [terraseg {tfail_s}]"
    if ratio >= 1:
        if pmiss:
            return "open", ratio, words + f" [not measured: PyTorch {pmiss_s}]"
        return "pass", ratio, words
    if tmiss:
        return "open", ratio, words + f" [not measured: {tmiss_s}]"
    return "fail", ratio, words


def verdict(name, rule, rows):
    """The lines of one done-when from row_verdict() results."""
    ratios = [r for s, r, _ in rows if r is not None and s in ("pass", "fail")]  # the rows decided
    fails = [w for s, _, w in rows if s == "fail"]
    opens = [w for s, _, w in rows if s == "open"]
    nones = [w for s, _, w in rows if s == "none"]
    passes = [w for s, _, w in rows if s == "pass"]
    if fails:
        word = "FAIL"
    elif opens:
        word = "INCOMPLETE"
    elif passes:
        word = "PASS"
    else:
        word = "NOT MEASURED"
    out = [f"{name} ({rule}): {word}"]
    counts = (f"{len(passes)} rows pass, {len(fails)} fail, {len(opens)} not fully measured, {len(nones)} without a "
              "PyTorch number")
    if ratios:
        gm = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        out.append(f"  ratio: min {min(ratios):.3f}, geometric mean {gm:.3f}, max {max(ratios):.3f} over the "
                   f"{len(ratios)} rows decided; {counts}")
    else:
        out.append(f"  ratio: no row decided; {counts}")
    prov = [r for s, r, _ in rows if r is not None and s == "open"]
    if prov:
        out.append(f"  provisional ratio of the rows not fully measured: min {min(prov):.3f}, max {max(prov):.3f} "
                   f"over {len(prov)} rows")
    for title, ws in (("below 1 or terraseg failed", fails), ("not fully measured", opens),
                      ("no PyTorch number (not counted)", nones), ("pass", passes)):
        if ws:
            out.append(f"  {title}:")
            out += [f"    {w}" for w in ws]
    return out


def verdicts(a, cells):
    out = []
    if "infer" in a.phases:
        rows = [row_verdict(cells, "infer", TS_MODES, MODES, s, b, ts_required=TS_DEFAULT) for s in a.sizes
                for b in a.batches]
        out += verdict("DONE-WHEN 1, inference",
                       "tiles/s of terraseg's best mode / PyTorch's best of fp32, tf32, bf16 cl, compile >= 1 in "
                       "every row", rows)
    if "train" in a.phases:
        rows = [row_verdict(cells, "train", ("bf16",), ("bf16",), s, b) for s in a.sizes for b in a.batches]
        if out:
            out.append("")
        out += verdict("DONE-WHEN 2, training", "tiles/s of terraseg bf16 training steps / PyTorch bf16 autocast "
                       "(bf16 cl) steps >= 1 in every row", rows)
    return out


def report(a, head, cells, interrupted=None, compile_s=()):
    notes = Notes()
    out = list(head)
    if interrupted:
        out.append(f"  NOTE:     interrupted ({interrupted}): the cells after it say skipped")
    for phase in a.phases:
        out.append("")
        out.append(f"{'Inference' if phase == 'infer' else 'Training steps'}, tiles/s (higher is better):")
        out.append("")
        out += table(a, phase, cells, notes)
    if notes.items:
        out.append("")
        out += [f"[{i + 1}] {t}" for i, t in enumerate(notes.items)]
    comp = [f"{p} {s}/b{b} {c['first']:.0f}" for (side, p, m, s, b), c in sorted(cells.items())
            if side == "torch" and m == "compile" and c["status"] == "ok" and c["first"] is not None
            and p in a.phases and s in a.sizes and b in a.batches]
    if comp:
        out.append("")
        out.append("torch.compile: first call (compilation included), seconds: " + ", ".join(comp))
    out.append("")
    out += verdicts(a, cells)
    return out


def from_csv(a):
    meta, cells = [], {}
    for path in a.from_csv:
        try:
            m, c = read_csv(path)
        except (OSError, ValueError, KeyError, csv.Error) as e:
            print(f"gpu_compare: --from-csv {path}: {e}", file=sys.stderr)
            return 1
        meta += [(run, lines, path) for run, lines in m]
        merge_cells(cells, c)
    if not cells:
        print("gpu_compare: --from-csv: no cells in " + ", ".join(a.from_csv), file=sys.stderr)
        return 1
    keys = cells.keys()
    a.sizes = a.sizes or sorted({k[3] for k in keys})
    a.batches = a.batches or sorted({k[4] for k in keys})
    a.phases = a.phases or [p for p in PHASES if any(k[1] == p for k in keys)]
    a.modes = a.modes if a.modes is not None else [m for m in MODES if any(k[0] == "torch" and k[2] == m for k in keys)]
    a.ts_modes = (a.ts_modes if a.ts_modes is not None else
                  [m for m in TS_MODES if any(k[0] == "terraseg" and k[2] == m for k in keys)])
    head = [f"gpu compare, from saved measurements: {' '.join(shlex.quote(p) for p in a.from_csv)}"]
    runs = {}
    for run, lines, path in meta:
        if run in runs:
            continue
        runs[run] = lines
        head.append("")
        head.append(f"run {run} ({path}):")
        head += lines
    devices = {l.split("=", 1)[1].split(";")[0].strip() for lines in runs.values() for l in lines
               if l.strip().startswith("device:") and "=" in l}
    if len(devices) > 1:
        head.append("")
        head.append("WARNING: these runs used different devices (" + " / ".join(sorted(devices)) + "): a ratio whose "
                    "two cells come from different runs compares different machines")
    used = {c["run"] for k, c in cells.items() if k[1] in a.phases and k[3] in a.sizes and k[4] in a.batches}
    if len(used) > 1:
        head.append("")
        head.append("cells from runs " + ", ".join(sorted(used)) + " (the CSV's run column says which)")
    print("\n".join(report(a, head, cells)))
    return 0


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.from_csv:
        return from_csv(a)
    try:
        import torch
    except ImportError as e:
        sys.exit(f"gpu_compare: cannot import torch ({e}); run tools/bench/gpu_compare.sh, which installs it")
    if not a.cpu_smoke_test and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build (torch.version.cuda is None): install a CUDA wheel, e.g. "
               "BENCH_TORCH_INDEX=https://download.pytorch.org/whl/cu128" if torch.version.cuda is None else
               f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check nvidia-smi, the driver "
               "version and CUDA_VISIBLE_DEVICES")
        print(f"gpu_compare: torch.cuda.is_available() is False: {why}", file=sys.stderr)
        return 1
    if not a.cpu_smoke_test:
        idx = int(a.device.split(":")[1]) if ":" in a.device else 0
        if idx >= torch.cuda.device_count():
            print(f"gpu_compare: --device {a.device}: torch sees {torch.cuda.device_count()} device(s)",
                  file=sys.stderr)
            return 1
    try:
        import segmentation_models_pytorch  # noqa: F401
    except ImportError as e:
        sys.exit(f"gpu_compare: cannot import segmentation_models_pytorch ({e}); run tools/bench/gpu_compare.sh")

    def progress(msg):
        print(f"gpu_compare: {msg}", file=sys.stderr, flush=True)

    cells, meta = {}, []
    if a.resume:
        try:
            meta, old = read_csv(a.resume)
        except (OSError, ValueError, KeyError, csv.Error) as e:
            print(f"gpu_compare: --resume {a.resume}: {e}", file=sys.stderr)
            return 1
        merge_cells(cells, old)
    # Only the CUDA context: PyTorch allocates nothing before its first cell,
    # and gives its cache back (empty_cache) after each, so terraseg's runs
    # (separate processes) have the GPU's memory.
    side = Torch(a)
    tv = terraseg_version(a.terraseg)
    head = header(a, tv, side)
    run_id = datetime.datetime.now().astimezone().strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    try:
        out = CsvOut(a.save_csv)
    except OSError as e:
        print(f"gpu_compare: --save-csv {a.save_csv}: {e}", file=sys.stderr)
        return 1
    for run, lines in meta:
        out.meta(run, lines)
    out.meta(run_id, head)
    for k, c in cells.items():
        if c["status"] in DONE:  # the skipped ones run again and get their own row
            out.row(k, c)
    interrupted = run_cells(a, side, cells, out, run_id, progress)
    out.close()
    if meta:
        head = head + [f"  resumed:  cells of {a.resume} (runs {', '.join(r for r, _ in meta)}) taken as measured; "
                       f"this run is {run_id}"]
    print("\n".join(report(a, head, cells, interrupted)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
