"""``condiff-infer`` and ``condiff-eval``: thin commands over ``pipeline``, ``writer`` and ``evaluate``.

    condiff-infer scans/ -o out/                      # bundled demo models when --models is omitted
    condiff-infer scans/ -o out/ --models set/ --device cuda --precision fp16
    condiff-infer scans/ -o out/ --shard 0/4          # case k goes to shard k % 4
    condiff-infer --merge out/                        # rebuild cases.csv / scores.csv from the records
    condiff-infer scans/ -o out/ --ray auto           # on the Ray cluster 'ray start' made (or --ray local)
    condiff-eval out/ --masks '{dir}/{stem}_seg.nii.gz' [--protocol benchmark]

Exit codes: 0 all cases done, 1 some failed (listed on stderr and in cases.csv), 2 usage or
configuration error before any work, 130 interrupted, 143 terminated.
"""
from __future__ import annotations

import datetime as _dt
import importlib.resources
import logging
import sys
import time
from pathlib import Path
from typing import Any

import click

from condiff.cli_common import (EXIT_FAILED, EXIT_OK, Terminated, add_file_log, device_options, environment_report,
                                logging_to, progress_option, quiet_option, remove_log, run_command, seed_option,
                                mask_pattern_option_check, verbose_option, version_option)
from condiff.errors import ModelSetError, OutputConflictError

logger = logging.getLogger("condiff.engine.cli")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def bundled(name: str) -> Path | None:
    """``condiff.examples/<name>`` (the demo model set or sample scans) if installed, else None."""
    try:
        root = importlib.resources.files("condiff.examples") / name
    except ModuleNotFoundError:
        return None
    path = Path(str(root))
    return path if path.is_dir() else None


def _positive_map_value(ctx, param, value):
    if value is not None and not (isinstance(value, float) and value > 0 and value != float("inf")):
        raise click.BadParameter(f"{value} is not a positive map value (for example 0.02)", param_hint="--overlay-max")
    return value


overlay_max_option = click.option(
    "--overlay-max", type=float, default=None, metavar="VALUE", callback=_positive_map_value,
    help="Top of the overlay colour scale, the same map value for every case (e.g. the largest map_max in "
         "cases.csv), so colours can be compared across cases; higher values saturate [default: each case's "
         "own maximum].")


def _eval_scale(text: str | None):
    """condiff-eval --overlay-max: None, "shared" or a positive map value."""
    if text is None or text == "shared":
        return text
    try:
        value = float(text)
    except ValueError:
        value = None
    return _positive_map_value(None, None, text if value is None else value)


def _echo_err(text: str) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------- infer


@click.command("condiff-infer", context_settings=CONTEXT)
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output folder OUT: maps/, restorations/, overlays/, records/, cases.csv, scores.csv, run.json "
                   "(README, Outputs).")
@click.option("--models", type=click.Path(path_type=Path),
              help="A model set (set.json) or one model folder [default: the bundled demo set].")
@device_options
@click.option("--fast-kernels", type=click.Choice(["torch", "triton", "compile"]), default="torch", show_default=True,
              help="Kernels inside --engine fast: PyTorch's (cuDNN attention, eager GroupNorm), condiff's Triton "
                   "attention and GroupNorm+SiLU (needs the triton package), or torch.compile of the network "
                   "(about a minute of compiling per batch shape). triton: compiled and timed on an H100, no faster "
                   "than torch yet; compile: never run on a GPU (bench/gpu_check.sh measures both).")
@click.option("--steps", type=click.IntRange(1, 1000), default=50, show_default=True, help="Sampler steps.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim"]), default="ddpm", show_default=True)
@click.option("--members", metavar="N|I,J,...", help="First N members, or these member indices (one index: '2,') [default: all].")
@seed_option
@click.option("--mask", "mask_pattern", metavar="PATTERN", default="auto", show_default=True,
              callback=mask_pattern_option_check,
              help="Brain mask per scan: a pattern such as '{dir}/{stem}_brainmask.nii.gz' ({dir}, {stem}, "
                   "{base} = stem without its last '_part', {case}, {casedir} = the case's folder part, {root} = "
                   "the input folder it was found in; photos: a field-of-view mask); "
                   "'auto' = '{dir}/{stem}_brainmask.nii.gz' "
                   "where that file exists, else the scan's own non-background voxels; 'none' = no mask.")
@click.option("--resume/--overwrite", default=True, show_default=True,
              help="Skip cases whose record proves their outputs current, or recompute everything.")
