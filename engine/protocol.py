"""The backend protocol: what the sampling loop needs from a network runtime."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    name: str               # "torch" | "ort" | "trt" | "fast": the --engine value
    device: torch.device
    precision: str          # "fp32" | "fp16" | "bf16"
    max_batch: int

    def denoise(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps for x_t: x_t, cond (B, C, H, W) float32 on ``device``, B <= max_batch; t int64 (B,).

        Returns float32 (B, C, H, W). No randomness inside a backend: noise belongs to the runner.
        """
        ...
