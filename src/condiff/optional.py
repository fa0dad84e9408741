"""Lazy access to optional heavy packages, with an error that names the extra."""
from __future__ import annotations

import importlib
from types import ModuleType

from condiff.errors import BackendUnavailableError

_EXTRA_FOR = {
    "onnx": "ort",
    "onnxruntime": "ort",
    "tensorrt": "trt",
    "cupy": "gpu",
    "ray": "ray",
    "diffusers": "test",
    "matplotlib": "bench",
}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise BackendUnavailableError naming ``pip install 'condiff[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = extra or _EXTRA_FOR.get(module.split(".")[0], module)
        raise BackendUnavailableError(
            None,
            f"the optional package '{module}' is not installed ({exc})",
            f"install it with: pip install 'condiff[{extra}]'",
        ) from exc
