"""Backbones (MONAI SwinUNETR, UNETR, BasicUNet; nnU-Net's ResEnc), ROI checks and the encoder export/import layout."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.networks.nets import BasicUNet, SwinUNETR, UNETR
from torch import nn

from .errors import ConfigError

# The output layer of each family: left out of exported weights so they load into any class count.
# nnU-Net's U-Nets: the seg_layers (one 1×1×1 conv per decoder stage), which nnU-Net's loader skips too.
HEAD_PREFIX = {"swinunetr": "out.", "unetr": "out.", "basicunet": "final_conv.",
               "resenc": "decoder.seg_layers.", "resenc_l": "decoder.seg_layers."}
# The encoder of each family: the part a pretrained checkpoint must fill.
ENCODER_PREFIX = {"swinunetr": "swinViT.", "unetr": "vit.",
                  "basicunet": ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."), "resenc": "encoder.",
                  "resenc_l": "encoder."}


def check_roi(name: str, roi: Sequence[int], subvolume_size: int | None = None, nnunet_plans: str | None = None,
              nnunet_configuration: str = "3d_fullres") -> None:
    """Reject a crop the backbone cannot take, with the rule it breaks."""
    roi = tuple(int(r) for r in roi)
    if name in ("resenc", "resenc_l"):
        from . import nnunet

        nnunet.check_roi(name, roi, nnunet_plans, nnunet_configuration, subvolume_size)
    elif name == "swinunetr":
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
    nnunet_plans: str | None = None,
    nnunet_configuration: str = "3d_fullres",
) -> nn.Module:
    """A segmentation network; (B, in_channels, *roi) → (B, out_channels, *roi).

    resenc: nnU-Net's network for ``nnunet_plans``/``nnunet_configuration``, built by nnU-Net's own
    get_network_from_plans; resenc_l: nnssl's fixed ResEnc-L. Their output layer is the decoder's seg_layers.
    """
    check_roi(name, roi, nnunet_plans=nnunet_plans, nnunet_configuration=nnunet_configuration)
    if name in ("resenc", "resenc_l"):
        from . import nnunet

        net = nnunet.build_network(nnunet.architecture(name, nnunet_plans, nnunet_configuration), in_channels,
                                   out_channels)
        net.subfore_nnunet.update(nnunet.plan_record(name, nnunet_plans, nnunet_configuration))
        return net
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
    raise ConfigError(f"model.name: unknown backbone {name!r}; choose swinunetr, unetr, basicunet, resenc or resenc_l")


def encoder_state(net: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The network's weights without its output layer: loads into the same family with any class count."""
    head = HEAD_PREFIX[name]
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items() if not k.startswith(head)}


def backbone_meta(net: nn.Module) -> dict:
    """What encoder.json records beyond the model config: the nnU-Net architecture the weights belong to."""
    info = getattr(net, "subfore_nnunet", None)
    return {"nnunet": dict(info)} if info else {}


def save_atomic(obj, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