@click.option("--dry-run", is_flag=True,
              help="Read and preprocess every input (and brain mask) as the run would, name the broken ones, and "
                   "list planned outputs; loads no model. An -o that cannot be created is exit 2, as in the run.")
@overlay_max_option
@click.option("--no-restoration", is_flag=True, help="Do not write restorations/.")
@click.option("--save-model-space", is_flag=True, help="Also write model_space/<case>.npz (for condiff-eval --protocol benchmark).")
@click.option("--save-member-maps", is_flag=True, help="Also keep every member's model-space maps in the npz.")
@click.option("--nan-policy", type=click.Choice(["error", "zero"]), default="error", show_default=True,
              help="NaN/Inf voxels fail the case, or count as 0.")
@click.option("--volume-index", type=int, default=None,
              help="Analyse volume N (from 0; negative counts from the end) of 4-D NIfTI series; 3-D inputs are "
                   "unaffected [default: a series with more than one volume fails].")
@click.option("--fallback-precision", type=click.Choice(["fp32", "bf16"]), default=None,
              help="A case whose output is not finite (half-precision overflow) is recomputed once on eager torch "
                   "at this precision, and its record and cases.csv say so [default: such a case fails].")
@click.option("--layout", type=click.Choice(["flat", "bids"]), default="flat", show_default=True,
              help="flat: maps/, restorations/, ... mirroring the inputs; bids: OUT is a BIDS derivative dataset "
                   "(sub-*/[ses-*/]anat/*_desc-anomaly_<suffix>.nii.gz, dataset_description.json); needs BIDS-named "
                   "NIfTI inputs and skips the dataset's derivatives/, so -o DATASET/derivatives/condiff works.")
@click.option("--deterministic", is_flag=True,
              help="Deterministic GPU kernels (PyTorch deterministic algorithms, cuDNN without autotuning, "
                   "CUBLAS_WORKSPACE_CONFIG, ORT deterministic compute), so reruns on one machine repeat bit for "
                   "bit; may be slower. Recorded in run.json. (CPU runs already repeat.)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="OUT/condiff.log as text lines, or JSON lines (time, level, message; case, status, score "
                   "for each finished, skipped or failed case) for log collectors.")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="PATH",
              help="Append the run's log here instead of OUT/condiff.log (its folder is created).")
@click.option("--fail-fast", is_flag=True,
              help="Stop at the first failed case (the others are left for a rerun) instead of going on.")
@click.option("--shard", metavar="I/N", help="Process only sorted cases k with k % N == I (0 <= I < N).")
@click.option("--merge", "merge_dir", type=click.Path(path_type=Path), metavar="OUT",
              help="Only rebuild OUT/cases.csv and OUT/scores.csv from OUT/records, then exit.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run on Ray: 'local' (a cluster on this machine, 127.0.0.1 only; the default when bare), 'auto' "
                   "(the cluster 'ray start' made here) or HOST:PORT. Put it after the inputs, or write --ray=ADDRESS.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None, metavar="N",
              help="Ray actors: at most one per GPU [default: one per GPU, or one per 4 CPUs].")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True, metavar="N",
              help="With --ray: times a case is rerun after its worker was lost (input errors are never retried).")
@click.option("--group-slices", type=click.IntRange(min=1), default=None, hidden=True,
              help="Slices per processing group [default: 4 x batch size].")
@progress_option
@quiet_option
@verbose_option
@version_option
def infer_main(**kw: Any) -> None:
    """Anomaly maps for every scan or photo in INPUT... (files or folders) [default: the bundled sample scans]."""
    run_command(lambda: _infer(**kw), verbose=kw["verbose"])


