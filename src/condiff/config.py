"""Configuration dataclasses and the ``condiff.model/1`` JSON schema (no torch here).

``UNetConfig`` covers the part of diffusers' ``UNet2DModel`` configuration space that the
reference uses, with the same field names, so a diffusers ``config.json`` converts by
picking keys. ``in_channels``/``out_channels`` follow from ``image_channels``: the network
sees ``[x_t, cond]`` concatenated on channels and predicts eps for ``x_t``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from condiff.errors import ModelFolderError

SCHEMA = "condiff.model/1"
SCHEMA_MAJOR = 1
DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")

# Limits on config.json values, checked when a config is read, so a typo or a damaged file is refused
# with the field's name instead of a traceback, a multi-GiB allocation or a "non-finite output" hours in.
# They are generous: the reference network (preset "paper") is 72.4 M parameters, 128..512 channels,
# 2 layers per block, 4 levels, 128 px and 1000 timesteps.
MAX_SIZE = 1024  # px (sample_size); the paper uses 128; attention memory grows with size**4
MIN_SIZE = 16  # px; PreprocessConfig.image_size has the same floor
MAX_CHANNELS = 4096  # per level; the paper's widest is 512 (8x headroom)
MAX_LEVELS = 8  # resolution levels: 1024 px halves to 8 px
MAX_LAYERS_PER_BLOCK = 16  # diffusers' UNet2DModel presets use 1..3
# 2**29 parameters = 2 GiB in float32 (7x the paper's net, more than any public UNet2DModel), refused before
# the network is built: channels and layers each within their own limit can still multiply to 100s of GiB.
MAX_PARAMETERS = 2 ** 29
MAX_TRAIN_TIMESTEPS = 100_000  # diffusers' default is 1000; the schedule table is this long
MIN_ALPHA_BAR = 1e-30  # alpha_bar at the last timestep; below it float32 sampling divides by ~0


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an int in lo..hi; a bool, str or float (even 8.0) is refused: JSON writes ints bare."""
    if not _is_int(value) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, not {value!r}")
    return int(value)


