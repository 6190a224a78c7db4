"""Backbones: the registry of families (MONAI's SwinUNETR, UNETR, BasicUNet; nnU-Net's ResEnc), loading
pretrained weights, the encoder artifact, and the nnU-Net export."""

from .registry import (
    BACKBONES,
    Backbone,
    BackboneSpec,
    backbone_spec,
    build_backbone,
    register_backbone,
    resolve_backbone,
)

# Former names: the output-layer and encoder key prefixes of each family (now BackboneSpec.head / .encoder).
HEAD_PREFIX = {name: spec.head for name, spec in BACKBONES.items()}
ENCODER_PREFIX = {name: spec.encoder for name, spec in BACKBONES.items()}

__all__ = ["BACKBONES", "ENCODER_PREFIX", "HEAD_PREFIX", "Backbone", "BackboneSpec", "backbone_spec",
           "build_backbone", "register_backbone", "resolve_backbone"]