def _infer(inputs, output, models, engine, device, precision, batch_size, fast_kernels, steps, sampler, members, seed,
           mask_pattern, resume, dry_run, no_restoration, save_model_space, save_member_maps, nan_policy, volume_index,
           fallback_precision, overlay_max,
           layout, deterministic, log_format, log_file, fail_fast, shard,
           merge_dir, ray_address, ray_workers, max_retries, group_slices, progress, quiet, verbose) -> int:
    from condiff.cli_common import resolve_precision
    from condiff.io.cases import DEFAULT_EXCLUDE, discover

    from . import pipeline, plan as planning, writer
    from .distributed import absolute_cases

    precision = resolve_precision(precision, engine)
    arguments = {k: _jsonable(v) for k, v in locals().items() if k not in ("discover", "pipeline", "planning", "writer", "resolve_precision",
                                                                      "DEFAULT_EXCLUDE", "absolute_cases")}
    t_entry = time.perf_counter()  # run.json's startup_s: discovery, folder checks, space estimate, model load
    if quiet and verbose:
        raise click.UsageError("-q/--quiet and -v/--verbose contradict each other: give one")
    with logging_to(verbose, echo=_echo_err, quiet=quiet, backlog=True):
        if merge_dir is not None:
            return _merge(merge_dir)
        if output is None:
            raise click.UsageError("missing -o/--output OUT (or use --merge OUT)")
        try:
            shard_t = planning.parse_shard(shard) if shard else None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--shard") from None
        if ray_address is not None and fail_fast:
            raise click.UsageError("--fail-fast is not supported with --ray yet (workers run cases in parallel)")
        if ray_address is not None:
            from .distributed import check_address

            try:
                check_address(ray_address)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--ray") from None
        if not inputs:
            scans = bundled("scans")
            if scans is None:
                raise click.UsageError("no INPUT given and the bundled sample scans are not installed")
            inputs = (scans,)
        if models is None:
            models = bundled("models")
            if models is None:
                raise ModelSetError(None, "no --models given and the bundled demo model set is not installed "
                                          "(condiff.examples/models is missing)",
                                    "pass --models DIR (a model set or a model folder)")
        from . import bids

        bids_layout = layout == "bids"
        # before discovery, which would read our own outputs (a BIDS dataset's derivatives/ is never read)
        planning.check_output_location(output, inputs, bids.RESERVED_FOLDERS if bids_layout else ())
        if log_file is not None:
            check_log_file(log_file)  # before any network is loaded
        excluded: list[Path] = []  # masks and label maps beside the scans, left out by name: reported
        cases = discover(inputs, DEFAULT_EXCLUDE + (bids.EXCLUDE if bids_layout else ()), excluded)
        # absolute input paths for every run, so records, cases.csv and messages do not depend on --ray
        # (whose workers need them) or on the folder the command was started in
        cases = absolute_cases(cases)
        contrasts = bids.contrasts(cases)
        if len(contrasts) > 1:  # a model set is trained on one contrast: the others' maps mark the contrast itself
            logger.warning("the inputs hold several BIDS contrasts (%s): a model set knows the contrast it was trained "
                           "on, and maps of another one show that contrast, not anomalies; give the files of the "
                           "model's contrast only", ", ".join(f"{k}: {n}" for k, n in contrasts.items()))
        if bids_layout:
            try:
                bids.check_cases(cases)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--layout") from None
        n_all = len(cases)
        all_names = {c.name for c in cases}  # every shard's cases: --overwrite leaves other shards' to them
        if shard_t is not None:
            cases = planning.select_shard(cases, *shard_t)
        ctx_kwargs = dict(models=models, out_dir=output, engine=engine, device=device, precision=precision,
                          batch_size=batch_size, steps=steps, sampler=sampler, members=members, seed=seed,
                          mask_pattern=mask_pattern, restoration=not no_restoration, model_space=save_model_space,
                          member_maps=save_member_maps, nan_policy=nan_policy, resume=resume, group_slices=group_slices,
                          volume_index=volume_index,
                          fast_kernels=fast_kernels, fallback_precision=fallback_precision,
                          deterministic=deterministic, layout=layout, overlay_max=overlay_max)
        if ray_address is None:
            ctx = pipeline.make_context(**ctx_kwargs)
            ctx.fail_fast = fail_fast
        else:
            from condiff.optional import require

            from . import distributed

            require("ray", "ray")  # exit 2 with the pip command before any work
            ctx = distributed.driver_context(ctx_kwargs)  # the workers load the networks, on their own devices
        _check_folder_consistency(output, cases, ctx, resume)
        if dry_run:
            from condiff.io.atomic import probe_creatable

            probe_creatable(output)  # what the run would refuse, the dry run refuses too (exit 2)
            return _dry_run(cases, ctx, n_all, shard_t, excluded)
        writer.check_creatable(output)  # these two fail before any network loads
        lock = writer.OutputLock(output, shard_t, method=lock_method(ctx))
        lock.check()  # acquire() below is the atomic check
        # cases with a record are probably done (resume): only the others will need new space
        todo = [c.path for c in cases if not resume or not (Path(output) / planning.record_path(c.name)).is_file()]
        short = writer.free_space_warning(output, todo, restorations=not no_restoration)
        if short is not None:
            logger.warning(short)
        if ray_address is None:
            pipeline.load_denoisers(ctx)
            writer.ensure_writable(output)
            with lock:
                _check_folder_consistency(output, cases, ctx, resume)  # again: a run may have finished meanwhile
                return _run(cases, ctx, shard_t, arguments, progress, n_all, all_names=all_names,
                            run_info={"excluded_inputs": [p.as_posix() for p in excluded]}, t_entry=t_entry)
        run_info: dict = {"excluded_inputs": [p.as_posix() for p in excluded], "ray": {}}
        # an unreachable cluster, or one without the --device asked for, is exit 2 before any output
        started = distributed.connect(ray_address, quiet=arguments["quiet"])
        try:
            layout = distributed.cluster_layout(device, ray_workers)

            def process(cases, ctx):
                return distributed.run_on_ray(cases, ctx_kwargs, ray_address, ray_workers, max_retries, ctx.progress,
                                              on_work=ctx.on_work, on_outcome=ctx.on_outcome, ctx=ctx,
                                              info=run_info["ray"], layout=layout)

            writer.ensure_writable(output)
            with lock:
                _check_folder_consistency(output, cases, ctx, resume)  # again: a run may have finished meanwhile
                return _run(cases, ctx, shard_t, arguments, progress, n_all, process, run_info, all_names=all_names,
                            t_entry=t_entry)
        finally:
            if started:
                distributed.disconnect()


