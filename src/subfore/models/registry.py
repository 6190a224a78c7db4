"""One spec per backbone family: how it is built, which keys are encoder, stem and output head, its default
learning rates, and the crops it accepts. A new backbone is one entry in :data:`BACKBONES`.

    >>> net = build_backbone(ModelConfig(name="basicunet", feature_size=8), 1, 2, (32, 32, 32))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from . import monai as monai_nets
from .nnunet import network as nnunet_nets


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of subfore knows about a backbone family."""

    name: str
    #: (model section, in_channels, out_channels, roi, architecture or None) → network
    build: Callable[..., nn.Module]
    #: key prefixes of the encoder: the part a pretrained checkpoint must fill
    encoder: tuple[str, ...]
    #: key prefix of the output layer: never loaded from a pretraining, left out of exported weights; the linear
    #: probe reads the input of this layer (the last of it, for a ModuleList), so it must be the final 1×1×1 conv
    head: str
    pretrain_lr: float
    finetune_lr: float
    #: roi → None, or ConfigError naming the rule (nnU-Net families check against their architecture instead)
    check_roi: Callable[[Sequence[int]], None] | None = None
    #: built from an nnU-Net architecture (plans) rather than from the model section's sizes
    nnunet: bool = False
    #: model.encoding visible: (model section, in_channels, roi, decoder section, predict_loss) → an MAE whose
    #: encoder keys are this family's (ViT families only), and the ViT's patch side in voxels
    visible: Callable[..., nn.Module] | None = None
    patch_size: int | None = None

    def encoder_keys(self, keys) -> list[str]:
        return [k for k in keys if k.startswith(self.encoder)]

    def head_module(self, net: nn.Module) -> nn.Module:
        """The output layer (nnU-Net's full-resolution seg layer: the last of ``seg_layers``)."""
        module = net.get_submodule(self.head.rstrip("."))
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            module = module[-1]
        return module


def from_section(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A builder ``(model section, in_channels, out_channels, roi)`` as a spec's ``build`` (which also receives the
    nnU-Net architecture, None for these families)."""
    return lambda m, cin, cout, roi, arch: build(m, cin, cout, roi)


def _nnunet(m, cin, cout, roi, arch):
    return nnunet_nets.build_network(arch, cin, cout, m.checkpointing)


BACKBONES: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    BackboneSpec(name="swinunetr", build=from_section(monai_nets.swinunetr), encoder=("swinViT.",), head="out.",
                 pretrain_lr=8e-4, finetune_lr=1e-3, check_roi=monai_nets.check_swinunetr_roi),
    BackboneSpec(name="unetr", build=from_section(monai_nets.unetr), encoder=("vit.",), head="out.",
                 pretrain_lr=1e-4, finetune_lr=3e-4, check_roi=monai_nets.check_multiple_of_16("unetr"),
                 visible=monai_nets.unetr_mae, patch_size=16),
    BackboneSpec(name="basicunet", build=from_section(monai_nets.basicunet),
                 encoder=("conv_0.", "down_1.", "down_2.", "down_3.", "down_4."), head="final_conv.",
                 pretrain_lr=1e-3, finetune_lr=1e-3, check_roi=monai_nets.check_multiple_of_16("basicunet")),
    BackboneSpec(name="resenc", build=_nnunet, encoder=("encoder.",), head="decoder.seg_layers.",
                 pretrain_lr=1e-3, finetune_lr=1e-3, nnunet=True),
    BackboneSpec(name="resenc_l", build=_nnunet, encoder=("encoder.",), head="decoder.seg_layers.",
                 pretrain_lr=1e-3, finetune_lr=1e-3, nnunet=True),
)}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Make a backbone family available to ``model.name`` (from a plug-in module, before configs are loaded)."""
    BACKBONES[spec.name] = spec
    return spec


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"model.name: unknown backbone {name!r}; choose {', '.join(BACKBONES)}") from None


@dataclass
class Backbone:
    """A backbone family resolved for one model section: for nnU-Net families the plans are read here, once."""

    spec: BackboneSpec
    model: Any  # the model section (subfore.config.ModelConfig or a subclass)
    architecture: dict | None = None
    plan: dict = field(default_factory=dict)  # what encoder.json records of the nnU-Net plan

    def check_roi(self, roi: Sequence[int], subvolume_size: int | None = None) -> None:
        """Reject a crop the backbone cannot take, with the rule it breaks."""
        roi = tuple(int(r) for r in roi)
        if self.spec.nnunet:
            nnunet_nets.check_roi_for(self.architecture, roi, self.describe(), subvolume_size)
        elif self.spec.check_roi is not None:
            self.spec.check_roi(roi)
        if subvolume_size and any(r % subvolume_size for r in roi):
            raise ConfigError(
                f"data.roi {list(roi)} does not divide into masking.subvolume_size={subvolume_size} subvolumes")

    def describe(self) -> str:
        return nnunet_nets.describe(self.model)

    def build(self, in_channels: int, out_channels: int, roi: Sequence[int]) -> nn.Module:
        """(B, in_channels, *roi) → (B, out_channels, *roi) for a crop :meth:`check_roi` accepted."""
        return self.spec.build(self.model, in_channels, out_channels, tuple(roi), copy.deepcopy(self.architecture))

    def build_visible(self, in_channels: int, roi: Sequence[int], decoder, predict_loss: bool) -> nn.Module:
        """The MAE of ``model.encoding: visible``: (B, C, *roi) and a patch mask → reconstruction (B, C, *roi)."""
        return self.spec.visible(self.model, in_channels, tuple(roi), decoder, predict_loss)

    def encoder_state(self, net: nn.Module) -> dict[str, torch.Tensor]:
        """The network's weights without its output layer (an MAE's: its encoder only): loads into the same family
        with any class count."""
        state = net.state_dict()
        if getattr(self.model, "encoding", "dense") == "visible":
            keep = self.spec.encoder_keys(state)  # the MAE decoder is pretraining's alone
        else:
            keep = [k for k in state if not k.startswith(self.spec.head)]
        return {k: state[k].detach().cpu().clone() for k in keep}

    def meta(self) -> dict:
        """What encoder.json records beyond the model section: the nnU-Net architecture the weights belong to."""
        return {"nnunet": {"architecture": copy.deepcopy(self.architecture), **self.plan}} if self.spec.nnunet else {}


def resolve_backbone(model) -> Backbone:
    """The backbone a model section describes; an nnU-Net plans file (if any) is read here, once, into
    ``model.nnunet_plan``, so that the config (and every checkpoint of the run) carries the network itself."""
    spec = backbone_spec(model.name)
    if not spec.nnunet:
        return Backbone(spec, model)
    return Backbone(spec, model, nnunet_nets.architecture(model), nnunet_nets.plan_record(model))


def build_backbone(model, in_channels: int, out_channels: int, roi: Sequence[int]) -> nn.Module:
    """A segmentation network for a model section: (B, in_channels, *roi) → (B, out_channels, *roi)."""
    backbone = resolve_backbone(model)
    backbone.check_roi(roi)
    return backbone.build(in_channels, out_channels, roi)
