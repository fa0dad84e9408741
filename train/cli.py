"""``condiff-train``: train one model per fold on a folder of healthy scans and write a model set.

    condiff-train --data ../shared/data/ixi-t1 --mask-pattern '{dir}/{stem}_brainmask.nii.gz' \\
                  --preset small --fold all -o models/ixi-small [--max-steps N] [--time-budget-min M] [--resume]

Output (DESIGN §3): ``OUT/fold<f>/{config.json, model.safetensors}`` (the EMA weights of the best
validation checkpoint when validation ran, else the final EMA weights) and ``OUT/set.json``;
training state under ``OUT/train/``: ``cache/`` (preprocessed slices), and per fold
``fold<f>/{checkpoints/, best/, metrics.jsonl}``. A model folder is (re)written whenever a fold stops,
also on a time budget or a signal, so every time-boxed chunk leaves a usable set; ``--resume``
continues each fold exactly from its newest checkpoint. Under ``torchrun`` every rank trains its
share of each global batch; rank 0 writes.

Resume: every fold's checkpoints are checked before any fold trains (a fold with checkpoints needs
``--resume``; with it the checkpoint's network, preprocessing and training/validation subjects must be
this run's, else exit 2 naming what differs). The best EMA weights live in ``best/ema-<step>.safetensors``,
keyed by step: a resume exports the weights of the best step its checkpoint records, never those a
killed run validated after its last checkpoint. set.json is rewritten for the folds that finished even
when a later fold fails.

Signals: the first SIGINT or a SIGTERM ends the current step, checkpoints and writes the model
folders, then exits 130 / 143; a second SIGINT aborts at once.

Divergence: a NaN/Inf loss, gradient norm or weight (a learning rate too high) stops the run with exit 1,
naming the steps and the newest checkpoint (the last finite one; ``--resume`` with a lower ``--lr``
continues from it). The diverged fold's model folder is not written; set.json still lists the others.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import click

from condiff import __version__
from condiff.cli_common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, logging_to,
                                mask_pattern_option_check, run_command, verbose_option, version_option)
from condiff.errors import TrainingDataError

logger = logging.getLogger("condiff.train")


def _parse_folds(fold: str | None, folds: str | None) -> list[int]:
    from condiff.train.folds import N_FOLDS

    if fold and folds:
        raise click.UsageError("give --fold or --folds, not both")
    text = folds or fold or "0"
    if text == "all":
        return list(range(N_FOLDS))
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected 0..{N_FOLDS - 1}, 'all' or a comma list", param_hint="--fold") from None
    if not out or any(not 0 <= f < N_FOLDS for f in out) or len(set(out)) != len(out):
        raise click.BadParameter(f"{text!r}: folds must be distinct integers in 0..{N_FOLDS - 1}", param_hint="--fold")
    return out


def code_version() -> str:
    """condiff's version, plus the git commit when run from a checkout (read-only query)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
        if sha.returncode == 0 and sha.stdout.strip():
            return f"{__version__}+g{sha.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def effective_tasks(tasks: tuple[int, ...], has_other: bool, role: str) -> tuple[tuple[int, ...], list[dict]]:
    """Drop task 1 when no other data set is available (§10 D7); the substitution is returned for the record."""
    from condiff.train.tasks import OTHER_DSET_BLEND

    if OTHER_DSET_BLEND not in tasks or has_other:
        return tasks, []
    rest = tuple(t for t in tasks if t != OTHER_DSET_BLEND)
    return rest, [{"task": OTHER_DSET_BLEND, "role": role, "replaced_by": list(rest),
                   "reason": "no other data set given (--other-data); task 1 falls back to the remaining tasks"}]


def resolve_hooks(specs: tuple[str, ...]) -> list:
    """The factories named by ``--val-hook MODULE:FUNC``, imported now: a bad one is ``TrainingDataError``
    (exit 2) before any data are read, not a traceback after they were."""
    factories = []
    remedy = "give MODULE:FUNCTION of an importable module, e.g. --val-hook condiff.train.healing:val_hook"
    for spec in specs:
        module, _, func = spec.partition(":")
        if not module or not func:
            raise TrainingDataError(None, f"--val-hook {spec!r}: expected MODULE:FUNCTION", remedy)
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise TrainingDataError(None, f"--val-hook {spec!r}: cannot import module {module!r} ({exc})",
                                    remedy + " (is the module on PYTHONPATH?)") from None
        except Exception as exc:  # the module itself fails to import
            raise TrainingDataError(None, f"--val-hook {spec!r}: importing {module!r} failed "
                                          f"({type(exc).__name__}: {exc})", "fix the module") from None
        factory = getattr(mod, func, None)
        if factory is None:
            raise TrainingDataError(None, f"--val-hook {spec!r}: module {module!r} has no {func!r}", remedy)
        if not callable(factory):
            raise TrainingDataError(None, f"--val-hook {spec!r}: {module}.{func} is not callable", remedy)
        factories.append(factory)
    return factories


