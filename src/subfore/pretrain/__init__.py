"""Masked-image-modelling pretraining: the resolved config and its crops (``data``), the LightningModule
(``module``) and the run (``run``)."""

from ..engine.module import warmup_cosine
from ..engine.run import resolve_precision
from .data import CropData, PretrainPlan, crop_volumes, resolve
from .module import MaskedImageModel
from .run import RunArtifacts, pretrain

__all__ = ["CropData", "MaskedImageModel", "PretrainPlan", "RunArtifacts", "crop_volumes", "pretrain",
           "resolve", "resolve_precision", "warmup_cosine"]
