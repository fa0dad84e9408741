"""ONNX Runtime backend: ``model.onnx`` on the CPU, CUDA or TensorRT execution provider.

The ONNX file is loaded only after its sidecar matches the folder's weights, network config and
condiff version (``condiff.artifacts``); a stale or foreign file is refused with the exact
``condiff-export`` command that rebuilds it. A requested execution provider that is not in the
session's providers after creation is a hard error: ONNX Runtime silently falls back to the CPU
when CUDA libraries are missing (onnxruntime issues 23372, 17801), condiff never does.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from condiff import artifacts
from condiff.errors import BackendUnavailableError
from condiff.io.atomic import is_utf8_path
from condiff.optional import require

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def _provider_name(provider: str | None, device: torch.device) -> str:
    if provider is None:
        return PROVIDERS["cuda" if device.type == "cuda" else "cpu"]
    if provider in PROVIDERS.values():
        return provider
    if provider.lower() not in PROVIDERS:
        raise BackendUnavailableError(None, f"unknown ONNX Runtime provider {provider!r}",
                                      f"choose one of {', '.join(PROVIDERS)}")
    return PROVIDERS[provider.lower()]


def _resolve_device(device, provider: str | None, available: list[str]) -> torch.device:
    """``None``/``auto``: the GPU when a GPU provider is requested, or when none is named and both this
    onnxruntime (CUDA provider) and torch (CUDA device) can use one; otherwise the CPU."""
    if device not in (None, "auto"):
        return torch.device(device)
    if provider is not None:
        wants_gpu = provider.lower() in ("cuda", "tensorrt") or provider in (PROVIDERS["cuda"], PROVIDERS["tensorrt"])
        return torch.device("cuda" if wants_gpu else "cpu")
    gpu_ready = device == "auto" and PROVIDERS["cuda"] in available and torch.cuda.is_available()
    return torch.device("cuda" if gpu_ready else "cpu")


def _session_providers(name: str, device: torch.device, precision: str, model_dir: Path, sidecar: dict | None = None,
                       max_batch: int = 16) -> list:
    """The provider list passed to ONNX Runtime (GPU providers keep the CPU one only for shape ops).

    TensorRT provider: its engine cache is named by graph and input names and versions, not by the
    weights, so a re-export of retrained weights would reload the old engine: the cache lives in a
    folder named by the ONNX file's digest. Its shape profile spans batch 1..``max_batch`` (without
    one, every batch outside the first one's range rebuilds the engine, minutes each)."""
    index = device.index or 0
    if name == PROVIDERS["cpu"]:
        return [name]
    cuda = (PROVIDERS["cuda"], {"device_id": index})
    if name == PROVIDERS["cuda"]:
        return [cuda, PROVIDERS["cpu"]]
    # TensorRT EP: nodes it cannot take (ORT's MultiHeadAttention contrib op) run on the CUDA EP.
    sidecar = sidecar or {}
    digest = str(sidecar.get("artifact_sha256") or "unknown")[:16]
    options = {"device_id": index, "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(model_dir / "ort-trt-cache" / digest)}
    if sidecar.get("image_shape"):
        chw = "x".join(str(int(v)) for v in sidecar["image_shape"])

        def shapes(batch: int) -> str:
            return f"x_t:{batch}x{chw},cond:{batch}x{chw},t:{batch}"

        options.update(trt_profile_min_shapes=shapes(1), trt_profile_opt_shapes=shapes(max_batch),
                       trt_profile_max_shapes=shapes(max_batch))
    return [(name, options), cuda, PROVIDERS["cpu"]]


class OrtDenoiser:
    """``denoise`` through an ``onnxruntime.InferenceSession`` (torch tensors in and out)."""

    name = "ort"

    def __init__(self, session, device: torch.device, precision: str, max_batch: int, sidecar: dict):
        self.session = session
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.sidecar = sidecar
        self.provider = session.get_providers()[0]

    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t, cond (B, C, H, W) float32, t int64 (B,) on ``device`` -> eps float32 (B, C, H, W) on ``device``."""
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        x_t = x_t.to(self.device, torch.float32).contiguous()
        cond = cond.to(self.device, torch.float32).contiguous()
        t = t.to(self.device, torch.int64).contiguous()
        if self.device.type == "cpu":
            # zero-copy views of the torch tensors; ORT returns a fresh array we wrap without a copy
            (eps,) = self.session.run(["eps"], {"x_t": x_t.numpy(), "cond": cond.numpy(), "t": t.numpy()})
            return torch.from_numpy(eps)
        return self._run_bound(x_t, cond, t)

    def _run_bound(self, x_t, cond, t) -> torch.Tensor:
        """GPU providers: bind torch CUDA buffers directly (no host round trip)."""
        eps = torch.empty_like(x_t)
        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, tensor, dtype in (("x_t", x_t, np.float32), ("cond", cond, np.float32), ("t", t, np.int64)):
            binding.bind_input(name, "cuda", index, dtype, tuple(tensor.shape), tensor.data_ptr())
        binding.bind_output("eps", "cuda", index, np.float32, tuple(eps.shape), eps.data_ptr())
        # ORT runs on its own stream: make it see inputs written on torch's stream, and wait for it
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return eps


def open_ort(model_dir: str | Path, *, device=None, precision: str = "fp32", max_batch: int = 16,
             provider: str | None = None, threads: int | None = None, deterministic: bool = False) -> OrtDenoiser:
    """Open ``model_dir/model.onnx`` after verifying its sidecar.

    ``provider``: ``cpu`` (default on the CPU), ``cuda`` (default for a CUDA ``device``) or
    ``tensorrt``; one that ONNX Runtime does not offer, or that the session does not load, raises
    ``BackendUnavailableError``. ``threads`` sets intra-op threads (default: ORT's choice, all cores).
    ``precision`` is fp32 (the exported graph); fp16 only through the TensorRT provider.
    ``deterministic``: ORT's deterministic compute (``--deterministic``; matters for the CUDA provider).
    """
    model_dir = Path(model_dir)
    ort = require("onnxruntime", "ort")
    available = ort.get_available_providers()
    dev = _resolve_device(device, provider, available)
    name = _provider_name(provider, dev)
    if (name == PROVIDERS["cpu"]) != (dev.type == "cpu"):
        raise BackendUnavailableError(None, f"provider {name} does not run on device {dev}",
                                      "use --device cpu for the CPU provider and a CUDA device for cuda/tensorrt")
    if precision not in ("fp32", "fp16"):
        raise BackendUnavailableError(None, f"the ort engine has no {precision} mode", "use --precision fp32")
    if precision == "fp16" and name != PROVIDERS["tensorrt"]:
        raise BackendUnavailableError(None, "the ort engine runs the fp32 ONNX graph; fp16 needs the TensorRT provider "
                                      "(from Python: open_ort(..., provider='tensorrt'))",
                                      "use --precision fp32, or --engine trt for an FP16 engine")
    if name not in available:
        raise BackendUnavailableError(None, f"ONNX Runtime provider {name} is not available (this onnxruntime offers "
                                      f"{', '.join(available)})",
                                      "install onnxruntime-gpu with: pip install 'condiff[gpu]' (instead of condiff[ort])")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(None, f"device {dev} requested but torch sees no CUDA device",
                                      "use --device cpu")
    sidecar = artifacts.verify_model_artifact(model_dir, artifacts.ONNX_NAME, kind="onnx")
    if sidecar.get("attention", {}).get("variant") == "ort_mha" and name == PROVIDERS["tensorrt"]:
        logger.warning("%s uses ORT's MultiHeadAttention, which the TensorRT provider hands to the CUDA provider",
                       model_dir / artifacts.ONNX_NAME)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.use_deterministic_compute = bool(deterministic)
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    onnx_path = model_dir / artifacts.ONNX_NAME
    if not is_utf8_path(os.path.abspath(onnx_path)):
        raise BackendUnavailableError(onnx_path, "is not a UTF-8 path, which ONNX Runtime cannot open",
                                      "rename the folder, or run the model set with --engine torch")
    try:
        session = ort.InferenceSession(str(onnx_path), options,
                                       providers=_session_providers(name, dev, precision, model_dir, sidecar,
                                                                    max(1, int(max_batch))))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise BackendUnavailableError(onnx_path, f"ONNX Runtime could not load it ({exc})",
                                      f"rebuild it with: {artifacts.rebuild_command(model_dir, 'onnx', sidecar.get('build_options'))}") from exc
    loaded = session.get_providers()
    if name not in loaded:
        raise BackendUnavailableError(onnx_path, f"ONNX Runtime did not load {name} (session runs on {', '.join(loaded)})",
                                      "check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs; condiff never falls back silently")
    logger.info("ort backend: %s on %s via %s", onnx_path, dev, name)
    return OrtDenoiser(session, dev, precision, max_batch, sidecar)
