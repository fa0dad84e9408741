"""Backend registry: ``open_denoiser(name, model_dir, device=..., precision=..., max_batch=...)``.

Each factory lives in its own module and imports its runtime lazily, so a missing runtime
only matters when it is asked for.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from condiff.errors import BackendUnavailableError

_FACTORIES = {
    "torch": ("condiff.engine.backends.torch_backend", "open_torch"),
    "ort": ("condiff.engine.backends.ort_backend", "open_ort"),
    "trt": ("condiff.engine.backends.trt_backend", "open_trt"),
    "fast": ("condiff.engine.graphs", "open_fast"),
}


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def register_backend(name: str, module: str, factory: str) -> None:
    _FACTORIES[name] = (module, factory)


def open_denoiser(name: str, model_dir: str | Path, **options):
    if name not in _FACTORIES:
        raise BackendUnavailableError(None, f"unknown engine {name!r}", f"choose one of {', '.join(sorted(_FACTORIES))}")
    module, factory = _FACTORIES[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("condiff"):
            raise BackendUnavailableError(None, f"engine {name!r} is not built into this condiff") from exc
        raise
    return getattr(mod, factory)(model_dir, **options)
