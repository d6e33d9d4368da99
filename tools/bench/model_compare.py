#!/usr/bin/env python3
"""Times the whole smp.Unet("resnet34") in terraseg, PyTorch and ONNX Runtime
in one run, on the same synthetic tile, batch 1 and 4, same thread count, and
prints the ratios (other / terraseg time: > 1 means terraseg is faster).

    python3 tools/bench/model_compare.py TERRASEG_BIN [--size PX] [--threads N]
                                         [--iters N] [--in-channels N] [--classes K]

Run it through tools/bench/model_compare.sh, which sets up the venv (torch,
segmentation-models-pytorch, onnx, onnxruntime; never needed by terraseg).
Eval forward: model.eval() under no_grad (torch), the exported ONNX graph
(ORT), `terraseg bench model` (eval forward with BN folded, as predict). Train step: model.train(),
forward, a sum of the logits as a stand-in loss, backward (torch) against
terraseg's train forward + backward. Medians of --iters after one warm-up.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def terraseg_times(binary, a):
    cmd = [binary, "bench", "model", "--size", str(a.size), "--threads", str(a.threads), "--iters", str(a.iters),
           "--in-channels", str(a.in_channels), "--classes", str(a.classes), "--batch", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    times = {}
    for line in out.splitlines():
        m = re.match(r"^(\d+)\s+\d+x\d+\s+([\d.]+)\s+[\d.]+\s+([\d.]+)\s+[\d.]+$", line.strip())
        if m:
            times[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    return out, times


def median_ms(fn, iters):
    fn()
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("terraseg")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--in-channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=2)
    a = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    import segmentation_models_pytorch as smp
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)

    ts_out, ts = terraseg_times(a.terraseg, a)
    model = smp.Unet("resnet34", encoder_weights=None, in_channels=a.in_channels, classes=a.classes)

    rows = []
    ort_note = ""
    for batch in (1, 4):
        x = torch.randn(batch, a.in_channels, a.size, a.size)
        model.eval()
        with torch.no_grad():
            t_eval = median_ms(lambda: model(x), a.iters)
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        t_train = median_ms(step, a.iters)
        t_ort = None
        try:
            import onnxruntime as ort
            model.eval()
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "unet.onnx")
                torch.onnx.export(model, x, path, opset_version=17, dynamo=False)
                so = ort.SessionOptions()
                so.intra_op_num_threads = a.threads
                so.inter_op_num_threads = 1
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                feed = {sess.get_inputs()[0].name: x.numpy()}
                t_ort = median_ms(lambda: sess.run(None, feed), a.iters)
        except Exception as e:  # report, do not hide: the ORT column says why it is empty
            ort_note = f"ONNX Runtime not timed: {type(e).__name__}: {e}"
        rows.append((batch, t_eval, t_train, t_ort))

    import importlib.metadata as md
    vers = {p: md.version(p) for p in ("torch", "segmentation-models-pytorch", "onnxruntime") if _has(md, p)}
    print(ts_out.strip())
    print()
    print(f"{a.size}x{a.size}, {a.in_channels} bands, {a.classes} classes, {a.threads} threads, median of {a.iters}; "
          + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"{'batch':>5} | {'eval fwd ms: terraseg':>22} {'torch':>8} {'ort':>8} {'torch/ts':>9} {'ort/ts':>7} | "
          f"{'train step ms: terraseg':>24} {'torch':>8} {'torch/ts':>9}")
    for batch, te, tt, to in rows:
        if batch not in ts:
            print(f"{batch:>5} | terraseg did not report this batch")
            continue
        se, st = ts[batch]
        ort_ms = f"{to:.1f}" if to else "-"
        ort_ratio = f"{to / se:.2f}" if to else "-"
        print(f"{batch:>5} | {se:22.1f} {te:8.1f} {ort_ms:>8} {te / se:9.2f} {ort_ratio:>7} | "
              f"{st:24.1f} {tt:8.1f} {tt / st:9.2f}")
    if ort_note:
        print(ort_note)
    return 0


def _has(md, p):
    try:
        md.version(p)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
