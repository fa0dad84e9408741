"""bench/quality.py with left-right flip test-time augmentation: mean of restore(y) and flip(restore(flip(y)))."""
import runpy, sys
from pathlib import Path
import torch
import condiff.engine.runner as runner
from condiff.sampler import restore as restore_once

def restore_flip(denoise, cond, plan, noise, callback=None):
    a = restore_once(denoise, cond, plan, noise)
    b = torch.flip(restore_once(denoise, torch.flip(cond, dims=[-1]), plan, torch.flip(noise, dims=[-1])), dims=[-1])
    return (a + b) / 2

runner.restore = restore_flip
sys.argv = ["quality.py"] + sys.argv[1:]
runpy.run_path(str(Path(__file__).resolve().parents[2] / "quality.py"), run_name="__main__")