def _run(cases, ctx, shard_t, arguments, progress: bool, n_all: int, process=None, run_info=None,
         all_names: set[str] | None = None, t_entry: float | None = None) -> int:
    from tqdm import tqdm

    from . import bids, pipeline, writer

    out = ctx.out_dir
    writer.clean_orphans(out, dead_writers_only=shard_t is not None)  # a shard: other shards may be writing
    if not ctx.resume:  # --overwrite: the folder keeps one method (the check before the lock refused it otherwise)
        from .consistency import remove_foreign

        # Up front, so a run that stops early leaves no finished case of the other method behind; with
        # --shard, other shards' cases are theirs to replace (give every shard --overwrite)
        others = (all_names or set()) - {c.name for c in cases} if shard_t is not None else set()
        remove_foreign(out, _foreign_records(out, ctx), others)
    if ctx.options.layout == "bids":
        from .bids import write_dataset_files

        write_dataset_files(out, arguments["inputs"])
    log_handler = open_run_log(arguments["log_file"] or out / "condiff.log", arguments)
    quiet = arguments["quiet"]
    started, t0 = _dt.datetime.now(_dt.timezone.utc), time.perf_counter()
    batch_size_start = ctx.batch_size  # the run may halve it after running out of memory
    batch_size_requested = getattr(ctx, "batch_size_given", None) or batch_size_start  # before a plan's limit
    n_members = len(ctx.members)
    bar = tqdm(total=0, unit="slice", unit_scale=1.0 / n_members, dynamic_ncols=True, file=sys.stderr,
               disable=quiet or not progress or not sys.stderr.isatty(), desc="condiff-infer")
    ctx.on_work = lambda n: (setattr(bar, "total", bar.total + n), bar.refresh())
    ctx.progress = bar.update

    reported: list = []  # what an interrupted run finished: process_cases never returns then

    def on_outcome(o: pipeline.CaseOutcome) -> None:
        reported.append(o)
        bar.set_postfix_str(f"cases {len(reported)}/{len(cases)}", refresh=False)  # the total grows by groups
        if o.status == "failed" and o.error_type != "NotFinished":  # those are summed up once, below
            _echo_err(f"FAILED {o.case.name}: {o.error}")

    ctx.on_outcome = on_outcome
    logger.info("condiff-infer: %d cases (%s), model set %s, %s on %s, %s", len(cases),
                "all" if shard_t is None else f"shard {shard_t[0]}/{shard_t[1]} of {n_all}", ctx.model_set.digest[:12],
                ctx.options.engine, ctx.device, ctx.options.precision)
    outcomes: list = []
    interrupted = None
    try:
        outcomes = (process or pipeline.process_cases)(cases, ctx)
    except (KeyboardInterrupt, Terminated) as exc:
        interrupted = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        raise
    finally:
        bar.close()
        if interrupted:
            outcomes = reported
        records: list = []
        try:
            records = writer.load_records(out)  # once, for the tables and the sidecars
            counts = writer.rebuild_tables(out, records)
        except OSError as exc:  # a full disk must not hide the run's own report
            logger.error("could not rebuild cases.csv/scores.csv: %s", exc)
            counts = {}
        if ctx.options.layout == "bids":
            try:
                bids.write_sidecars(out, records, arguments["inputs"])
            except OSError as exc:
                logger.error("could not write the BIDS sidecars: %s", exc)
        elapsed = time.perf_counter() - t0
        st = ctx.stats
        # a full output disk stops the run (Ray workers report it through their cases' outcomes)
        stopped = pipeline.stop_reason(ctx, outcomes)
        by_status: dict[str, int] = {}
        for o in outcomes:  # cases a stop left unstarted or unwritten did not fail: counted apart
            status = "not_finished" if o.error_type == "NotFinished" else o.status
            by_status[status] = by_status.get(status, 0) + 1
        unreported = [] if not interrupted else sorted({c.name for c in cases} - {o.case.name for o in outcomes})
        if unreported:  # the signal came before these were done: not failed, not finished
            by_status["not_finished"] = by_status.get("not_finished", 0) + len(unreported)
        doc = {
            "command": "condiff-infer", "argv": sys.argv, "arguments": arguments, "versions": environment_report(),
            "model_set": {"path": ctx.model_set.root.as_posix(), "digest": ctx.model_set.digest,
                          "members": [d.as_posix() for d in ctx.model_set.member_dirs], "used": ctx.members},
            "options": ctx.options.to_dict(), "options_digest": ctx.options_digest,
            "device": ctx.device, "device_name": _device_name(ctx.device), "batch_size": ctx.batch_size,
            "batch_size_requested": "auto" if ctx.batch_auto else batch_size_requested,
            "batch_size_start": batch_size_start, "batch_halvings": st.batch_halvings,
            "shard": None if shard_t is None else list(shard_t),
            "started": started.isoformat(timespec="seconds"),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "timings_s": {"total": elapsed, **{k: v for k, v in st.to_dict().items() if k.endswith("_s")},
                          **({} if t_entry is None else {"startup_s": t0 - t_entry})},
            "throughput": {"slices": st.n_slices, "unet_evaluations": st.n_unet_evals,
                           "slices_per_s": st.n_slices / st.infer_s if st.infer_s else None,
                           "unet_evaluations_per_s": st.n_unet_evals / st.infer_s if st.infer_s else None},
            "counts": {"cases": len(cases), **by_status}, "records": counts,
            "failed": [o.case.name for o in outcomes if o.status == "failed" and o.error_type != "NotFinished"],
            "not_finished": [o.case.name for o in outcomes if o.error_type == "NotFinished"] + unreported,
            "stopped": stopped,
            "interrupted": interrupted is not None, "signal": interrupted, **(run_info or {}),
        }
        try:
            writer.write_run_json(out, doc, shard_t)
        except OSError as exc:
            logger.error("could not write run.json: %s", exc)
        logger.info("finished in %.1f s: %s%s", elapsed, by_status, " (interrupted)" if interrupted else "")
        remove_log(log_handler)
    n_failed, n_left = by_status.get("failed", 0), by_status.get("not_finished", 0)
    left_out = (run_info or {}).get("excluded_inputs", ())
    from condiff.io.cases import in_bids_reserved_folder

    n_reserved = sum(1 for p in left_out if in_bids_reserved_folder(p))
    n_excluded = len(left_out) - n_reserved
    if not quiet:
        click.echo(f"condiff-infer: {by_status.get('ok', 0)} done, {by_status.get('skipped', 0)} already done, "
                   f"{n_failed} failed" + (f", {n_left} not finished" if n_left else "") + f" -> {out}")
        if n_excluded or n_reserved:
            what = [f"{n_excluded} file(s) beside the scans skipped as masks or label maps by name"] if n_excluded else []
            what += [f"{n_reserved} file(s) in the dataset's {'/, '.join(bids.RESERVED_FOLDERS)}/ skipped"] if n_reserved else []
            click.echo(f"({'; '.join(what)}; listed in {out / writer.run_json_name(shard_t)} under excluded_inputs)")
    if n_failed:
        click.echo(f"{n_failed} case(s) failed; reasons in {out / 'cases.csv'}", err=True)
    if stopped is not None:
        _echo_err(f"STOPPED: {stopped}; {n_left} case(s) not finished. "
                  "Rerun the same command to resume: finished cases are kept and skipped")
    return EXIT_FAILED if n_failed or n_left else EXIT_OK


