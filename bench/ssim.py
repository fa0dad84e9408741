#!/usr/bin/env python3
"""SSIM anomaly map: fused CUDA kernel vs the torch reference vs scikit-image (Triton-tutorial style).

For every batch size B and channel count C (images ``--size`` square, fixed seed) the benchmark times

* (a) ``condiff.engine.ssim_cuda.ssim_map_cuda`` (CUDA only; ``--half-x`` adds an fp16-restoration row),
* (b) ``condiff.ssim.ssim_map``, the grouped-conv reference, on the same device (CUDA, else the CPU),
* (c) scikit-image ``structural_similarity`` on the CPU for ``--skimage-batch`` images (maps/s),

warm-up first, then ``--repeats`` timed calls (CUDA events on the GPU, perf_counter on the CPU); median,
min and max. GB/s is measured against the kernel's minimal byte count: read x and y once, write the
(B, 1, H, W) float32 map once. Accuracy: max |diff| of each row against the torch reference in fp32 on
the CPU (first ``--check-batch`` images; cuDNN's TF32 default cannot blur it), against the timed torch
output, and against scikit-image (float64) away from the 5-pixel border, where its reflect padding
differs from the reference's zero padding. Without CUDA the kernel rows are skipped with a note.

    python bench/ssim.py --batch 2 --channels 1 3 --repeats 2                   # CPU smoke test
    python bench/ssim.py --batch 40 400 --channels 1 3 --size 128 --repeats 20 --json bench/results/ssim.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import condiff
from condiff.engine.ssim_cuda import cuda_ssim_available, ssim_map_cuda
from condiff.ssim import ssim_map


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[40, 400])
    p.add_argument("--channels", type=int, nargs="+", default=[1, 3])
    p.add_argument("--size", type=int, default=128, help="H = W")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skimage-batch", type=int, default=4, help="images timed with scikit-image (CPU)")
    p.add_argument("--check-batch", type=int, default=8, help="images compared with the CPU fp32 reference")
    p.add_argument("--half-x", action="store_true", help="also time the kernel with a float16 restoration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write results here (and a .md table beside it)")
    p.add_argument("--markdown", type=Path, default=None, help="Markdown table path (default: JSON path .md)")
    return p.parse_args(argv)


def make_inputs(batch: int, channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MRI-like pair on the CPU: y with zero background around a textured ellipse, x a noisy restoration."""
    g = torch.Generator().manual_seed(seed)
    r, c = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = ((r / 0.8) ** 2 + (c / 0.65) ** 2 < 1).float()
    y = head * (0.3 + 0.5 * torch.rand(batch, channels, size, size, generator=g))
    x = (y + 0.05 * torch.randn(batch, channels, size, size, generator=g)).clamp(0, 1)
    return x, y


def time_calls(fn, repeats: int, warmup: int, cuda: bool) -> list[float]:
    """Milliseconds per call; CUDA events bracketed by synchronisation on the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def skimage_maps(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) -> (N, 1, H, W) float64 with the reference's settings (reference-method.md §6)."""
    from skimage.metrics import structural_similarity

    xd, yd = x.double().numpy(), y.double().numpy()
    out = np.empty((xd.shape[0], 1, *xd.shape[2:]))
    for i in range(xd.shape[0]):
        maps = [np.clip(1 - structural_similarity(xd[i, c], yd[i, c], gaussian_weights=True, sigma=1.5,
                                                  use_sample_covariance=False, data_range=255, full=True)[1], 0, 1)
                for c in range(xd.shape[1])]
        out[i, 0] = np.mean(maps, axis=0)
    return out


def max_diff(a, b, interior: bool = False) -> float:
    a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().cpu().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    n = min(a.shape[0], b.shape[0])
    a, b = a[:n], b[:n]
    if interior:
        a, b = a[..., 5:-5, 5:-5], b[..., 5:-5, 5:-5]
    return float(np.abs(a - b).max())


def min_bytes(x: torch.Tensor, y: torch.Tensor) -> int:
    b, c, h, w = x.shape
    return b * c * h * w * (x.element_size() + y.element_size()) + b * h * w * 4


def row(name, device, x, y, times, **extra) -> dict:
    med = statistics.median(times)
    return {"impl": name, "device": device, "batch": x.shape[0], "channels": x.shape[1], "size": x.shape[-1],
            "x_dtype": str(x.dtype).removeprefix("torch."), "median_ms": med, "min_ms": min(times),
            "max_ms": max(times), "repeats": len(times), "maps_per_s": x.shape[0] / (med / 1e3),
            "gb_per_s": min_bytes(x, y) / (med / 1e3) / 1e9, **extra}


