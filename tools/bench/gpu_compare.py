#!/usr/bin/env python3
"""Times smp.Unet("resnet34") on a CUDA GPU in PyTorch (several modes) and in
terraseg, on the same synthetic tiles, and prints one Markdown table of tiles/s
per phase (inference, training) with ratios, ready for docs/benchmarks.md.

    python3 tools/bench/gpu_compare.py [TERRASEG_BIN] [--sizes 256,512]
        [--batches 1,2,4,8,16,32] [--modes fp32,tf32,bf16,compile]
        [--phases infer,train] [--iters N] [--warmup N] [--device cuda[:N]] ...

Run it through tools/bench/gpu_compare.sh, which makes the venv (a CUDA build
of torch and segmentation-models-pytorch; terraseg itself never needs Python)
and builds terraseg with CUDA.

PyTorch modes (all on the same model, same data, same step):
  fp32     eager, float32, NCHW, TF32 off for cuDNN convs and cuBLAS matmuls
  tf32     eager, float32, NCHW, TF32 on
  bf16     eager, channels_last model and input, torch.autocast(bfloat16), TF32 on
  compile  torch.compile (--compile-mode, dynamic=False) of the channels_last
           model, called under the same bf16 autocast, TF32 on; compiled afresh
           (torch._dynamo.reset()) for every size, batch and phase; its first
           call (the compilation) is reported separately and never timed
cudnn.benchmark is on (PyTorch's fastest eager setting) unless
--no-cudnn-benchmark. CUDA graphs are not used.

Phases:
  infer  model.eval(), torch.inference_mode(), forward to logits (no softmax)
  train  model.train(); zero_grad(set_to_none); forward; loss = 0.5 CE + 0.5
         Dice in float32 (per-image soft Dice over softmax, eps 1e-7, the
         default loss of `terraseg bench train`); backward; AdamW step (lr 3e-4,
         weight decay 1e-4, fused=True). The loss and the optimizer are eager
         in every mode (torch.compile compiles the model only).

Timing: the input tensor (and labels) already on the GPU; --warmup steps, then
--iters steps, each between two torch.cuda.synchronize() calls; the median
step time gives tiles/s = batch / median. A batch that runs out of memory is
reported as OOM (and larger batches of that mode and size are skipped).

terraseg: `terraseg bench model --device DEV` (its inference copy's forward,
BN folded, with the batch upload and logits download, as predict runs it) for
inference and `terraseg bench train --device DEV` (labels upload, forward, the
same 0.5 CE + 0.5 Dice loss, backward, AdamW, as the trainer runs it) for
training, with --iters and, if given, --ts-tf32 / --ts-args. If terraseg
fails or refuses, its column says "n/a: <terraseg's reason>" once and the
PyTorch table is still printed.

Ratios: terraseg tiles/s / the best PyTorch mode's tiles/s in that row (> 1:
terraseg is faster); for training also terraseg / bf16 autocast.

Progress goes to stderr; the header and tables go to stdout.
"""
import argparse
import contextlib
import datetime
import gc
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time

MODES = ("fp32", "tf32", "bf16", "compile")
MODE_TITLES = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16 cl", "compile": "compile"}
PHASES = ("infer", "train")


def int_list(s):
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {s!r}")
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers >= 1, got {s!r}")
    return v


def name_list(allowed):
    def parse(s):
        v = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in v if x not in allowed]
        if not v or bad:
            raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)} (comma-separated), got {s!r}")
        return v
    return parse