def lock_method(ctx) -> dict:
    """What the output lock records of this run's method (engine.consistency): the model-set digest and the
    options that make a result another method. Shards of one split running side by side must agree on it."""
    from .consistency import METHOD_OPTIONS

    options = ctx.options.to_dict()
    return {"model_set": ctx.model_set.digest, **{k: options.get(k) for k in METHOD_OPTIONS}}


def _foreign_records(output: Path, ctx) -> list:
    """Records in ``output`` made with another model set or method than ``ctx``'s (engine.consistency)."""
    from .consistency import foreign_records
    from .writer import load_records

    return foreign_records(load_records(Path(output)), ctx.model_set.digest, ctx.options.to_dict())


def _check_folder_consistency(output: Path, cases, ctx, resume: bool) -> None:
    """Before any network loads, and again once the folder's lock is held (a run that held it while this
    one loaded its models may have written another method's cases): exit 2 when the output folder holds finished
    cases of another method (``--overwrite`` replaces them in ``_run``; failed ones hold no result to
    pool), this run's input files under other case names (they would be counted twice, whatever
    ``--overwrite`` says), or a case name made from another file (``--overwrite`` replaces it)."""
    from .consistency import conflict_message, foreign_records, renamed_inputs, replaced_inputs
    from .writer import load_records

    records = load_records(Path(output))
    if not records:
        return
    foreign = [(rec, diffs) for rec, diffs in foreign_records(records, ctx.model_set.digest, ctx.options.to_dict())
               if rec.get("status") == "ok"]
    if foreign and resume:
        raise OutputConflictError(output, conflict_message(foreign),
                                  "Use another -o folder, or --overwrite to replace those results "
                                  "(the other method's cases are deleted; with --shard, each shard replaces its own)")
    renamed = renamed_inputs(records, cases)
    if renamed:
        name, other, path = renamed[0]
        raise OutputConflictError(output, f"already holds {len(renamed)} of this run's input files under other case "
                                  f"names (e.g. {path} is case {other}, this run would add it as {name}); the folder "
                                  "would count them twice",
                                  "Give the inputs from the same folder as the run that made it, or use another -o folder")
    replaced = replaced_inputs(records, cases) if resume else []
    if replaced:
        name, old, new = replaced[0]
        raise OutputConflictError(output, f"holds {len(replaced)} case(s) made from other input files than this "
                                  f"run's (e.g. {name}: {old}, this run: {new}); this run would replace their results",
                                  "Use another -o folder for these inputs, or --overwrite to replace them")


