"""Export a condiff model folder to ONNX: ``model.onnx`` + ``model.onnx.json``, kept only once checked.

Graph contract (the engine's ``ort`` backend and the TensorRT build read it):
inputs ``x_t``, ``cond`` float32 (B, C, H, W) and ``t`` int64 (B,); output ``eps`` float32
(B, C, H, W); only the batch axis is dynamic (H, W are the model's ``sample_size``).

The file is traced (TorchScript exporter: torch 2.13's default dynamo exporter needs onnxscript,
which condiff does not depend on) to a temporary name in the destination folder, checked with
``onnx.checker`` (path-based, so a > 2 GB model would work too), run in ONNX Runtime (CPU, fp32)
at a batch size other than the traced one and compared with the eager torch network (SDPA
attention) within ``atol`` (1e-4, DESIGN §5), and then run through a short reverse diffusion on a
calibration set beside eager torch, comparing the anomaly maps, scores and AP users would get
(``condiff.export.parity``). Only then is it renamed to its final name and its sidecar written; any
failure removes the temporary file and leaves the final name untouched.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from condiff import artifacts
from condiff.errors import CondiffError, ExportError, short_message
from condiff.io.atomic import remove_stale_temp_files, temp_path
from condiff.modelset import load_model
from condiff.optional import require
from condiff.unet import ConditionalUNet, sdpa_attention

from condiff.export.attention import VARIANTS, export_warnings_off, make_attention
from condiff.export.parity import CALIBRATION_IMAGES, FP32, MapParity, check_size, map_parity

logger = logging.getLogger(__name__)

INPUT_NAMES = ("x_t", "cond", "t")
OUTPUT_NAME = "eps"
DEFAULT_OPSET = 17
ATOL = 1e-4
# ONNX Runtime's contrib operators live in this domain (MultiHeadAttention, version 1).
_CUSTOM_OPSETS = {"com.microsoft": 1}


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote and how well it matched torch."""

    path: Path
    sidecar: Path | None
    attention: str
    max_abs_diff: float
    seconds: float
    maps: MapParity | None = None  # None when the map check was skipped (map_steps 0)


def resolve_attention(attention: str, target: str = "ort") -> str:
    """``auto`` -> ``ort_mha`` for ONNX Runtime (fused, bounded memory, fastest on the CPU) and
    ``sdpa`` (plain MatMul → Softmax → MatMul, which TensorRT fuses) for a TensorRT build."""
    if attention == "auto":
        return "ort_mha" if target == "ort" else "sdpa"
    if attention not in VARIANTS:
        raise ValueError(f"unknown attention {attention!r}; choose auto or one of {VARIANTS}")
    if attention == "ort_mha" and target != "ort":
        raise ValueError("ort_mha is an ONNX Runtime contrib operator; TensorRT cannot parse it (use sdpa or chunked)")
    return attention


# Largest fp32 score tensor (one image, one layer) an unchunked graph may ask ONNX Runtime for.
MAX_PLAIN_SCORE_BYTES = 1 << 30