def device_arg(s):
    if not re.fullmatch(r"cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"write cuda or cuda:N, got {s!r}")
    return s


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="gpu_compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("terraseg", nargs="?", help="the terraseg binary (a CUDA build); without it the terraseg "
                    "column says n/a")
    ap.add_argument("--sizes", type=int_list, default=[256, 512], help="tile sizes in pixels (default 256,512)")
    ap.add_argument("--batches", type=int_list, default=[1, 2, 4, 8, 16, 32],
                    help="batch sizes (default 1,2,4,8,16,32)")
    ap.add_argument("--modes", type=name_list(MODES), default=list(MODES),
                    help="PyTorch modes (default fp32,tf32,bf16,compile)")
    ap.add_argument("--phases", type=name_list(PHASES), default=list(PHASES),
                    help="infer and/or train (default both)")
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
    ap.add_argument("--ts-tf32", action="store_true", help="pass --tf32 to terraseg")
    ap.add_argument("--ts-args", default="", help="more options for `terraseg bench model/train`, one string "
                    "(for example its precision options)")
    ap.add_argument("--ts-timeout", type=float, default=1800, help="seconds per terraseg run (default 1800)")
    # Development only: runs the PyTorch side on the CPU at whatever sizes are
    # given, to check this script without a GPU. Its numbers are no benchmark.
    ap.add_argument("--cpu-smoke-test", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.iters < 1 or a.warmup < 0 or a.in_channels < 1 or a.classes < 1:
        ap.error("--iters >= 1, --warmup >= 0, --in-channels >= 1 and --classes >= 1")
    if any(s % 32 for s in a.sizes):
        ap.error("--sizes must be multiples of 32 (the U-Net's encoder divides by 32)")
    return a


# ---- terraseg --------------------------------------------------------------------------

MODEL_ROW = re.compile(r"^(\d+)\s+(\d+)x(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$")
TRAIN_ROW = re.compile(r"^(\d+)\s+(\d+)x(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$")


def terraseg_version(binary):
    if not binary:
        return "no terraseg binary given"
    try:
        r = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=120)
    except OSError as e:
        return f"{binary}: {e}"
    return (r.stdout + r.stderr).strip()


def terraseg_run(binary, a, phase, size, batch):
    """(tiles/s, None) or (None, why). why starts with 'unavailable: ' when
    terraseg refused the request as such (exit 2: not built, not implemented)."""
    if not binary:
        return None, "unavailable: no terraseg binary given"
    if not os.access(binary, os.X_OK):
        return None, f"unavailable: {binary} is not an executable"
    bench = "model" if phase == "infer" else "train"
    cmd = [binary, "bench", bench, "--device", a.device, "--size", str(size), "--batch", str(batch),
           "--iters", str(a.iters), "--in-channels", str(a.in_channels), "--classes", str(a.classes)]
    if a.ts_tf32:
        cmd.append("--tf32")
    cmd += shlex.split(a.ts_args)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.ts_timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {a.ts_timeout:.0f} s"
    except OSError as e:
        return None, f"unavailable: {e}"
    if r.returncode != 0:
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()] or [f"exit status {r.returncode}"]
        why = lines[-1].strip()
        return None, ("unavailable: " if r.returncode == 2 else "") + why
    for line in r.stdout.splitlines():
        line = line.strip()
        if phase == "infer":
            m = MODEL_ROW.match(line)
            if m and int(m.group(1)) == batch:
                return batch / (float(m.group(4)) * 1e-3), None
        else:
            m = TRAIN_ROW.match(line)
            if m and int(m.group(1)) == batch:
                return float(m.group(6)), None
    return None, f"no batch-{batch} row in the output of: {shlex.join(cmd)}"


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

    def tf32_state(self):
        t = self.torch
        if self.new_tf32_api:
            return (f"torch.backends.cuda.matmul.fp32_precision = {t.backends.cuda.matmul.fp32_precision!r}, "
                    f"torch.backends.cudnn.conv.fp32_precision = {t.backends.cudnn.conv.fp32_precision!r}")
        return (f"torch.backends.cuda.matmul.allow_tf32 = {t.backends.cuda.matmul.allow_tf32}, "
                f"torch.backends.cudnn.allow_tf32 = {t.backends.cudnn.allow_tf32}")

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


# ---- the report --------------------------------------------------------------------------------

def fmt_rate(v):
    if isinstance(v, str):
        return v
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
               f"in_channels={a.in_channels}, classes={a.classes}), synthetic tiles already on the device")
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
        driver = "unknown (no nvidia-smi)"
        if shutil.which("nvidia-smi"):
            r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                driver = r.stdout.strip().splitlines()[0].strip()
        out.append(f"  device:   {a.device} = {p.name}, compute capability {p.major}.{p.minor}, "
                   f"{p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs; NVIDIA driver {driver}")
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
    out.append("  modes:    " + "; ".join(f"{MODE_TITLES[m]} = {modes[m]}" for m in a.modes))
    out.append("  infer:    model.eval(), torch.inference_mode(), forward to logits")
    out.append("  train:    model.train(), zero_grad, forward, 0.5 CE + 0.5 per-image Dice (float32), backward, "
               "AdamW(lr 3e-4, wd 1e-4, fused) step")
    ts_extra = (" --tf32" if a.ts_tf32 else "") + (f" {a.ts_args}" if a.ts_args else "")
    out.append(f"  terraseg: infer = `terraseg bench model --device {a.device}{ts_extra}` (forward with BN folded, upload + download included), "
               f"train = `terraseg bench train --device {a.device}{ts_extra}` (forward, 0.5 CE + 0.5 Dice, "
               f"backward, AdamW)")
    out.append(f"  timing:   {a.warmup} warm-up steps, then the median of {a.iters} steps, each between two "
               f"synchronizations; tiles/s = batch / median step (terraseg: its own median of {a.iters} after one "
               f"warm-up)")
    out.append("  ratios:   terraseg tiles/s / best PyTorch mode's tiles/s (> 1: terraseg faster); training also "
               "terraseg / bf16 autocast")
    return out