def _check_merge_single_method(out_dir: Path, records: list) -> None:
    """--merge: exit 2, tables untouched, when the finished cases (of ``records``) come from more than one
    method (shards run with different options or model sets): cases.csv and condiff-eval would pool them."""
    from condiff.errors import CondiffError

    from .consistency import check_single_method

    try:
        check_single_method([r for r in records if r.get("status") == "ok"], out_dir)
    except CondiffError as exc:
        raise OutputConflictError(out_dir, exc.problem,
                                  "cases.csv and scores.csv were not rebuilt; rerun the shards of one method with "
                                  "the same options and --overwrite, or move the other method's cases to another "
                                  "folder") from None


def check_log_file(path: Path) -> None:
    """A --log-file must be a file we could append to (its folder may still have to be created);
    exit 2 naming it otherwise. Creates nothing, so --dry-run can check it too."""
    import os

    from condiff.errors import OutputConflictError

    if path.is_dir():
        raise OutputConflictError(path, "is a folder, not a file for the run log", "give a file path to --log-file")
    target = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if (target is not path and not target.is_dir()) or not os.access(target, os.W_OK):
        raise OutputConflictError(path, "cannot be written as the run log"
                                  + ("" if target is path else f" ({target} is not a writable folder)"),
                                  "give a writable file path to --log-file")


