"""Backbones (MONAI SwinUNETR, UNETR, BasicUNet), ROI checks and the encoder export/import layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.nets import BasicUNet, SwinUNETR, UNETR
from torch import nn

from .errors import ConfigError

# The output layer of each family: left out of exported weights so they load into any class count.
HEAD_PREFIX = {"swinunetr": "out.", "unetr": "out.", "basicunet": "final_conv."}
# The encoder of each family: the part a pretrained checkpoint must fill.
ENCODER_PREFIX = {"swinunetr": "swinViT.", "unetr": "vit.", "basicunet": "conv_0."}


def check_roi(name: str, roi: Sequence[int], subvolume_size: int | None = None) -> None:
    """Reject a crop the backbone cannot take, with the rule it breaks."""
    roi = tuple(int(r) for r in roi)
    if name == "swinunetr":
        if min(roi) < 64 or any(r % 32 for r in roi):
            raise ConfigError(
                f"data.roi {list(roi)}: SwinUNETR needs every side ≥ 64 and a multiple of 32 "
                f"(its bottleneck is 1/32 of the crop and instance norm fails below 2³), e.g. [64, 64, 64] or [96, 96, 96]"
            )
    elif any(r % 16 for r in roi):
        raise ConfigError(f"data.roi {list(roi)}: {name} needs every side to be a multiple of 16")
    if subvolume_size and any(r % subvolume_size for r in roi):
        raise ConfigError(
            f"data.roi {list(roi)} does not divide into masking.subvolume_size={subvolume_size} subvolumes"
        )


def build_backbone(
    name: str,
    in_channels: int,
    out_channels: int,
    roi: Sequence[int],
    feature_size: int = 48,
    use_v2: bool = True,
    checkpointing: bool = False,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
    dropout: float = 0.0,
) -> nn.Module:
    """A MONAI segmentation network; (B, in_channels, *roi) → (B, out_channels, *roi)."""
    check_roi(name, roi)
    if name == "swinunetr":
        return SwinUNETR(
            in_channels=in_channels, out_channels=out_channels, feature_size=feature_size, use_v2=use_v2,
            use_checkpoint=checkpointing, drop_rate=dropout, spatial_dims=3,
        )
    if name == "unetr":
        if hidden_size % num_heads:
            raise ConfigError(f"model.hidden_size ({hidden_size}) must be divisible by model.num_heads ({num_heads})")
        return UNETR(
            in_channels=in_channels, out_channels=out_channels, img_size=tuple(roi), feature_size=feature_size,
            hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, dropout_rate=dropout, spatial_dims=3,
        )
    if name == "basicunet":
        f = feature_size
        return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                         features=(f, f, 2 * f, 4 * f, 8 * f, f), dropout=dropout)
    raise ConfigError(f"model.name: unknown backbone {name!r}; choose swinunetr, unetr or basicunet")


def encoder_state(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The network's weights without its output layer: loads into the same family with any class count."""
    head = HEAD_PREFIX[name]
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith(head)}


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