def largest_score_bytes(cfg) -> int:
    """Bytes of the largest fp32 attention score tensor (heads × N × N) of one image, over all layers."""
    n = len(cfg.block_out_channels)
    layers = []  # (channels, resolution) of each attention layer
    for i, kind in enumerate(cfg.down_block_types):
        if kind == "AttnDownBlock2D":
            layers.append((cfg.block_out_channels[i], cfg.sample_size >> i))
    for i, kind in enumerate(cfg.up_block_types):
        if kind == "AttnUpBlock2D":
            layers.append((cfg.block_out_channels[n - 1 - i], cfg.sample_size >> (n - 1 - i)))
    if cfg.add_attention:
        layers.append((cfg.block_out_channels[-1], cfg.sample_size >> (n - 1)))
    return max(((ch // (cfg.attention_head_dim or ch)) * (res * res) ** 2 * 4 for ch, res in layers), default=0)


def _temp_name(final: Path) -> Path:
    return temp_path(final)


def _example_inputs(channels: int, size: int, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, channels, size, size, generator=g)
    cond = torch.rand(batch, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g, dtype=torch.int64)
    return x_t, cond, t


def trace_to_onnx(model: ConditionalUNet, path: str | Path, *, variant: str, chunk_size: int | None = None,
                  pad_head_dim: int | None = None, opset: int = DEFAULT_OPSET, trace_batch: int = 2) -> None:
    """Trace ``model`` with the export attention ``variant`` to ``path`` (no checks; see ``write_checked_onnx``).

    The model's attention is restored to SDPA afterwards.
    """
    cfg = model.config
    inputs = _example_inputs(cfg.image_channels, cfg.sample_size, trace_batch, seed=1)
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    model.set_attention_fn(make_attention(variant, chunk_size=chunk_size, pad_head_dim=pad_head_dim))
    try:
        with torch.no_grad(), export_warnings_off():
            torch.onnx.export(model, inputs, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True,
                              custom_opsets=_CUSTOM_OPSETS if variant == "ort_mha" else None, dynamo=False)
    finally:
        model.set_attention_fn(sdpa_attention)
    _declare_output_shape(path, (cfg.image_channels, cfg.sample_size, cfg.sample_size))


def _declare_output_shape(path: str | Path, image_shape: tuple[int, int, int]) -> None:
    """State ``eps`` as (batch, C, H, W): ONNX shape inference stops at ORT's contrib operator, which
    would leave the output's C, H, W as anonymous symbols."""
    onnx = require("onnx", "ort")
    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if all(d.dim_value == want for d, want in zip(dims[1:], image_shape)):
        return
    for d, want in zip(dims[1:], image_shape):
        d.Clear()
        d.dim_value = want
    onnx.save(model, str(path))


def check_onnx(path: str | Path) -> None:
    """``onnx.checker`` on the file path (works for models with external data too)."""
    onnx = require("onnx", "ort")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx raises its own ValidationError and sometimes plain errors
        raise ExportError(path, f"onnx.checker rejected the exported graph ({exc})") from exc


def ort_cpu_session(path: str | Path, threads: int | None = None):
    """A plain ONNX Runtime CPU session (fp32, all graph optimisations) for checks."""
    ort = require("onnxruntime", "ort")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff_vs_torch(path: str | Path, model: ConditionalUNet, *, batch: int = 1, seed: int = 0,
                          threads: int | None = None, session=None, seconds: dict | None = None) -> float:
    """Max |eps_ORT - eps_torch| on seeded random inputs at ``batch`` (torch with SDPA attention).

    ``seconds``: filled with ``{"ort": ..., "torch": ...}``, each call's wall time per image."""
    cfg = model.config
    x_t, cond, t = _example_inputs(cfg.image_channels, cfg.sample_size, batch, seed)
    session = session or ort_cpu_session(path, threads)
    start = time.perf_counter()
    (eps_ort,) = session.run([OUTPUT_NAME], {"x_t": x_t.numpy(), "cond": cond.numpy(), "t": t.numpy()})
    middle = time.perf_counter()
    model.set_attention_fn(sdpa_attention)
    with torch.inference_mode():
        eps = model(x_t, cond, t)
    if seconds is not None:
        seconds.update(ort=(middle - start) / batch, torch=(time.perf_counter() - middle) / batch)
    return float((torch.from_numpy(eps_ort) - eps).abs().max())


def ort_denoiser(session):
    """An ONNX Runtime session as the sampler's ``eps = denoise(x_t, cond, t)`` (CPU tensors)."""
    def denoise(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        (eps,) = session.run([OUTPUT_NAME], {"x_t": x_t.numpy(), "cond": cond.numpy(), "t": t.numpy()})
        return torch.from_numpy(eps)

    return denoise


def check_maps(session, model: ConditionalUNet, modality: str | None, steps: int, where: Path,
               images: int = CALIBRATION_IMAGES) -> MapParity:
    """The map check (``condiff.export.parity``) of an ONNX Runtime session; ``ExportError`` if it fails."""
    cfg = model.config
    model.set_attention_fn(sdpa_attention)
    logger.info("checking maps: %d DDPM steps on %d calibration images, ONNX Runtime against torch", steps, images)
    parity = map_parity(model, ort_denoiser(session), cfg.image_channels, cfg.sample_size, modality, steps=steps,
                        n=images)
    return parity.require(FP32, where, "ONNX Runtime's",
                          "nothing was written; report this with the model's config.json")


def write_checked_onnx(model: ConditionalUNet, final_path: str | Path, *, variant: str, chunk_size: int | None = None,
                       pad_head_dim: int | None = None, opset: int = DEFAULT_OPSET, atol: float = ATOL,
                       trace_batch: int = 2, check_batch: int = 1, threads: int | None = None,
                       before_replace: Callable[[], None] | None = None, map_steps: int | None = 0,
                       modality: str | None = None, ort_check: bool = True) -> tuple[float | None, MapParity | None]:
    """Trace, check and compare; rename to ``final_path`` only if every check passes.

    ``map_steps``: the map check's DDPM steps on 4 images; None sizes it to the network's speed
    (``parity.check_size``); 0 skips it. Returns (max |Δeps|, the map check or None when skipped).
    ``check_batch`` differs from ``trace_batch`` so the comparison also proves the batch axis is dynamic.
    On any failure the temporary file is removed and ``final_path`` is left as it was.
    ``ort_check=False`` (the TensorRT build of a large network, checked on the GPU afterwards) writes the
    checked graph without running it in ONNX Runtime: no Δeps (None), no map check.
    ``before_replace`` runs after the checks, just before the rename (e.g. to drop a stale sidecar).
    """
    final_path = Path(final_path)
    tmp = _temp_name(final_path)
    try:
        trace_to_onnx(model, tmp, variant=variant, chunk_size=chunk_size, pad_head_dim=pad_head_dim,
                      opset=opset, trace_batch=trace_batch)
        check_onnx(tmp)
        diff, maps = (_compare_in_ort(tmp, final_path, model, atol=atol, check_batch=check_batch, threads=threads,
                                      map_steps=map_steps, modality=modality) if ort_check else (None, None))
        if before_replace is not None:
            before_replace()
        os.replace(tmp, final_path)
    except CondiffError:  # ExportError, or a missing onnx/onnxruntime naming its extra
        raise
    except Exception as exc:
        raise ExportError(final_path, f"ONNX export failed ({type(exc).__name__}: {short_message(exc)})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return diff, maps


def _compare_in_ort(tmp: Path, final_path: Path, model: ConditionalUNet, *, atol: float, check_batch: int,
                    threads: int | None, map_steps: int | None, modality: str | None) -> tuple[float, MapParity | None]:
    """``write_checked_onnx``'s ONNX Runtime checks of the traced graph ``tmp``: eps against torch, then
    the map check (sized to the network's speed when ``map_steps`` is None)."""
    session = ort_cpu_session(tmp, threads)
    seconds: dict = {}
    diff = max_abs_diff_vs_torch(tmp, model, batch=check_batch, threads=threads, session=session, seconds=seconds)
    if not diff <= atol:  # also catches NaN
        raise ExportError(final_path, f"ONNX Runtime output differs from torch by {diff:.3g} "
                          f"(max abs, batch {check_batch}), more than the tolerance {atol:g}",
                          "nothing was written; report this with the model's config.json")
    images, steps = CALIBRATION_IMAGES, map_steps
    if map_steps is None:
        images, steps = check_size(seconds["ort"] + seconds["torch"])
        if steps < 10:
            logger.info("map check sized to the network's speed (%.1f s a call, torch and ONNX Runtime): "
                        "%d steps on %d images; --map-check-steps 10 for the full check",
                        seconds["ort"] + seconds["torch"], steps, images)
    return diff, (check_maps(session, model, modality, steps, final_path, images) if steps else None)


def export_onnx(model_dir: str | Path, *, attention: str = "auto", opset: int = DEFAULT_OPSET,
                chunk_size: int | None = None, atol: float = ATOL, check_batch: int = 1,
                threads: int | None = None, map_steps: int | None = None) -> OnnxExport:
    """Write ``model_dir/model.onnx`` and its sidecar ``model.onnx.json`` for ONNX Runtime.

    ``attention``: ``auto`` (= ``ort_mha``), ``ort_mha``, ``chunked`` (portable, bounded memory;
    ``chunk_size`` query rows per chunk, default from a 128 MiB score budget per image) or ``sdpa``
    (plain, unbounded memory: small models only). ``map_steps``: DDPM steps of the map check on the
    calibration set (None: 10 on 4 images, smaller for slow networks; 0 skips it, the sidecar says so). Raises ``ExportError`` (nothing written)
    when a check fails. Temporary files a killed earlier export left in ``model_dir`` are removed first
    (``remove_stale_temp_files``).
    """
    start = time.perf_counter()
    model_dir = Path(model_dir)
    remove_stale_temp_files(model_dir)  # a killed earlier export's .model.onnx.<pid>.<token>.tmp, sidecar, plan
    variant = resolve_attention(attention, "ort")
    if variant != "chunked":
        chunk_size = None  # only the chunked graph has chunks
    model, config = load_model(model_dir)
    scores = largest_score_bytes(config.unet)
    if variant == "sdpa" and scores > MAX_PLAIN_SCORE_BYTES:
        raise ExportError(model_dir, f"--attention sdpa would make ONNX Runtime hold a {scores / 2**30:.1f} GiB attention "
                          "score tensor per image (twice, for the softmax)", "use --attention auto or chunked")
    fingerprint = artifacts.model_fingerprint(model_dir)
    final = model_dir / artifacts.ONNX_NAME
    # A stale sidecar must never describe the new file: drop it before the rename, write the new one after.
    old_sidecar = artifacts.sidecar_path(final)
    logger.info("exporting %s to ONNX (attention %s, opset %d)", model_dir, variant, opset)
    diff, maps = write_checked_onnx(model, final, variant=variant, chunk_size=chunk_size, opset=opset, atol=atol,
                                    check_batch=check_batch, threads=threads,
                                    before_replace=lambda: old_sidecar.unlink(missing_ok=True),
                                    map_steps=map_steps, modality=(config.preprocessing or {}).get("modality"))
    ort = require("onnxruntime", "ort")
    onnx = require("onnx", "ort")
    build_options = {"opset": opset, "attention": attention if attention != "auto" else None,
                     "chunk_size": chunk_size}
    sidecar = artifacts.write_sidecar(final, {
        "kind": "onnx",
        "artifact_sha256": artifacts.file_sha256(final),
        **fingerprint,
        "opset": opset,
        "precision": "fp32",
        "attention": {"variant": variant, "chunk_size": chunk_size, "pad_head_dim": None},
        "batch_profile": {"dynamic": True},
        "image_shape": [config.image_channels, config.unet.sample_size, config.unet.sample_size],
        "io": {"inputs": list(INPUT_NAMES), "outputs": [OUTPUT_NAME]},
        "check": {"max_abs_diff": diff, "atol": atol, "batch": check_batch, "against": "torch fp32 eager (SDPA)",
                  "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
                  "maps": maps.to_dict(FP32) if maps is not None else "skipped (--map-check-steps 0)"},
        "build_options": build_options,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    })
    seconds = time.perf_counter() - start
    logger.info("wrote %s (max |Δ| vs torch %.2e, %.1f s)", final, diff, seconds)
    return OnnxExport(final, sidecar, variant, diff, seconds, maps)
