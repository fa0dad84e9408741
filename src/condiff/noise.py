"""Sampling noise as a pure function of (seed, input digest, slice, member).

Each (slice, member) pair owns a CPU ``torch.Generator`` seeded from a hash of its key, and
draws its start noise and every step's noise in a fixed order. Results therefore do not depend
on batch size, batch order or backend, and every backend consumes exactly the same noise.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseKey:
    seed: int
    digest: str  # the input file's SHA-256 (or any stable case identifier)
    slice_index: int
    member: int

    def generator_seed(self) -> int:
        text = f"condiff-noise/1|{self.seed}|{self.digest}|{self.slice_index}|{self.member}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


def draw_noise(keys: list[NoiseKey], n_draws: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, n_draws, C, H, W) float32 on the CPU; row b is a pure function of keys[b]."""
    out = torch.empty((len(keys), n_draws, *shape), dtype=torch.float32)
    for b, key in enumerate(keys):
        gen = torch.Generator().manual_seed(key.generator_seed())
        out[b] = torch.randn((n_draws, *shape), generator=gen, dtype=torch.float32)
    return out
