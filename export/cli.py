"""``condiff-export``: ONNX (and with ``--trt`` TensorRT FP16) artifacts beside a model's weights.

CKPT is a condiff model folder, a model set (every member is exported), or a diffusers
``UNet2DModel`` folder as the reference saves it (``unet_ema/`` or ``unet/`` inside a run folder
are found too), which is imported into ``-o OUT`` first. With ``-o`` a condiff folder or set is
copied (config and weights only) to OUT and exported there; without it the artifacts are written
beside the weights in place.

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
from condiff.errors import ExportError, ModelFolderError, OutputConflictError
from condiff.modelset import CONFIG, SET_FILE, WEIGHTS, open_model_set

logger = logging.getLogger(__name__)

_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
SET_DOCUMENTS = ("README.md", "LICENSE", "LICENSE.txt", "CITATION.bib")


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


def _copy_model(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        shutil.copy2(src / name, dst / name)


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
        return [import_diffusers_unet(diffusers_dir, out, preprocessing=contract)]
    model_set = open_model_set(ckpt)
    if out is None:  # in place: every member folder must take the new files
        for member in model_set.member_dirs:
            if not os.access(member, os.W_OK | os.X_OK):
                raise OutputConflictError(member, "is not writable, so its artifacts cannot be written beside it",
                                          "export a copy with -o OUT")
        return list(model_set.member_dirs)
    _refuse_nonempty(out)
    if not (ckpt / SET_FILE).is_file():
        _copy_model(ckpt, out)
        return [out]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ckpt / SET_FILE, out / SET_FILE)  # member paths are relative, so the set stays valid
    for card in SET_DOCUMENTS:  # the model card and licence travel with the weights
        if (ckpt / card).is_file():
            shutil.copy2(ckpt / card, out / card)
    members = []
    for member in model_set.member_dirs:
        dst = out / member.relative_to(ckpt)
        _copy_model(member, dst)
        members.append(dst)
    return members


def _refuse_nonempty(out: Path) -> None:
    """-o OUT must be new or empty, and creatable: checked before anything is read or copied."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputConflictError(out, "already exists and is not an empty folder",
                                  f"choose a new -o OUT (if an interrupted export left it, finish it in place: "
                                  f"condiff-export {out})")
    from condiff.io.atomic import check_creatable

    check_creatable(out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("ckpt", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a copy of the model(s) with their artifacts here (required for a diffusers folder).")
@click.option("--trt", is_flag=True, help="Also build model.fp16.plan with TensorRT (needs a GPU and tensorrt).")
@click.option("--opset", type=click.IntRange(14, 23), default=17, show_default=True, help="ONNX opset.")
@click.option("--attention", type=click.Choice(["auto", "chunked", "ort_mha", "sdpa"]), default="auto", show_default=True,
              help="Attention in model.onnx: auto = ort_mha (ONNX Runtime's fused operator); chunked = portable "
                   "query-chunked plain ops, bounded memory; sdpa = plain, unbounded memory (small models only).")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help="Query rows per chunk for --attention chunked [default: from a 128 MiB score budget per image].")
@click.option("--pad-head-dim", type=click.IntRange(min=0), default=16, show_default=True,
              help="TensorRT only: zero-pad the attention head dim to this size (0: keep 8).")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True, help="TensorRT profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=16, show_default=True, help="TensorRT profile: tuned batch.")
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
                               pad_head_dim=pad_head_dim, batches=(min_batch, opt_batch, max_batch),
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
        from condiff.export.trt_build import BatchProfile, build_trt
        from condiff.optional import require

        try:
            profile = BatchProfile(*batches)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        require("tensorrt", "trt")  # fail before any work, not after the first ONNX export
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
