"""The training loop: objective, optimiser, EMA, validation schedule, resume, DDP.

One step (reference-method §3), per process on its shard of the global batch:

    t ~ U{0 … 999}, eps = N(0, I) + 0.1·N(0, 1) per (sample, channel)   (drawn per sample, ``data.py``)
    x_t  = sqrt(ab_t)·x0 + sqrt(1 − ab_t)·eps                           (float32)
    eps^ = UNet([x_t, cond], t)                                          (bf16 autocast on CUDA, fp32 on CPU)
    loss = mean_b  w(t_b) · mean_CHW  m_bchw · (eps^ − eps)²             (float32, w = min-SNR γ=1)

with m = 1 everywhere for the reference recipe, and m = ``mask_weight`` inside the synthetic anomaly
mask for a recipe that pushes healing (``RECIPES``). AdamW (lr 1e-4, wd 1e-2), constant LR, global
grad-norm clip 1.0 (after unscaling under fp16), EMA update after every optimiser step.

Validation (§3, §10 D5): the EMA weights on the held-out subjects every ``val_every`` steps from
``val_start``; the moving average, best-checkpoint rule and early stopping live in ``validation.py``.

Distributed (torchrun, ``WORLD_SIZE`` > 1): every rank holds the same model, takes its own ``B``
samples of the global batch (``StepBatchSampler``), DDP averages gradients; validation is sharded and
summed, so every rank reaches the same decisions without a broadcast. Rank 0 writes all files.

Divergence (a learning rate too high): the loss and gradient norm, accumulated on the device, are
checked where they reach the host anyway (each log record, every ``log_every`` steps), the weights and
the EMA before every checkpoint or best-weights write and at the end of ``fit``. A NaN/Inf stops
training with ``TrainingDivergedError`` (reason ``diverged`` in metrics.jsonl's end record) and nothing
non-finite is written: the newest checkpoint stays the last finite one.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from condiff.config import ScheduleConfig
from condiff.errors import CondiffError, TrainingDataError
from condiff.modelset import count_nonfinite
from condiff.schedule import alpha_bar, min_snr_weight
from condiff.train import checkpoint as ckpt
from condiff.train.data import StepBatchSampler, TaskSamples, collate
from condiff.train.distributed import DistInfo, all_reduce_sum
from condiff.train.ema import EMA
from condiff.train.lr_anneal import LrAnneal
from condiff.train.validation import (ValHook, ValState, best_weights_path, prune_best, reconcile_best, run_hooks,
                                      should_validate, sum_val_loss, val_batches, val_record, write_best)

logger = logging.getLogger(__name__)

# Named recipes. "reference" is the paper's (§3). "healing" removes more of the synthetic anomalies at
# equal steps (CPU evidence, bench/results/recipes-cpu-2026-11-27/): the mask weight and the identity
# share were measured first (at lr 1e-4), the 4x learning rate on top of them; the GPU comparison is
# still to run. A resume that changes these values is logged (Trainer.load).
RECIPES: dict[str, dict[str, float | int]] = {
    "reference": {"lr": 1e-4, "mask_weight": 1.0, "p_no_task": 0.2},
    # size curriculum 2:2500 measured on the CPU (bench/results/curriculum-cpu-2026-12-04): heals sooner at
    # equal steps, most on the tasks a fold never trains on; off again by step 2,500
    "healing": {"lr": 4e-4, "mask_weight": 10.0, "p_no_task": 0.05,
                "size_scale_start": 2.0, "size_curriculum_steps": 2500},
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that shapes the optimisation (recorded in the model's ``trained`` block)."""

    max_steps: int = 500_000
    batch_size: int = 16                 # per process; global batch = batch_size × world size
    recipe: str = "reference"
    lr: float = 1e-4
    mask_weight: float = 1.0
    p_no_task: float = 0.2               # used by whoever builds the training RestorationTask
    size_scale_start: float = 1.0        # anomaly-size curriculum (train/curriculum.py): scale at step 0 …
    size_curriculum_steps: int = 0       # … falling linearly to 1 at this step (0: no curriculum)
    lr_anneal_start: int = 0             # learning rate constant up to this step (train/lr_anneal.py) …
    lr_anneal_end: int = 0               # … a cosine fall to lr × lr_final_factor at this step (0: no anneal)
    lr_final_factor: float = 0.01
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    snr_gamma: float = 1.0
    precision: str = "auto"              # auto: bf16 on CUDA, fp32 on CPU
    val_every: int = 500
    val_start: int = 5000
    val_batch_size: int = 40
    val_max_slices: int | None = None    # a fixed, evenly spaced subset of the held-out slices
    ma_alpha: float = 0.9
    patience: int = 50_000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    checkpoint_part_mb: float | None = None
    log_every: int = 50
    time_budget_s: float | None = None
    seed: int = 42
    num_workers: int = 0

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.batch_size < 1 or self.max_steps < 0:
            raise ValueError("batch_size must be >= 1 and max_steps >= 0")
        if self.mask_weight <= 0:
            raise ValueError(f"mask_weight must be > 0, got {self.mask_weight}")
        self.betas = tuple(self.betas)
        self.anneal  # validates the anneal

    @property
    def anneal(self) -> LrAnneal:
        return LrAnneal(self.lr_anneal_start, self.lr_anneal_end, self.lr_final_factor)

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimiser step taken after ``step`` completed steps."""
        return self.lr * self.anneal.factor(step)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d


RECIPE_KEYS = ("recipe", "lr", "mask_weight", "p_no_task", "size_scale_start", "size_curriculum_steps",
               "lr_anneal_start", "lr_anneal_end", "lr_final_factor", "weight_decay", "betas", "grad_clip", "snr_gamma")


def recipe_changes(before: dict, now: dict) -> str:
    """'lr 0.0001 -> 0.0004, …' for the optimisation settings that differ (a resume with another recipe)."""
    return ", ".join(f"{k} {before[k]} -> {now[k]}" for k in RECIPE_KEYS
                     if k in before and k in now and before[k] != now[k])


def contract_changes(before: dict | None, now: dict | None) -> str:
    """'network (sample_size), preprocessing (normalisation, fov_mm)' where a checkpoint's recorded contract
    and this run's differ; '' when either is unknown or they agree. Landmark values are fitted on the data
    and may move with it (a data change is warned about separately)."""
    if not before or not now:
        return ""
    parts = []
    for key, label in (("unet", "network"), ("preprocessing", "preprocessing")):
        a, b = dict(before.get(key) or {}), dict(now.get(key) or {})
        if key == "preprocessing":
            a["landmarks"], b["landmarks"] = a.get("landmarks") is not None, b.get("landmarks") is not None
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if keys:
            parts.append(f"{label} ({', '.join(keys)})")
    return ", ".join(parts)


def _names(items, limit: int = 8) -> str:
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def split_changes(before: dict | None, now: dict | None) -> str:
    """'trained on, now held out: sub-03; …' where a checkpoint's training/validation subjects and this run's
    differ; '' when either is unknown or they agree."""
    if not before or not now:
        return ""
    bt, bv = set(before.get("train") or ()), set(before.get("validation") or ())
    nt, nv = set(now.get("train") or ()), set(now.get("validation") or ())
    if (bt, bv) == (nt, nv):
        return ""
    parts = []
    for moved, what in ((bt & nv, "trained on, now held out for validation"),
                        (bv & nt, "held out for validation, now trained on"),
                        ((bt | bv) - (nt | nv), "no longer in the data"),
                        ((nt | nv) - (bt | bv), "new in the data")):
        if moved:
            parts.append(f"{what}: {_names(moved)}")
    return "; ".join(parts)


def check_resume_state(path: str | Path, state: dict, contract: dict | None, data_split: dict | None) -> None:
    """Refuse (``TrainingDataError``, exit 2) to continue a checkpoint's ``state`` with another network or
    preprocessing contract, or with other training/validation subjects (the model card would misstate what
    was trained on). A checkpoint of an older condiff that records no subjects is warned about only."""
    changed = contract_changes(state.get("contract"), contract)
    if changed:
        raise TrainingDataError(path, f"was trained with another {changed} than this run asks for",
                                "resume with the run's original options, or start a new run in another folder")
    moved = split_changes(state.get("data_split"), data_split)
    if moved:
        raise TrainingDataError(path, f"was trained on other subjects than this run would use ({moved})",
                                "resume with the run's original --data and --holdout, or start a new run in "
                                "another -o folder")
    if data_split is not None and state.get("data_split") is None:
        logger.warning("%s records no training and validation subjects (an older condiff): the split cannot be "
                       "checked; the model card lists this run's", path)


def recipe_config(recipe: str, **overrides) -> TrainConfig:
    """A ``TrainConfig`` from a named recipe; explicit keyword values (not None) override the recipe."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    return TrainConfig(recipe=recipe, **values)


