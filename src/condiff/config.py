"""Configuration dataclasses and the ``condiff.model/1`` JSON schema (no torch here).

``UNetConfig`` covers the part of diffusers' ``UNet2DModel`` configuration space that the
reference uses, with the same field names, so a diffusers ``config.json`` converts by
picking keys. ``in_channels``/``out_channels`` follow from ``image_channels``: the network
sees ``[x_t, cond]`` concatenated on channels and predicts eps for ``x_t``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from condiff.errors import ModelFolderError

SCHEMA = "condiff.model/1"
SCHEMA_MAJOR = 1
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    image_channels: int = 1
    sample_size: int = 128
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D")
    attention_head_dim: int | None = 8
    norm_num_groups: int = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have equal length")
        bad = [t for t in self.down_block_types if t not in DOWN_TYPES] + [
            t for t in self.up_block_types if t not in UP_TYPES
        ]
        if bad:
            raise ValueError(f"unsupported block types {bad}; supported: {DOWN_TYPES + UP_TYPES}")
        if self.image_channels not in (1, 3):
            raise ValueError("image_channels must be 1 (MRI) or 3 (RGB)")

    @property
    def in_channels(self) -> int:
        return 2 * self.image_channels

    @property
    def out_channels(self) -> int:
        return self.image_channels

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown UNet config keys {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "UNetConfig":
        """Convert a diffusers ``UNet2DModel`` config, refusing settings we do not implement."""
        required = {
            "time_embedding_type": "positional", "act_fn": "silu", "resnet_time_scale_shift": "default",
            "downsample_type": "conv", "upsample_type": "conv", "center_input_sample": False,
            "class_embed_type": None, "num_class_embeds": None,
        }
        for key, want in required.items():
            if d.get(key, want) != want:
                raise ValueError(f"diffusers config has {key}={d[key]!r}; condiff supports only {want!r}")
        if d.get("dropout", 0.0) not in (0, 0.0):
            raise ValueError("diffusers config has dropout != 0; condiff is an inference network without dropout")
        in_ch, out_ch = d.get("in_channels", 3), d.get("out_channels", 3)
        if in_ch != 2 * out_ch:
            raise ValueError(f"in_channels={in_ch}, out_channels={out_ch}: not an image-conditioned UNet ([x_t, cond])")
        keep = {f.name for f in dataclasses.fields(cls)} - {"image_channels"}
        return cls(image_channels=out_ch, **{k: d[k] for k in keep if k in d})

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers ``UNet2DModel`` constructor arguments."""
        d = self.to_dict()
        d.pop("image_channels")
        d.update(in_channels=self.in_channels, out_channels=self.out_channels, center_input_sample=False,
                 time_embedding_type="positional", act_fn="silu", resnet_time_scale_shift="default",
                 downsample_type="conv", upsample_type="conv", dropout=0.0)
        return d


PRESETS: dict[str, dict[str, Any]] = {
    # The reference network (diffusers UNet2DModel, reference-method.md §2.1), up path as the reference lists it.
    "paper": {},
    # Same widths, attention at 16/32/64 px on the up path and none at 128 px.
    "symmetric": {"up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
    # CPU-sized demo net: 3.17 M parameters (6.3 MB in fp16, so three members ship in < 20 MB),
    # attention only at 16 px; ~0.1 s per 128x128 forward on 2 CPU cores.
    "small": {
        "block_out_channels": (32, 64, 96, 112), "layers_per_block": 1, "norm_num_groups": 16,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    },
    # For long training carried across GPU sessions: 1.84 M parameters, so a checkpoint with its EMA
    # and AdamW moments (29.5 MB) still travels to the device beside the repo, the IXI scans and the
    # wheels (64 MiB a call; bench/train_chunks.py stage checks it).
    "compact": {
        "block_out_channels": (32, 64, 64, 80), "layers_per_block": 1, "norm_num_groups": 16,
        "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    },
    # Test-sized: two levels, attention on both paths.
    "tiny": {
        "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    },
}


def preset(name: str, image_channels: int = 1, sample_size: int = 128) -> UNetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return UNetConfig(image_channels=image_channels, sample_size=sample_size, **PRESETS[name])


@dataclass(frozen=True)
class ScheduleConfig:
    """diffusers ``DDPMScheduler()`` defaults (reference-method.md §4)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScheduleConfig":
        return cls(**d)


@dataclass
class ModelConfig:
    """Everything in a model folder's ``config.json``."""

    unet: UNetConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    fold: int | None = None
    train_tasks: list[int] | None = None
    val_tasks: list[int] | None = None
    trained: dict[str, Any] = field(default_factory=dict)

    @property
    def image_channels(self) -> int:
        return self.unet.image_channels

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "unet": self.unet.to_dict(),
            "schedule": self.schedule.to_dict(),
            "preprocessing": self.preprocessing,
            "image_channels": self.unet.image_channels,
            "fold": self.fold,
            "train_tasks": self.train_tasks,
            "val_tasks": self.val_tasks,
            "trained": self.trained,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str | None = None) -> "ModelConfig":
        schema = d.get("schema")
        if not isinstance(schema, str) or not schema.startswith("condiff.model/"):
            raise ModelFolderError(path, f"config.json has no condiff schema (found {schema!r})",
                                   "a diffusers UNet2DModel folder is imported with: condiff-export --import-diffusers DIR -o OUT")
        try:
            major = int(schema.split("/", 1)[1].split(".")[0])
        except ValueError:
            raise ModelFolderError(path, f"unreadable schema version {schema!r}") from None
        if major != SCHEMA_MAJOR:
            raise ModelFolderError(path, f"schema {schema} is not supported by this condiff (reads condiff.model/{SCHEMA_MAJOR})",
                                   f"use a condiff release that reads condiff.model/{major}")
        try:
            return cls(
                unet=UNetConfig.from_dict(d["unet"]),
                schedule=ScheduleConfig.from_dict(d.get("schedule", {})),
                preprocessing=d.get("preprocessing", {}),
                fold=d.get("fold"),
                train_tasks=d.get("train_tasks"),
                val_tasks=d.get("val_tasks"),
                trained=d.get("trained", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFolderError(path, f"invalid config.json ({exc})") from exc