def environment(args_line: str) -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "numpy": np.__version__, "condiff": condiff.__version__}
    for mod in ("skimage", "cupy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    cuda = torch.cuda.is_available()
    return {"machine": platform.node(), "platform": platform.platform(), "cpu": cpu,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": args_line,
            "versions": versions, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if cuda else None}


def markdown(env: dict, rows: list[dict], notes: list[str]) -> str:
    lines = [f"# SSIM map benchmark ({env['date']})", "",
             f"- machine: {env['machine']} ({env['platform']}), CPU: {env['cpu']}, GPU: {env['gpu'] or 'none'}",
             f"- command: `{env['command']}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
             f"- cuDNN TF32 allowed (torch reference on GPU): {env['cudnn_allow_tf32']}", ""]
    lines += [f"- note: {n}" for n in notes]
    lines += ["", "GB/s counts the minimal bytes: read x and y once, write the map once. Diffs are max |diff|; "
              "vs skimage away from the 5-px border.", "",
              "| B | C | impl | device | x dtype | median ms | min–max ms | maps/s | GB/s | vs torch CPU fp32 "
              "| vs torch timed | vs skimage |", "|" + "---|" * 12]
    fmt = lambda v: "–" if v is None else f"{v:.2e}"
    for r in rows:
        lines.append(f"| {r['batch']} | {r['channels']} | {r['impl']} | {r['device']} | {r['x_dtype']} | "
                     f"{r['median_ms']:.3f} | {r['min_ms']:.3f}–{r['max_ms']:.3f} | {r['maps_per_s']:.0f} | "
                     f"{r['gb_per_s']:.3g} | {fmt(r.get('diff_vs_torch_cpu'))} | {fmt(r.get('diff_vs_torch_timed'))} "
                     f"| {fmt(r.get('diff_vs_skimage'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(shlex.join([sys.executable, *(sys.argv if argv is None else ["bench/ssim.py", *argv])]))
    cuda = torch.cuda.is_available()
    kernel = cuda and cuda_ssim_available()
    device = "cuda" if cuda else "cpu"
    notes = []
    if not cuda:
        notes.append("no CUDA device: kernel rows skipped, torch reference timed on the CPU")
    elif not kernel:
        notes.append("CuPy not installed: kernel rows skipped (pip install 'condiff[gpu]')")
    if kernel:  # build time apart from the timed calls
        t0 = time.perf_counter()
        ssim_map_cuda(torch.zeros(1, 1, 8, 8, device="cuda"), torch.zeros(1, 1, 8, 8, device="cuda"))
        torch.cuda.synchronize()
        env["kernel_build_s"] = time.perf_counter() - t0

    rows = []
    for channels in args.channels:
        for batch in args.batch:
            first = len(rows)
            x, y = make_inputs(batch, channels, args.size, args.seed)
            n_check, n_sk = min(batch, args.check_batch), min(batch, args.skimage_batch)
            ref_cpu = ssim_map(x[:n_check], y[:n_check])
            sk = skimage_maps(x[:n_sk], y[:n_sk])  # also the warm-up of its timing below
            xd, yd = x.to(device), y.to(device)
            torch_out = ssim_map(xd, yd)
            torch_times = time_calls(lambda: ssim_map(xd, yd), args.repeats, args.warmup, cuda)
            if kernel:
                variants = [("cuda kernel", xd)] + ([("cuda kernel", xd.half())] if args.half_x else [])
                for name, xk in variants:
                    out = ssim_map_cuda(xk, yd)
                    times = time_calls(lambda: ssim_map_cuda(xk, yd), args.repeats, args.warmup, True)
                    fp32 = xk.dtype == torch.float32  # an fp16 row is checked against the same rounded x
                    ref = ref_cpu if fp32 else ssim_map(x[:n_check].half(), y[:n_check])
                    rows.append(row(name, device, xk, yd, times, diff_vs_torch_cpu=max_diff(out, ref),
                                    diff_vs_torch_timed=max_diff(out, torch_out) if fp32 else None,
                                    diff_vs_skimage=max_diff(out, sk, interior=True) if fp32 else None))
            rows.append(row("torch ssim_map", device, xd, yd, torch_times,
                            diff_vs_torch_cpu=max_diff(torch_out, ref_cpu),
                            diff_vs_skimage=max_diff(torch_out, sk, interior=True)))
            sk_times = time_calls(lambda: skimage_maps(x[:n_sk], y[:n_sk]), max(1, min(args.repeats, 3)), 0, False)
            rows.append(row("skimage", "cpu", x[:n_sk].double(), y[:n_sk].double(), sk_times,
                            diff_vs_torch_cpu=max_diff(sk, ref_cpu, interior=True)))
            print(f"B={batch} C={channels}: " + ", ".join(f"{r['impl']} {r['median_ms']:.3f} ms" for r in rows[first:]),
                  file=sys.stderr)

    table = markdown(env, rows, notes)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": env, "notes": notes, "rows": rows}, indent=2) + "\n")
        (args.markdown or args.json.with_suffix(".md")).write_text(table)
    elif args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
