"""Member folders from a training checkpoint's raw and EMA weights (the experiment in README.md).

    python checkpoint_members.py RUN_WORK_DIR BUNDLED_MEMBER OUT_PREFIX

RUN_WORK_DIR is a fold's ``train/fold<f>`` (``checkpoints/`` and ``best/``). Writes, stored fp16 with the
bundled member's config (same preprocessing and landmarks): ``OUT_PREFIX-raw`` (the optimiser's
weights at the newest checkpoint), ``OUT_PREFIX-ema`` (its EMA) and ``OUT_PREFIX-best`` (the best-EMA
weights the validation rule kept). Then ``bench/assemble_set.py`` makes sets of them.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from condiff.modelset import load_model, save_model
from condiff.train import checkpoint as ckpt

work, bundled, prefix = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
c = ckpt.load_checkpoint(ckpt.latest_checkpoint(work / "checkpoints"))
best_step = json.loads((work / "best" / "best.json").read_text())["step"]
weights = {
    "raw": ({k[6:]: v for k, v in c.tensors.items() if k.startswith("model/")}, c.step),
    "ema": ({k[4:]: v for k, v in c.tensors.items() if k.startswith("ema/")}, c.step),
    "best": (load_file(str(work / "best" / "ema.safetensors")), best_step),
}
for kind, (state, step) in weights.items():
    model, cfg = load_model(bundled)
    model.load_state_dict(state, strict=True)
    cfg = dataclasses.replace(cfg, trained={**cfg.trained, "steps": c.step, "weights_step": step,
                                            "snapshot": f"{work} {kind} weights at step {step}",
                                            "recipe": c.state["train_config"]})
    target = Path(f"{prefix}-{kind}")
    save_model(target, model, cfg, dtype=torch.float16)
    print(target, step)
