"""``condiff-export``: ONNX (and with ``--trt`` TensorRT FP16) artifacts beside a model's weights.

CKPT is a condiff model folder, a model set (every member is exported), or a diffusers
``UNet2DModel`` folder as the reference saves it (``unet_ema/`` or ``unet/`` inside a run folder
are found too), which is imported into ``-o OUT`` first. With ``-o`` a condiff folder or set is
copied (config and weights only) to OUT and exported there; without it the artifacts are written
beside the weights in place. The copy writes each file under a temporary name and renames it
whole, ``set.json`` (a single folder's ``config.json``) last, so an interrupted copy never leaves a
partial file under a final name, and rerunning the same command resumes it.

Exit codes: 0 every artifact written; 1 some member failed (the others are written; each failure
is printed with its file and reason); 2 usage or configuration error before any export.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import click

from condiff.cli_common import EXIT_FAILED, EXIT_OK, logging_to, run_command, verbose_option, version_option
from condiff.io.atomic import is_utf8_path
from condiff.errors import ExportError, ModelFolderError, ModelSetError, OutputConflictError
from condiff.modelset import CONFIG, SET_FILE, WEIGHTS, open_model_set

logger = logging.getLogger(__name__)

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SET_DOCUMENTS = ("README.md", "LICENSE", "LICENSE.txt", "CITATION.bib")  # + any LICENSE-*.txt (data licences)


def find_diffusers_folder(path: Path) -> Path | None:
    """``path`` itself, or its ``unet_ema/`` / ``unet/`` subfolder, when it holds a diffusers UNet2DModel."""
    for candidate in (path, path / "unet_ema", path / "unet"):
        cfg = candidate / CONFIG
        if not cfg.is_file():
            continue
        try:
            raw = json.loads(cfg.read_text(encoding="utf-8"))
        except (ValueError, OSError):  # not JSON, not UTF-8, unreadable: not a diffusers folder
            continue
        if isinstance(raw, dict) and raw.get("_class_name") == "UNet2DModel":
            return candidate
    return None


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` (bytes and metadata, as ``shutil.copy2``) so that ``dst`` is whole or absent: to a
    temporary name in ``dst``'s folder (``condiff.io.atomic``'s), fsynced, then renamed."""
    from condiff.io.atomic import fsync_dir, temp_path

    tmp = temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:  # before copystat: a read-only source's mode would forbid opening it
            os.fsync(f.fileno())
        shutil.copystat(src, tmp)
        os.replace(tmp, dst)
    except BaseException:  # also KeyboardInterrupt and condiff's SIGTERM: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def _copy_plan(ckpt: Path, model_set) -> list[tuple[Path, Path]]:
    """(source file, path in OUT) of a ``-o`` copy, in copy order: members' weights and config, the set's
    documents, and ``set.json`` last (a single folder: ``config.json`` last), so that OUT is a model set
    or folder only once every file it names is whole."""
    if not (ckpt / SET_FILE).is_file():
        return [(ckpt / WEIGHTS, Path(WEIGHTS)), (ckpt / CONFIG, Path(CONFIG))]
    plan = []
    for member in model_set.member_dirs:
        rel = member.relative_to(ckpt)  # member paths are relative, so the copied set.json stays valid
        plan += [(member / WEIGHTS, rel / WEIGHTS), (member / CONFIG, rel / CONFIG)]
    documents = [*SET_DOCUMENTS, *sorted(p.name for p in ckpt.glob("LICENSE-*.txt"))]
    plan += [(ckpt / card, Path(card)) for card in documents if (ckpt / card).is_file()]  # model card, licences
    plan.append((ckpt / SET_FILE, Path(SET_FILE)))
    return plan


def _copy(out: Path, plan: list[tuple[Path, Path]]) -> None:
    from condiff.io.atomic import create_folder

    create_folder(out)  # exit 2 naming OUT where it cannot be made
    for src, rel in plan:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        _copy_file(src, dst)


def read_contract(source: Path) -> dict:
    """A preprocessing contract from a JSON file (the contract itself, or a condiff config.json holding one)
    or from a condiff model folder; checked by ``PreprocessConfig``."""
    from condiff.preprocess import PreprocessConfig

    path = source / CONFIG if source.is_dir() else source
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ModelFolderError(path, f"cannot be read as a preprocessing contract ({exc})") from None
    contract = doc.get("preprocessing", doc) if isinstance(doc, dict) else None
    try:
        return PreprocessConfig.from_dict(contract).to_dict()
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelFolderError(path, f"holds no valid preprocessing contract ({exc})",
                               'give a JSON object such as {"modality": "mri", "image_size": 128, ...} '
                               "or a condiff model folder trained the same way") from None


