#!/usr/bin/env python3
"""Whole-pipeline throughput of condiff's engines against eager PyTorch (nanoGPT ``bench.py`` style).

One slice = ``steps`` DDPM steps x ``members`` UNet evaluations (the paper: 50 x 10 = 500). Per engine,
precision and batch size B the benchmark times

* the pipeline: ``condiff.engine.runner.run_slices`` on B slices (noise, reverse loop, SSIM map, member
  mean), warm-up then ``--repeats`` timed runs -> slices/s, image evaluations/s, s per 500-evaluation slice;
* one ``denoise`` call alone at batch B -> ms per call and per image;

with the two baselines always in the same run: eager fp32 PyTorch, and eager PyTorch as the reference ran it
(fp32 weights under fp16 autocast with TF32 and SDPA; on the CPU bf16 autocast). GPU timings use CUDA events
bracketed by ``torch.cuda.synchronize``. FLOPs per evaluation and the sequential floor come from
``performance.md`` §1/§3 for paper/symmetric at 128 px; other networks are counted once with
``FlopCounterMode``. Weights are random (seeded); results go to ``--out`` as JSON, Markdown and a PNG plot.

    python bench/throughput.py --preset small --batch-sizes 1 4 --steps 5 --engines torch ort --device cpu
    python bench/throughput.py --preset paper --batch-sizes 8 32 --engines fast:fp16 fast-triton:fp16 --device cuda
    python bench/throughput.py --smoke --out /tmp/bench          # CI: tiny net, 32 px, 2 steps

The report is named throughput-PRESET-DEVICE-DATE (.json, .md, .png) in ``--out``; the script refuses to
start when those files exist (an earlier run of the same day) unless ``--force`` is given. "max Δmap vs fp32"
compares a row's maps with the fp32 baseline's only at the same batch size, step count and seed; with another
``--fp32-steps`` it is left empty (bench/gpu_consistency.py measures accuracy at equal steps).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import inspect
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from condiff.config import ModelConfig, preset
from condiff.engine.backends import open_denoiser
from condiff.engine.backends.torch_backend import resolve_device
from condiff.engine.runner import SliceJob, run_slices
from condiff.errors import BackendUnavailableError
from condiff.modelset import load_model, save_model
from condiff.sampler import make_plan
from condiff.unet import ConditionalUNet

from machine import loadavg, machine_info, versions  # noqa: E402 (bench/ is on sys.path when run as a script)
from throughput_report import markdown, plot

EVALS_PER_PAPER_SLICE = 500  # 10 members x 50 DDPM steps
# performance.md §1: all tensor-core work of one 128x128 1-channel evaluation; 3 channels add 0.23 GFLOP
TABLE_GFLOP = {"paper": 727.9, "symmetric": 311.1}
# performance.md §3: sequential floor per 128x128 evaluation (ms), by card
FLOOR_MS = {"paper": {"H100": 4.05, "H200": 4.06}, "symmetric": {"H100": 0.97, "H200": 0.97}}
# fast-*: the fast engine's variants (FAST_ENGINES); fast-triton-x: Triton with the attention kernel's
# experimental switches (MMA row sum; paired f16 exp in fp16), measured before they become defaults
ENGINES = ("torch", "ort", "fast", "fast-triton", "fast-compile", "fast-triton-x")
# the fast engine's variants: engine name -> (kernels, kernel_options, note for the report)
FAST_ENGINES = {
    "fast": ("torch", None, None),
    "fast-compile": ("compile", None,
                     "torch.compile (inductor, default mode) inside the whole-loop CUDA graph; compiled in the first run"),
    "fast-triton": ("triton", None,
                    "Triton attention + GroupNorm/SiLU kernels (engine/kernels), compiled in the first run"),
    "fast-triton-x": ("triton", {"mma_rowsum": True, "half_exp": True},
                      "Triton kernels with the attention's experimental switches: row sum in the P @ V MMA, "
                      "exp2 as paired f16 (fp16 only); compiled in the first run"),
}
PRECISIONS = ("fp32", "fp16", "bf16")


class Skip(Exception):
    """An engine row that cannot run here; the message becomes the row's note."""