def table(a, phase, res, ts):
    modes = a.modes
    cols = ["size", "batch"] + [MODE_TITLES[m] for m in modes] + ["best", "terraseg", "ts/best"]
    if phase == "train":
        cols.append("ts/bf16")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    reason_shown = False
    for size in a.sizes:
        for batch in a.batches:
            r = res.get((phase, size, batch), {})
            nums = {m: v for m, v in r.items() if isinstance(v, float)}
            best = max(nums, key=nums.get) if nums else None
            tv, why = ts.get((phase, size, batch), (None, "not run"))
            if tv is not None:
                ts_cell = fmt_rate(tv)
            elif why.startswith("unavailable: "):
                ts_cell = "n/a" if reason_shown else f"n/a: {why[len('unavailable: '):]}"
                reason_shown = True
            else:
                ts_cell = f"error: {why}"
            cells = [str(size), str(batch)] + [fmt_rate(r.get(m)) for m in modes]
            cells.append(MODE_TITLES[best] if best else "-")
            cells.append(ts_cell)
            cells.append(f"{tv / nums[best]:.2f}" if tv is not None and best else "-")
            if phase == "train":
                cells.append(f"{tv / nums['bf16']:.2f}" if tv is not None and "bf16" in nums else "-")
            lines.append("| " + " | ".join(md_cell(c) for c in cells) + " |")
    return lines


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
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

    # terraseg first, before PyTorch holds GPU memory in its caching allocator.
    tv = terraseg_version(a.terraseg)
    ts = {}
    for phase in a.phases:
        unavailable = None
        for size in a.sizes:
            for batch in a.batches:
                if unavailable:
                    ts[(phase, size, batch)] = (None, unavailable)
                    continue
                progress(f"terraseg {phase} {size}x{size} batch {batch}")
                v, why = terraseg_run(a.terraseg, a, phase, size, batch)
                ts[(phase, size, batch)] = (v, why)
                if why:
                    progress(f"  terraseg: {why}")
                    if why.startswith("unavailable: "):
                        unavailable = why  # the same answer for every row: ask once

    side = Torch(a)
    res = {}
    compile_s = []
    for phase in a.phases:
        for mode in a.modes:
            for size in a.sizes:
                oom = False
                for batch in a.batches:
                    key = (phase, size, batch)
                    if oom:
                        res.setdefault(key, {})[mode] = "OOM"
                        continue
                    progress(f"torch {phase} {mode} {size}x{size} batch {batch}")
                    try:
                        med, first = side.measure(phase, mode, size, batch)
                        res.setdefault(key, {})[mode] = batch / med
                        progress(f"  {batch / med:.1f} tiles/s (median {med * 1e3:.2f} ms/step, first call "
                                 f"{first:.1f} s)")
                        if mode == "compile":
                            compile_s.append(f"{phase} {size}/b{batch} {first:.0f}")
                    except side.oom:
                        side.release()
                        oom = True
                        res.setdefault(key, {})[mode] = "OOM"
                        progress("  out of memory")
                    except Exception as e:  # a failed compile, say: report it in the table, go on
                        side.release()
                        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]
                        res.setdefault(key, {})[mode] = f"error ({msg})"
                        progress(f"  failed: {msg}")

    print("\n".join(header(a, tv, side)))
    for phase in a.phases:
        print()
        print(f"{'Inference' if phase == 'infer' else 'Training steps'}, tiles/s (higher is better):")
        print()
        print("\n".join(table(a, phase, res, ts)))
    if compile_s:
        print()
        print("torch.compile: first call (compilation included), seconds: " + ", ".join(compile_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