def open_run_log(path: Path, arguments: dict):
    """The run's file log (appended to), its folder created."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return add_file_log(str(path), verbose=arguments["verbose"], log_format=arguments["log_format"])


def _device_name(device: str) -> str:
    import platform

    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # a Ray driver without a GPU: run.json's "ray" names the workers' GPUs
            return "cuda (remote workers)"
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _one_screen() -> bool:
    """stdout and stderr both on a terminal: a message printed to both would show twice."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def _dry_run(cases, ctx, n_all: int, shard_t, excluded=()) -> int:
    from .plan import dry_run_status

    click.echo(f"condiff-infer --dry-run: {len(cases)} case(s)"
               f"{'' if shard_t is None else f' (shard {shard_t[0]}/{shard_t[1]} of {n_all})'}; "
               f"model set {ctx.model_set.root} ({len(ctx.members)} of {len(ctx.model_set)} members, digest "
               f"{ctx.model_set.digest[:12]}); {ctx.options.engine} on {ctx.device}; output {ctx.out_dir}")
    n_bad = 0
    one_screen = _one_screen()
    for case in cases:
        status, reason, plan = dry_run_status(case, ctx)
        if status == "invalid":
            n_bad += 1
            click.echo(f"  invalid  {case.name}: {reason}")
            if not one_screen:
                _echo_err(f"INVALID {case.name}: {reason}")
            continue
        click.echo(f"  {status:<8} {case.name}  <- {case.path}  ({reason})")
        for rel in [*plan.outputs.values(), plan.record]:
            click.echo(f"             {rel}")
    from condiff.io.cases import in_bids_reserved_folder

    reserved = [p for p in excluded if in_bids_reserved_folder(p)]
    for path in excluded:
        why = ("in a BIDS dataset's derivatives/, sourcedata/ or code/" if path in reserved
               else "a mask or label map by its name")
        click.echo(f"  excluded {path}  ({why})")
    n_named = len(excluded) - len(reserved)
    click.echo(f"{len(cases) - n_bad} case(s) valid, {n_bad} invalid"
               + (f", {n_named} file(s) excluded as masks or label maps" if n_named else "")
               + (f", {len(reserved)} file(s) in the dataset's derivatives/, sourcedata/, code/ skipped" if reserved else "")
               + "; no model was loaded")
    return EXIT_FAILED if n_bad else EXIT_OK


def _merge(out_dir: Path) -> int:
    from condiff.errors import OutputConflictError
    from condiff.io.lock import lock_holders

    from . import writer
    from .evaluate import unfinished_runs

    if not (out_dir / "records").is_dir():
        raise OutputConflictError(out_dir, "has no records/ folder", "give the -o folder of a condiff-infer run")
    records = writer.load_records(out_dir)  # once: the method check, the tables and the sidecars see one view
    _check_merge_single_method(out_dir, records)
    whole = [(holder, state) for name, holder, state in lock_holders(out_dir) if name == ".condiff.lock"]
    if whole and whole[0][1] != "stale":  # the tables are that run's to write: two writers would race
        click.echo(f"condiff-infer --merge: {out_dir / '.condiff.lock'}: a whole-folder run ({whole[0][0] or 'unknown'}) "
                   "is writing this folder and its tables now; nothing was merged. Run --merge after it finishes "
                   "(if no run is active, delete the lock)", err=True)
        return EXIT_FAILED
    writer.clean_orphans(out_dir, dead_writers_only=True)
    counts = writer.rebuild_tables(out_dir, records)
    if any((r.get("options") or {}).get("layout") == "bids" for r in records):
        from .bids import write_sidecars

        write_sidecars(out_dir, records)
    click.echo(f"condiff-infer --merge: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed -> "
               f"{out_dir / 'cases.csv'}, {out_dir / 'scores.csv'}")
    # shards that never ran (or still run), interrupted runs, locks of killed or live runs: the tables lack cases
    unfinished = unfinished_runs(out_dir, "from the tables")
    for what, why in unfinished:
        click.echo(f"warning: {out_dir / what if what.startswith(('run', '.condiff')) else what}: {why}", err=True)
    return EXIT_FAILED if counts.get("failed") or unfinished else EXIT_OK


# ----------------------------------------------------------------------------------------- eval


@click.command("condiff-eval", context_settings=CONTEXT)
@click.argument("out_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--masks", "mask_pattern", required=True, metavar="PATTERN", callback=mask_pattern_option_check,
              help="Label mask per case, e.g. '{dir}/{stem}_seg.nii.gz' ({dir}, {stem}, {base}, {case}, {casedir}, "
                   "{root} of the input, as --mask of condiff-infer).")
@click.option("--protocol", type=click.Choice(["native", "benchmark"]), default="native", show_default=True,
              help="native: the written maps on the input grid; benchmark: the reference code's evaluation, in model "
                   "slice space (needs --save-model-space at inference).")
@click.option("--missing-label", type=click.Choice(["error", "normal"]), default="error", show_default=True,
              help="A case without a label file: error (not evaluated, exit 1) or normal (a case without lesion).")
@click.option("--label-values", metavar="V,V,...", callback=lambda ctx, param, text: _label_values(text),
              help="Only these values of the label maps are lesion, e.g. BraTS 2013/2015 '4' (enhancing tumour) or "
                   "'1,3,4' (tumour core) [default: every value > 0]. NIfTI label maps only.")
@click.option("--baselines", is_flag=True,
              help="benchmark protocol: also score four non-learned maps on the same pixels, the input's intensity "
                   "inside the brain ('bright'), its complement ('dark'), its deviation from the local median "
                   "('median') and the brain mask itself ('area': slice size alone), and chance: is the model "
                   "better than thresholding brightness?")
