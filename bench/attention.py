#!/usr/bin/env python3
"""Attention kernels alone: condiff's Triton kernel against PyTorch SDPA at the paper preset's shapes.

Each implementation runs one forward call on q, k, v in diffusers' memory layout ((B, N, H*d)
projections viewed as (B, H, N, d)); GPU times are CUDA events, median of ``--repeats`` after
``--warmup`` calls. Speed is reported as performance.md §4 does: B*H*N^2 exponentials per call /
(seconds x SMs x max SM clock) = exp / SM / clock, against MUFU's ceiling of 16 (§3), plus attention
matmul TFLOP/s (4*B*H*N^2*d, unpadded). Accuracy: relative error against a float64 oracle on 64
query rows of sample 0.

    python bench/attention.py --json out/attention.json             # paper shapes, batch 8, fp16
    python bench/attention.py --poly-shares 0 0.2 0.33 --configs 128,128,8,2 128,64,4,3
    python bench/attention.py --interpret --json /tmp/a.json        # CPU: tiny shapes, Triton's interpreter

Without CUDA the script needs ``--interpret`` (it exits with status 2 otherwise: the paper shapes on the CPU
take minutes per call, and the Triton kernel needs CUDA tensors).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

# performance.md §1: the paper preset's attention layers (d = 8): 16 heads x 128^2 tokens, 32 x 64^2
SHAPES = {"paper-128px": (8, 16, 16384, 8), "paper-64px": (8, 32, 4096, 8)}
TINY = {"tiny-100": (1, 2, 100, 8), "tiny-64": (1, 2, 64, 8)}
MUFU_PER_SM_CLOCK = 16  # performance.md §3
H100_MAX_SM_MHZ = 1980  # performance.md §3: H100 and H200 both report 1980 MHz


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, metavar="NAME|B,H,N,D",
                   help=f"named shapes ({', '.join(SHAPES)}) or B,H,N,D [default: both paper shapes]")
    p.add_argument("--batch", type=int, default=None, help="override B of every shape")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument("--poly-shares", type=float, nargs="+", default=[0.0, 0.2],
                   help="Triton rows with this share of exponentials on the FMA pipe (0 = MUFU only)")
    p.add_argument("--configs", nargs="*", default=[], metavar="BM,BN,WARPS,STAGES",
                   help="extra Triton rows with these launch parameters instead of the CONFIGS table (tuning)")
    p.add_argument("--no-experimental", action="store_true",
                   help="leave out the rows of the kernel's experimental switches (MMA row sum, paired f16 exp)")
    p.add_argument("--no-sdpa-backends", action="store_true",
                   help="time only SDPA's default dispatch, not also its cuDNN and FlashAttention backends")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=None, help="seconds: later rows are reported as skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the report here (and Markdown next to it)")
    p.add_argument("--interpret", action="store_true",
                   help="CPU check of this script: tiny shapes through Triton's interpreter (timings meaningless)")
    args = p.parse_args(argv)
    if args.interpret:
        args.shapes = args.shapes or list(TINY)
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    args.shapes = args.shapes or list(SHAPES)
    try:
        args.shape_list = [_shape(s, args.batch) for s in args.shapes]
        args.config_list = [tuple(int(v) for v in c.split(",")) for c in args.configs]
    except ValueError as exc:
        p.error(str(exc))
    if any(len(c) != 4 for c in args.config_list):
        p.error("--configs entries are BLOCK_M,BLOCK_N,num_warps,num_stages")
    if any(not 0 <= s < 1 for s in args.poly_shares):
        p.error("--poly-shares must be in [0, 1)")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats >= 1 and --warmup >= 0")
    return args


def _shape(text: str, batch: int | None) -> tuple[str, tuple[int, int, int, int]]:
    named = {**SHAPES, **TINY}
    if text in named:
        b, h, n, d = named[text]
    else:
        try:
            b, h, n, d = (int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"shape {text!r}: use one of {', '.join(named)} or B,H,N,D") from None
        text = f"{b}x{h}x{n}x{d}"
    return text, (batch or b, h, n, d)


def gpu_clock_mhz() -> tuple[float, str]:
    """Max SM clock from nvidia-smi, else the 1980 MHz performance.md §3 gives for the H100/H200."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
        return float(out[0]), "nvidia-smi clocks.max.sm"
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return float(H100_MAX_SM_MHZ), "assumed 1980 MHz (performance.md §3; nvidia-smi not readable)"


