"""Import a diffusers ``UNet2DModel`` folder (the reference's ``unet_ema/``) into a condiff model folder.

This is the one explicit place where pickled weights (``diffusion_pytorch_model.bin``) may be read,
with ``torch.load(weights_only=True)``; the inference path only ever reads safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from condiff.config import ModelConfig, ScheduleConfig, UNetConfig
from condiff.errors import ModelFolderError
from condiff.modelset import save_model
from condiff.unet import ConditionalUNet

# diffusers < 0.15 named the legacy attention block's layers differently
_LEGACY_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _read_state(src: Path) -> dict[str, torch.Tensor]:
    st = src / "diffusion_pytorch_model.safetensors"
    binf = src / "diffusion_pytorch_model.bin"
    for path in (st, binf):
        if not path.is_file():
            continue
        try:
            if path == st:
                from condiff.modelset import load_safetensors
                return load_safetensors(path)
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # safetensors and torch raise their own types for corrupt files
            raise ModelFolderError(path, f"cannot be read ({type(exc).__name__}: {str(exc).strip()[:160]})",
                                   "the file is corrupt or truncated; copy it again") from None
    raise ModelFolderError(src, "no diffusion_pytorch_model.safetensors or .bin; not a diffusers model folder")


def _rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in state.items():
        for old, new in _LEGACY_ATTENTION.items():
            if ".attentions." in name and f".{old}" in name:
                name = name.replace(f".{old}", f".{new}")
                break
        out[name] = value
    return out


def import_diffusers_unet(src: str | Path, dst: str | Path, preprocessing: dict | None = None,
                          schedule: ScheduleConfig | None = None) -> Path:
    """Convert ``src`` (config.json + diffusion_pytorch_model.*) into a condiff model folder at ``dst``.

    The weights are copied bit for bit (same parameter names, same dtype cast to float32 only
    if they were stored wider/narrower). Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ModelFolderError(src, "no config.json; not a diffusers model folder")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # UnicodeDecodeError is a ValueError
        raise ModelFolderError(cfg_path, f"is not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelFolderError(cfg_path, "is not a JSON object")
    if raw.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ModelFolderError(cfg_path, f"is a {raw.get('_class_name')}, condiff imports UNet2DModel only")
    try:
        unet_cfg = UNetConfig.from_diffusers(raw)
    except ValueError as exc:
        raise ModelFolderError(cfg_path, str(exc)) from exc
    if preprocessing:
        from condiff.preprocess import PreprocessConfig

        pre = PreprocessConfig.from_dict(preprocessing)
        if pre.image_size != unet_cfg.sample_size or pre.channels != unet_cfg.image_channels:
            raise ModelFolderError(cfg_path, f"the network takes {unet_cfg.image_channels}-channel "
                                   f"{unet_cfg.sample_size}-px slices, the preprocessing contract gives "
                                   f"{pre.channels}-channel {pre.image_size}-px ones", "give the contract it was trained with")
    state = _rename_legacy(_read_state(src))
    model = ConditionalUNet(unet_cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ModelFolderError(src, f"weights do not fit the configuration ({exc})") from exc
    config = ModelConfig(unet=unet_cfg, schedule=schedule or ScheduleConfig(),
                         preprocessing=preprocessing or {},
                         trained={"imported_from": str(src), "source": "diffusers UNet2DModel"})
    return save_model(dst, model, config)
