"""A mask generator from a run config's ``masking:`` section."""

from __future__ import annotations

from ..errors import SubforeError
from .base import REGISTRY, MaskGenerator, make_generator
from .foreground import ForegroundMask
from .grid import Threshold, Window
from .random import RandomMask
from .teacher import TeacherGuidedMask


def from_config(masking, threshold: Threshold, window: Window | None) -> MaskGenerator:
    """The generator ``masking.strategy`` names, with λ already resolved to normalised units (or "otsu").

    masking: the ``masking`` section (subfore.config.MaskingConfig); window: what λ is range-checked against.
    """
    options = dict(masking.options)
    cls = REGISTRY[masking.strategy]
    if issubclass(cls, (RandomMask, ForegroundMask)):
        options.setdefault("exact", masking.exact)
    if issubclass(cls, ForegroundMask):
        options.update(threshold=threshold, window=window)
    if issubclass(cls, TeacherGuidedMask):
        options.update(threshold=threshold, window=window, gate=masking.gate, r0=masking.r0, rT=masking.rT,
                       schedule=masking.schedule)
    try:
        return make_generator(masking.strategy, ratio=masking.ratio, size=masking.subvolume_size, **options)
    except ValueError as exc:
        raise SubforeError(f"masking: {exc}") from None
