"""The per-case flow: read -> preprocess -> run_slices over all members -> invert -> write.

``process_cases(cases, ctx)`` is the unit every scheduler calls: the CLI with all cases (or
one shard), a Ray actor with one case at a time. Cases are taken in groups (until a group
holds ``group_slices`` slices) so that slices of many small cases share device batches;
the runner's fixed-shape batches keep each row independent of its neighbours, so grouping
never changes a result. Within a group every case either gets all its outputs and then its
record, or fails alone: its reason is recorded (``records/<case>.json`` with status
``failed``) and stale outputs are removed. An interruption loses at most the group in flight.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from condiff import __version__
from condiff.config import ScheduleConfig
from condiff.errors import BackendUnavailableError, CondiffError, InputImageError, ModelSetError, is_out_of_space
from condiff.io.cases import Case
from condiff.modelset import ModelSet, open_model_set
from condiff.preprocess import (PreprocessConfig, Prepared, analysed_box, auto_foreground, mask_to_slices, prepare_image,
                                prepare_volume)
from condiff.sampler import SamplerPlan, make_plan

from .plan import (AUTO_MASK, RECORD_SCHEMA, resolve_mask_path, takes_mask, CasePlan, RunOptions, check_output_names, parse_members,
                   plan_case, read_record, resume_check, sha256_path)
from .backoff import release_cached, run_within_memory
from .runner import SliceJob, run_slices
from .writer import remove_outputs, write_case_files, write_record

logger = logging.getLogger(__name__)


@dataclass
class CaseOutcome:
    """What happened to one case: ``status`` is "ok", "skipped" (outputs already current) or "failed"."""

    case: Case
    status: str
    error: str | None = None
    error_type: str | None = None
    score: float | None = None
    max_slice_score: float | None = None
    n_slices: int = 0
    stopped_by: str | None = None  # set on cases left unfinished because the run stopped early (why)


@dataclass
class RunStats:
    """Counters and timings for run.json (never written into records or CSVs)."""

    n_slices: int = 0
    n_unet_evals: int = 0
    prepare_s: float = 0.0
    infer_s: float = 0.0
    write_s: float = 0.0
    load_s: float = 0.0
    batch_halvings: int = 0  # out-of-memory back-offs (each halves the batch size and reruns the group)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RunContext:
    """Everything ``process_cases`` needs; built by ``make_context`` (+ ``load_denoisers``)."""

    out_dir: Path
    model_set: ModelSet
    members: list[int]
    options: RunOptions
    preprocess: PreprocessConfig
    plan: SamplerPlan
    device: str
    batch_size: int
    mask_pattern: str | None = None
    batch_auto: bool = False  # --batch-size auto: halve on out of memory instead of failing
    resume: bool = True
    denoisers: list = field(default_factory=list)
    group_slices: int | None = None
    fail_fast: bool = False          # stop at the first failed case
    stopped: str | None = None       # why the run stopped early (full output disk, --fail-fast): no further case starts
    progress: Callable[[int], None] | None = None      # slice-member restorations just finished
    on_work: Callable[[int], None] | None = None       # slice-member restorations about to start
    on_outcome: Callable[[CaseOutcome], None] | None = None
    stats: RunStats = field(default_factory=RunStats)
    fallback_precision: str | None = None  # rerun a case with non-finite output on eager torch at this precision
    fallback_denoisers: list = field(default_factory=list)  # opened at the first such case
    standing_in_for: list | None = None  # while the fallback runs: the engine's own denoisers
    batch_size_given: int | None = None  # the batch size asked for, before a TensorRT plan's limit
    deterministic: bool = False  # deterministic kernels (engine.determinism); process-wide once set

    @property
    def options_digest(self) -> str:
        return self.options.digest()


# ----------------------------------------------------------------------------------------- setup


def resolve_device(text: str | None) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; a requested GPU that is absent is an error."""
    if text in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise BackendUnavailableError(None, f"unknown device {text!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise BackendUnavailableError(None, f"device {text!r} is not supported", "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise BackendUnavailableError(None, f"device {text!r} requested but CUDA is not available", "use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailableError(None, f"device {text!r} requested but only {torch.cuda.device_count()} GPU(s) "
                                      "are visible", "check CUDA_VISIBLE_DEVICES")
    return str(dev)


def make_context(models: str | Path, out_dir: str | Path, *, engine: str = "torch", device: str = "auto",
                 precision: str = "fp32", batch_size: int | None = None, steps: int = 50, sampler: str = "ddpm",
                 members: str | None = None, seed: int = 0, mask_pattern: str | None = None, restoration: bool = True,
                 model_space: bool = False, member_maps: bool = False, nan_policy: str = "error",
                 resume: bool = True, group_slices: int | None = None, fast_kernels: str = "torch",
                 fallback_precision: str | None = None, deterministic: bool = False,
                 layout: str = "flat", volume_index: int | None = None,
                 overlay_max: float | None = None) -> RunContext:
    """Validate the model set and options; no network is loaded (see ``load_denoisers``).

    ``deterministic`` switches this process to deterministic kernels (``engine.determinism``).

    Raises ``CondiffError`` subclasses (exit 2 in the CLI) for an invalid set, member list,
    preprocessing contract, sampler settings or device.
    """
    if mask_pattern in ("none", ""):
        mask_pattern = None
    model_set = open_model_set(models)
    try:
        member_idx = parse_members(members, len(model_set))
    except ValueError as exc:
        raise ModelSetError(models, str(exc)) from None
    try:
        preprocess = PreprocessConfig.from_dict(model_set.preprocessing)
    except (TypeError, ValueError) as exc:
        raise ModelSetError(model_set.member_dirs[0] / "config.json", f"invalid preprocessing contract ({exc})",
                            "a folder imported from diffusers needs one: rerun condiff-export --import-diffusers "
                            "SOURCE -o NEW_FOLDER --preprocessing FILE_OR_MODEL_FOLDER") from exc
    if preprocess.image_size != model_set.image_size or preprocess.channels != model_set.image_channels:
        raise ModelSetError(models, f"preprocessing gives {preprocess.channels}-channel {preprocess.image_size}-px slices, "
                            f"the network takes {model_set.image_channels} channels at {model_set.image_size} px")
    schedule: ScheduleConfig = model_set.configs[0].schedule
    try:
        plan = make_plan(sampler, steps, schedule)
    except ValueError as exc:
        raise ModelSetError(models, f"cannot build the {sampler} sampler ({exc})") from exc
    if fast_kernels != "torch" and engine != "fast":
        raise BackendUnavailableError(None, f"--fast-kernels {fast_kernels} applies only to the fast engine",
                                      "add --engine fast, or drop --fast-kernels")
    dev = resolve_device(device)
    if deterministic:
        from .determinism import enable_deterministic

        enable_deterministic(engine)
    options = RunOptions(engine=engine, precision=precision, device_type=dev.split(":")[0], sampler=sampler,
                         steps=steps, members=tuple(member_idx), seed=seed, mask=mask_pattern,
                         restoration=restoration, model_space=model_space or member_maps, member_maps=member_maps,
                         nan_policy=nan_policy, preprocessing=preprocess.to_dict(), schedule=schedule.to_dict(),
                         fast_kernels=fast_kernels, layout=layout, volume_index=volume_index,
                         overlay_max=None if overlay_max is None else float(overlay_max))
    return RunContext(out_dir=Path(out_dir), model_set=model_set, members=member_idx, options=options,
                      preprocess=preprocess, plan=plan, device=dev,
                      batch_size=batch_size or (16 if dev == "cpu" else 64), mask_pattern=mask_pattern,
                      resume=resume, group_slices=group_slices, batch_auto=batch_size is None,
                      fallback_precision=fallback_precision, deterministic=deterministic)


def load_denoisers(ctx: RunContext) -> None:
    """Open one backend per selected member (``open_denoiser``); errors are configuration errors."""
    from .backends import open_denoiser

    t0 = time.perf_counter()
    dev = torch.device(ctx.device)
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available():
        # cuda:N the current device: CUDA graphs capture, and TensorRT contexts run, on the current one
        # (plain "cuda" already means the current device; set_device refuses a device without index)
        torch.cuda.set_device(dev)
    extra = {"kernels": ctx.options.fast_kernels} if ctx.options.engine == "fast" else {}
    if ctx.options.engine == "ort" and ctx.deterministic:
        extra["deterministic"] = True  # torch and fast follow the process-wide switch
    ctx.denoisers = [open_denoiser(ctx.options.engine, ctx.model_set.member_dirs[m], device=ctx.device,
                                   precision=ctx.options.precision, max_batch=ctx.batch_size, **extra)
                     for m in ctx.members]
    # a TensorRT plan takes at most its profile's batch: the runner must not ask for more
    caps = [d.max_batch for d in ctx.denoisers if isinstance(getattr(d, "max_batch", None), int)]
    if ctx.batch_size_given is None:
        ctx.batch_size_given = ctx.batch_size  # what was asked for, for run.json
    if caps and min(caps) < ctx.batch_size:
        (logger.info if ctx.batch_auto else logger.warning)(
            "batch size %d -> %d: the largest batch the %s engine was built for", ctx.batch_size, min(caps),
            ctx.options.engine)
        ctx.batch_size = min(caps)
    ctx.stats.load_s += time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- per case


@dataclass
class _Pending:
    """A case read and preprocessed, waiting for its group to run."""

    case: Case
    plan: CasePlan
    input_sha256: str
    mask_path: Path | None
    mask_sha256: str | None
    source: Any            # the io.volumes.Volume (header and affine for writing), None for images
    mask: np.ndarray | None  # the brain mask on the input grid (bool), if one was given
    prepared: Prepared
    jobs: list[SliceJob]
    info: dict[str, Any]   # shape, spacing, orientation for the record


def _abs(path: Path | None) -> str | None:
    """Absolute (not symlink-resolved) posix path for records, so eval and other workers find the file."""
    return None if path is None else Path(os.path.abspath(path)).as_posix()


def _error_text(exc: BaseException) -> str:
    return exc.message if isinstance(exc, CondiffError) else f"{type(exc).__name__}: {exc}"


def _fail(ctx: RunContext, case: Case, plan: CasePlan, exc: BaseException, input_sha256: str | None = None,
          mask_path: Path | None = None, mask_sha256: str | None = None) -> CaseOutcome:
    """Record a failed case: stale outputs removed, a ``failed`` record written (never trusted by resume)."""
    if not isinstance(exc, CondiffError) and not is_out_of_space(exc):  # a bug, not bad input: keep the traceback
        logger.error("%s: internal error", case.name, exc_info=exc)
    text = _error_text(exc)
    record = {
        "schema": RECORD_SCHEMA, "case": case.name, "status": "failed", "kind": case.kind,
        "input": _abs(case.path), "input_sha256": input_sha256, "mask": _abs(mask_path), "mask_sha256": mask_sha256,
        "error_type": type(exc).__name__, "error": text, "model_set_digest": ctx.model_set.digest,
        "options_digest": ctx.options_digest, "condiff_version": __version__,
    }
    try:
        remove_outputs(ctx.out_dir, plan)
    except OSError:  # an output name that cannot exist (too long) has nothing to remove; the record still goes
        pass
    try:
        write_record(ctx.out_dir, plan, record)
    except Exception as write_exc:  # any second error must not escape: the other cases still have to run
        logger.error("%s: could not record the failure (%s: %s)", case.name, type(write_exc).__name__, write_exc)
    logger.info("case %s failed: %s", case.name, text, extra={"case": case.name, "status": "failed", "error": text})
    return CaseOutcome(case, "failed", error=text, error_type=type(exc).__name__)


class _CaseWarnings(logging.Handler):
    """Collects the readers' and preprocessing's warnings about one case (this thread's only), so its
    record and ``cases.csv`` say what was done to the input (EXIF rotation, alpha dropped, NaN zeroed)."""

    LOGGERS = ("condiff.io", "condiff.preprocess")

    def __init__(self, case: Case):
        super().__init__(logging.WARNING)
        self.prefix, self.thread, self.messages = f"{case.path}: ", threading.get_ident(), []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            text = record.getMessage()
            self.messages.append(text[len(self.prefix):] if text.startswith(self.prefix) else text)

    def __enter__(self) -> "_CaseWarnings":
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


def read_case(case: Case, ctx: RunContext, mask_path: Path | None):
    with _CaseWarnings(case) as noted:
        source, mask, prepared, info = _read_case(case, ctx, mask_path)
    if noted.messages:
        info["warnings"] = noted.messages + info.get("warnings", [])  # in the order they happened
    return source, mask, prepared, info


def _read_case(case: Case, ctx: RunContext, mask_path: Path | None):
    """Read a case and its brain mask and preprocess it into model slices, as the run does (and
    ``--dry-run``, so that "valid" there means the run's reader accepts the file). Returns
    ``(source volume or None, brain mask or None, Prepared, info)``; raises ``CondiffError``."""
    from condiff.io import images, volumes

    modality = ctx.preprocess.modality
    if case.kind == "volume":
        if modality != "mri":
            raise InputImageError(case.path, "is a volume but this model set analyses RGB photographs",
                                  "use an MRI model set for NIfTI scans")
        source = volumes.read_volume_or_slice(case.path, nan_policy=ctx.options.nan_policy,
                                              orientation=ctx.preprocess.orientation,
                                              volume_index=ctx.options.volume_index)
        mask = None if mask_path is None else volumes.read_mask(mask_path, source)
        if mask is None and ctx.preprocess.use_mask and ctx.mask_pattern == AUTO_MASK:
            # a skull-stripped scan without a mask file: its own non-background voxels are the brain
            mask = auto_foreground(source.data)
            logger.info("case %s: no brain mask file, using the scan's non-background voxels", case.name)
        prepared = prepare_volume(source, ctx.preprocess, mask=mask)
        info = {"shape": [int(s) for s in source.data.shape], "spacing": [float(z) for z in source.zooms],
                "orientation": "".join(prepared.geometry.get("input_axcodes") or []),
                "nonfinite_voxels": source.nonfinite, "series_volumes": source.series, "mask_auto": False}
        if mask_path is None and ctx.preprocess.use_mask and ctx.mask_pattern == AUTO_MASK:
            info["warnings"] = ["no brain mask file: the scan's non-background voxels were used as the brain"]
            info["mask_auto"] = True  # condiff-eval rebuilds it from the input to restrict its pixels the same way
    else:
        if modality != "rgb":
            raise InputImageError(case.path, "is a 2-D photograph but this model set analyses MRI volumes",
                                  "use an RGB model set for photographs, or give NIfTI scans")
        rgb = images.read_image(case.path)
        source = mask = None
        prepared = prepare_image(rgb, ctx.preprocess)
        if mask_path is not None:  # a field-of-view (retina) mask: the map is 0 outside it, as outside a brain
            mask = images.read_label_image(mask_path)
            if mask.shape != rgb.shape[:2]:
                raise InputImageError(mask_path, f"mask shape {mask.shape} differs from the photo's {rgb.shape[:2]}",
                                      "give a mask on the photo's pixel grid")
            prepared.foreground = mask_to_slices(mask, prepared)
            if not prepared.foreground.any():
                raise InputImageError(mask_path, "has no pixel inside the part of the photo the model sees",
                                      "check the mask (pixels > 0 are analysed)")
        info = {"shape": [int(s) for s in rgb.shape[:2]], "spacing": None, "orientation": None,
                "nonfinite_voxels": 0, "series_volumes": 1}
        r0, r1, c0, c1 = analysed_box(prepared.geometry)
        info["warnings"] = []
        if (r1 - r0, c1 - c0) != rgb.shape[:2]:  # not square: the contract's centre crop (the reference's)
            share = (r1 - r0) * (c1 - c0) / (rgb.shape[0] * rgb.shape[1])
            info["warnings"].append(f"not square: only its central {r1 - r0}x{c1 - c0} px (rows x columns, as "
                                    f"shape; {share:.0%}) were analysed (rows {r0}-{r1 - 1}, columns {c0}-{c1 - 1}); "
                                    "the map is 0 elsewhere")
        if not info["warnings"]:
            del info["warnings"]
    if len(prepared.slices) == 0:
        raise InputImageError(case.path, "no slice has foreground to analyse", "check the image (and its brain mask)")
    return source, mask, prepared, info


def _identity(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is replaced (inode) or rewritten (size, modification time)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _point_record_at(ctx: RunContext, plan: CasePlan, case: Case, mask_path: Path | None) -> None:
    """A finished case whose input (or mask) was found at a new path, same bytes (a moved cohort): its record
    then names where the files are now, which condiff-eval reads (the brain mask, the scan's own foreground)."""
    rec = read_record(ctx.out_dir / plan.record)
    now = {"input": _abs(case.path), "mask": _abs(mask_path)}
    if rec is not None and any(rec.get(k) != v for k, v in now.items()):
        write_record(ctx.out_dir, plan, {**rec, **now})


def _prepare(case: Case, ctx: RunContext) -> _Pending | CaseOutcome:
    """Digest, resume check, read, preprocess. Returns the pending case or its final outcome."""
    plan = plan_case(case, ctx.options)
    input_sha = mask_path = mask_sha = mask_before = None
    try:
        check_output_names(plan)
        before = _identity(case.path)  # the digest must name the bytes read (a file replaced meanwhile: failed)
        input_sha = sha256_path(case.path)
        if takes_mask(case, ctx.mask_pattern):
            mask_path = resolve_mask_path(case, ctx.mask_pattern)
            mask_before = None if mask_path is None else _identity(mask_path)
            mask_sha = None if mask_path is None else sha256_path(mask_path)
        if ctx.resume:
            reason = resume_check(ctx.out_dir, plan, input_sha256=input_sha, mask_sha256=mask_sha,
                                  model_set_digest=ctx.model_set.digest, options=ctx.options,
                                  network_digest=ctx.model_set.network_digest)
            if reason is None:
                _point_record_at(ctx, plan, case, mask_path)
                logger.info("case %s: outputs up to date, skipped", case.name, extra={"case": case.name, "status": "skipped"})
                return CaseOutcome(case, "skipped")
            logger.debug("case %s: recomputing (%s)", case.name, reason)
        source, mask, prepared, info = read_case(case, ctx, mask_path)
        for path, seen in ((case.path, before), (mask_path, mask_before)):
            if path is not None and _identity(path) != seen:
                raise InputImageError(path, "changed while it was being read (replaced or rewritten during the run): "
                                            "its digest and the voxels analysed could differ",
                                      "Rerun when nothing is writing the file")
    except Exception as exc:
        return _fail(ctx, case, plan, exc, input_sha, mask_path, mask_sha)
    remove_outputs(ctx.out_dir, plan)  # no stale record or file may outlive the outputs we are about to replace
    jobs = [SliceJob(cond=torch.from_numpy(np.ascontiguousarray(prepared.slices[i])), digest=input_sha,
                     slice_index=int(prepared.slice_index[i]), foreground=torch.from_numpy(prepared.foreground[i]))
            for i in range(len(prepared.slices))]
    return _Pending(case, plan, input_sha, mask_path, mask_sha, source, mask, prepared, jobs, info)


def _write_case(ctx: RunContext, p: _Pending, maps: np.ndarray, rest: np.ndarray, scores: np.ndarray,
                member_scores: np.ndarray, member_maps: np.ndarray | None, fallback: dict | None = None) -> CaseOutcome:
    """Write one case's outputs, then its record. ``maps`` (S, H, W), ``rest`` (S, C, H, W) in model space.
    ``fallback``: the case was recomputed on eager torch (``_fallback_results``); the record says so."""
    case = p.case
    engine, precision = ctx.options.engine, ctx.options.precision
    if fallback is not None:
        engine, precision = "torch", fallback["precision"]
    if not _finite(maps, rest):
        raise CondiffError(case.path, f"non-finite output from engine {engine} ({precision})",
                           "try --precision fp32, or --fallback-precision fp32 to recompute such cases")
    arrays = None
    if "model_space" in p.plan.outputs:
        arrays = {"slices": p.prepared.slices, "maps": maps, "foreground": p.prepared.foreground,
                  "slice_index": p.prepared.slice_index, "scores": scores, "members": np.asarray(ctx.members),
                  "member_scores": member_scores}
        if member_maps is not None:
            arrays["member_maps"] = member_maps
    written = write_case_files(ctx.out_dir, p.plan, kind=case.kind, prepared=p.prepared, source=p.source,
                               brain_mask=p.mask, maps=maps, restorations=rest, scores=scores, model_space=arrays,
                               overlay_max=ctx.options.overlay_max)
    score, top = float(scores.mean()), float(scores.max())
    record = {
        "schema": RECORD_SCHEMA, "case": case.name, "status": "ok", "kind": case.kind,
        "input": _abs(case.path), "input_sha256": p.input_sha256, "mask": _abs(p.mask_path), "mask_sha256": p.mask_sha256,
        "model_set_digest": ctx.model_set.digest, "network_digest": ctx.model_set.network_digest,
        "options": ctx.options.to_dict(),
        "options_digest": ctx.options.case_digest(p.info.get("nonfinite_voxels"), p.info.get("series_volumes")),
        "condiff_version": __version__, "engine": engine, "precision": precision, "fallback": fallback,
        "seed": ctx.options.seed, "members": list(ctx.members), "sampler": ctx.options.sampler,
        "steps": ctx.options.steps, **p.info, "geometry": p.prepared.geometry, "n_slices": int(len(scores)),
        "score": score, "max_slice_score": top, "map_max": float(maps.max()) if maps.size else 0.0,
        "slice_scores": [[int(k), float(s)] for k, s in zip(p.prepared.slice_index, scores)],
        "member_scores": [float(v) for v in member_scores.mean(axis=1)],
        "outputs": written,
    }
    write_record(ctx.out_dir, p.plan, record)  # last: the proof the case is done
    logger.info("case %s done: score %.6g, max slice %.6g, %d slices", case.name, score, top, len(scores),
                extra={"case": case.name, "status": "ok", "score": score, "max_slice_score": top, "n_slices": len(scores)})
    return CaseOutcome(case, "ok", score=score, max_slice_score=top, n_slices=int(len(scores)))


def _run_group(group: list[_Pending], ctx: RunContext) -> list[CaseOutcome]:
    jobs = [j for p in group for j in p.jobs]
    n_members = len(ctx.denoisers)
    if ctx.on_work is not None:
        ctx.on_work(len(jobs) * n_members)
    t0 = time.perf_counter()
    results = run_within_memory(run_slices, jobs, ctx)  # run_slices looked up here: tests replace it
    ctx.stats.infer_s += time.perf_counter() - t0
    ctx.stats.n_slices += len(jobs)
    ctx.stats.n_unet_evals += len(jobs) * n_members * ctx.plan.n_steps
    t0 = time.perf_counter()
    outcomes, start = [], 0
    for p in group:
        n = len(p.jobs)
        sl = slice(start, start + n)
        start += n
        if ctx.stopped is not None:  # the disk filled, or --fail-fast, at an earlier case of this group
            outcome = _unfinished(p.case, ctx)
            outcomes.append(outcome)
            _report(ctx, outcome)
            continue
        try:
            case_results, fallback = results[sl], None
            maps, rest = _maps_and_restorations(case_results)
            if not _finite(maps, rest) and _can_fall_back(ctx):
                case_results, fallback = _fallback_results(p, ctx)
                maps, rest = _maps_and_restorations(case_results)
            scores = np.array([r.score for r in case_results], dtype=np.float64)
            member_scores = np.array([r.member_scores for r in case_results], dtype=np.float64).T.reshape(n_members, n)
            case_member_maps = (np.stack([r.member_maps.numpy() for r in case_results], axis=1).astype(np.float32)
                                if ctx.options.member_maps else None)
            outcome = _write_case(ctx, p, maps, rest, scores, member_scores, case_member_maps, fallback)
        except Exception as exc:
            if is_out_of_space(exc):
                ctx.stopped = f"no space left on the output disk ({ctx.out_dir}) while writing {p.case.name}"
                logger.error("%s: %s; stopping: no further case is started", p.case.name, exc)
            outcome = _fail(ctx, p.case, p.plan, exc, p.input_sha256, p.mask_path, p.mask_sha256)
        _stop_if_failing_fast(ctx, outcome)
        outcomes.append(outcome)
        _report(ctx, outcome)
    ctx.stats.write_s += time.perf_counter() - t0
    return outcomes


def _maps_and_restorations(results) -> tuple[np.ndarray, np.ndarray]:
    return (np.stack([r.amap.numpy() for r in results]).astype(np.float32),
            np.stack([r.restoration.numpy() for r in results]).astype(np.float32))


def _finite(maps: np.ndarray, rest: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(maps)) and np.all(np.isfinite(rest)))


def _can_fall_back(ctx: RunContext) -> bool:
    """--fallback-precision is set and would run something other than what just failed."""
    fb = ctx.fallback_precision
    return fb is not None and not (ctx.options.engine == "torch" and ctx.options.precision == fb)


def _fallback_results(p: _Pending, ctx: RunContext) -> tuple[list, dict]:
    """Recompute one case on eager torch at ``ctx.fallback_precision`` (half-precision overflow, ecosystem
    C.39): the same members, noise and batch rules, so the case equals a run made that way from the start."""
    from .backends import open_denoiser

    logger.warning("case %s: non-finite output from engine %s (%s); recomputing it on torch %s (--fallback-precision)",
                   p.case.name, ctx.options.engine, ctx.options.precision, ctx.fallback_precision)
    if not ctx.fallback_denoisers:
        ctx.fallback_denoisers = [open_denoiser("torch", ctx.model_set.member_dirs[m], device=ctx.device,
                                                precision=ctx.fallback_precision, max_batch=ctx.batch_size)
                                  for m in ctx.members]
    if ctx.on_work is not None:
        ctx.on_work(len(p.jobs) * len(ctx.members))
    primary = ctx.denoisers
    # the eager fallback needs more memory than the engine it stands in for, whose captured graphs
    # (all members, the run's batch shape) would otherwise stay pinned, also through a halving
    release_cached(primary)
    ctx.denoisers, ctx.standing_in_for = ctx.fallback_denoisers, primary
    t0 = time.perf_counter()
    try:
        results = run_within_memory(run_slices, p.jobs, ctx)
    finally:
        ctx.denoisers, ctx.standing_in_for = primary, None
    ctx.stats.infer_s += time.perf_counter() - t0
    ctx.stats.n_unet_evals += len(p.jobs) * len(ctx.members) * ctx.plan.n_steps
    reason = f"non-finite output from engine {ctx.options.engine} ({ctx.options.precision})"
    return results, {"precision": ctx.fallback_precision, "from_engine": ctx.options.engine,
                     "from_precision": ctx.options.precision, "reason": reason}


def _unfinished(case: Case, ctx: RunContext) -> CaseOutcome:
    """A case left unfinished (not started, or computed but not written) because the run stopped
    early. No record is written: after a full disk there is no room, and none is needed (a rerun
    picks the case up like any unfinished one)."""
    return CaseOutcome(case, "failed", error=f"not finished: the run stopped ({ctx.stopped}); rerun to resume",
                       error_type="NotFinished", stopped_by=ctx.stopped)


def _stop_if_failing_fast(ctx: RunContext, outcome: CaseOutcome) -> None:
    if ctx.fail_fast and ctx.stopped is None and outcome.status == "failed":
        ctx.stopped = f"--fail-fast: {outcome.case.name} failed"
        logger.error("%s failed and --fail-fast is set; stopping: no further case is started", outcome.case.name)


def stop_reason(ctx: RunContext, outcomes: Sequence[CaseOutcome]) -> str | None:
    """Why the run stopped early, from the context or, for cases that Ray workers ran, from their
    outcomes; None when it did not."""
    if ctx.stopped is not None:
        return ctx.stopped
    return next((o.stopped_by for o in outcomes if o.stopped_by), None)


def _report(ctx: RunContext, outcome: CaseOutcome) -> None:
    if ctx.on_outcome is not None:
        ctx.on_outcome(outcome)


GROUP_HELD_BYTES = 512 * 2**20  # input volumes (and masks) a group may hold while it waits for its batch


def _held_bytes(p: _Pending) -> int:
    """Host memory a waiting case holds at input resolution (its volume and brain mask)."""
    data = getattr(p.source, "data", None)
    return int(getattr(data, "nbytes", 0)) + int(getattr(p.mask, "nbytes", 0))


def process_cases(cases: Sequence[Case], ctx: RunContext) -> list[CaseOutcome]:
    """Run ``cases`` (in order) and write their outputs; returns one outcome per case, in order.

    Needs ``load_denoisers(ctx)`` first unless every case is skipped or fails before inference.
    ``KeyboardInterrupt`` and other ``BaseException`` propagate: finished cases keep their
    records, the group in flight leaves nothing under final names.
    """
    target = ctx.group_slices or 4 * ctx.batch_size
    done: dict[int, CaseOutcome] = {}
    group: list[tuple[int, _Pending]] = []
    n_group = held = 0

    def flush() -> None:
        nonlocal group, n_group, held
        if group:
            if not ctx.denoisers:
                raise RuntimeError("process_cases needs load_denoisers(ctx) before inference")
            for (k, _), outcome in zip(group, _run_group([p for _, p in group], ctx)):
                done[k] = outcome
        group, n_group, held = [], 0, 0

    for k, case in enumerate(cases):
        if ctx.stopped is not None:
            done[k] = _unfinished(case, ctx)
            _report(ctx, done[k])
            continue
        t0 = time.perf_counter()
        item = _prepare(case, ctx)
        ctx.stats.prepare_s += time.perf_counter() - t0
        if isinstance(item, CaseOutcome):
            done[k] = item
            _report(ctx, item)
            if ctx.fail_fast and item.status == "failed":
                flush()  # the cases before it (in input order) still finish
                _stop_if_failing_fast(ctx, item)
            continue
        group.append((k, item))
        n_group += len(item.jobs)
        held += _held_bytes(item)
        # a large --batch-size must not hold dozens of full-resolution volumes: the bytes bound the group
        # too (how cases are grouped never changes their results: each slice's noise is its own)
        if n_group >= target or held >= GROUP_HELD_BYTES:
            flush()
    flush()
    if ctx.stopped is not None:
        logger.error("stopped early: %s", ctx.stopped)
    return [done[k] for k in range(len(cases))]


__all__ = ["CaseOutcome", "RunStats", "RunContext", "resolve_device", "make_context", "load_denoisers",
           "process_cases", "is_out_of_space", "stop_reason"]