# ------------------------------------------------------------------------------------------ objective


def diffusion_loss(model: nn.Module, batch: dict[str, torch.Tensor], alpha_bar_table: torch.Tensor,
                   snr_gamma: float = 1.0, mask_weight: float = 1.0,
                   autocast_dtype: torch.dtype | None = None,
                   memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar loss, per-sample weighted loss (B,)) for one batch already on the model's device.

    ``batch``: x0, cond, eps (B, C, H, W) float32; t (B,) int64; mask (B, H, W) bool.
    """
    x0, cond, eps, t = batch["x0"], batch["cond"], batch["eps"], batch["t"]
    ab = alpha_bar_table[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * eps
    x_t = x_t.contiguous(memory_format=memory_format)
    cond = cond.contiguous(memory_format=memory_format)
    with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        eps_hat = model(x_t, cond, t)
    err = (eps_hat.float() - eps) ** 2
    if mask_weight != 1.0:
        weight = 1.0 + (mask_weight - 1.0) * batch["mask"].to(err.dtype).unsqueeze(1)
        err = err * weight
    per_sample = min_snr_weight(t, alpha_bar_table, snr_gamma) * err.mean(dim=(1, 2, 3))
    return per_sample.mean(), per_sample


# ------------------------------------------------------------------------------------------ result


class TrainingDivergedError(CondiffError):
    """The loss, the gradient norm or the weights became NaN/Inf; names the run's metrics.jsonl, the steps
    and the newest (finite) checkpoint. ``steps``: (first, last) step of the window where it was seen."""

    def __init__(self, path, problem: str, hint: str | None = None, steps: tuple[int, int] = (0, 0)):
        super().__init__(path, problem, hint)
        self.steps = steps


@dataclass
class FitResult:
    steps: int
    reason: str                     # max_steps | early_stopping | time_budget | signal (diverged: raised)
    wall_time_s: float
    val: ValState
    best_path: Path | None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Owns the model, its EMA, the optimiser and all state that a checkpoint must restore.

    ``train_set`` / ``val_set``: ``TaskSamples``. ``work_dir``: checkpoints, ``best/`` and
    ``metrics.jsonl`` (rank 0 writes). ``hooks``: extra validation metrics, each called on rank 0 as
    ``hook(step, ema_module) -> dict`` at every validation and logged with it (the healing metric).
    ``stop``: a callable polled after every step (e.g. set by SIGTERM) that ends training cleanly.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, train_set: TaskSamples, work_dir: str | Path,
                 val_set: TaskSamples | None = None, device: torch.device | str = "cpu",
                 dist_info: DistInfo = DistInfo(), hooks: Sequence[ValHook] = (), progress: bool = False,
                 stop: Callable[[], bool] | None = None, schedule: ScheduleConfig = ScheduleConfig(),
                 contract: dict | None = None, data_split: dict | None = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dist = dist_info
        self.work_dir = Path(work_dir)
        self.train_set, self.val_set = train_set, val_set
        self.hooks = list(hooks)
        self.contract = contract  # network config and preprocessing: a resume must keep them
        self.data_split = data_split  # {"train": [subjects], "validation": [subjects]}: a resume must keep them
        self.progress = progress
        self.stop = stop or (lambda: False)
        cuda = self.device.type == "cuda"
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
        if precision == "fp16" and not cuda:
            raise ValueError("fp16 training needs CUDA (GradScaler); use fp32 or bf16 on the CPU")
        self.precision = precision
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        self.ema = EMA(self.model)
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if cuda else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.alpha_bar = alpha_bar(schedule).to(self.device)
        self.step = 0
        self.position = 0           # data-order state: samples consumed from the training stream
        self.val = ValState()
        self.elapsed_before = 0.0   # wall time of earlier runs of this training (resume)
        self.finished: str | None = None
        self._finite_step = 0       # the last step whose loss, gradient norm or weights were seen finite
        self.sampler = StepBatchSampler(len(train_set), cfg.batch_size, cfg.seed, 0, dist_info.rank,
                                        dist_info.world_size)

    # ----------------------------------------------------------------------------- one step
    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.dist.world_size

    def batch_at(self, step_offset: int = 0) -> dict[str, torch.Tensor]:
        """This rank's batch for step ``self.step + step_offset`` (for tests and tools; ``fit`` streams)."""
        keys = self.sampler.keys_at(self.position + step_offset * self.global_batch + self.dist.rank * self.cfg.batch_size,
                                    self.cfg.batch_size)
        return collate([self.train_set[k] for k in keys])

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Zero gradients, compute the loss and back-propagate (DDP averages gradients). Returns the loss."""
        self.optimizer.zero_grad(set_to_none=True)
        self.net.train()
        loss, _ = diffusion_loss(self.net, self._to_device(batch), self.alpha_bar, self.cfg.snr_gamma,
                                 self.cfg.mask_weight, self.autocast_dtype, self.memory_format)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def optimizer_step(self) -> torch.Tensor:
        """Unscale, clip, step, advance the step counter and update the EMA. Returns the gradient norm."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        for group in self.optimizer.param_groups:  # set every step: a resume needs no scheduler state
            group["lr"] = self.cfg.lr_at(self.step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        self.position += self.global_batch
        return norm.detach()

    # ----------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> float:
        """Mean per-sample validation loss of the EMA weights at the current step (all ranks agree)."""
        cfg = self.cfg
        mine = val_batches(len(self.val_set), self.step, cfg.val_batch_size, cfg.val_max_slices, self.dist.rank,
                           self.dist.world_size)

        def per_sample_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return diffusion_loss(self.ema.module, self._to_device(batch), self.alpha_bar, cfg.snr_gamma, 1.0,
                                  self.autocast_dtype, self.memory_format)[1]

        total, count = sum_val_loss(self.val_set, mine, per_sample_loss, cfg.num_workers)
        total, count = all_reduce_sum([total, count], self.dist, self.device)
        return total / max(count, 1)

    # ----------------------------------------------------------------------------- state
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"ema/{k}": v for k, v in self.ema.state_dict().items()})
        opt_t, opt_meta = ckpt.optimizer_to_flat(self.optimizer)
        tensors.update(opt_t)
        rng_t, rng_meta = ckpt.rng_state()
        tensors.update(rng_t)
        meta = {
            "step": self.step, "ema_updates": self.ema.n_updates, "optimizer": opt_meta,
            "scaler": self.scaler.state_dict(), "rng": rng_meta,
            "data_order": {"position": self.position, "seed": self.cfg.seed, "n": len(self.train_set),
                           "global_batch": self.global_batch},
            "val": asdict(self.val), "elapsed_s": self.elapsed_before + self._run_time(),
            "finished": self.finished, "train_config": self.cfg.to_dict(), "world_size": self.dist.world_size,
            "contract": self.contract, "data_split": self.data_split,
        }
        return tensors, meta

    def load(self, path: str | Path) -> None:
        """Restore everything from a checkpoint folder (exact resume)."""
        c = ckpt.load_checkpoint(path)
        s = c.state
        check_resume_state(path, s, self.contract, self.data_split)
        model = {k[6:]: v for k, v in c.tensors.items() if k.startswith("model/")}
        ema = {k[4:]: v for k, v in c.tensors.items() if k.startswith("ema/")}
        try:
            self.model.load_state_dict(model, strict=True)
        except RuntimeError as exc:  # checkpoints written before the contract was recorded
            first = str(exc).strip().splitlines()[-1].strip()[:160]
            raise TrainingDataError(path, f"holds another network than this run's --preset/--image-size ({first})",
                                    "resume with the run's original options") from None
        self.ema.load_state_dict(ema, s["ema_updates"])
        # CPU tensors: load_state_dict moves the moments to each parameter's device and keeps the
        # step counters where AdamW expects them (on the CPU unless capturable/fused).
        ckpt.optimizer_from_flat(self.optimizer, {k: v for k, v in c.tensors.items() if k.startswith("optim/")},
                                 s["optimizer"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        ckpt.set_rng_state(c.tensors, s["rng"])
        self.step = int(s["step"])
        self._finite_step = self.step
        order = s["data_order"]
        if order["n"] != len(self.train_set) or order["seed"] != self.cfg.seed:
            logger.warning("%s: the training data or seed changed since this checkpoint; the data order differs", path)
        if order["global_batch"] != self.global_batch:
            logger.warning("%s: global batch %d differs from the checkpoint's %d; the resume is not exact",
                           path, self.global_batch, order["global_batch"])
        changed = recipe_changes(s.get("train_config") or {}, self.cfg.to_dict())
        if changed:
            logger.warning("%s: the optimisation changed since this checkpoint (%s); training goes on with the new "
                           "values", path, changed)
        self.position = int(order["position"])
        self.val = ValState(**s["val"])
        self.elapsed_before = float(s["elapsed_s"])
        self.finished = s.get("finished")
        self._reconcile_best()

    def _reconcile_best(self) -> None:
        """Drop best weights this state does not know (rank 0): see ``validation.reconcile_best``."""
        if not self.dist.is_main:
            return
        for p in reconcile_best(self.work_dir, self.step, self.val):
            logger.warning("%s: discarded; written after step %d by a run that stopped before checkpointing it "
                           "(the best weights are those of step %s)", p, self.step, self.val.best_step)

    def save(self, barrier: bool = True) -> Path | None:
        """Write a checkpoint of the current step (rank 0) and prune old ones. Non-finite weights are never
        written (``TrainingDivergedError``, on every rank: the replicas agree), so the newest checkpoint
        stays a usable one."""
        self.check_weights()
        path = None
        if self.dist.is_main:
            tensors, meta = self.state()
            part = None if not self.cfg.checkpoint_part_mb else int(self.cfg.checkpoint_part_mb * ckpt.MB)
            path = ckpt.save_checkpoint(self.work_dir / "checkpoints", self.step, tensors, meta, part)
            ckpt.prune_checkpoints(self.work_dir / "checkpoints", self.cfg.keep_checkpoints)
            prune_best(self.work_dir, self._best_steps_in_use())
        if barrier and self.dist.enabled:
            dist.barrier()
        return path

    def _best_steps_in_use(self) -> set[int]:
        """The best steps of the live state and of every kept checkpoint (a damaged newer one may send a
        resume back to an older checkpoint, whose best weights must then still exist)."""
        steps = {self.val.best_step}
        for _, path in ckpt.list_checkpoints(self.work_dir / "checkpoints"):
            try:
                steps.add(json.loads((path / ckpt.STATE).read_text())["val"]["best_step"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return {s for s in steps if s is not None}

    # ----------------------------------------------------------------------------- divergence
    def diverged_error(self, what: str) -> TrainingDivergedError:
        """The error for a NaN/Inf first seen now, in the steps since the last finite sighting."""
        first, last = min(self._finite_step + 1, self.step), self.step
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        found = ckpt.list_checkpoints(self.work_dir / "checkpoints")
        hint = "rerun with a lower --lr (e.g. a tenth)"
        if found:
            step, path = found[-1]
            hint += (f": with --resume it continues from the newest checkpoint, {path.name} (step {step}, finite "
                     "weights); should that diverge again, start afresh in another -o folder")
        else:
            hint += "; no checkpoint was written"
        return TrainingDivergedError(self.work_dir / "metrics.jsonl",
                                     f"training diverged: {what} in {steps} (learning rate {self.cfg.lr:g})", hint,
                                     steps=(first, last))

    def _check_record(self, record: dict) -> None:
        """Raise when a train record's mean loss or gradient norm is NaN/Inf. Under fp16 the GradScaler skips
        steps whose gradients overflow (routine while it calibrates): the gradient norm is not judged there."""
        bad = [f"{name} {record[key]}" for key, name in (("loss", "mean loss"), ("grad_norm", "gradient norm"))
               if not math.isfinite(record[key]) and (key == "loss" or self.precision != "fp16")]
        if bad:
            raise self.diverged_error(" and ".join(bad))
        self._finite_step = self.step

    def check_weights(self, ema_only: bool = False) -> None:
        """Raise when the weights (and the EMA weights) hold NaN/Inf; one host sync each."""
        for what, module in ((("EMA weights", self.ema.module),) if ema_only else
                             (("weights", self.model), ("EMA weights", self.ema.module))):
            bad = count_nonfinite(module.state_dict().values())
            if bad:
                raise self.diverged_error(f"{bad} non-finite {what}")
        if not ema_only:
            self._finite_step = self.step

    # ----------------------------------------------------------------------------- fit
    def _run_time(self) -> float:
        return time.monotonic() - self._t0 if hasattr(self, "_t0") else 0.0

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with open(self.work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_metrics(self) -> None:
        """Drop log records newer than the current step (written by a run that died after its checkpoint)."""
        path = self.work_dir / "metrics.jsonl"
        if not self.dist.is_main or not path.is_file():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue
        path.write_text("".join(line + "\n" for line in keep))

    def _log_train(self, acc: dict) -> dict:
        """Log the mean loss and gradient norm since the last record (all ranks take part), then reset.
        A non-finite mean is logged, then raised (``TrainingDivergedError``): this is where the device's
        sums reach the host, so the check costs no extra sync."""
        n = acc["n"]
        loss, norm = all_reduce_sum([acc["loss"].item() / n, acc["norm"].item() / n], self.dist, self.device)
        dt = time.monotonic() - acc["t"]
        record = {"kind": "train", "step": self.step, "loss": loss / self.dist.world_size,
                  "grad_norm": norm / self.dist.world_size, "lr": self.optimizer.param_groups[0]["lr"],
                  "ema_decay": self.ema.last_decay, "images_per_s": n * self.global_batch / max(dt, 1e-9),
                  "elapsed_s": self.elapsed_before + self._run_time()}
        self._log(record)
        acc["loss"].zero_(), acc["norm"].zero_()
        acc["n"], acc["t"] = 0, time.monotonic()
        self._check_record(record)
        return record

    def _should_validate(self) -> bool:
        return self.val_set is not None and should_validate(self.step, self.cfg.val_start, self.cfg.val_every)

    def _run_validation(self) -> dict:
        """Validate, update the moving average, write a new best (rank 0), run the hooks (rank 0), log."""
        t0 = time.monotonic()
        loss = self.validate()
        if not math.isfinite(loss):  # all ranks agree (summed): the EMA is poisoned, never a best
            raise self.diverged_error(f"validation loss {loss} of the EMA weights")
        improved = self.val.update(loss, self.step, self.cfg.ma_alpha)
        record = val_record(self.step, loss, self.val, improved)
        if improved:
            self.check_weights(ema_only=True)
        if self.dist.is_main:
            if improved:
                write_best(self.work_dir, self.ema.state_dict(), self.step, self.val)
            record.update(run_hooks(self.hooks, self.step, self.ema.module))
        record["val_time_s"] = time.monotonic() - t0
        record["elapsed_s"] = self.elapsed_before + self._run_time()
        self._log(record)
        return record

    def _stop_requested(self) -> str | None:
        reason = None
        if self.stop():
            reason = "signal"
        elif self.cfg.time_budget_s is not None and self._run_time() >= self.cfg.time_budget_s:
            reason = "time_budget"
        if self.dist.enabled:  # all ranks stop together
            code = {None: 0, "time_budget": 1, "signal": 2}[reason]
            flag = torch.tensor([code], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            reason = {0: None, 1: "time_budget", 2: "signal"}[int(flag.item())]
        return reason

    def fit(self) -> FitResult:
        """Train from the current state to ``max_steps``, early stopping, the time budget or a stop request.

        Always ends with a checkpoint of the last step (rank 0), unless training diverged: then the end
        record says so, no checkpoint is written and ``TrainingDivergedError`` is raised.
        """
        cfg = self.cfg
        self._t0 = time.monotonic()
        self._reconcile_best()  # a fresh start keeps no best weights of an earlier run that never checkpointed
        if self.finished == "early_stopping":
            return FitResult(self.step, "early_stopping", self.elapsed_before, self.val, self._best_path())
        self.finished = None
        start_step = self.step
        self.sampler = StepBatchSampler(len(self.train_set), cfg.batch_size, cfg.seed, self.position, self.dist.rank,
                                        self.dist.world_size)
        loader = torch.utils.data.DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=collate, num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda", prefetch_factor=4 if cfg.num_workers else None,
            persistent_workers=False)
        bar = None
        if self.progress and self.dist.is_main:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, file=sys.stderr, unit="step", dynamic_ncols=True,
                       disable=not sys.stderr.isatty())
        reason = "max_steps"
        acc = {"loss": torch.zeros((), device=self.device), "norm": torch.zeros((), device=self.device),
               "n": 0, "t": time.monotonic()}
        saved_at = None
        self._finite_step = self.step
        it = iter(loader)
        try:
            while self.step < cfg.max_steps:
                batch = next(it)
                acc["loss"] += self.forward_backward(batch)
                acc["norm"] += self.optimizer_step()
                acc["n"] += 1
                if bar is not None:
                    bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    record = self._log_train(acc)
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", ma=f"{self.val.ma:.4g}" if self.val.ma else "-")
                if self._should_validate():
                    self._run_validation()
                    if self.val.patience_exceeded(self.step, cfg.patience):
                        reason = "early_stopping"
                        self.finished = reason
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save()
                    saved_at = self.step
                if reason == "early_stopping":
                    break
                # Under DDP the stop flag is all-reduced, a host sync: poll every 10 steps there.
                stop = self._stop_requested() if not self.dist.enabled or self.step % 10 == 0 else None
                if stop:
                    reason = stop
                    break
        except TrainingDivergedError as exc:
            self._log_diverged(exc)
            raise
        finally:  # an exception mid-step may leave a torn state: it is never checkpointed
            del it
            if bar is not None:
                bar.close()
        try:
            if acc["n"]:
                self._log_train(acc)
            if reason == "max_steps":
                self.finished = reason
            if saved_at != self.step and (self.step != start_step or not ckpt.list_checkpoints(self.work_dir / "checkpoints")):
                self.save()
        except TrainingDivergedError as exc:
            self._log_diverged(exc)
            raise
        wall = self.elapsed_before + self._run_time()
        self._log({"kind": "end", "step": self.step, "reason": reason, "elapsed_s": wall,
                   "best_step": self.val.best_step, "best_ma": self.val.best})
        return FitResult(self.step, reason, wall, self.val, self._best_path())

    def _log_diverged(self, exc: TrainingDivergedError) -> None:
        self._log({"kind": "end", "step": self.step, "reason": "diverged", "problem": exc.problem,
                   "elapsed_s": self.elapsed_before + self._run_time(), "best_step": self.val.best_step,
                   "best_ma": self.val.best})

    def _best_path(self) -> Path | None:
        return best_weights_path(self.work_dir, self.val)


def bit_equal(a: nn.Module, b: nn.Module) -> bool:
    """True when two modules hold bit-identical parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