def prepare_models(ckpt: Path, out: Path | None, import_diffusers: bool, contract: dict | None = None) -> list[Path]:
    """The model folders to export: imported, copied to ``out``, or ``ckpt``'s own members."""
    diffusers_dir = find_diffusers_folder(ckpt)
    if import_diffusers or diffusers_dir is not None:
        if diffusers_dir is None:
            raise ModelFolderError(ckpt, "is not a diffusers UNet2DModel folder (no config.json with "
                                   "_class_name UNet2DModel here or in unet_ema/ or unet/)")
        if out is None:
            raise OutputConflictError(ckpt, "a diffusers folder is imported into a new condiff model folder",
                                      "give one with -o OUT")
        only_pickle = not (diffusers_dir / _DIFFUSERS_WEIGHTS[0]).is_file() and (diffusers_dir / _DIFFUSERS_WEIGHTS[1]).is_file()
        if only_pickle and not import_diffusers:
            raise ModelFolderError(diffusers_dir / _DIFFUSERS_WEIGHTS[1], "pickled weights are read only on explicit request",
                                   f"run: condiff-export --import-diffusers {ckpt} -o {out}")
        _refuse_nonempty(out)
        from condiff.export.diffusers_import import import_diffusers_unet

        logger.info("importing diffusers UNet2DModel %s into %s", diffusers_dir, out)
        if contract is None:
            logger.warning("%s: imported without a preprocessing contract; condiff-infer refuses it until one is "
                           "given (rerun with --preprocessing FILE_OR_MODEL_FOLDER)", out)
        from condiff.io.atomic import create_folder

        create_folder(out)
        return [import_diffusers_unet(diffusers_dir, out, preprocessing=contract)]
    try:
        model_set = open_model_set(ckpt)
    except ModelSetError as exc:
        if out is None and _may_be_unfinished_copy(ckpt, exc):
            hint = f"{exc.hint}; " if exc.hint else ""
            raise ModelSetError(exc.path, exc.problem, f"{hint}if an interrupted copy left it, rerun the command that "
                                f"made it (condiff-export SET -o {ckpt}): the copy resumes") from None
        raise
    if out is None:  # in place: every member folder must take the new files
        for member in model_set.member_dirs:
            if not os.access(member, os.W_OK | os.X_OK):
                raise OutputConflictError(member, "is not writable, so its artifacts cannot be written beside it",
                                          "export a copy with -o OUT")
        return list(model_set.member_dirs)
    plan = _copy_plan(ckpt, model_set)
    _copy(out, _left_to_copy(out, plan))
    if not (ckpt / SET_FILE).is_file():
        return [out]
    return [out / member.relative_to(ckpt) for member in model_set.member_dirs]


def _may_be_unfinished_copy(folder: Path, exc: ModelSetError) -> bool:
    """Whether ``folder``, which ``open_model_set`` refused, may be what an interrupted ``-o`` copy left:
    set.json with a member's weights missing or not matching (an older condiff wrote set.json first
    and copied in place), or model files without set.json / config.json (they are written last)."""
    if (folder / SET_FILE).is_file():
        return exc.path is not None and Path(exc.path).name == WEIGHTS
    if (folder / CONFIG).is_file():
        return False
    try:
        return (folder / WEIGHTS).is_file() or any((sub / CONFIG).is_file() or (sub / WEIGHTS).is_file()
                                                  for sub in folder.iterdir() if sub.is_dir())
    except OSError:
        return False


def _not_empty(out: Path) -> OutputConflictError:
    return OutputConflictError(out, "already exists and is not an empty folder",
                               f"choose a new -o OUT (if an interrupted export left it, finish it in place: "
                               f"condiff-export {out})")


