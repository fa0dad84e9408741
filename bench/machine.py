"""The machine and package versions a benchmark ran on, for every report in bench/results/."""
from __future__ import annotations

import contextlib
import os
import platform

import torch

import condiff


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    ram = None
    with contextlib.suppress(OSError, ValueError):
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    gpu_mem = (round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
               if device.type == "cuda" else None)
    return {"host": platform.node(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "ram_gib": ram, "torch_threads": torch.get_num_threads(),
            "device": device.type, "gpu": gpu, "gpu_memory_gib": gpu_mem, "loadavg_start": loadavg()}


def loadavg() -> list[float] | None:
    """1/5/15-minute load average: other work on the machine inflates CPU timings."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "condiff": condiff.__version__, "torch": torch.__version__,
           "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for pkg in ("onnxruntime", "onnx", "numpy", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