def implementations(args, torch, attention_triton):
    """(label, fn(q, k, v) -> out) pairs: SDPA rows first (the baseline), then the Triton rows."""
    import torch.nn.functional as F

    rows = [("sdpa (default dispatch)", F.scaled_dot_product_attention)]
    if torch.cuda.is_available() and not args.no_sdpa_backends:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def backend(kind):
            def fn(q, k, v):
                with sdpa_kernel([kind]):
                    return F.scaled_dot_product_attention(q, k, v)
            return fn
        rows += [("sdpa cuDNN", backend(SDPBackend.CUDNN_ATTENTION)),
                 ("sdpa FlashAttention-2", backend(SDPBackend.FLASH_ATTENTION))]

    def triton_row(share, config=None, **switches):
        def fn(q, k, v):
            return attention_triton.triton_attention(q, k, v, poly_exp_share=share, config=config, **switches)
        return fn
    for share in args.poly_shares:
        rows.append((f"triton, poly share {share:g}" if share else "triton", triton_row(share)))
    if not args.no_experimental:  # the kernel's experimental switches (module docstring): d < 16; f16 exp in fp16 only
        rows.append(("triton, MMA row sum", triton_row(0.0, mma_rowsum=True)))
        if args.dtype == "fp16":
            rows += [("triton, paired f16 exp", triton_row(0.0, half_exp=True)),
                     ("triton, MMA row sum + paired f16 exp", triton_row(0.0, mma_rowsum=True, half_exp=True))]
    for cfg in args.config_list:
        rows.append((f"triton BM{cfg[0]} BN{cfg[1]} w{cfg[2]} s{cfg[3]}", triton_row(0.0, cfg)))
    return rows


def time_calls(fn, args, torch, cuda: bool) -> list[float]:
    """Seconds per call: ``warmup`` untimed calls (compiles), then ``repeats`` timed ones."""
    for _ in range(args.warmup):
        fn()
    samples = []
    for _ in range(args.repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def run(args) -> dict:
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported: @triton.jit reads it then
    import torch
    import triton

    from condiff.engine.kernels import attention_triton

    cuda = torch.cuda.is_available() and not args.interpret
    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    sms = torch.cuda.get_device_properties(device).multi_processor_count if cuda else None
    mhz, clock_source = gpu_clock_mhz() if cuda else (None, "CPU run: no SM clock")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + shlex.join(sys.argv), "device": torch.cuda.get_device_name(device) if cuda else
            f"CPU ({platform.processor() or platform.machine()}), Triton interpreter" if args.interpret else "CPU",
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            "dtype": args.dtype, "sms": sms, "max_sm_mhz": mhz, "clock_source": clock_source,
            "repeats": args.repeats, "warmup": args.warmup,
            "configs_table": [[None if c == float("inf") else c for c in row] for row in attention_triton.CONFIGS],
            "interpret": args.interpret}
    deadline = time.perf_counter() + args.time_budget if args.time_budget else None
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for shape_name, shape in args.shape_list:
        rows += measure_shape(shape_name, shape, args, g, torch, attention_triton, device, dtype, cuda,
                              sms, mhz, deadline)
    return {"schema": "condiff.bench.attention/1", "meta": meta, "rows": rows}


