"""Member folders from the best-EMA weights of earlier training states (the experiment in README.md).

    python snapshot_members.py STATES_ROOT BUNDLED_SET OUT

STATES_ROOT holds ``continued-*/train-state/fold<f>/best/{best.json,ema.safetensors}`` (restored from
git with ``git archive``, see ../ARCHIVED.md); each becomes ``OUT/fold<f>-<step>`` with the bundled
member's config (same preprocessing and landmarks), stored fp16. Then ``bench/assemble_set.py`` makes a set.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from condiff.modelset import load_model, save_model

states, bundled, out = (Path(a) for a in sys.argv[1:4])
out.mkdir(exist_ok=True)
for best in sorted(states.glob("continued-*/train-state/fold*/best")):
    fold = best.parent.name
    step = json.loads((best / "best.json").read_text())["step"]
    target = out / f"{fold}-{step}"
    if target.exists():  # fold9's best EMA did not move after 31,500: one member, not two
        continue
    model, cfg = load_model(bundled / fold)
    model.load_state_dict(load_file(str(best / "ema.safetensors")), strict=True)
    cfg = dataclasses.replace(cfg, trained={**cfg.trained, "best_step": step,
                                            "snapshot": f"{best.parts[-4]} best EMA"})
    save_model(target, model, cfg, dtype=torch.float16)
    print(target)
