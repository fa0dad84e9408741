"""CPU eager denoising: rows side by side on one thread each against the old rows-in-turn on all threads.

The eager torch engine evaluates every row (slice) of a CPU batch as its own batch-1 call, so results
do not depend on batch size or packing. It used to run those calls one after another on all of
torch's threads; it now runs them side by side, one intra-op thread each. This measures, in one
run on random seeded networks, milliseconds per image for:

- ``rows-in-turn``: the old way (batch-1 calls in turn, torch's thread count),
- ``rows-side-by-side``: ``TorchDenoiser.denoise`` as shipped,
- ``whole-batch``: one call on the whole batch (fastest where it wins, but its rounding depends on
  the batch, which is why the engine does not do it), for reference;

and, with ``--pipeline MODEL_SET``, the whole restoration of 24 slices (3 scans' worth of the first
command) through ``run_slices`` at batch 16 and 50 DDPM steps, rows in turn against side by side.

    python bench/cpu_rows.py --out bench/results/cpu-row-threads-2026-12-07
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import loadavg, machine_info, versions  # noqa: E402

from condiff.config import preset  # noqa: E402
from condiff.engine.backends.torch_backend import TorchDenoiser  # noqa: E402
from condiff.unet import ConditionalUNet  # noqa: E402

CASES = {"tiny": (32, (1, 2, 8, 16)), "small": (64, (1, 2, 8)), "symmetric": (128, (1, 2))}


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(name: str, size: int, batches, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    net = ConditionalUNet(preset(name, 1, sample_size=size))
    den = TorchDenoiser(net, torch.device("cpu"), "fp32", max(batches))
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        x, c = torch.randn(batch, 1, size, size, generator=g), torch.rand(batch, 1, size, size, generator=g)
        t = torch.full((batch,), 500)

        def in_turn():
            with torch.inference_mode():
                return torch.cat([net(x[i:i + 1], c[i:i + 1], t[i:i + 1]) for i in range(batch)])

        def whole():
            with torch.inference_mode():
                return net(x, c, t)

        for label, fn in (("rows-in-turn", in_turn), ("rows-side-by-side", lambda: den.denoise(x, c, t)),
                          ("whole-batch", whole)):
            times = _timed(fn, repeats)
            med = statistics.median(times)
            rows.append({"preset": name, "size": size, "batch": batch, "way": label,
                         "ms_per_image": 1e3 * med / batch, "min_ms_per_image": 1e3 * min(times) / batch,
                         "max_ms_per_image": 1e3 * max(times) / batch, "repeats": repeats})
            print(f"{name:9s} {size:3d}px batch {batch:2d} {label:18s} {1e3 * med / batch:9.1f} ms/image", flush=True)
    return rows


class RowsInTurn(TorchDenoiser):
    """The engine before this change: batch-1 calls one after another on all of torch's threads."""

    def _rows(self, x_t, cond, t):
        with torch.inference_mode():
            return torch.cat([self.model(x_t[i:i + 1], cond[i:i + 1], t[i:i + 1]) for i in range(x_t.shape[0])])


def pipeline(model_set: Path, repeats: int, slices: int = 24, steps: int = 50) -> list[dict]:
    """Seconds for ``slices`` random slices x every member x ``steps`` DDPM steps, each way, same noise."""
    from condiff.engine.runner import SliceJob, run_slices
    from condiff.modelset import load_model, open_model_set
    from condiff.sampler import make_plan

    models = [load_model(d)[0] for d in open_model_set(model_set).member_dirs]
    size = models[0].config.sample_size
    g = torch.Generator().manual_seed(0)
    jobs = [SliceJob(torch.rand(1, size, size, generator=g), "bench", k) for k in range(slices)]
    plan = make_plan("ddpm", steps)
    rows, maps = [], {}
    for label, cls in (("rows-in-turn", RowsInTurn), ("rows-side-by-side", TorchDenoiser)):
        dens = [cls(m, torch.device("cpu"), "fp32", 16) for m in models]
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            maps[label] = run_slices(dens, jobs, plan, batch_size=16)
            times.append(time.perf_counter() - start)
        rows.append({"pipeline": str(model_set), "slices": len(jobs), "members": len(models), "steps": steps,
                     "way": label, "seconds": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "repeats": repeats})
        print(f"pipeline {label:18s} {statistics.median(times):7.2f} s", flush=True)
    diff = max(float((a.amap - b.amap).abs().max()) for a, b in zip(maps["rows-in-turn"], maps["rows-side-by-side"]))
    for r in rows:
        r["max_abs_map_diff_between_ways"] = diff  # rounding: the old way's calls ran on all threads
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pipeline", type=Path, default=None, metavar="MODEL_SET",
                   help="also time the whole restoration of 24 slices with this model set")
    p.add_argument("--pipeline-repeats", type=int, default=3)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_info(torch.device("cpu"))  # its load average is the one before the run
    rows = [r for name in args.presets for r in measure(name, *CASES[name], args.repeats)]
    whole = pipeline(args.pipeline, args.pipeline_repeats) if args.pipeline else []
    report = {"command": "python " + " ".join(sys.argv), "started": started,
              "machine": machine, "loadavg_end": loadavg(), "versions": versions(),
              "rows": rows, "pipeline": whole}
    (args.out / "cpu_rows.json").write_text(json.dumps(report, indent=1) + "\n")
    base = {(r["preset"], r["batch"]): r["ms_per_image"] for r in rows if r["way"] == "rows-in-turn"}
    lines = ["| preset | px | batch | way | ms/image (median) | min–max | speed-up vs rows-in-turn |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['size']} | {r['batch']} | {r['way']} | {r['ms_per_image']:.1f} | "
                     f"{r['min_ms_per_image']:.1f}–{r['max_ms_per_image']:.1f} | "
                     f"{base[r['preset'], r['batch']] / r['ms_per_image']:.2f}× |")
    if whole:
        lines += ["", f"Whole restoration ({whole[0]['pipeline']}: {whole[0]['slices']} slices x {whole[0]['members']} "
                  f"members x {whole[0]['steps']} DDPM steps, batch 16; maps of the two ways differ by at most "
                  f"{whole[0]['max_abs_map_diff_between_ways']:.1e}):", "",
                  "| way | s (median) | min–max | speed-up |", "|---|---|---|---|"]
        lines += [f"| {r['way']} | {r['seconds']:.2f} | {r['min_s']:.2f}–{r['max_s']:.2f} | "
                  f"{whole[0]['seconds'] / r['seconds']:.2f}× |" for r in whole]
    (args.out / "cpu_rows.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'cpu_rows.json'}, .md")


if __name__ == "__main__":
    main()
