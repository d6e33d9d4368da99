"""Times the conv shapes of a `terraseg bench conv --csv` file in PyTorch and
ONNX Runtime and prints them next to terraseg's times, as ratios.

Called by tools/bench/conv_compare.sh, which makes the venv and, for each
round, runs terraseg and then `conv_compare.py measure` on its CSV; a final
`conv_compare.py report` prints the table. Everything is float32 on the CPU,
NCHW, with the thread count given.

  PyTorch       forward:         torch.nn.functional.conv2d (no autograd)
                backward data:   aten.convolution_backward, output_mask
                                 [True, False, False]
                backward filter: aten.convolution_backward, output_mask
                                 [False, True, has_bias] (terraseg times the
                                 head's bias gradient with its filter gradient)
  ONNX Runtime  forward only: a one-node Conv model per shape (weights and
                bias as initializers, built with onnx.helper), default graph
                optimizations, intra_op_num_threads = threads.

Each measurement is one warm-up call and then the median of --iters calls,
timed one by one, as terraseg does; the report takes, per shape and
framework, the median over the rounds. Rounds alternate the frameworks at a
coarse grain, so a slow spell of a shared machine does not land on one
framework only. Ratios are other/terraseg times: > 1 means terraseg is faster.
"""

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper


def read_shapes(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        sys.exit(f"conv_compare: {path} has no rows")
    ints = ("cin", "cout", "kernel", "stride", "pad", "in_h", "in_w", "out_h", "out_w", "batch", "count",
            "needs_dx", "bias", "threads")
    floats = ("gflop_fwd", "ms_fwd", "ms_bwd_data", "ms_bwd_filter", "gemm_gflops", "sgemm_peak_gflops")
    for r in rows:
        for k in ints:
            r[k] = int(r[k])
        for k in floats:
            r[k] = float(r[k])
    return rows


def median_ms(fn, iters):
    """One warm-up call, then the median of iters individually timed calls."""
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_torch(s, iters):
    """Median ms of forward, backward data and backward filter for shape s."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.rand(*shape, generator=g) * 2 - 1

    x = rand(s["batch"], s["cin"], s["in_h"], s["in_w"])
    w = rand(s["cout"], s["cin"], s["kernel"], s["kernel"])
    b = rand(s["cout"]) if s["bias"] else None
    dy = rand(s["batch"], s["cout"], s["out_h"], s["out_w"])
    stride, pad = [s["stride"]] * 2, [s["pad"]] * 2
    # The same geometry must come out as in terraseg, or the shapes differ.
    y = F.conv2d(x, w, b, stride, pad)
    if tuple(y.shape) != tuple(dy.shape):
        sys.exit(f"conv_compare: {s['name']}: torch gives {tuple(y.shape)}, terraseg {tuple(dy.shape)}")

    bwd = torch.ops.aten.convolution_backward
    bias_sizes = [s["cout"]] if s["bias"] else None

    def fwd():
        F.conv2d(x, w, b, stride, pad)

    def bwd_data():
        bwd(dy, x, w, bias_sizes, stride, pad, [1, 1], False, [0, 0], 1, [True, False, False])

    def bwd_filter():
        bwd(dy, x, w, bias_sizes, stride, pad, [1, 1], False, [0, 0], 1, [False, True, bool(s["bias"])])

    with torch.no_grad():
        return median_ms(fwd, iters), median_ms(bwd_data, iters), median_ms(bwd_filter, iters)


def ort_model(s):
    """A one-node ONNX model: Y = Conv(X, W[, B]) with W and B as initializers."""
    rng = np.random.default_rng(0)
    k, p = s["kernel"], s["pad"]
    w = (rng.random((s["cout"], s["cin"], k, k), dtype=np.float32) * 2 - 1)
    inits = [numpy_helper.from_array(w, "W")]
    inputs = ["X", "W"]
    if s["bias"]:
        inits.append(numpy_helper.from_array(rng.random(s["cout"], dtype=np.float32), "B"))
        inputs.append("B")
    node = helper.make_node("Conv", inputs, ["Y"], kernel_shape=[k, k], strides=[s["stride"]] * 2,
                            pads=[p, p, p, p], dilations=[1, 1], group=1)
    graph = helper.make_graph(
        [node], "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [s["batch"], s["cin"], s["in_h"], s["in_w"]])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [s["batch"], s["cout"], s["out_h"], s["out_w"]])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # opset 17; older than what recent onnx writes, so any recent ORT loads it
    onnx.checker.check_model(model)
    return model.SerializeToString()


def time_ort(s, threads, iters):
    """Median ms of one ONNX Runtime forward call for shape s."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(ort_model(s), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((s["batch"], s["cin"], s["in_h"], s["in_w"]), dtype=np.float32) * 2 - 1
    y = sess.run(None, {"X": x})[0]
    if y.shape != (s["batch"], s["cout"], s["out_h"], s["out_w"]):
        sys.exit(f"conv_compare: {s['name']}: onnxruntime gives {y.shape}")
    return median_ms(lambda: sess.run(None, {"X": x}), iters)


def measure(args):
    """Times every shape of one terraseg CSV in PyTorch and ONNX Runtime."""
    shapes = read_shapes(args.csv)
    setup_threads(args.threads)
    with open(args.out + ".tmp", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["name", "torch_ms_fwd", "torch_ms_bwd_data", "torch_ms_bwd_filter", "ort_ms_fwd"])
        for s in shapes:
            tf, td, tw = time_torch(s, args.iters)
            of = time_ort(s, args.threads, args.iters)
            wr.writerow([s["name"], f"{tf:.6f}", f"{td:.6f}", f"{tw:.6f}", f"{of:.6f}"])
    os.replace(args.out + ".tmp", args.out)


def setup_threads(threads):
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (only allowed once, before any parallel work)


def fmt_ms(v):
    return "-" if v is None else f"{v:.2f}"


def fmt_ratio(other, ts):
    return "-" if other is None or ts <= 0 else f"{other / ts:.2f}"


def print_table(header, rows, align):
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells):
        out = []
        for c, wd, a in zip(cells, widths, align):
            out.append(str(c).ljust(wd) if a == "l" else str(c).rjust(wd))
        return "| " + " | ".join(out) + " |"

    print(line(header))
    print("|" + "|".join(("-" * (wd + 1) + ":") if a == "r" else (":" + "-" * (wd + 1))
                         for wd, a in zip(widths, align)) + "|")
    for r in rows:
        print(line(r))