def measure_shape(shape_name, shape, args, g, torch, attention_triton, device, dtype, cuda, sms, mhz, deadline):
    """Every implementation on one (B, H, N, d); the tensors are freed when this returns."""
    b, h, n, d = shape
    proj = [torch.randn(b, n, h * d, generator=g).to(device, dtype) for _ in range(3)]
    q, k, v = (t.view(b, n, h, d).transpose(1, 2) for t in proj)
    picked = torch.arange(0, n, max(1, n // 64), device=device)
    ref = attention_triton.attention_reference(q[:1, :, picked], k[:1], v[:1])
    exps = b * h * n * n
    base_ms, rows = None, []
    for label, fn in implementations(args, torch, attention_triton):
        row = {"shape": shape_name, "B": b, "H": h, "N": n, "d": d, "impl": label, "status": "ok", "note": None}
        if deadline is not None and time.perf_counter() > deadline:
            rows.append({**row, "status": "skipped", "note": "--time-budget spent"})
            continue
        try:
            out = fn(q, k, v)
            err = float((out[:1, :, picked].double() - ref).norm() / ref.norm())
            samples = time_calls(lambda: fn(q, k, v), args, torch, cuda)  # noqa: B023 (called right here)
        except Exception as exc:  # an unavailable SDPA backend must not lose the other rows
            rows.append({**row, "status": "skipped", "note": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        ms = statistics.median(samples) * 1e3
        if label.startswith("sdpa (default"):
            base_ms = ms
        per_clock = exps / (ms / 1e3) / (sms * mhz * 1e6) if cuda else None
        row.update(ms=ms, ms_min=min(samples) * 1e3, ms_max=max(samples) * 1e3, rel_err=err,
                   exp_per_s=exps / (ms / 1e3), exp_per_sm_clock=per_clock,
                   mufu_share=per_clock / MUFU_PER_SM_CLOCK if per_clock else None,
                   tflops=4 * exps * d / (ms / 1e3) / 1e12, speedup_vs_sdpa=base_ms / ms if base_ms else None)
        rows.append(row)
        print(f"[attention] {shape_name} {label}: {ms:.3f} ms, rel err {err:.2e}", file=sys.stderr, flush=True)
    return rows


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [f"# Attention kernels: {m['device']}, {m['dtype']}", "",
             f"- date: {m['date']}", f"- command: `{m['command']}`",
             f"- versions: python {m['python']}, torch {m['torch']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
             f"triton {m['triton']}",
             (f"- {m['sms']} SMs at {m['max_sm_mhz']} MHz ({m['clock_source']}); exp/SM/clock = B*H*N^2 / "
              f"(s x SMs x clock), MUFU ceiling {MUFU_PER_SM_CLOCK} (performance.md §3)" if m["sms"] else
              "- no GPU: exp/SM/clock is not defined"),
             f"- median of {m['repeats']} calls after {m['warmup']} warm-up calls; Triton CONFIGS table "
             f"(max N, BLOCK_M, BLOCK_N, warps, stages; null = any N) {m['configs_table']}", "",
             "| shape | impl | ms median (min–max) | exp/SM/clock | of MUFU peak | TFLOP/s | vs SDPA | rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['impl']} | skipped: {r['note']} | | | | | |")
            continue
        share = f"{100 * r['mufu_share']:.0f} %" if r["mufu_share"] else "–"
        lines.append(f"| {r['shape']} | {r['impl']} | {r['ms']:.3f} ({r['ms_min']:.3f}–{r['ms_max']:.3f}) | "
                     f"{_fmt(r['exp_per_sm_clock'])} | {share} | {_fmt(r['tflops'])} | "
                     f"{_fmt(r['speedup_vs_sdpa'])} | {r['rel_err']:.2e} |")
    if m["interpret"]:
        lines += ["", "Interpreter run: checks the script and the kernel's numbers, not its speed."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.interpret:
        import torch

        if not torch.cuda.is_available():
            print("attention.py: error: no CUDA device: this benchmark needs a GPU (the Triton kernel runs on CUDA "
                  "tensors, and the paper shapes take minutes per call on the CPU); use --interpret for the CPU "
                  "check of this script (tiny shapes through Triton's interpreter)", file=sys.stderr)
            return 2
    report = run(args)
    md = markdown(report)
    print(md)
    if args.json:
        path = os.path.abspath(args.json)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.splitext(path)[0] + ".md", "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
