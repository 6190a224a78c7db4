"""Intensity presets: how a raw CT or MRI volume becomes a normalised, resampled, RAS-oriented crop."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..masking.grid import Window


class Preset(BaseModel):
    """Preprocessing shared by pretraining, finetuning and inference.

    ``ct``: RAS, ``spacing`` mm, HU window [a_min, a_max] → [b_min, b_max] with clipping.
    ``mri``: RAS, ``spacing`` mm, per-volume (per-channel) percentiles [lower, upper] → [0, 1], clipped.
    """

    model_config = ConfigDict(extra="forbid")

    modality: Literal["ct", "mri"] = "ct"
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    orientation: str = "RAS"
    a_min: float = -175.0
    a_max: float = 250.0
    b_min: float = 0.0
    b_max: float = 1.0
    lower_percentile: float = Field(0.5, ge=0, le=100)
    upper_percentile: float = Field(99.5, ge=0, le=100)
    channels: int = Field(1, ge=1, description="image channels (e.g. 4 for MSD BraTS); 1 rejects 4D files")

    @model_validator(mode="after")
    def _check(self) -> "Preset":
        if self.a_max <= self.a_min or self.b_max <= self.b_min:
            raise ValueError("the intensity window needs a_max > a_min and b_max > b_min")
        if self.upper_percentile <= self.lower_percentile:
            raise ValueError("upper_percentile must exceed lower_percentile")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        return self

    @property
    def window(self) -> Window | None:
        """The HU window for CT (used to convert a λ given in HU); None for MRI."""
        return Window(self.a_min, self.a_max, self.b_min, self.b_max) if self.modality == "ct" else None

    def fingerprint(self) -> str:
        """A short hash of every setting that changes the preprocessed voxels (the cache key)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def make_preset(name: str = "ct", **overrides) -> Preset:
    """The ``ct`` or ``mri`` preset with any field overridden (e.g. ``spacing=(1.5, 1.5, 2.0)``)."""
    if name not in ("ct", "mri"):
        raise ValueError(f"unknown preset {name!r}; choose 'ct' or 'mri'")
    return Preset(modality=name, **overrides)