@click.option("--threshold", "threshold_text", metavar="T|METRICS.json",
              help="Also report the Dice at a threshold chosen outside the evaluated data: a number, or the "
                   "metrics-<protocol>.json of condiff-eval on other (e.g. validation) cases, whose best-Dice "
                   "threshold is taken; the per-case rows use it too.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
              help="N case resamples (e.g. 1000): 95 % intervals of the metrics and of the ensemble's difference "
                   "to each member and baseline row; 0: none.")
@click.option("--bootstrap-seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the case resamples.")
@click.option("--lesion-iou", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.25, show_default=True,
              help="IoU at which a lesion and a called region match in the lesion-wise counts (0.25: the Shifts MS "
                   "track's lesion F1; a tiny value such as 1e-9 counts any overlap).")
@progress_option
@click.option("--overlays/--no-overlays", default=True, show_default=True,
              help="native protocol: also write eval-overlays/<case>.png, the label's outline on the input and on "
                   "the map, for the slices holding the most label.")
@click.option("--overlay-max", type=str, default=None, metavar="VALUE|shared", callback=lambda c, p, v: _eval_scale(v),
              help="Top of the eval figures' colour scale, the same for every case so colours compare across "
                   "cases: a map value, or 'shared' (the largest map value of the evaluated cases); higher values "
                   "saturate [default: each case's own maximum].")
@verbose_option
@version_option
def eval_main(**kw: Any) -> None:
    """Pixel and sample metrics (AP_i, AUROC, AP_p, best Dice; Dice at 5 % FPR, AUPRO) of a condiff-infer
    output folder, and lesions found / false regions at the best-Dice (or given) threshold."""
    run_command(lambda: _eval(**kw), verbose=kw["verbose"])


def _label_values(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integer label values",
                                 param_hint="--label-values") from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"{text!r}: give one or more label values above 0 (0 is background)",
                                 param_hint="--label-values")
    return tuple(sorted(set(values)))


def _eval(out_dir: Path, mask_pattern: str, protocol: str, missing_label: str, label_values, baselines: bool,
          threshold_text: str | None, bootstrap: int, bootstrap_seed: int, lesion_iou: float, progress: bool,
          overlays: bool, overlay_max: float | None, verbose: int) -> int:
    from tqdm import tqdm

    from condiff.io.atomic import write_json_atomic, write_text_atomic
    from condiff.io.lock import EvalLock

    from .evaluate import cases_csv, evaluate, format_table, read_given_threshold, table_csv

    with logging_to(verbose, echo=_echo_err), EvalLock(out_dir):
        if baselines and protocol != "benchmark":
            raise click.UsageError("--baselines needs --protocol benchmark (the baselines are scored on the "
                                   "model-space slices that --save-model-space writes)")
        given = None if threshold_text is None else read_given_threshold(threshold_text, protocol)
        with tqdm(total=bootstrap, unit="resample", desc="condiff-eval bootstrap", file=sys.stderr,
                  disable=not (bootstrap and progress and sys.stderr.isatty())) as bar:
            ev = evaluate(out_dir, mask_pattern, protocol, overlays=overlays and protocol == "native",
                          missing_label=missing_label, label_values=label_values, baselines=baselines,
                          threshold=given, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, progress=bar.update,
                          lesion_iou=lesion_iou, overlay_max=overlay_max)
        if not ev.rows:  # nothing evaluated (a mistyped --masks): keep the metrics of an earlier evaluation
            for case, err in ev.failures:
                _echo_err(f"NOT EVALUATED {case}: {err}")
            _echo_err(f"no case could be evaluated; {out_dir / f'metrics-{protocol}.json'} and its tables were "
                      "not written (earlier ones are kept)")
            return EXIT_FAILED
        click.echo(format_table(ev))
        doc = _nan_to_none(ev.to_dict())  # JSON has no NaN: a metric without both classes is null
        write_json_atomic(out_dir / f"metrics-{protocol}.json", doc)
        write_text_atomic(out_dir / f"metrics-{protocol}.csv", table_csv(ev))
        write_text_atomic(out_dir / f"metrics-{protocol}-cases.csv", cases_csv(ev))
        for case, err in ev.failures:
            _echo_err(f"NOT EVALUATED {case}: {err}")
        return EXIT_FAILED if ev.failures else EXIT_OK


def _nan_to_none(obj):
    import math

    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


__all__ = ["infer_main", "eval_main", "bundled"]


if __name__ == "__main__":  # python -m condiff.engine.cli == condiff-infer
    infer_main()
