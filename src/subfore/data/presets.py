"""Intensity presets: how a raw CT or MRI volume becomes a normalised, resampled, RAS-oriented crop.

``nnunet`` presets are built from an nnU-Net plans file (:func:`subfore.data.plans.preset_from_plans`).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from ..errors import ConfigError
from ..masking.foreground import parse_threshold
from ..masking.grid import Threshold, Window


#: SubFore's foreground window (the papers' code): −175…250 HU → 0…1, so λ = 0.1 is −132.5 HU.
SUBFORE_WINDOW = Window(-175.0, 250.0, 0.0, 1.0)


class ChannelNorm(BaseModel):
    """One channel's nnU-Net normalisation: the plans' scheme and the fingerprint's foreground intensities."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SCHEMES: ClassVar[tuple[str, ...]] = ("CTNormalization", "ZScoreNormalization", "NoNormalization",
                                          "RescaleTo01Normalization", "RGBTo01Normalization")

    scheme: str
    use_mask: bool = False
    mean: float | None = None
    std: float | None = None
    lower: float | None = Field(None, description="percentile 0.5 of the foreground (CTNormalization clip)")
    upper: float | None = Field(None, description="percentile 99.5 of the foreground")


class Preset(BaseModel):
    """Preprocessing shared by pretraining, finetuning and inference.

    ``ct``: RAS, ``spacing`` mm, HU window [a_min, a_max] → [b_min, b_max] with clipping.
    ``mri``: RAS, ``spacing`` mm, per-volume (per-channel) percentiles [lower, upper] → [0, 1], clipped.
    ``nnunet``: RAS, the plans' spacing, nnU-Net's normalisation per channel (``norms``), then the spatial
    axes permuted by ``axes`` into nnU-Net's array order, so crops and kernels line up as in nnUNetv2_train.
    """

    model_config = ConfigDict(extra="forbid")

    modality: Literal["ct", "mri", "nnunet"] = "ct"
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    orientation: str = "RAS"
    a_min: float = -175.0
    a_max: float = 250.0
    b_min: float = 0.0
    b_max: float = 1.0
    lower_percentile: float = Field(0.5, ge=0, le=100)
    upper_percentile: float = Field(99.5, ge=0, le=100)
    channels: int = Field(1, ge=1, description="image channels (e.g. 4 for MSD BraTS); 1 rejects 4D files")
    norms: tuple[ChannelNorm, ...] | None = Field(None, description="nnunet: the normalisation of each channel")
    axes: tuple[int, int, int] | None = Field(None, description="nnunet: array axis i ← RAS axis axes[i]")

    @model_validator(mode="after")
    def _check(self) -> "Preset":
        if self.a_max <= self.a_min or self.b_max <= self.b_min:
            raise ValueError("the intensity window needs a_max > a_min and b_max > b_min")
        if self.upper_percentile <= self.lower_percentile:
            raise ValueError("upper_percentile must exceed lower_percentile")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if self.modality == "nnunet" and (self.norms is None or len(self.norms) != self.channels):
            raise ValueError("an nnunet preset needs one normalisation per channel")
        if self.axes is not None and sorted(self.axes) != [0, 1, 2]:
            raise ValueError(f"axes must be a permutation of (0, 1, 2), got {self.axes}")
        return self

    @model_serializer(mode="wrap")
    def _without_unused(self, handler):
        # The ct and mri presets dump (and so hash, and key caches) as they did before the nnunet fields existed.
        data = handler(self)
        for key in ("norms", "axes"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @property
    def window(self) -> Window | None:
        """The HU window for CT (used to convert a λ given in HU); None for MRI.

        nnunet: CTNormalization (clip to [lower, upper], then (x − mean) / std) is exactly the window
        [lower, upper] → [(lower − mean) / std, (upper − mean) / std]; None unless every channel has the same one.
        """
        if self.modality == "nnunet":
            n = self.norms[0] if self.norms else None
            if n is None or n.scheme != "CTNormalization" or any(m != n for m in self.norms) or n.upper <= n.lower:
                return None
            std = max(n.std, 1e-8)
            return Window(n.lower, n.upper, (n.lower - n.mean) / std, (n.upper - n.mean) / std)
        return Window(self.a_min, self.a_max, self.b_min, self.b_max) if self.modality == "ct" else None

    @property
    def reference_window(self) -> Window | None:
        """The HU window SubFore's foreground is decided in when that is not the network's own input, else None.

        nnunet with CTNormalization: nnU-Net clips to the labelled voxels' 0.5–99.5 percentiles (on abdominal CT
        often above −100 HU, so fat and air would clip alike) and z-scores; the foreground is then decided on the
        papers' −175…250 HU → 0…1 window of the same resampled HU (a ``reference`` carried beside the image), so
        "-132.5 HU" means what it means under the ``ct`` preset. ``ct`` and ``mri``: the network's input itself.
        """
        return SUBFORE_WINDOW if self.modality == "nnunet" and self.window is not None else None

    @property
    def array_spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (mm) along the axes of the preprocessed array (``spacing`` permuted by ``axes``)."""
        return tuple(self.spacing[a] for a in self.axes) if self.axes else self.spacing  # type: ignore[return-value]

    def foreground_threshold(self, threshold: Threshold | None, threshold_hu: float | None = None
                             ) -> tuple[Threshold, Window | None]:
        """λ in the units the foreground is decided in (or 'otsu'), and the window to range-check λ against.

        That is the network's normalised input, or the :attr:`reference_window` where there is one (nnunet with
        CTNormalization: λ 0.1 = −132.5 HU, as under ``ct``). nnunet without CTNormalization: no HU, and no bounds
        (z-scores have none).
        """
        window = self.reference_window or self.window
        if self.modality == "nnunet":
            if threshold_hu is not None and window is None:
                schemes = sorted({n.scheme for n in self.norms or ()})
                raise ConfigError(f"masking.threshold {threshold_hu:g} HU: the plans normalise with "
                                  f"{', '.join(schemes)}, not one CTNormalization; give 'otsu' or a value in "
                                  f"normalised units")
            if window is None:
                window = Window(-math.inf, math.inf, -math.inf, math.inf)
        return parse_threshold(threshold, threshold_hu, window), window

    def fingerprint(self) -> str:
        """A short hash of every setting that changes the preprocessed voxels (the cache key)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def make_preset(name: str = "ct", **overrides) -> Preset:
    """The ``ct`` or ``mri`` preset with any field overridden (e.g. ``spacing=(1.5, 1.5, 2.0)``)."""
    if name not in ("ct", "mri"):
        raise ValueError(f"unknown preset {name!r}; choose 'ct' or 'mri'")
    return Preset(modality=name, **overrides)
