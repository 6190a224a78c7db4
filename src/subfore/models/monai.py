"""MONAI's backbones: SwinUNETR (the SubFore paper's), UNETR and BasicUNet (the small CNN for CPU users).

Each builder maps a model section (``model.*``) to a network (B, in_channels, *roi) → (B, out_channels, *roi).
``model.checkpointing`` checkpoints the encoder: SwinUNETR's by MONAI (``use_checkpoint``), UNETR's ViT blocks and
BasicUNet's encoder stages (conv_0, down_1…down_4) here (:mod:`.checkpointing`), with the same state_dict keys.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import BasicUNet, SwinUNETR, UNETR
from torch import nn

from ..errors import ConfigError
from .checkpointing import checkpoint_modules
from .mae import PATCH, MaskedAutoencoder, freeze_unused


def check_swinunetr_roi(roi: Sequence[int]) -> None:
    if min(roi) < 64 or any(r % 32 for r in roi):
        raise ConfigError(
            f"data.roi {list(roi)}: SwinUNETR needs every side ≥ 64 and a multiple of 32 "
            f"(its bottleneck is 1/32 of the crop and instance norm fails below 2³), e.g. [64, 64, 64] or [96, 96, 96]"
        )


def check_multiple_of_16(name: str):
    def check(roi: Sequence[int]) -> None:
        if any(r % 16 for r in roi):
            raise ConfigError(f"data.roi {list(roi)}: {name} needs every side to be a multiple of 16")

    return check


def swinunetr_args(m, in_channels: int, out_channels: int, roi: Sequence[int]) -> dict:
    return dict(in_channels=in_channels, out_channels=out_channels, feature_size=m.feature_size, use_v2=m.use_v2,
                use_checkpoint=m.checkpointing, drop_rate=m.dropout, spatial_dims=3)


def unetr_args(m, in_channels: int, out_channels: int, roi: Sequence[int]) -> dict:
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads ({m.num_heads})")
    return dict(in_channels=in_channels, out_channels=out_channels, img_size=tuple(roi), feature_size=m.feature_size,
                hidden_size=m.hidden_size, mlp_dim=m.mlp_dim, num_heads=m.num_heads, dropout_rate=m.dropout,
                spatial_dims=3)


def basicunet_args(m, in_channels: int, out_channels: int, roi: Sequence[int]) -> dict:
    f = m.feature_size
    return dict(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                features=(f, f, 2 * f, 4 * f, 8 * f, f), dropout=m.dropout)


#: model.name → (MONAI class, its constructor arguments for a model section): the builders below, and what a
#: model folder's config.json tells users to construct
CONSTRUCTORS = {
    "swinunetr": (SwinUNETR, swinunetr_args),
    "unetr": (UNETR, unetr_args),
    "basicunet": (BasicUNet, basicunet_args),
}


def swinunetr(m, in_channels: int, out_channels: int, roi: Sequence[int]) -> nn.Module:
    return SwinUNETR(**swinunetr_args(m, in_channels, out_channels, roi))


def unetr(m, in_channels: int, out_channels: int, roi: Sequence[int]) -> nn.Module:
    net = freeze_unused(UNETR(**unetr_args(m, in_channels, out_channels, roi)))
    if m.checkpointing:
        checkpoint_modules(net.vit.blocks)
    return net


def basicunet(m, in_channels: int, out_channels: int, roi: Sequence[int]) -> nn.Module:
    net = BasicUNet(**basicunet_args(m, in_channels, out_channels, roi))
    if m.checkpointing:
        checkpoint_modules([net.conv_0, net.down_1, net.down_2, net.down_3, net.down_4])
    return net


def unetr_mae(m, in_channels: int, roi: Sequence[int], decoder, predict_loss: bool = False) -> MaskedAutoencoder:
    """UNETR's ViT (built by UNETR itself: the same init and key names) with an MAE decoder over the crop's patches.

    decoder: the ``decoder`` section (width, depth, heads); predict_loss: hard-patch mining's per-patch loss head.
    """
    vit = UNETR(**unetr_args(m, in_channels, 1, roi)).vit
    if m.checkpointing:
        checkpoint_modules(vit.blocks)  # the visible tokens' blocks; the light decoder is not checkpointed
    return MaskedAutoencoder(vit, in_channels, tuple(r // PATCH for r in roi), decoder.width, decoder.depth,
                             decoder.heads, predict_loss)
