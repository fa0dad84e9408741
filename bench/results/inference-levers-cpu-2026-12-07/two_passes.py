"""bench/quality.py with K restoration passes: each pass restores the previous restoration (the experiment in README.md).

    PASSES=2 python two_passes.py --models SET --data ../shared/data --out DIR --synthetic --steps 10 --device cpu

Pass k > 0 conditions on the previous restoration (clipped to [0, 1], the input's zero background
kept) and draws its noise spatially flipped; the map still compares the last restoration with the input.
"""
import os
import runpy
import sys
from pathlib import Path

import torch

import condiff.engine.runner as runner
from condiff.sampler import restore as restore_once

PASSES = int(os.environ.get("PASSES", "2"))


def restore_passes(denoise, cond, plan, noise, callback=None):
    foreground = (cond.float() != 0).float()
    x = cond.float()
    for k in range(PASSES):
        x = restore_once(denoise, x, plan, noise if k % 2 == 0 else torch.flip(noise, dims=[-1, -2]))
        x = x.clamp(0, 1) * foreground
    return x


runner.restore = restore_passes
sys.argv = ["quality.py"] + sys.argv[1:]
runpy.run_path(str(Path(__file__).resolve().parents[2] / "quality.py"), run_name="__main__")