def _refuse_nonempty(out: Path) -> None:
    """-o OUT must be new or empty, and creatable: checked before anything is read or copied."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _not_empty(out)
    from condiff.io.atomic import check_creatable

    check_creatable(out)


def _same_or_prefix(dst: Path, src: Path) -> str:
    """``"same"`` when ``dst`` holds ``src``'s bytes, ``"prefix"`` when it holds their beginning (a copy cut
    short), ``"other"`` otherwise."""
    size, full = dst.stat().st_size, src.stat().st_size
    if size > full:
        return "other"
    with open(dst, "rb") as a, open(src, "rb") as b:
        while block := a.read(1 << 20):
            if b.read(len(block)) != block:
                return "other"
    return "same" if size == full else "prefix"


def _left_to_copy(out: Path, plan: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
    """What of ``plan`` is still to be copied into ``out``: all of it when OUT is new or empty; when OUT
    holds an unfinished copy of the same source, the files missing or cut short. Checked before
    anything is copied.

    An unfinished copy holds nothing but the copy's folders and files, each whole or the beginning
    of its source (what an older condiff left when killed mid-file), and temporary files of condiff
    processes that have exited (removed, logged). A finished copy, or anything else, is refused as
    before (``-o OUT`` must be new or empty); a temporary file of a live process means another export
    is writing OUT."""
    from condiff.io.atomic import remove_stale_temp_files, temp_writer_pid
    from condiff.io.lock import process_exited

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        _refuse_nonempty(out)  # creatable
        return plan
    if not out.is_dir():
        raise _not_empty(out)
    from condiff.io.atomic import check_creatable

    check_creatable(out)  # writable
    files = {rel.as_posix() for _, rel in plan}
    folders = {parent.as_posix() for _, rel in plan for parent in rel.parents if parent != Path(".")}
    stale_in = set()
    for dirpath, dirnames, filenames in os.walk(out):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(out).as_posix()
            if path.is_symlink():
                raise _not_empty(out)
            if name in dirnames:
                if rel not in folders:
                    raise _not_empty(out)
                continue
            pid = temp_writer_pid(name)
            if pid is not None:
                if not process_exited(pid):
                    raise OutputConflictError(out, f"another process (pid {pid}) is writing {path}",
                                              "let it finish, or stop it and run this command again")
                stale_in.add(path.parent)
            elif rel not in files:
                raise _not_empty(out)
    left = []
    for src, rel in plan:
        dst = out / rel
        if not dst.exists():
            left.append((src, rel))
            continue
        state = _same_or_prefix(dst, src)
        if state == "other":
            raise OutputConflictError(out, f"already exists and is not an empty folder ({dst} is not a copy of {src})",
                                      "choose a new -o OUT, or empty it")
        if state == "prefix":
            logger.warning("%s: cut short by an interrupted copy; copying it again", dst)
            left.append((src, rel))
    if not left:
        raise _not_empty(out)  # a finished copy: its export is finished in place
    for folder in sorted(stale_in):
        remove_stale_temp_files(folder)
    logger.info("%s: resuming an unfinished copy (%d of %d files left to copy)", out, len(left), len(plan))
    return left


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a copy of the model(s) with their artifacts here (required for a diffusers folder).")
@click.option("--trt", is_flag=True, help="Also build model.fp16.plan with TensorRT (needs a GPU and tensorrt).")
@click.option("--opset", type=click.IntRange(14, 20), default=17, show_default=True,
              help="ONNX opset (torch's TorchScript exporter, which condiff uses, supports up to 20; so does "
                   "TensorRT 10.0's parser).")
@click.option("--attention", type=click.Choice(["auto", "chunked", "ort_mha", "sdpa"]), default="auto", show_default=True,
              help="Attention in model.onnx: auto = ort_mha (ONNX Runtime's fused operator); chunked = portable "
                   "query-chunked plain ops, bounded memory; sdpa = plain, unbounded memory (small models only).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Query rows per chunk for --attention chunked [default: from a 128 MiB score budget per image].")
@click.option("--pad-head-dim", type=click.IntRange(min=0), default=16, show_default=True,
              help="TensorRT only: zero-pad the attention head dim to this size (0: keep 8).")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True, help="TensorRT profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None,
              help="TensorRT profile: the batch its kernels are tuned for [default: --max-batch, the batch the trt "
                   "engine runs, since it pads every batch to it for its CUDA graph].")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True, help="TensorRT profile: largest batch.")
@click.option("--workspace-gb", type=click.FloatRange(min=0.25), default=8.0, show_default=True,
              help="TensorRT builder workspace limit.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TensorRT timing cache file [default: one per GPU architecture and TensorRT version in the model folder].")
@click.option("--map-check-steps", type=click.IntRange(0, 1000), default=None,
              help="DDPM steps of the map check: the export and eager fp32 torch restore the same calibration "
                   "images with the same noise, and an export whose maps, scores or AP differ is refused "
                   "(0: skip it; the sidecar says so) [default: 10 on 4 images; for ONNX, fewer (down to 2 on 2) "
                   "when the network is so slow that the check would take more than about 2 minutes].")
@click.option("--import-diffusers", is_flag=True,
              help="CKPT is a diffusers UNet2DModel folder; allows reading its pickled .bin weights.")
@click.option("--preprocessing", "contract_source", type=click.Path(exists=True, path_type=Path), default=None,
              help="With a diffusers folder: the preprocessing contract the network was trained with (a JSON "
                   "object, a condiff config.json, or a condiff model folder); without one condiff-infer "
                   "cannot use the import.")
@verbose_option
@version_option
def main(ckpt: Path, out: Path | None, trt: bool, opset: int, attention: str, chunk_size: int | None,
         pad_head_dim: int, min_batch: int, opt_batch: int, max_batch: int, workspace_gb: float,
         timing_cache: Path | None, map_check_steps: int | None, import_diffusers: bool, contract_source: Path | None,
         verbose: int) -> None:
    """Export CKPT (model folder, model set or diffusers UNet2DModel folder) to ONNX [and TensorRT]."""
    def body() -> int:
        with logging_to(verbose):
            return _export_all(ckpt, out, trt=trt, opset=opset, attention=attention, chunk_size=chunk_size,
                               pad_head_dim=pad_head_dim,
                               batches=(min_batch, max_batch if opt_batch is None else opt_batch, max_batch),
                               workspace_gb=workspace_gb, timing_cache=timing_cache,
                               import_diffusers=import_diffusers, contract_source=contract_source,
                               map_steps=map_check_steps)

    run_command(body, verbose)


def _export_all(ckpt: Path, out: Path | None, *, trt: bool, opset: int, attention: str, chunk_size: int | None,
                pad_head_dim: int, batches: tuple[int, int, int], workspace_gb: float, timing_cache: Path | None,
                import_diffusers: bool, contract_source: Path | None = None, map_steps: int | None = None) -> int:
    from condiff.export.onnx_export import export_onnx

    profile = None
    if trt:
        from condiff.export.trt_build import BatchProfile, build_trt, require_tensorrt

        try:
            profile = BatchProfile(*batches)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        require_tensorrt()  # fail before any work (also on TensorRT 11), not after the first ONNX export
    where = ckpt if out is None else out  # where the artifacts are written (a set elsewhere is copied first)
    if not is_utf8_path(os.path.abspath(where)):
        raise ExportError(where, "is not a UTF-8 path: ONNX and ONNX Runtime read and write UTF-8 paths only",
                          "give -o a UTF-8 folder name (the model set is copied there), or rename the folder")
    contract = None if contract_source is None else read_contract(contract_source)
    models = prepare_models(ckpt, out, import_diffusers, contract)
    failed = 0
    for model_dir in models:
        try:
            result = export_onnx(model_dir, attention=attention, opset=opset, chunk_size=chunk_size, map_steps=map_steps)
            click.echo(f"{result.path}\tattention={result.attention}\tmax_abs_diff={result.max_abs_diff:.2e}"
                       f"\t{_maps_text(result.maps)}\t{result.seconds:.1f}s")
            if trt:
                plan = build_trt(model_dir, profile=profile, workspace_gb=workspace_gb, timing_cache=timing_cache,
                                 attention=attention if attention in ("chunked", "sdpa") else "auto",
                                 pad_head_dim=pad_head_dim or None, chunk_size=chunk_size, opset=opset,
                                 map_steps=map_steps)
                click.echo(f"{plan.path}\tmax_abs_diff={plan.max_abs_diff:.2e}\t{_maps_text(plan.maps)}"
                           f"\tbuild={plan.build_seconds:.1f}s")
        except ExportError as exc:
            failed += 1
            click.echo(f"error: {exc.message}", err=True)
    return EXIT_FAILED if failed else EXIT_OK


def _maps_text(maps) -> str:
    if maps is None:
        return "maps=unchecked"
    return (f"maps ({maps.steps} steps x {maps.images} images): rel_diff={maps.relative_map_diff:.1e} "
            f"corr={maps.min_correlation:.6f} "
            f"AP {maps.ap_export:.4f}/{maps.ap_reference:.4f} (export/torch)")


if __name__ == "__main__":  # pragma: no cover
    main()