@dataclass(frozen=True)
class Spec:
    engine: str     # torch | torch-autocast | ort | fast | fast-triton | fast-compile | fast-triton-x
    precision: str  # fp32 | fp16 | bf16 (for torch-autocast: the autocast dtype)
    role: str       # baseline-fp32 | baseline-reference | engine

    @property
    def label(self) -> str:
        if self.role == "baseline-fp32":
            return "torch fp32 (eager baseline)"
        if self.role == "baseline-reference":
            return f"torch autocast-{self.precision} (reference)"
        return f"{self.engine} {self.precision}"


class AutocastDenoiser:
    """fp32 weights under ``torch.autocast`` as the reference ran inference (fp16 + TF32 on CUDA, SDPA)."""

    name = "torch-autocast"

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, max_batch: int):
        self.device, self.precision, self.max_batch = device, precision, max_batch
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self.model = model.to(device=device, dtype=torch.float32).eval()

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference config sets allow_tf32: true
        try:
            with torch.autocast(self.device.type, dtype=self.dtype):
                return self.model(x_t, cond, t).float()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32


# ---------------------------------------------------------------- arguments

# what --smoke fixes; giving one of these options with another value beside --smoke is an error
SMOKE = {"preset": "tiny", "size": 32, "steps": 2, "batch_sizes": [1, 2], "repeats": 2, "warmup": 1}
_UNSET = object()


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be at least 1")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be greater than 0")
    return value


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", choices=["paper", "symmetric", "small", "tiny"])
    p.add_argument("--image-channels", type=int, default=1, choices=[1, 3])
    p.add_argument("--size", type=positive_int, default=128, help="image side in pixels")
    p.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 4])
    p.add_argument("--steps", type=positive_int, default=50, help="DDPM steps per member")
    p.add_argument("--members", type=positive_int, default=1,
                   help="ensemble members (per-slice numbers are also scaled to 10)")
    p.add_argument("--engines", nargs="+", default=list(ENGINES),
                   help="engine or engine:precision (torch, ort, fast, fast-triton, fast-compile, fast-triton-x); a bare name runs every --precisions")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="for bare --engines names; default: fp32 on the CPU, fp16 on CUDA (fp32 is the baseline)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row (>= 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (>= 1; the first also builds graphs)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch and ONNX Runtime")
    p.add_argument("--fp32-steps", type=positive_int, default=None,
                   help="steps for the fp32 baseline only (per-step cost does not depend on the step count; "
                        "fp32 is ~10x slower on GPU); rows at other step counts get no 'max Δmap vs fp32'. "
                        "Default: --steps")
    p.add_argument("--fp32-batch-sizes", type=positive_int, nargs="+", default=None,
                   help="batch sizes for the fp32 baseline only. Default: --batch-sizes")
    p.add_argument("--cpu-reference", choices=["bf16", "skip"], default="bf16",
                   help="reference-style baseline on the CPU: bf16 autocast, or skip it")
    p.add_argument("--time-budget", type=positive_float, default=None,
                   help="seconds: rows that would end later are reported as skipped (results so far are kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing report of the same name (throughput-PRESET-DEVICE-DATE.json/.md/.png "
                        "in --out); without it the script refuses to start, so a rerun cannot replace a recorded "
                        "report with a partial one")
    p.add_argument("--smoke", action="store_true",
                   help="CI: tiny preset, 32 px, 2 steps, batch 1 and 2, 2 repeats, warm-up 1 (giving any of "
                        "--preset/--size/--steps/--batch-sizes/--repeats/--warmup another value is an error)")
    # the options --smoke fixes start unset, so that explicitly given ones can be told from defaults
    args = p.parse_args(argv, namespace=argparse.Namespace(**{dest: _UNSET for dest in SMOKE}))
    given = {dest: getattr(args, dest) for dest in SMOKE if getattr(args, dest) is not _UNSET}
    for dest in SMOKE:
        if dest not in given:
            setattr(args, dest, SMOKE[dest] if args.smoke else p.get_default(dest))
    if args.smoke:
        conflicts = [f"{option_name(d)} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for d, v in given.items() if v != SMOKE[d]]
        if conflicts:
            p.error(f"--smoke fixes {smoke_values()}; drop {', '.join(conflicts)} or --smoke")
        print(f"[bench] --smoke: {smoke_values()}", file=sys.stderr, flush=True)
    elif args.repeats < 5:
        p.error("--repeats must be at least 5 (only --smoke uses fewer)")
    args.warmup = max(1, args.warmup)
    for spec in args.engines:
        name, _, prec = spec.partition(":")
        if name not in ENGINES or (prec and prec not in PRECISIONS):
            p.error(f"--engines {spec!r}: use one of {ENGINES}, optionally :fp32/:fp16/:bf16")
    return args


def smoke_values() -> str:
    return ", ".join(f"{option_name(d)} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for d, v in SMOKE.items())


def engine_specs(args, device: torch.device) -> tuple[list[Spec], list[str]]:
    """Baselines first, then the requested engine/precision pairs (duplicates of a baseline dropped)."""
    notes = []
    specs = [Spec("torch", "fp32", "baseline-fp32")]
    if device.type == "cuda":
        specs.append(Spec("torch-autocast", "fp16", "baseline-reference"))
    elif args.cpu_reference == "bf16":
        specs.append(Spec("torch-autocast", "bf16", "baseline-reference"))
        notes.append("CPU: the reference-style baseline is bf16 autocast over fp32 weights "
                     "(the reference ran fp16 autocast on CUDA).")
    else:
        notes.append("CPU: reference-style baseline skipped (--cpu-reference skip); the reference ran fp16 "
                     "autocast on CUDA.")
    precisions = args.precisions or (["fp16"] if device.type == "cuda" else ["fp32"])
    for item in args.engines:
        name, _, prec = item.partition(":")
        for p in [prec] if prec else precisions:
            spec = Spec(name, p, "engine")
            if spec.engine == "torch" and p == "fp32":
                continue  # that is the fp32 baseline
            if spec not in specs:
                specs.append(spec)
    return specs, notes


class PeakMemory:
    """Peak memory of one measurement: CUDA allocator peak, or the process's peak RSS on the CPU.

    On Linux, writing 5 to /proc/self/clear_refs resets VmHWM, so each row gets its own peak;
    elsewhere ru_maxrss is the process's high-water mark so far (monotonic across rows).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss (process high-water mark)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.kind = "VmHWM, process peak RSS reset per row"

    def read_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind.startswith("VmHWM"):
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------- model, FLOPs, floor

def build_model_dir(root: Path, args) -> tuple[Path, float, str]:
    """Seeded random weights saved as a model folder; returns (folder, GFLOP per evaluation, source)."""
    cfg = preset(args.preset, args.image_channels, args.size)
    torch.manual_seed(args.seed)
    model = ConditionalUNet(cfg).eval()
    if args.preset in TABLE_GFLOP and args.size == 128:
        gflop = TABLE_GFLOP[args.preset] + (0.23 if args.image_channels == 3 else 0.0)
        source = "performance.md §1 (tensor-core work at 128x128)"
    else:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, args.image_channels, args.size, args.size)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(x, x, torch.tensor([500]))
        gflop = counter.get_total_flops() / 1e9
        source = "torch.utils.flop_counter.FlopCounterMode at batch 1 (convolutions, linears, attention matmuls)"
    model_dir = save_model(root / "member0", model, ModelConfig(unet=cfg))
    return model_dir, gflop, source


def floor_ms(args, machine: dict) -> tuple[float | None, str]:
    """performance.md §3 sequential floor per evaluation, or None with the reason."""
    if machine["device"] != "cuda":
        return None, "CPU run: performance.md §3 gives no CPU floor (floors are for the H100/H200 GPUs)."
    if args.preset not in FLOOR_MS or args.size != 128:
        return None, f"no floor for preset {args.preset} at {args.size} px (performance.md §3 covers paper/symmetric at 128 px)."
    card = "H200" if "H200" in (machine["gpu"] or "") else "H100"
    note = f"sequential floor {FLOOR_MS[args.preset][card]} ms per evaluation ({card}, performance.md §3)"
    if card not in (machine["gpu"] or ""):
        note += f"; this GPU is {machine['gpu']}, so the H100 floor is only indicative"
    return FLOOR_MS[args.preset][card], note + "."


# ---------------------------------------------------------------- engines

def open_engine(spec: Spec, model_dir: Path, device: torch.device, max_batch: int, threads: int | None):
    """Returns (denoiser, note about its build or None); raises Skip when the engine cannot run here."""
    if spec.engine == "torch":
        return open_denoiser("torch", model_dir, device=device, precision=spec.precision, max_batch=max_batch), None
    if spec.engine == "torch-autocast":
        return AutocastDenoiser(load_model(model_dir)[0], device, spec.precision, max_batch), None
    if spec.engine == "ort":
        return open_ort_engine(model_dir, device, spec.precision, max_batch, threads)
    if spec.engine in FAST_ENGINES:
        kernels, options, note = FAST_ENGINES[spec.engine]
        try:
            graphs = importlib.import_module("condiff.engine.graphs")
        except ModuleNotFoundError as exc:
            raise Skip(f"condiff.engine.graphs is not available ({exc})") from None
        if not hasattr(graphs, "open_fast"):
            raise Skip("condiff.engine.graphs has no open_fast")
        if kernels == "triton":
            try:
                import triton  # noqa: F401
            except ImportError as exc:
                raise Skip(f"triton is not installed ({exc})") from None
        den = graphs.open_fast(model_dir, device=device, precision=spec.precision, max_batch=max_batch,
                               kernels=kernels, kernel_options=options)
        return den, note
    raise Skip(f"unknown engine {spec.engine}")


def open_ort_engine(model_dir: Path, device, precision: str, max_batch: int, threads: int | None):
    """Export model.onnx next to the weights (once), then open it with ONNX Runtime."""
    for module in ("onnxruntime", "condiff.engine.backends.ort_backend", "condiff.export.onnx_export"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise Skip(f"{module} is not available ({exc})") from None
    import onnxruntime

    from condiff.engine.backends.ort_backend import open_ort
    from condiff.export import onnx_export

    provider = "CUDAExecutionProvider" if torch.device(device).type == "cuda" else "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():  # check before a long export
        raise Skip(f"this onnxruntime has no {provider} (it offers {', '.join(onnxruntime.get_available_providers())})")
    note = None
    if not (model_dir / "model.onnx").is_file():  # build time then includes the checked export
        result = onnx_export.export_onnx(model_dir, threads=threads)
        note = (f"build time includes the checked ONNX export: {result.seconds:.1f} s, attention "
                f"{result.attention}, max |Δ eps| vs torch {result.max_abs_diff:.2g}")
        print(f"[bench] {note}", file=sys.stderr, flush=True)
    return open_ort(model_dir, device=device, precision=precision, max_batch=max_batch, threads=threads), note


@contextlib.contextmanager
def loop_dispatch(den):
    """Give an engine that owns the whole reverse loop (``restore_batch``) the loop inside ``run_slices``.

    The runner calls ``sampler.restore(den.denoise, ...)``; until it dispatches to ``restore_batch`` itself,
    this swaps the runner's ``restore`` for the duration of one row. Yields a note, or None when not needed.
    """
    import condiff.engine.runner as runner

    if not hasattr(den, "restore_batch") or "restore_batch" in inspect.getsource(runner):
        yield None
        return
    original = runner.restore

    def restore(denoise, cond, plan, noise, callback=None):
        if getattr(denoise, "__self__", None) is den:
            return den.restore_batch(cond, noise, plan)
        return original(denoise, cond, plan, noise, callback)

    runner.restore = restore
    try:
        yield "pipeline: run_slices with its restore() routed to the engine's restore_batch (bench shim)"
    finally:
        runner.restore = original


# ---------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BudgetSpent(Exception):
    """The next run would end after ``--time-budget``; the row is reported as skipped."""


def timed(fn, device: torch.device, warmup: int, repeats: int, deadline: float | None = None):
    """Warm up, then time ``repeats`` runs (CUDA events on GPU). Returns (first run s, [s], last output).

    With a ``deadline`` (perf_counter time), stops before a run that the previous one says would pass it.
    """
    first, last, samples, out = None, 0.0, [], None
    for i in range(warmup + repeats):
        if deadline is not None and i > 0 and time.perf_counter() + last > deadline:
            raise BudgetSpent(f"--time-budget reached after {i} of {warmup + repeats} runs (last run {last:.3g} s)")
        sync(device)
        t0 = time.perf_counter()
        if i >= warmup and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            out = fn()
            sync(device)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        last = time.perf_counter() - t0
        first = last if i == 0 else first
    return first, samples, out


def spread(samples: list[float], scale: float = 1.0) -> dict:
    return {"median": statistics.median(samples) * scale, "min": min(samples) * scale,
            "max": max(samples) * scale, "samples": [s * scale for s in samples]}


def make_jobs(n: int, channels: int, size: int, seed: int) -> list[SliceJob]:
    """n random conditioning slices in [-1, 1] (the whole image is foreground)."""
    gen = torch.Generator().manual_seed(seed + 1)
    conds = torch.rand((n, channels, size, size), generator=gen) * 2 - 1
    return [SliceJob(cond=conds[i], digest="bench", slice_index=i) for i in range(n)]


def measure(den, spec: Spec, batch: int, steps: int, args, device, memory: PeakMemory,
            deadline: float | None = None) -> dict:
    """One row: pipeline timing through run_slices, then denoise alone, at batch ``batch``."""
    plan = make_plan("ddpm", steps)
    jobs = make_jobs(batch, args.image_channels, args.size, args.seed)
    members = [den] * args.members  # one resident model; every member runs its own loop, as distinct weights would
    memory.reset()
    with loop_dispatch(den) as note:
        first, samples, results = timed(lambda: run_slices(members, jobs, plan, seed=args.seed, batch_size=batch),
                                         device, args.warmup, args.repeats, deadline)
    g = torch.Generator().manual_seed(args.seed + 2)
    shape = (batch, args.image_channels, args.size, args.size)
    x = torch.randn(shape, generator=g).to(den.device)
    cond = torch.rand(shape, generator=g).mul(2).sub(1).to(den.device)
    t = torch.full((batch,), 500, dtype=torch.int64, device=den.device)
    _, d_samples, _ = timed(lambda: den.denoise(x, cond, t), device, args.warmup, args.repeats, deadline)
    pipe = spread(samples)
    evals_per_s = batch * args.members * steps / pipe["median"]
    den_ms = spread(d_samples, 1e3)
    return {
        "status": "ok", "note": note, "steps": steps, "slice_evals": args.members * steps,
        "first_call_s": first, "pipeline_s": pipe,
        "slices_per_s": batch / pipe["median"], "evals_per_s": evals_per_s,
        "slice_s_10_members": pipe["median"] / batch * 10 / args.members,
        "paper_slice_s": EVALS_PER_PAPER_SLICE / evals_per_s,
        "paper_slices_per_s": evals_per_s / EVALS_PER_PAPER_SLICE,
        "denoise_ms": den_ms, "denoise_ms_per_image": den_ms["median"] / batch,
        "denoise_evals_per_s": batch * 1e3 / den_ms["median"],
        "peak_mem_mib": memory.read_mib(), "peak_mem_kind": memory.kind,
        "_maps": torch.stack([r.amap for r in results]), "_scores": torch.tensor([r.score for r in results]),
    }


# ---------------------------------------------------------------- derived columns

def finish(rows: list[dict], gflop: float, floor: float | None) -> None:
    """Add TFLOP/s, floor fractions and ratios to both baselines (same batch, and the baseline's best batch)."""
    ok = [r for r in rows if r["status"] == "ok"]
    by_role = {role: {r["batch_size"]: r for r in ok if r["role"] == role}
               for role in ("baseline-fp32", "baseline-reference")}
    best = {role: max((r["evals_per_s"] for r in rs.values()), default=None) for role, rs in by_role.items()}
    for r in rows:
        r["gflop_per_eval"] = gflop
        r["floor_ms_per_eval"] = floor
        if r["status"] != "ok":
            continue
        ms_per_eval = 1e3 / r["evals_per_s"]
        r["pipeline_tflops"] = gflop * r["evals_per_s"] / 1e3
        r["denoise_tflops"] = gflop * r["denoise_evals_per_s"] / 1e3
        r["floor_fraction"] = floor / ms_per_eval if floor else None  # share of the floor's speed reached
        r["x_floor"] = ms_per_eval / floor if floor else None          # times slower than the floor
        for role, key in (("baseline-fp32", "vs_fp32"), ("baseline-reference", "vs_reference")):
            base = by_role[role].get(r["batch_size"])
            r[key] = r["evals_per_s"] / base["evals_per_s"] if base else None
            r[key + "_best"] = r["evals_per_s"] / best[role] if best[role] else None


GPU_CONSISTENCY = "see bench/gpu_consistency.py for equal-step accuracy"


def map_differences(rows: list[dict]) -> None:
    """Max |map| and |score| difference of every row against the fp32 baseline run on the same slices
    with the same noise: same batch size, step count and seed. Otherwise both are None and
    ``map_diff_note`` says why (``--fp32-steps`` gives the baseline other steps: its maps are another
    sampling of the chain, and their difference would not measure an engine's accuracy)."""
    ref = {r["batch_size"]: r for r in rows if r["role"] == "baseline-fp32" and r["status"] == "ok"}
    for r in rows:
        maps, scores = r.pop("_maps", None), r.pop("_scores", None)
        base = ref.get(r["batch_size"])
        r["max_abs_map_diff_vs_fp32"] = r["max_abs_score_diff_vs_fp32"] = r["map_diff_note"] = None
        if maps is None:
            continue
        if base is None:
            r["map_diff_note"] = f"no fp32 baseline row at batch {r['batch_size']}"
            continue
        if base["steps"] != r["steps"]:
            r["map_diff_note"] = (f"steps differ from the fp32 baseline ({r['steps']} against {base['steps']}, "
                                  f"--fp32-steps); {GPU_CONSISTENCY}")
            continue
        if base.get("seed") != r.get("seed") or base["_maps_keep"].shape != maps.shape:
            r["map_diff_note"] = f"not the fp32 baseline's slices and noise (seed or shape differ); {GPU_CONSISTENCY}"
            continue
        r["max_abs_map_diff_vs_fp32"] = float((maps - base["_maps_keep"]).abs().max())
        r["max_abs_score_diff_vs_fp32"] = float((scores - base["_scores_keep"]).abs().max())


# ---------------------------------------------------------------- main

class Report:
    """Rows so far plus the run's header; rewrites JSON and Markdown after every row, so a run cut short
    (``timeout --signal=INT``, ``--time-budget``) still leaves what it measured."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.machine, self.versions = machine_info(device), versions()
        self.date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.stem = f"throughput-{args.preset}-{device.type}-{self.date[:10]}"
        self.out = Path(args.out)
        self.floor, self.floor_note = floor_ms(args, self.machine)
        self.notes: list[str] = []
        self.rows: list[dict] = []
        self.gflop, self.flops_source = None, None

    def paths(self) -> list[Path]:
        return [self.out / f"{self.stem}{ext}" for ext in (".json", ".md", ".png")]

    def existing(self) -> list[Path]:
        return [p for p in self.paths() if p.exists()]

    def add(self, row: dict) -> None:
        if row["role"] == "baseline-fp32" and row["status"] == "ok":
            row["_maps_keep"], row["_scores_keep"] = row["_maps"], row["_scores"]
        self.rows.append(row)
        self.write(final=False)

    def build(self) -> dict:
        args = self.args
        rows = [dict(r) for r in self.rows]
        finish(rows, self.gflop, self.floor)
        map_differences(rows)
        for r in rows:
            r.pop("_maps_keep", None)
            r.pop("_scores_keep", None)
        notes = list(self.notes)
        load, load_end = self.machine["loadavg_start"], loadavg()
        if self.device.type == "cpu" and load and load[0] > 0.5 * (os.cpu_count() or 1):
            notes.append(f"the machine was busy (1-min load {load[0]} at the start, {load_end[0]} at the end, "
                         f"{os.cpu_count()} cores): CPU timings are inflated; min is the least disturbed figure.")
        meta = {"date": self.date, "command": "python " + shlex.join(sys.argv),
                "preset": args.preset, "image_channels": args.image_channels, "size": args.size,
                "steps": args.steps, "members": args.members, "repeats": args.repeats, "warmup": args.warmup,
                "batch_sizes": args.batch_sizes, "fp32_steps": args.fp32_steps or args.steps,
                "fp32_batch_sizes": args.fp32_batch_sizes or args.batch_sizes, "seed": args.seed,
                "threads": args.threads, "time_budget_s": args.time_budget, "gflop_per_eval": self.gflop,
                "flops_source": self.flops_source, "floor_ms_per_eval": self.floor, "floor_note": self.floor_note,
                "evals_per_paper_slice": EVALS_PER_PAPER_SLICE, "loadavg_end": load_end, "notes": notes}
        return {"schema": "condiff.bench.throughput/1", "meta": meta, "machine": self.machine,
                "versions": self.versions, "rows": rows}

    def write(self, final: bool) -> dict:
        report = self.build()
        self.out.mkdir(parents=True, exist_ok=True)
        if final:
            note = plot(report, self.out / f"{self.stem}.png")
            if note:
                self.notes.append(note)
                report["meta"]["notes"].append(note)
        (self.out / f"{self.stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        (self.out / f"{self.stem}.md").write_text(markdown(report))
        return report


def run(args, rep: Report) -> None:
    """Measure every planned row into ``rep``; engines are opened one at a time and freed after their rows."""
    device = rep.device
    deadline = time.perf_counter() + args.time_budget if args.time_budget else None
    specs, rep.notes = engine_specs(args, device)
    with tempfile.TemporaryDirectory(prefix="condiff-bench-") as tmp:
        model_dir, rep.gflop, rep.flops_source = build_model_dir(Path(tmp), args)
        memory = PeakMemory(device)
        for spec in specs:
            fp32 = spec.role == "baseline-fp32"
            batches = (args.fp32_batch_sizes if fp32 else None) or args.batch_sizes
            steps = (args.fp32_steps if fp32 else None) or args.steps
            base = {"engine": spec.engine, "precision": spec.precision, "role": spec.role, "label": spec.label,
                    "members": args.members, "steps": steps, "seed": args.seed, "machine": rep.machine,
                    "versions": rep.versions}
            den, build_s, skip = None, None, None
            try:
                if deadline is not None and time.perf_counter() > deadline:
                    raise Skip("not run: --time-budget spent")
                t0 = time.perf_counter()
                den, build_note = open_engine(spec, model_dir, device, max(batches), args.threads)
                build_s = time.perf_counter() - t0
                if build_note:
                    rep.notes.append(f"{spec.label}: {build_note}")
            except (Skip, BackendUnavailableError) as exc:
                skip = str(exc)
            except Exception as exc:  # a broken engine must not lose the baselines' numbers
                traceback.print_exc()
                skip = f"build failed: {type(exc).__name__}: {exc}"
            for batch in batches:
                row = {**base, "batch_size": batch, "build_s": build_s, "status": "skipped", "note": skip}
                if den is not None:
                    print(f"[bench] {spec.label} batch {batch} ...", file=sys.stderr, flush=True)
                    try:
                        row.update(measure(den, spec, batch, steps, args, device, memory, deadline))
                    except BudgetSpent as exc:
                        row["note"] = str(exc)
                    except KeyboardInterrupt:
                        row["note"] = "interrupted (SIGINT or timeout) during this row"
                        rep.add(row)
                        raise
                    except Exception as exc:
                        traceback.print_exc()
                        row["note"] = f"failed: {type(exc).__name__}: {exc}"
                rep.add(row)
            del den
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rep = Report(args, resolve_device(args.device))
    existing = rep.existing()
    if existing and not args.force:
        verb = "already exist" if len(existing) > 1 else "already exists"
        print(f"throughput.py: error: {', '.join(map(str, existing))} {verb} (a report of the same preset, device "
              "and day); nothing was run. Pass --force to overwrite, or another --out.", file=sys.stderr)
        return 2
    if existing:  # --force: the JSON and Markdown are rewritten after the first row; a stale plot goes now
        rep.paths()[2].unlink(missing_ok=True)
    rc = 0
    try:
        run(args, rep)
    except KeyboardInterrupt:
        rep.notes.append("the run was interrupted (SIGINT or timeout): rows not listed were not measured.")
        rc = 130
    report = rep.write(final=True)
    print(markdown(report))
    print(f"wrote {rep.out / rep.stem}.json, .md" + ("" if any("plot skipped" in n for n in rep.notes) else ", .png"),
          file=sys.stderr)
    if not any(r["role"].startswith("baseline") and r["status"] == "ok" for r in report["rows"]):
        print("throughput.py: error: no baseline row was measured (see the notes of the skipped rows), so the "
              "report has no reference to compare with", file=sys.stderr)
        rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