def _load_hooks(specs: tuple[str, ...], context: dict) -> list:
    return [factory(context) for factory in resolve_hooks(specs)]


class _StopFlag:
    """SIGTERM or a first SIGINT ask for a clean stop at the end of the current step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("signal %d: stopping after this step (checkpoint and model folder follow; rerun the same "
                       "command with --resume to continue)", signum)

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


def _fov_mm(value: float) -> float:
    """--fov-mm: 0 (the reference's crop) or a field of view the preprocessing contract accepts."""
    from condiff.preprocess import MAX_FOV_MM, MIN_FOV_MM

    if value != 0 and not MIN_FOV_MM <= value <= MAX_FOV_MM:
        raise click.BadParameter(f"{value:g} mm is outside {MIN_FOV_MM:g}..{MAX_FOV_MM:g} mm (0: the reference's crop)")
    return value


def _check_options(out: Path, *, lr, mask_weight, p_no_task, image_size: int, preset_name: str, precision: str,
                   device_name: str, val_hooks: tuple[str, ...] = (), cache_dir: str | None = None) -> None:
    """Option values that would fail only after the data are read: refuse them first (exit 2)."""
    import math

    from condiff.config import preset

    resolve_hooks(val_hooks)

    for name, value in (("--lr", lr), ("--mask-weight", mask_weight)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise TrainingDataError(None, f"{name} must be a positive number, not {value}")
    if p_no_task is not None and not 0.0 <= p_no_task <= 1.0:
        raise TrainingDataError(None, f"--p-no-task must be in [0, 1], not {p_no_task}")
    levels = len(preset(preset_name, image_channels=1, sample_size=max(image_size, 1)).block_out_channels)
    step = 2 ** (levels - 1)
    if image_size < step or image_size % step:
        raise TrainingDataError(None, f"--image-size {image_size} does not suit the {preset_name} preset "
                                      f"({levels} resolution levels)", f"use a multiple of {step}")
    if precision in ("fp16", "bf16"):
        import torch

        on_cuda = str(device_name).startswith("cuda") or (device_name in (None, "auto") and torch.cuda.is_available())
        if not on_cuda:
            raise TrainingDataError(None, f"--precision {precision} needs a CUDA device (got --device {device_name})",
                                    "use --precision fp32 on the CPU")
    if str(device_name).startswith("cuda"):  # before OUT/train is made: a refused run leaves nothing behind
        import torch

        if not torch.cuda.is_available():
            raise TrainingDataError(None, f"device {device_name} requested but CUDA is not available", "use --device cpu")
    from condiff.io.atomic import check_creatable

    check_creatable(out)
    if cache_dir:  # made when the first volume is cached, after OUT: a path that cannot be a folder fails now
        from condiff.errors import OutputConflictError
        from condiff.io.atomic import probe_creatable

        try:
            check_creatable(Path(cache_dir))
            probe_creatable(Path(cache_dir))  # what permissions do not tell: /proc, a read-only file system
        except OutputConflictError as exc:
            raise TrainingDataError(cache_dir, f"--cache-dir {exc.problem}", "give a folder that can be made "
                                                                            "and written") from None


def _load_newest_readable(trainer, root: Path) -> Path:
    """Load the newest checkpoint that reads back intact; a damaged newer one (a disk fault, a copy cut
    short) is reported and an older one taken: the resume is then exact from that older step."""
    from condiff.train import checkpoint as ckpt
    from condiff.train.checkpoint import CheckpointError

    found = ckpt.list_checkpoints(root)
    for k, (_, path) in enumerate(reversed(found)):
        try:
            trainer.load(path)
            return path
        except CheckpointError as exc:
            if k == len(found) - 1:
                what = "the only checkpoint" if len(found) == 1 else f"every checkpoint ({len(found)})"
                raise CheckpointError(root, f"{what} is damaged ({exc.path}: {exc.problem})",
                                      "copy the checkpoints again if you have them, or start afresh without "
                                      "--resume in another -o folder") from exc
            logger.warning("%s is damaged (%s); resuming from the checkpoint before it", path, exc.problem)
    raise AssertionError("unreachable: called with at least one checkpoint")


def _check_existing_members(out: Path, fold_list, unet_cfg, preprocessing: dict) -> None:
    """Never overwrite a trained model, and keep OUT one model set (one network shape and contract).

    ``OUT/fold<f>`` of a fold this run trains may be replaced only by the run that made it (its
    checkpoints under ``OUT/train/fold<f>``, with --resume); other ``fold*`` folders join this run's
    set.json, so their image size, channels and preprocessing must be this run's."""
    from condiff.modelset import read_config
    from condiff.train import checkpoint as ckpt

    for member in sorted(out.glob("fold*")):
        if not (member / "config.json").is_file():
            continue
        try:
            fold = int(member.name[4:])
        except ValueError:
            continue
        if fold in fold_list:
            if ckpt.latest_checkpoint(out / "train" / member.name / "checkpoints") is not None:
                continue  # this run's own export: --resume continues it (refused below without --resume)
            raise TrainingDataError(member, "already holds a trained model that this run would overwrite",
                                    "choose another -o folder (or move that model folder away first)")
        cfg = read_config(member)
        mismatch = [what for what, a, b in (
            ("image size", cfg.unet.sample_size, unet_cfg.sample_size),
            ("channels", cfg.image_channels, unet_cfg.image_channels),
            ("preprocessing", cfg.preprocessing, preprocessing)) if a != b]
        if mismatch:
            raise TrainingDataError(member, f"was trained with another {', '.join(mismatch)} than this run; "
                                            "OUT's set.json would join them into an unusable model set",
                                    "choose another -o folder for this run")


def _check_fold_checkpoints(out: Path, fold_list, resume: bool, contract: dict, data_split: dict,
                            copies: list[str] = ()) -> None:
    """Before any fold trains: a fold with checkpoints needs --resume, and with --resume the newest
    checkpoint's contract and training/validation subjects must be this run's (``check_resume_state``;
    ``Trainer.load`` checks again the checkpoint it actually reads). ``copies``: byte copies this run
    dropped; a run that trained on them (started before condiff dropped copies) resumes with --keep-copies."""
    from condiff.train import checkpoint as ckpt
    from condiff.train.loop import check_resume_state

    for fold in fold_list:
        work = out / "train" / f"fold{fold}"
        latest = ckpt.latest_checkpoint(work / "checkpoints")
        if latest is None:
            continue
        if not resume:
            raise TrainingDataError(work, "holds checkpoints of an earlier run",
                                    "pass --resume to continue it, or choose another output folder")
        try:
            state = json.loads((latest / ckpt.STATE).read_text())
        except (OSError, ValueError):
            continue  # damaged: the fold's resume reports it and falls back to an older checkpoint
        if isinstance(state, dict):
            try:
                check_resume_state(latest, state, contract, data_split)
            except TrainingDataError as exc:
                if not copies or "no longer in the data" not in exc.problem:
                    raise  # not what dropping a copy changes (a copy dropped is a subject gone from the data)
                raise TrainingDataError(exc.path, exc.problem + f"; this run drops byte-identical copies of other "
                                        f"scans ({', '.join(copies[:5])}{', ...' if len(copies) > 5 else ''})",
                                        "a run that trained on them (started before condiff dropped copies) "
                                        "resumes with --keep-copies") from exc


def _created_top(path: Path) -> Path | None:
    """The outermost folder of ``path`` that does not exist yet (what making ``path`` creates), or None."""
    path = Path(os.path.abspath(path))
    top = None
    while not path.exists() and not path.is_symlink():
        top, path = path, path.parent
    return top


def _export_fold(out: Path, fold_dir_name: str, model_cfg, trainer, result, weights_dtype) -> Path:
    """Write ``OUT/fold<f>`` from the best EMA weights (or the final EMA weights); never non-finite ones."""
    import torch

    from condiff.modelset import count_nonfinite, load_safetensors, save_model
    from condiff.unet import ConditionalUNet

    net = ConditionalUNet(model_cfg.unet)
    if result.best_path is not None:
        net.load_state_dict(load_safetensors(result.best_path), strict=True)
    else:
        net.load_state_dict({k: v.detach().cpu() for k, v in trainer.ema.state_dict().items()}, strict=True)
    bad = count_nonfinite(net.state_dict().values())
    if bad:  # fit() checks before every write; this guards weights written by an older condiff
        raise trainer.diverged_error(f"{bad} non-finite weights in {result.best_path or 'the final EMA'}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[weights_dtype]
    return save_model(out / fold_dir_name, net, model_cfg, dtype=dtype)


def train_command(**kw) -> int:
    """The command body (also callable from Python, with the options as keywords); returns the exit code.

    Option values, ``--val-hook`` modules, the data folder and ``--holdout`` against its subjects are checked
    before anything is created; then ``OUT/train`` is locked (rank 0), since two trainings of one output
    folder would overwrite each other's checkpoints. A configuration or data error before any fold trains
    removes what this run created (OUT or OUT/train, with the cache in it); folders that existed stay."""
    from condiff.errors import CondiffError
    from condiff.io.lock import OutputLock
    from condiff.train import data as tdata

    out = Path(kw["output"])
    _check_options(out, lr=kw.get("lr"), mask_weight=kw.get("mask_weight"), p_no_task=kw.get("p_no_task"),
                   image_size=kw["image_size"], preset_name=kw["preset_name"], precision=kw["precision"],
                   device_name=kw["device_name"], val_hooks=tuple(kw.get("val_hooks") or ()),
                   cache_dir=kw.get("cache_dir"))
    if kw.get("val_hooks") and kw["holdout"] == 0:
        logger.warning("--val-hook %s never runs: --holdout 0 holds out no subject, so nothing is validated",
                       " ".join(kw["val_hooks"]))
    # The data folder and --holdout against its subjects, before OUT is made (the last check after the
    # scans are read, in SliceSet.split_holdout, catches scans that give no slice).
    kw["copies"] = []
    kw["listed_cases"] = tdata.list_cases(kw["data"], keep_copies=kw.get("keep_copies", False),
                                          copies=kw["copies"])  # listed once: its warnings are printed once
    subjects = tdata.case_subjects(kw["listed_cases"])
    if kw["holdout"] >= len(subjects):
        raise TrainingDataError(kw["data"], f"holding out {kw['holdout']} of {len(subjects)} subjects leaves none "
                                            "to train on", "lower --holdout or add subjects")
    run = {"trained": False}
    if int(os.environ.get("RANK", "0")) != 0:
        return _train_command(**kw, run=run)
    from condiff.io.atomic import create_folder

    created = _created_top(out / "train")
    create_folder(out / "train")
    clean_up = False
    try:
        with OutputLock(out / "train") as lock:  # held elsewhere: exit 2 here, and nothing is cleaned up
            try:
                return _train_command(**kw, run=run)
            except CondiffError:
                # A configuration or data error before any training: leave nothing behind that this run
                # made (OUT/train and the cache in it); a folder that existed before is never touched.
                clean_up = created is not None and not run["trained"]
                if clean_up:  # the files while the lock is held; the folders once it is released
                    _remove_files_but(created, lock.path)
                raise
    finally:
        if clean_up:  # only folders left empty: a training that took the lock meanwhile keeps its own
            _remove_empty_folders(created)


def _remove_files_but(root: Path, keep: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path != keep and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True) + [root]:
        try:
            folder.rmdir()
        except OSError:  # not empty (another run's files), or gone
            pass


def _train_command(data: str, mask_pattern: str | None, modality: str, image_size: int, fov_mm: float | None,
                  normalisation: str, other_data: tuple[str, ...], other_mask_pattern: str | None, preset_name: str,
                  fold_list: list[int], output: str, resume: bool, max_steps: int, time_budget_min: float | None,
                  batch_size: int, device_name: str, precision: str, seed: int, holdout: int, checkpoint_every: int,
                  checkpoint_part_mb: float | None, val_every: int, val_start: int, val_max_slices: int | None,
                  patience: int, recipe: str, lr: float | None, mask_weight: float | None, p_no_task: float | None,
                  size_curriculum: str | None, workers: int | None, cache_dir: str | None, log_every: int, val_hooks: tuple[str, ...],
                  weights_dtype: str, progress: bool, landmarks: bool = False, lr_anneal: str | None = None,
                  run: dict | None = None, listed_cases: list | None = None, keep_copies: bool = False,
                  copies: list | None = None) -> int:
    """The training itself, under the lock ``train_command`` holds."""
    import numpy as np
    import torch

    from condiff.config import ModelConfig, preset
    from condiff.modelset import save_model_set
    from condiff.preprocess import PreprocessConfig
    from condiff.train import data as tdata
    from condiff.train.folds import fold_tasks
    from condiff.train.distributed import init_distributed, resolve_device
    from condiff.train.loop import Trainer, TrainingDivergedError, recipe_config
    from condiff.train.tasks import P_NO_TASK, ArrayPool, RestorationTask
    from condiff.train import checkpoint as ckpt
    from condiff.train.curriculum import SizeCurriculum, parse_size_curriculum
    from condiff.train.lr_anneal import parse_lr_anneal
    from condiff.unet import ConditionalUNet

    t_start = time.monotonic()
    run = {} if run is None else run  # run["trained"]: set once a fold starts training
    out = Path(output)
    device = resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingDataError(None, f"device {device_name} requested but CUDA is not available", "use --device cpu")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # the reference allows TF32 (§3)
        torch.backends.cudnn.allow_tf32 = True
    info = init_distributed(device)
    if workers is None:
        # The tasks run on the CPU (~5-30 ms a sample); a fast GPU step at batch 64 needs most cores.
        workers = min(16, max(0, (os.cpu_count() or 1) // max(1, info.world_size) - 1))

    if listed_cases is None:
        copies = []
        listed_cases = tdata.list_cases(data, keep_copies=keep_copies, copies=copies)
    cases = listed_cases
    if modality == "auto":
        modality = tdata.detect_modality(cases, data)
    if modality == "mri":
        pre = PreprocessConfig(modality="mri", image_size=image_size, fov_mm=fov_mm, normalisation=normalisation,
                               use_mask=bool(mask_pattern))
        if landmarks:
            fitted = tdata.fit_training_landmarks(cases, pre, mask_pattern, holdout)
            pre = dataclasses.replace(pre, landmarks=fitted)
            logger.info("intensity landmarks from %d training scans: %s", len(tdata._training_cases(cases, holdout)),
                        " ".join(f"{v:.3f}" for v in fitted))
    else:
        pre = PreprocessConfig(modality="rgb", image_size=image_size)
    cache = Path(cache_dir) if cache_dir else out / "train" / "cache"

    def load_all():
        s = tdata.load_slices(data, pre, mask_pattern=mask_pattern, cache_dir=cache, cases=cases)
        o = [tdata.load_source_pool(d, image_size, cache, other_mask_pattern, fov_mm) for d in other_data]
        return s, o

    if info.enabled and not info.is_main:
        torch.distributed.barrier()  # rank 0 fills the cache first
    slices, others = load_all()
    if info.enabled and info.is_main:
        torch.distributed.barrier()
    train_slices, val_slices = slices.split_holdout(holdout)
    if pre.landmarks is not None:
        tdata.check_landmark_subjects(cases, holdout, train_slices)
    other_pools = [ArrayPool(o.images) for o in others]
    channels = slices.channels
    # An explicit --size-curriculum (``none`` included) overrides the recipe's; absent, the recipe's stands.
    curriculum = parse_size_curriculum(size_curriculum) if size_curriculum is not None else None
    anneal = parse_lr_anneal(lr_anneal) if lr_anneal is not None else None
    cfg = recipe_config(recipe, lr=lr, mask_weight=mask_weight, p_no_task=p_no_task,
                        size_scale_start=curriculum.start if curriculum else None,
                        size_curriculum_steps=curriculum.steps if curriculum else None,
                        lr_anneal_start=anneal.start if anneal else None, lr_anneal_end=anneal.end if anneal else None,
                        lr_final_factor=anneal.final if anneal else None, max_steps=max_steps,
                        batch_size=batch_size, precision=precision, val_every=val_every, val_start=val_start,
                        val_max_slices=val_max_slices, patience=patience, checkpoint_every=checkpoint_every,
                        checkpoint_part_mb=checkpoint_part_mb, log_every=log_every, seed=seed, num_workers=workers)
    unet_cfg = preset(preset_name, image_channels=channels, sample_size=image_size)
    contract = {"unet": unet_cfg.to_dict(), "preprocessing": pre.to_dict()}
    data_split = {"train": train_slices.subjects, "validation": [] if val_slices is None else val_slices.subjects}
    if info.is_main:
        _check_existing_members(out, fold_list, unet_cfg, pre.to_dict())
    _check_fold_checkpoints(out, fold_list, resume, contract, data_split, copies or [])
    version = code_version()
    stop = _StopFlag()
    members, summary = [], []
    diverged: TrainingDivergedError | None = None
    finished = False
    try:
        with stop:
            for fold in fold_list:
                train_ids, val_ids = fold_tasks(fold)
                eff_train, subs = effective_tasks(train_ids, bool(other_pools), "train")
                eff_val, subs_val = effective_tasks(val_ids, bool(other_pools), "validation")
                fold_seed = int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])
                fold_cfg = type(cfg)(**{**cfg.to_dict(), "seed": fold_seed})
                work = out / "train" / f"fold{fold}"
                latest = ckpt.latest_checkpoint(work / "checkpoints")  # --resume: checked by _check_fold_checkpoints
                remaining = None
                if time_budget_min is not None:
                    remaining = time_budget_min * 60.0 - (time.monotonic() - t_start)
                    if info.enabled:  # every rank must take the same decision
                        r = torch.tensor([remaining], dtype=torch.float64, device=device)
                        torch.distributed.all_reduce(r, op=torch.distributed.ReduceOp.MIN)
                        remaining = float(r.item())
                    if remaining <= 0:
                        logger.warning("time budget used up; fold %d not started", fold)
                        summary.append({"fold": fold, "status": "not started (time budget)"})
                        continue
                    fold_cfg.time_budget_s = remaining
                train_task = RestorationTask(eff_train, p_no_task=fold_cfg.p_no_task, same_pool=ArrayPool(train_slices.images),
                                             other_pools=other_pools, has_background=modality == "mri")
                sizes = SizeCurriculum(fold_cfg.size_scale_start, fold_cfg.size_curriculum_steps)
                scale_at = sizes.epoch_scale(len(train_slices.images), batch_size * info.world_size) if sizes.active else None
                train_set = tdata.TaskSamples(train_slices.images, train_task, fold_seed, tdata.TRAIN_STREAM,
                                              centre=modality == "rgb", size_scale_at=scale_at)
                val_set = None
                if val_slices is not None:
                    # Validation keeps the reference's 20 % no-task rate whatever the recipe, so losses compare.
                    val_task = RestorationTask(eff_val, p_no_task=P_NO_TASK, same_pool=ArrayPool(val_slices.images),
                                               other_pools=other_pools, has_background=modality == "mri")
                    val_set = tdata.TaskSamples(val_slices.images, val_task, fold_seed, tdata.VAL_STREAM,
                                                centre=modality == "rgb")
                torch.manual_seed(fold_seed)
                model = ConditionalUNet(unet_cfg)
                hook_ctx = {"fold": fold, "val_tasks": val_ids, "val_images": None if val_slices is None else val_slices.images,
                            "modality": modality, "device": device, "seed": fold_seed, "other_pools": other_pools,
                            "preprocessing": pre.to_dict()}
                trainer = Trainer(model, fold_cfg, train_set, work, val_set=val_set, device=device, dist_info=info,
                                  hooks=_load_hooks(val_hooks, hook_ctx), progress=progress, stop=stop,
                                  contract=contract, data_split=data_split)
                if latest is not None:
                    latest = _load_newest_readable(trainer, work / "checkpoints")
                    trainer.truncate_metrics()
                    logger.warning("fold %d: resuming from %s (step %d)", fold, latest, trainer.step)
                    if trainer.step >= max_steps and trainer.finished != "early_stopping":
                        logger.warning("fold %d: nothing trained: its checkpoint is at step %d, --max-steps %d "
                                       "(absolute) is not above it; raise --max-steps to train on (the model "
                                       "folder is rewritten from the checkpoint's state)", fold, trainer.step, max_steps)
                run["trained"] = True
                try:
                    result = trainer.fit()
                    trained = {
                        "steps": result.steps, "wall_time_s": round(result.wall_time_s, 3), "stop_reason": result.reason,
                        "complete": result.reason in ("max_steps", "early_stopping"),
                        "weights": "ema-best" if result.best_path is not None else "ema-final",
                        "best_step": result.val.best_step, "best_val_ma": result.val.best,
                        "data": {"train": train_slices.describe(),
                                 "validation": None if val_slices is None else val_slices.describe(),
                                 "mask_pattern": mask_pattern, "holdout_subjects": holdout,
                                 "other_data": [o.describe() for o in others]},
                        "recipe": {"name": recipe, **fold_cfg.to_dict()},
                        "effective_train_tasks": list(eff_train), "effective_val_tasks": list(eff_val),
                        "substitutions": subs + subs_val, "code_version": version, "device": str(device),
                        "precision": trainer.precision, "world_size": info.world_size, "global_batch": trainer.global_batch,
                    }
                    model_cfg = ModelConfig(unet=unet_cfg, preprocessing=pre.to_dict(), fold=fold, train_tasks=list(train_ids),
                                            val_tasks=list(val_ids), trained=trained)
                    if info.is_main:
                        members.append(_export_fold(out, f"fold{fold}", model_cfg, trainer, result, weights_dtype))
                except TrainingDivergedError as exc:  # nothing non-finite was written; the other folds would follow
                    diverged = exc
                    summary.append({"fold": fold, "steps": trainer.step, "reason": "diverged", "diverged_steps": list(exc.steps),
                                    "best_step": trainer.val.best_step, "best_val_ma": trainer.val.best})
                    break
                summary.append({"fold": fold, "steps": result.steps, "reason": result.reason,
                                "best_step": result.val.best_step, "best_val_ma": result.val.best})
                if stop():
                    break
        finished = True
    finally:
        if info.is_main:
            existing = sorted({p.name for p in members} | {p.name for p in out.glob("fold*") if (p / "config.json").is_file()},
                              key=lambda n: int(n[4:]))
            try:
                if existing:
                    save_model_set(out, [out / n for n in existing], name=f"condiff {preset_name} on {Path(data).name}")
            except Exception as exc:
                if finished:
                    raise
                logger.warning("%s: set.json not rewritten (%s)", out, exc)  # the error that stopped training follows
            if finished:
                click.echo(json.dumps({"output": str(out), "members": existing, "folds": summary}, indent=1))
    if info.enabled:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if diverged is not None:
        if info.is_main:
            click.echo(f"error: {diverged.message}", err=True)
        return EXIT_FAILED
    if stop.signum == signal.SIGTERM:
        return EXIT_TERMINATED
    if stop.signum == signal.SIGINT:
        return EXIT_INTERRUPTED
    return EXIT_OK


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--data", required=True, type=click.Path(file_okay=False), help="Folder of healthy scans (NIfTI) or photographs.")
@click.option("--mask-pattern", default=None, callback=mask_pattern_option_check, help="Brain mask per volume, e.g. '{dir}/{stem}_brainmask.nii.gz' "
              "({dir}, {stem}, {base}, {case}, {casedir}, {root}, as condiff-infer --mask; e.g. a BIDS dataset's "
              "'{root}/derivatives/fmriprep/{casedir}/{base}_desc-brain_mask.nii.gz'); with it everything outside "
              "the mask is background.")
@click.option("--modality", type=click.Choice(["auto", "mri", "rgb"]), default="auto", show_default=True,
              help="mri: NIfTI volumes cut into slices; rgb: photographs; auto: from the files found.")
@click.option("--image-size", type=click.IntRange(16, 1024), default=128, show_default=True,
              help="Side of the square slices the network sees (the paper: 128); inference resamples to it.")
@click.option("--fov-mm", type=float, default=192.0, show_default=True, callback=lambda c, p, v: _fov_mm(v),
              help="In-plane field of view (MRI), 1 to 1000 mm; 0 = reference crop.")
@click.option("--normalisation", type=click.Choice(["percentile", "max"]), default="percentile", show_default=True,
              help="MRI intensity scaling ('max' is the reference's).")
@click.option("--landmarks/--no-landmarks", default=False, show_default=True,
              help="MRI, percentile: also standardise each scan's intensity histogram to landmarks fitted on the "
                   "training scans (Nyúl & Udupa), stored in the model (robust to contrast enhancement).")
@click.option("--other-data", multiple=True, type=click.Path(file_okay=False),
              help="Blending sources for task 1 (another image collection); repeatable. None: task 1 is dropped "
                   "and the substitution recorded.")
@click.option("--other-mask-pattern", default=None, callback=mask_pattern_option_check,
              help="Mask pattern for --other-data volumes.")
@click.option("--preset", "preset_name", type=click.Choice(["small", "compact", "tiny", "symmetric", "paper"]), default="small",
              show_default=True, help="Network size: paper is the reference UNet (72 M weights), small 3.2 M, "
                                      "compact 1.8 M, tiny for tests; symmetric: paper's widths without attention at 128 px.")
@click.option("--fold", default=None, help="0..9 or 'all' [default: 0].")
@click.option("--folds", default=None, help="Comma list, e.g. 0,3,6.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Model set folder to write.")
@click.option("--resume", is_flag=True, help="Continue each fold from its newest checkpoint under OUT/train.")
@click.option("--max-steps", type=click.IntRange(min=1), default=500_000, show_default=True,
              help="Optimizer steps per fold (absolute: a resumed fold stops at this step).")
@click.option("--time-budget-min", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop cleanly (checkpoint + model folders) when this much wall time is used, all folds together.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Per process.")
@click.option("--device", "device_name", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 autocast on CUDA, fp32 on the CPU; fp16 uses a GradScaler.")
@click.option("--seed", type=int, default=42, show_default=True,
              help="Seeds weights, data order and synthetic anomalies (each fold its own stream).")
@click.option("--keep-copies", is_flag=True,
              help="Train on byte-identical copies of a scan as separate cases (by default each is trained on once, "
                   "with a warning: a copy held out would validate on training data). For resuming runs started "
                   "before copies were dropped.")
@click.option("--holdout", type=click.IntRange(min=0), default=2, show_default=True,
              help="Last N subjects held out for validation, each with all its files (a subject: a BIDS sub-<label>, "
                   "else one file; 0: no validation, final EMA weights exported). A resume keeps the split.")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Steps between checkpoints under OUT/train (0: only the one at the end or when stopped).")
@click.option("--checkpoint-part-mb", type=click.FloatRange(min=0.001), default=None,
              help="Split checkpoint tensors into parts of at most this many MB (10^6 bytes), e.g. 16.")
@click.option("--val-every", type=click.IntRange(min=1), default=500, show_default=True,
              help="Steps between validations on the held-out subjects.")
@click.option("--val-start", type=click.IntRange(min=0), default=5000, show_default=True,
              help="First step that validates.")
@click.option("--val-max-slices", type=click.IntRange(min=1), default=None, help="Validate on a fixed subset.")
@click.option("--patience", type=click.IntRange(min=0), default=50_000, show_default=True,
              help="Stop a fold when this many steps passed since the best moving average (0.9) of the "
                   "validation loss.")
@click.option("--recipe", type=click.Choice(["reference", "healing"]), default="reference", show_default=True,
              help="reference: the paper's (lr 1e-4, 20% clean samples); healing: lr 4e-4, loss x10 inside the "
                   "anomaly masks, 5% clean samples, anomaly sizes x2 falling to the paper's by step 2,500.")
@click.option("--lr", type=float, default=None, help="Override the recipe's learning rate.")
@click.option("--lr-anneal", default=None, metavar="START:END[:FINAL]",
              help="Keep the learning rate up to step START, then a cosine fall to FINAL times it (default 0.01) "
                   "at step END (absolute steps, so a resumed run keeps the schedule; e.g. 38000:42000). "
                   "Default: constant, as the reference.")
@click.option("--mask-weight", type=float, default=None, help="Loss weight inside synthetic anomaly masks.")
@click.option("--p-no-task", type=click.FloatRange(0, 1), default=None, help="Share of uncorrupted training samples.")
@click.option("--size-curriculum", default=None, metavar="START:STEPS",
              help="Anomaly sizes stretched by START at step 0, falling linearly to the reference's at STEPS "
                   "(e.g. 2:4000); 'none' turns off a recipe's curriculum [healing: 2:2500, reference: none].")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Data-loader workers per process.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Preprocessed training volumes (.npy, keyed by file and preprocessing) [default: OUT/train/cache].")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps between lines of OUT/train/fold*/metrics.jsonl (loss, learning rate, speed).")
@click.option("--val-hook", "val_hooks", multiple=True, metavar="MODULE:FUNC",
              help="Extra validation metrics: FUNC(context) returns hook(step, ema_model) -> dict.")
@click.option("--weights-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Storage type of the exported model.safetensors (fp16 halves it; the bundled set's choice); "
                   "checkpoints stay fp32.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@verbose_option
@version_option
def main(verbose: int, fold: str | None, folds: str | None, fov_mm: float, **kw) -> None:
    """Train condiff fold models on healthy images and write a model set (the paper's training: synthetic
    anomalies the network learns to undo, one fold per 3-combination of the five tasks)."""
    fold_list = _parse_folds(fold, folds)
    from condiff.train.curriculum import parse_size_curriculum

    from condiff.train.lr_anneal import parse_lr_anneal

    for parse, name in ((parse_size_curriculum, "size_curriculum"), (parse_lr_anneal, "lr_anneal")):
        try:
            parse(kw.get(name))
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--" + name.replace("_", "-")) from None

    def body() -> int:
        with logging_to(verbose):
            return train_command(fold_list=fold_list, fov_mm=fov_mm or None, **kw)

    run_command(body, verbose)


if __name__ == "__main__":  # pragma: no cover
    main()