def _real(name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> float:
    """``value`` as a finite float in the interval (brackets as the message prints them)."""
    ok = _is_real(value) and math.isfinite(value)
    if ok:
        v = float(value)
        ok = (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)
    if not ok:
        interval = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, not {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return value


def _choice(name: str, value: Any, allowed: tuple) -> Any:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, not {value!r}")
    return value


def _check_keys(what: str, cls: type, d: Any) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, not {d!r}")
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}")


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
        """Refuse values the network cannot be built from or would build absurdly (ValueError naming the
        field and its allowed range: ``ModelConfig.from_dict`` and ``from_diffusers`` report it)."""
        object.__setattr__(self, "image_channels", _int("image_channels", self.image_channels, 1, 3))
        if self.image_channels not in (1, 3):
            raise ValueError("image_channels must be 1 (MRI) or 3 (RGB)")
        object.__setattr__(self, "sample_size", _int("sample_size", self.sample_size, MIN_SIZE, MAX_SIZE))
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"{name} must be a list, not {getattr(self, name)!r}")
        n = len(self.block_out_channels)
        if not 1 <= n <= MAX_LEVELS:
            raise ValueError(f"block_out_channels must list 1..{MAX_LEVELS} levels, not {n}")
        groups = _int("norm_num_groups", self.norm_num_groups, 1, MAX_CHANNELS)
        object.__setattr__(self, "norm_num_groups", groups)
        channels = []
        for c in self.block_out_channels:
            c = _int("each block_out_channels entry", c, 1, MAX_CHANNELS)
            if c % groups:  # GroupNorm splits every level's channels into norm_num_groups groups
                raise ValueError(f"each block_out_channels entry must be a multiple of norm_num_groups={groups}, "
                                 f"not {list(self.block_out_channels)}")
            channels.append(c)
        object.__setattr__(self, "block_out_channels", tuple(channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("down_block_types, up_block_types and block_out_channels must have equal length")
        bad = [t for t in self.down_block_types if t not in DOWN_TYPES] + [
            t for t in self.up_block_types if t not in UP_TYPES
        ]
        if bad:
            raise ValueError(f"unsupported block types {bad}; supported: {DOWN_TYPES + UP_TYPES}")
        object.__setattr__(self, "layers_per_block",
                           _int("layers_per_block", self.layers_per_block, 1, MAX_LAYERS_PER_BLOCK))
        object.__setattr__(self, "add_attention", _bool("add_attention", self.add_attention))
        object.__setattr__(self, "flip_sin_to_cos", _bool("flip_sin_to_cos", self.flip_sin_to_cos))
        if self.attention_head_dim is not None:
            # heads = channels // attention_head_dim must be >= 1 at every level with attention
            widths = [channels[i] for i, t in enumerate(self.down_block_types) if t == "AttnDownBlock2D"]
            widths += [channels[n - 1 - i] for i, t in enumerate(self.up_block_types) if t == "AttnUpBlock2D"]
            widths += [channels[-1]] if self.add_attention else []
            hi = min(widths, default=MAX_CHANNELS)
            object.__setattr__(self, "attention_head_dim",
                               _int("attention_head_dim (null: one head)", self.attention_head_dim, 1, hi))
        if self.attn_norm_num_groups is not None:
            ag = _int("attn_norm_num_groups (null: norm_num_groups)", self.attn_norm_num_groups, 1, MAX_CHANNELS)
            if self.add_attention and channels[-1] % ag:
                raise ValueError(f"attn_norm_num_groups={ag} must divide the last block_out_channels entry "
                                 f"({channels[-1]})")
            object.__setattr__(self, "attn_norm_num_groups", ag)
        # 0 < eps < 1: eps is added to a variance; 0, negative or NaN gave non-finite outputs on every scan
        object.__setattr__(self, "norm_eps", _real("norm_eps", self.norm_eps, 0.0, 1.0, open_lo=True, open_hi=True))
        # the sinusoidal embedding divides by (channels[0] // 2 - freq_shift)
        object.__setattr__(self, "freq_shift", _int("freq_shift", self.freq_shift, 0, max(channels[0] // 2 - 1, 0)))
        # Downsample pads itself only for 0; other paddings change the feature-map sizes and break the skips
        object.__setattr__(self, "downsample_padding", _int("downsample_padding", self.downsample_padding, 0, 1))
        # the mid block divides its outputs by it (diffusers uses 1 or sqrt(2))
        object.__setattr__(self, "mid_block_scale_factor",
                           _real("mid_block_scale_factor", self.mid_block_scale_factor, 1e-3, 1e3))
        params = parameter_count(self)
        if params > MAX_PARAMETERS:
            raise ValueError(f"block_out_channels {list(channels)} with layers_per_block={self.layers_per_block} "
                             f"give {params / 1e6:,.0f} M parameters ({4 * params / 2**30:,.1f} GiB in float32); "
                             f"condiff builds networks of at most {MAX_PARAMETERS / 1e6:,.0f} M")

    def check_resolution(self) -> None:
        """``sample_size`` must halve evenly at every level (else the skip connections do not line up).
        Checked when a stored config is read, not in ``__post_init__``: ``condiff-train`` builds presets
        at any ``--image-size`` to report this with its own hint."""
        step = 2 ** (len(self.block_out_channels) - 1)
        if self.sample_size % step:
            raise ValueError(f"sample_size must be a multiple of {step} for {len(self.block_out_channels)} "
                             f"resolution levels, not {self.sample_size}")

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
        _check_keys("UNet config", cls, d)
        cfg = cls(**d)
        cfg.check_resolution()
        return cfg

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
        cfg = cls(image_channels=out_ch, **{k: d[k] for k in keep if k in d})
        cfg.check_resolution()
        return cfg

    def to_diffusers(self) -> dict[str, Any]:
        """The equivalent diffusers ``UNet2DModel`` constructor arguments."""
        d = self.to_dict()
        d.pop("image_channels")
        d.update(in_channels=self.in_channels, out_channels=self.out_channels, center_input_sample=False,
                 time_embedding_type="positional", act_fn="silu", resnet_time_scale_shift="default",
                 downsample_type="conv", upsample_type="conv", dropout=0.0)
        return d


def parameter_count(cfg: UNetConfig) -> int:
    """The number of parameters ``ConditionalUNet(cfg)`` has, without building it (mirrors unet.py)."""
    def conv(i, o, k=3):
        return i * o * k * k + o

    def linear(i, o):
        return i * o + o

    def resnet(i, o):
        return 2 * i + conv(i, o) + linear(temb, o) + 2 * o + conv(o, o) + (conv(i, o, 1) if i != o else 0)

    def attention(c):
        inner = (c // (cfg.attention_head_dim or c)) * (cfg.attention_head_dim or c)
        return 2 * c + 3 * linear(c, inner) + linear(inner, c)

    ch, n, layers = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    temb = 4 * ch[0]
    total = conv(cfg.in_channels, ch[0]) + linear(ch[0], temb) + linear(temb, temb)
    out_ch = ch[0]
    for i, kind in enumerate(cfg.down_block_types):
        in_ch, out_ch = out_ch, ch[i]
        total += sum(resnet(in_ch if j == 0 else out_ch, out_ch) for j in range(layers))
        total += layers * attention(out_ch) if kind == "AttnDownBlock2D" else 0
        total += conv(out_ch, out_ch) if i < n - 1 else 0
    total += 2 * resnet(ch[-1], ch[-1]) + (attention(ch[-1]) if cfg.add_attention else 0)
    rev = ch[::-1]
    out_ch = rev[0]
    for i, kind in enumerate(cfg.up_block_types):
        prev_ch, out_ch = out_ch, rev[i]
        in_ch = rev[min(i + 1, n - 1)]
        for j in range(layers + 1):
            total += resnet((prev_ch if j == 0 else out_ch) + (in_ch if j == layers else out_ch), out_ch)
        total += (layers + 1) * attention(out_ch) if kind == "AttnUpBlock2D" else 0
        total += conv(out_ch, out_ch) if i < n - 1 else 0
    return total + 2 * ch[0] + conv(ch[0], cfg.out_channels)


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

    def __post_init__(self):
        """Refuse schedules the sampler cannot run (ValueError naming the field and its allowed range)."""
        object.__setattr__(self, "num_train_timesteps",
                           _int("num_train_timesteps", self.num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS))
        # betas are noise variances per step: in (0, 1), not decreasing (diffusers' schedules rise)
        start = _real("beta_start", self.beta_start, 0.0, 1.0, open_lo=True, open_hi=True)
        end = _real("beta_end", self.beta_end, 0.0, 1.0, open_lo=True, open_hi=True)
        if end < start:
            raise ValueError(f"beta_end ({end:g}) must not be below beta_start ({start:g})")
        object.__setattr__(self, "beta_start", start)
        object.__setattr__(self, "beta_end", end)
        _choice("beta_schedule", self.beta_schedule, ("linear", "scaled_linear"))
        _choice("prediction_type", self.prediction_type, ("epsilon",))
        object.__setattr__(self, "clip_sample", _bool("clip_sample", self.clip_sample))
        # x0 is clamped to [-range, range]; the images live in [-1, 1], so 1000 is far beyond any use
        object.__setattr__(self, "clip_sample_range",
                           _real("clip_sample_range", self.clip_sample_range, 0.0, 1e3, open_lo=True))
        # alpha_bar at the last timestep (float64 here; the sampler's float32 table underflows near 1e-38)
        if self.beta_schedule == "linear":
            betas = (start + (end - start) * k / max(self.num_train_timesteps - 1, 1)
                     for k in range(self.num_train_timesteps))
        else:
            betas = ((start ** 0.5 + (end ** 0.5 - start ** 0.5) * k / max(self.num_train_timesteps - 1, 1)) ** 2
                     for k in range(self.num_train_timesteps))
        log_ab = math.fsum(math.log1p(-b) for b in betas)
        if log_ab < math.log(MIN_ALPHA_BAR):
            raise ValueError(f"beta_start={start:g}, beta_end={end:g} over num_train_timesteps="
                             f"{self.num_train_timesteps} leave alpha_bar = e^{log_ab:.0f} at the last step, below "
                             f"{MIN_ALPHA_BAR:g}: sampling would divide by zero; lower beta_end or num_train_timesteps")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ScheduleConfig":
        _check_keys("schedule", cls, d)
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
        if "unet" not in d:
            raise ModelFolderError(path, 'invalid config.json (no "unet" section)')
        section = "unet"  # named in the message: "invalid config.json (unet: norm_eps must be ...)"
        try:
            unet = UNetConfig.from_dict(d["unet"])
            section = "schedule"
            schedule = ScheduleConfig.from_dict(d.get("schedule", {}))
            section = "preprocessing"
            preprocessing = d.get("preprocessing", {})
            if preprocessing:  # checked here, kept as stored; none yet (a diffusers import) is reported on use
                from condiff.preprocess import PreprocessConfig

                if not isinstance(preprocessing, dict):
                    raise ValueError(f"must be a JSON object, not {preprocessing!r}")
                PreprocessConfig.from_dict(preprocessing)
            section = None
            return cls(
                unet=unet,
                schedule=schedule,
                preprocessing=preprocessing,
                fold=d.get("fold"),
                train_tasks=d.get("train_tasks"),
                val_tasks=d.get("val_tasks"),
                trained=d.get("trained", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            where = f"{section}: " if section else ""
            raise ModelFolderError(path, f"invalid config.json ({where}{exc})") from exc