def totals(shapes, t):
    """Count-weighted ms of one round: forward (ts, torch, ort) and forward + backward (ts, torch)."""
    tot = dict.fromkeys(("ts_f", "torch_f", "ort_f", "ts_fb", "torch_fb"), 0.0)
    for s in shapes:
        c, dx, m = s["count"], s["needs_dx"], t[s["name"]]
        tot["ts_f"] += c * s["ms_fwd"]
        tot["torch_f"] += c * m["torch_ms_fwd"]
        tot["ort_f"] += c * m["ort_ms_fwd"]
        tot["ts_fb"] += c * (s["ms_fwd"] + dx * s["ms_bwd_data"] + s["ms_bwd_filter"])
        tot["torch_fb"] += c * (m["torch_ms_fwd"] + dx * m["torch_ms_bwd_data"] + m["torch_ms_bwd_filter"])
    return tot


def report(args):
    """One table from the rounds: per shape and framework the median over rounds."""
    if len(args.csv) != len(args.times):
        sys.exit("conv_compare: need one --times file per --csv file")
    rounds = []
    for c, tpath in zip(args.csv, args.times):
        with open(tpath, newline="") as f:
            t = {r["name"]: {k: float(v) for k, v in r.items() if k != "name"} for r in csv.DictReader(f)}
        rounds.append((read_shapes(c), t))
    shapes = rounds[0][0]
    names = [s["name"] for s in shapes]
    for sh, t in rounds:
        if [s["name"] for s in sh] != names or sorted(t) != sorted(names):
            sys.exit("conv_compare: the rounds do not list the same shapes")

    def med(i, key):
        """Median over rounds of shape i's key (terraseg's from its CSV, others from the times)."""
        if key.startswith("ms_"):
            return statistics.median(sh[i][key] for sh, _ in rounds)
        return statistics.median(t[names[i]][key] for _, t in rounds)

    setup_threads(args.threads)
    blas = ""
    if args.terraseg_log:
        with open(args.terraseg_log) as f:
            blas = next((ln.strip() for ln in f if ln.startswith("OpenBLAS")), "")
    s0 = shapes[0]
    print(f"conv compare: batch {s0['batch']}, {s0['in_h']}x{s0['in_w']} tile, {args.threads} threads, "
          f"float32 NCHW on the CPU; per measurement the median of {args.iters} calls after 1 warm-up, "
          f"then the median over {len(rounds)} rounds (terraseg, then PyTorch and ONNX Runtime, per round)")
    print(f"  terraseg:     {blas or '(no log)'}")
    print(f"  PyTorch:      {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"oneDNN (mkldnn) {'on' if torch.backends.mkldnn.is_available() else 'off'}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"  ONNX Runtime: {ort.__version__} (onnx {onnx.__version__}), CPUExecutionProvider, "
          f"intra_op_num_threads = {args.threads}")
    print(f"  Python {platform.python_version()}, numpy {np.__version__}")
    print()

    header = ["layer", "count", "fwd ts", "torch", "ort", "torch/ts", "ort/ts",
              "bwd-data ts", "torch", "torch/ts", "bwd-filter ts", "torch", "torch/ts"]
    rows, merged = [], []
    for i, s in enumerate(shapes):
        m = {k: med(i, k) for k in ("ms_fwd", "ms_bwd_data", "ms_bwd_filter", "torch_ms_fwd", "torch_ms_bwd_data",
                                    "torch_ms_bwd_filter", "ort_ms_fwd")}
        merged.append((s, m))
        rows.append([s["name"] + ("" if s["needs_dx"] else " *"), s["count"],
                     fmt_ms(m["ms_fwd"]), fmt_ms(m["torch_ms_fwd"]), fmt_ms(m["ort_ms_fwd"]),
                     fmt_ratio(m["torch_ms_fwd"], m["ms_fwd"]), fmt_ratio(m["ort_ms_fwd"], m["ms_fwd"]),
                     fmt_ms(m["ms_bwd_data"]), fmt_ms(m["torch_ms_bwd_data"]),
                     fmt_ratio(m["torch_ms_bwd_data"], m["ms_bwd_data"]),
                     fmt_ms(m["ms_bwd_filter"]), fmt_ms(m["torch_ms_bwd_filter"]),
                     fmt_ratio(m["torch_ms_bwd_filter"], m["ms_bwd_filter"])])
    print_table(header, rows, "lr" + "r" * 11)
    print()
    print("Times in ms per call. ts = terraseg. Ratios = other/terraseg: > 1 means terraseg is faster.")
    print("* encoder.conv1: its data gradient is timed but left out of the totals (nothing needs the image's).")
    print()

    # Totals from the per-shape medians, and per round to show the spread.
    med_shapes = [dict(s, ms_fwd=m["ms_fwd"], ms_bwd_data=m["ms_bwd_data"], ms_bwd_filter=m["ms_bwd_filter"])
                  for s, m in merged]
    tot = totals(med_shapes, {s["name"]: m for s, m in merged})
    print_table(["all convs, count-weighted", "terraseg ms", "torch ms", "ort ms", "torch/ts", "ort/ts"],
                [["forward", fmt_ms(tot["ts_f"]), fmt_ms(tot["torch_f"]), fmt_ms(tot["ort_f"]),
                  fmt_ratio(tot["torch_f"], tot["ts_f"]), fmt_ratio(tot["ort_f"], tot["ts_f"])],
                 ["forward + backward (data + filter)", fmt_ms(tot["ts_fb"]), fmt_ms(tot["torch_fb"]), "-",
                  fmt_ratio(tot["torch_fb"], tot["ts_fb"]), "-"]],
                "lrrrrr")
    if len(rounds) > 1:
        per = [totals(sh, t) for sh, t in rounds]
        print()
        print("Spread over rounds (count-weighted totals, ms, round by round):")
        for key, label in (("ts_f", "terraseg forward"), ("torch_f", "torch forward"), ("ort_f", "ort forward"),
                           ("ts_fb", "terraseg fwd+bwd"), ("torch_fb", "torch fwd+bwd")):
            print(f"  {label:17s} " + "  ".join(f"{p[key]:8.1f}" for p in per))

    if args.out_csv:
        with open(args.out_csv + ".tmp", "w", newline="") as f:
            wr = csv.writer(f)
            keys = ["ms_fwd", "torch_ms_fwd", "ort_ms_fwd", "ms_bwd_data", "torch_ms_bwd_data", "ms_bwd_filter",
                    "torch_ms_bwd_filter"]
            wr.writerow(["name", "count", "needs_dx"] + ["ts_" + k if k.startswith("ms_") else k for k in keys])
            for s, m in merged:
                wr.writerow([s["name"], s["count"], s["needs_dx"]] + [f"{m[k]:.6f}" for k in keys])
        os.replace(args.out_csv + ".tmp", args.out_csv)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="time one round's shapes in PyTorch and ONNX Runtime")
    m.add_argument("--csv", required=True, help="CSV from `terraseg bench conv --csv`")
    m.add_argument("--out", required=True, help="CSV of the times measured here")
    r = sub.add_parser("report", help="print the comparison over all rounds")
    r.add_argument("--csv", nargs="+", required=True, help="terraseg CSVs, one per round")
    r.add_argument("--times", nargs="+", required=True, help="measure outputs, one per round, same order")
    r.add_argument("--terraseg-log", help="terraseg's printed output, for its BLAS line")
    r.add_argument("--out-csv", help="also write the merged per-shape medians to this CSV")
    for p in (m, r):
        p.add_argument("--threads", type=int, required=True)
        p.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if args.cmd == "measure":
        shapes = read_shapes(args.csv)
        if any(s["threads"] != args.threads for s in shapes):
            sys.exit(f"conv_compare: terraseg ran with {shapes[0]['threads']} threads, asked for {args.threads}")
        measure(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
