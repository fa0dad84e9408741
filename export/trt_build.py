"""Build ``model.fp16.plan`` (TensorRT, FP16) from a portable ONNX export; keep it only once checked.

Flow (NVIDIA's demo/Diffusion, STYLE §5): export a TensorRT-friendly ONNX (plain
MatMul → Softmax → MatMul attention with q pre-scaled, which TensorRT fuses; head dim zero-padded
8 → 16 by default) to a temporary file and check it in ONNX Runtime against torch (fp32, 1e-4);
parse it with an explicit-batch network; build with FP16, one optimisation profile over the
batch axis (min/opt/max, default 1/64/64), a workspace limit and a timing cache; refuse a
``None`` engine; run the engine once against torch (fp16 tolerance on eps), then a short reverse
diffusion on the calibration set against torch (``condiff.export.parity``: maps, scores, AP within
the FP16 tolerances), and only then rename the plan to its final name and write ``model.fp16.plan.json`` (TensorRT version, GPU name, compute
capability, ONNX digest, profile).

Every ``tensorrt`` import goes through ``condiff.optional.require("tensorrt", "trt")`` inside the
functions, so this module imports without TensorRT. TensorRT could not be installed on any
machine this project has (performance.md §5): this path is unit-tested with a stub module only.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from condiff import artifacts
from condiff.errors import BackendUnavailableError, ExportError
from condiff.io.atomic import write_bytes_atomic
from condiff.modelset import load_model
from condiff.optional import require
from condiff.unet import ConditionalUNet, sdpa_attention

from condiff.export.onnx_export import (ATOL, DEFAULT_OPSET, INPUT_NAMES, MAX_PLAIN_SCORE_BYTES, OUTPUT_NAME,
                                        _example_inputs, largest_score_bytes, resolve_attention, write_checked_onnx)
from condiff.export.parity import CALIBRATION_IMAGES, DEFAULT_STEPS, FP16, MapParity, map_parity

logger = logging.getLogger(__name__)

# fp16 engine vs fp32 torch on eps (max abs). eps is ~N(0, 1); a 20-resnet UNet in fp16 lands around
# 1e-3..1e-2. Maps after 50 steps are judged separately (DESIGN §5); this only catches broken engines.
FP16_ATOL = 5e-2
DEFAULT_WORKSPACE_GB = 8.0
DEFAULT_PAD_HEAD_DIM = 16


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimisation profile over the batch axis."""

    min: int = 1
    opt: int = 64  # = max: with CUDA graphs the trt engine pads every batch to the profile's largest
    max: int = 64

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def shapes(self, *rest: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes with batch first and ``rest`` after it."""
        return (self.min, *rest), (self.opt, *rest), (self.max, *rest)

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass
class TrtBuild:
    path: Path
    sidecar: Path
    max_abs_diff: float
    build_seconds: float
    maps: MapParity | None = None  # None when the map check was skipped


def gpu_identity(device: torch.device | int = 0) -> dict[str, str]:
    """``gpu_name`` and ``compute_capability`` ("9.0") as the sidecar and the runtime record them."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu_name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def default_timing_cache(folder: Path, trt_version: str, compute_capability: str) -> Path:
    """Timing caches are per GPU architecture and TensorRT version (TensorRT warns against sharing them)."""
    tag = re.sub(r"[^0-9A-Za-z.-]+", "", f"sm{compute_capability.replace('.', '')}-trt{trt_version}")
    return folder / f"trt-timing-{tag}.cache"


SUPPORTED_TRT_MAJOR = 10


def require_tensorrt():
    """The ``tensorrt`` module, if it is a version condiff can build with; ``BackendUnavailableError``
    naming the extra otherwise. TensorRT 11 removed ``BuilderFlag.FP16`` (every network is strongly
    typed there), so an FP16 plan would need an FP16 ONNX graph: condiff builds with TensorRT 10."""
    trt = require("tensorrt", "trt")
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if major != str(SUPPORTED_TRT_MAJOR) or not hasattr(trt.BuilderFlag, "FP16"):
        raise BackendUnavailableError(None, f"TensorRT {getattr(trt, '__version__', '?')} is installed; condiff builds "
                                      f"and runs its FP16 plans with TensorRT {SUPPORTED_TRT_MAJOR}.x (11 removed the "
                                      "FP16 builder flag)", "pip install 'tensorrt>=10,<11' (or: pip install 'condiff[trt]')")
    return trt


def build_engine(onnx_path: str | Path, *, image_shape: tuple[int, int, int], profile: BatchProfile = BatchProfile(),
                 workspace_gb: float = DEFAULT_WORKSPACE_GB, timing_cache: str | Path | None = None,
                 fp16: bool = True) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (bytes). ``ExportError`` on any failure.

    ``image_shape`` is (C, H, W); ``x_t`` and ``cond`` get (B, C, H, W) and ``t`` (B,) over the profile.
    The timing cache is read if present and written back (atomically) after a successful build.
    """
    trt = require_tensorrt()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated there, required before).
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(onnx_path, f"TensorRT's ONNX parser rejected the graph ({errors or 'no details'})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name in INPUT_NAMES[:2]:
        opt_profile.set_shape(name, *profile.shapes(*image_shape))
    opt_profile.set_shape(INPUT_NAMES[2], *profile.shapes())
    config.add_optimization_profile(opt_profile)

    cache_path = Path(timing_cache) if timing_cache else None
    blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another GPU or TensorRT version: start a fresh one rather than mix them
        logger.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", cache_path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(onnx_path, "TensorRT returned no engine (build_serialized_network gave None)",
                          "run with -v to see TensorRT's log; a larger --workspace-gb may help")
    if cache_path is not None:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


class EngineRunner:
    """A freshly built ``plan``, deserialized once, as ``eps = runner(x_t, cond, t)`` (any device in,
    float32 on the CPU out): what the export checks call."""

    def __init__(self, plan: bytes, device: torch.device):
        trt = require("tensorrt", "trt")
        self.device = device
        self._int32_t = None
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ExportError(None, "TensorRT could not deserialize the engine it just built")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ExportError(None, "TensorRT could not create an execution context (out of GPU memory?)")
        self._int32_t = self.engine.get_tensor_dtype("t") == trt.int32  # a parser that narrowed the int64 input

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t, cond, t = (a.to(self.device).contiguous() for a in (x_t, cond, t))
        if self._int32_t:
            t = t.to(torch.int32)
        eps = torch.empty_like(x_t)
        for name, tensor in zip((*INPUT_NAMES, OUTPUT_NAME), (x_t, cond, t, eps)):
            if name != OUTPUT_NAME:
                self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ExportError(None, "TensorRT execute_async_v3 failed on a check batch")
        stream.synchronize()
        return eps.float().cpu()


def run_engine_once(plan: bytes, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    device: torch.device) -> torch.Tensor:
    """Deserialize ``plan`` and run one batch -> eps float32 on the CPU."""
    return EngineRunner(plan, device)(*inputs)


def build_trt(model_dir: str | Path, *, profile: BatchProfile = BatchProfile(), workspace_gb: float = DEFAULT_WORKSPACE_GB,
              timing_cache: str | Path | None = None, attention: str = "auto", pad_head_dim: int | None = DEFAULT_PAD_HEAD_DIM,
              chunk_size: int | None = None, opset: int = DEFAULT_OPSET, atol: float = FP16_ATOL,
              device: str | torch.device = "cuda", map_steps: int | None = None) -> TrtBuild:
    """Write ``model_dir/model.fp16.plan`` and its sidecar; ``ExportError`` (nothing written) on failure.

    ``map_steps``: DDPM steps of the map check on the calibration set (None: 10, the GPU makes it
    cheap; 0 skips it)."""
    trt = require_tensorrt()
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise BackendUnavailableError(None, "building a TensorRT engine needs a CUDA GPU", "run condiff-export --trt on the GPU machine")
    model_dir = Path(model_dir)
    variant = resolve_attention(attention, "trt")
    pad = pad_head_dim or None
    model, config = load_model(model_dir)
    fingerprint = artifacts.model_fingerprint(model_dir)
    gpu = gpu_identity(device)
    size = config.unet.sample_size
    image_shape = (config.image_channels, size, size)
    cache = Path(timing_cache) if timing_cache else default_timing_cache(model_dir, trt.__version__, gpu["compute_capability"])
    final = model_dir / artifacts.PLAN_NAME
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".condiff-trt-", dir=model_dir) as scratch:
        onnx_path = Path(scratch) / "model.trt.onnx"
        # the plain-attention graph of a large network needs far more host memory in ONNX Runtime on
        # the CPU than the GPU has (paper: 16 GiB of scores per image, ~2x that resident): there the
        # engine's own checks against torch on the GPU below stand in for the ONNX Runtime one
        scores = largest_score_bytes(config.unet)
        ort_check = variant == "chunked" or scores <= MAX_PLAIN_SCORE_BYTES
        if not ort_check:
            logger.info("%s: the TensorRT graph's attention scores (%.1f GiB per image) are too large to check in "
                        "ONNX Runtime on the CPU; the engine is checked against torch on the GPU instead",
                        model_dir, scores / 2**30)
        onnx_diff, _ = write_checked_onnx(model, onnx_path, variant=variant, chunk_size=chunk_size, pad_head_dim=pad,
                                          opset=opset, atol=ATOL, ort_check=ort_check)
        onnx_sha = artifacts.file_sha256(onnx_path)
        plan = build_engine(onnx_path, image_shape=image_shape, profile=profile, workspace_gb=workspace_gb,
                            timing_cache=cache)
    build_seconds = time.perf_counter() - start
    diff = _compare_plan(plan, model, image_shape, profile, device)
    if not diff <= atol:
        raise ExportError(final, f"the FP16 engine differs from torch by {diff:.3g} (max abs), more than {atol:g}",
                          "nothing was written; the network may overflow in fp16")
    steps = DEFAULT_STEPS if map_steps is None else map_steps
    maps = None
    if steps:
        maps = _check_plan_maps(plan, model, config, profile, device, steps).require(
            FP16, final, "the FP16 engine's", "nothing was written; the network may overflow in fp16")
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(plan)
        artifacts.sidecar_path(final).unlink(missing_ok=True)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    build_options = {"attention": attention if attention != "auto" else None, "chunk_size": chunk_size,
                     "pad_head_dim": None if (pad or 0) == DEFAULT_PAD_HEAD_DIM else (pad or 0),
                     "opset": opset, "min_batch": profile.min, "opt_batch": profile.opt, "max_batch": profile.max,
                     "workspace_gb": workspace_gb, "timing_cache": str(timing_cache) if timing_cache else None}
    sidecar = artifacts.write_sidecar(final, {
        "kind": "tensorrt",
        "artifact_sha256": artifacts.file_sha256(final),
        **fingerprint,
        "opset": opset,
        "precision": "fp16",
        "attention": {"variant": variant, "chunk_size": chunk_size if variant == "chunked" else None, "pad_head_dim": pad},
        "batch_profile": profile.to_dict(),
        "image_shape": list(image_shape),
        "io": {"inputs": list(INPUT_NAMES), "outputs": [OUTPUT_NAME]},
        "tensorrt_version": trt.__version__,
        **gpu,
        "onnx_sha256": onnx_sha,
        "workspace_gb": workspace_gb,
        "timing_cache": str(cache),
        "build_seconds": round(build_seconds, 3),
        "check": {"max_abs_diff": diff, "atol": atol, "batch": profile.min, "against": "torch fp32 eager (SDPA)",
                  "onnx_max_abs_diff": onnx_diff if onnx_diff is not None else "skipped (graph too large for ONNX Runtime on the CPU)",
                  "maps": maps.to_dict(FP16) if maps is not None else "skipped (--map-check-steps 0)"},
        "build_options": build_options,
        "versions": {"torch": torch.__version__, "tensorrt": trt.__version__},
    })
    logger.info("wrote %s (%.1f s to build, max |Δ| vs torch %.2e)", final, build_seconds, diff)
    return TrtBuild(final, sidecar, diff, build_seconds, maps)


def _compare_plan(plan: bytes, model: ConditionalUNet, image_shape: tuple[int, int, int], profile: BatchProfile,
                  device: torch.device) -> float:
    """Max |eps_TRT - eps_torch| on one seeded batch of ``profile.min`` images, torch fp32 on the same GPU."""
    channels, size, _ = image_shape
    inputs = _example_inputs(channels, size, profile.min, seed=0)
    eps_trt = run_engine_once(plan, inputs, device)
    model.set_attention_fn(sdpa_attention)
    with torch.inference_mode():
        eps = model.to(device)(*(a.to(device) for a in inputs)).float().cpu()
    model.to("cpu")
    return float((eps_trt - eps).abs().max())


def plan_denoiser(plan: bytes, device: torch.device):
    """The built engine as the sampler's denoiser (tests replace this)."""
    return EngineRunner(plan, device)


def within_profile(denoise, profile: BatchProfile):
    """``denoise`` fed only batches the profile allows: chunks of at most ``profile.max`` rows, a short
    one padded with copies of its first row up to ``profile.min`` (padded rows are dropped)."""
    def run(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, x_t.shape[0], profile.max):
            parts = [a[start:start + profile.max] for a in (x_t, cond, t)]
            rows = parts[0].shape[0]
            if rows < profile.min:
                parts = [torch.cat([a, a[:1].expand(profile.min - rows, *a.shape[1:])]) for a in parts]
            out.append(denoise(*parts)[:rows])
        return torch.cat(out)

    return run


def _check_plan_maps(plan: bytes, model: ConditionalUNet, config, profile: BatchProfile, device: torch.device,
                     steps: int) -> MapParity:
    """The map check of the FP16 engine against fp32 torch on the same GPU (the calibration batch is fed
    in the batch sizes the plan's profile allows)."""
    n = CALIBRATION_IMAGES
    exported = within_profile(plan_denoiser(plan, device), profile)
    model.set_attention_fn(sdpa_attention)
    model.to(device)

    def reference(x_t, cond, t):
        return model(x_t.to(device), cond.to(device), t.to(device)).float().cpu()

    logger.info("checking maps: %d DDPM steps on %d calibration images, TensorRT FP16 against torch", steps, n)
    try:
        return map_parity(reference, exported, config.image_channels, config.unet.sample_size,
                          (config.preprocessing or {}).get("modality"), steps=steps, n=n)
    finally:
        model.to("cpu")


__all__ = ["BatchProfile", "TrtBuild", "FP16_ATOL", "DEFAULT_WORKSPACE_GB", "DEFAULT_PAD_HEAD_DIM", "EngineRunner",
           "gpu_identity", "default_timing_cache", "build_engine", "run_engine_once", "plan_denoiser", "build_trt"]
