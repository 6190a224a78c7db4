"""Backbones: the registry of families (MONAI's SwinUNETR, UNETR, BasicUNet; nnU-Net's ResEnc), loading
pretrained weights, the encoder artifact, and the nnU-Net export."""

from .registry import BACKBONES, Backbone, BackboneSpec, backbone_spec, build_backbone, resolve_backbone

__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "backbone_spec", "build_backbone", "resolve_backbone"]
