"""The conditional UNet: diffusers ``UNet2DModel`` re-implemented in plain PyTorch.

Parameter names equal diffusers 0.24's, so a reference checkpoint loads without renaming and
a condiff model folder stays readable by diffusers. The network sees ``cat([x_t, cond], 1)``
(noisy image first, reference-method.md §2.2) and returns eps for ``x_t``.

Attention runs through ``attention_fn`` (default: PyTorch SDPA); export swaps it for a
memory-bounded or runtime-specific form without touching the weights. Every GroupNorm (and the SiLU
that follows it in resnets and before ``conv_out``) runs through ``norm_fn`` (default: the modules
and ``F.silu``), so a fused kernel can replace the pair (``condiff.engine.kernels``); the
``nn.GroupNorm`` modules and their parameter names stay as they are.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from condiff.config import UNetConfig

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NormFn = Callable[[nn.GroupNorm, torch.Tensor, bool], torch.Tensor]  # (norm, x, silu) -> silu?(norm(x))


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, heads, N, d); softmax scale d**-0.5 as diffusers."""
    return F.scaled_dot_product_attention(q, k, v)


def torch_group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """``norm(x)``, then SiLU when ``silu``: the eager form of the ``NormFn`` seam."""
    y = norm(x)
    return F.silu(y) if silu else y


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (B,) -> (B, dim), as diffusers ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> + time projection -> GroupNorm -> SiLU -> conv, plus shortcut."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, eps: float, output_scale: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale = output_scale
        self.norm_fn: NormFn = torch_group_norm

    def forward(self, x, temb):
        h = self.conv1(self.norm_fn(self.norm1, x, True))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.norm_fn(self.norm2, h, True))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        return out if self.output_scale == 1.0 else out / self.output_scale


class AttentionBlock(nn.Module):
    """Self-attention over all H*W positions (diffusers' legacy attention block)."""

    def __init__(self, channels: int, head_dim: int, groups: int, eps: float, output_scale: float = 1.0):
        super().__init__()
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, self.heads * head_dim)
        self.to_k = nn.Linear(channels, self.heads * head_dim)
        self.to_v = nn.Linear(channels, self.heads * head_dim)
        self.to_out = nn.ModuleList([nn.Linear(self.heads * head_dim, channels)])
        self.output_scale = output_scale
        self.attention_fn: AttentionFn = sdpa_attention
        self.norm_fn: NormFn = torch_group_norm

    def forward(self, x):
        b, c, hgt, wid = x.shape
        tokens = self.norm_fn(self.group_norm, x, False).flatten(2).transpose(1, 2)  # (B, N, C)

        def heads(t):
            return t.view(b, -1, self.heads, self.head_dim).transpose(1, 2)

        out = self.attention_fn(heads(self.to_q(tokens)), heads(self.to_k(tokens)), heads(self.to_v(tokens)))
        out = self.to_out[0](out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))
        out = out.transpose(1, 2).reshape(b, c, hgt, wid) + x
        return out if self.output_scale == 1.0 else out / self.output_scale


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, n_layers, attention: bool, cfg: UNetConfig, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(n_layers))
        head_dim = cfg.attention_head_dim or out_ch
        self.attentions = nn.ModuleList(
            AttentionBlock(out_ch, head_dim, cfg.norm_num_groups, cfg.norm_eps) for _ in range(n_layers)
        ) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)]) if add_downsample else None

    def forward(self, x, temb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    def __init__(self, in_ch, prev_ch, out_ch, temb_ch, n_layers, attention: bool, cfg: UNetConfig, add_upsample: bool):
        super().__init__()
        resnets = []
        for i in range(n_layers):
            skip_ch = in_ch if i == n_layers - 1 else out_ch
            res_in = prev_ch if i == 0 else out_ch
            resnets.append(ResnetBlock(res_in + skip_ch, out_ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps))
        self.resnets = nn.ModuleList(resnets)
        head_dim = cfg.attention_head_dim or out_ch
        self.attentions = nn.ModuleList(
            AttentionBlock(out_ch, head_dim, cfg.norm_num_groups, cfg.norm_eps) for _ in range(n_layers)
        ) if attention else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_upsample else None

    def forward(self, x, skips, temb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, ch, temb_ch, cfg: UNetConfig):
        super().__init__()
        scale = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            ResnetBlock(ch, ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps, scale) for _ in range(2))
        attn_groups = cfg.attn_norm_num_groups or cfg.norm_num_groups
        self.attentions = nn.ModuleList(
            [AttentionBlock(ch, cfg.attention_head_dim or ch, attn_groups, cfg.norm_eps, scale)]
        ) if cfg.add_attention else None

    def forward(self, x, temb):
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x, temb)


class ConditionalUNet(nn.Module):
    """eps = UNet(cat([x_t, cond]), t). Shapes: x_t, cond (B, C, H, W); t int64 (B,) -> eps (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        temb_ch = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        n = len(ch)
        self.down_blocks = nn.ModuleList()
        out_ch = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            self.down_blocks.append(DownBlock(in_ch, out_ch, temb_ch, cfg.layers_per_block,
                                              kind == "AttnDownBlock2D", cfg, add_downsample=i < n - 1))
        self.mid_block = MidBlock(ch[-1], temb_ch, cfg)
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        out_ch = rev[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(in_ch, prev_ch, out_ch, temb_ch, cfg.layers_per_block + 1,
                                          kind == "AttnUpBlock2D", cfg, add_upsample=i < n - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.norm_fn: NormFn = torch_group_norm

    def attention_blocks(self) -> list[AttentionBlock]:
        return [m for m in self.modules() if isinstance(m, AttentionBlock)]

    def set_attention_fn(self, fn: AttentionFn) -> None:
        for block in self.attention_blocks():
            block.attention_fn = fn

    def set_norm_fn(self, fn: NormFn) -> None:
        """Route every GroupNorm(+SiLU) through ``fn``; ``torch_group_norm`` restores the eager form."""
        for m in self.modules():
            if isinstance(m, (ResnetBlock, AttentionBlock, ConditionalUNet)):
                m.norm_fn = fn

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(emb.to(self.conv_in.weight.dtype))
        x = self.conv_in(torch.cat([x_t, cond], dim=1))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb)
            skips.extend(block_skips)
        x = self.mid_block(x, emb)
        for block in self.up_blocks:
            x = block(x, skips, emb)
        return self.conv_out(self.norm_fn(self.conv_norm_out, x, True))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
