"""Mask generators over a grid of subvolumes, the masked-input builder and the masked loss.

    >>> gen = make_generator("foreground", ratio=0.6, size=16, threshold=0.1)
    >>> mask = gen(x, generator=torch.Generator().manual_seed(0))   # (B, nz, ny, nx), True = masked
    >>> loss = masked_l1(model(apply_mask(x, mask)), x, mask)
"""

from .base import REGISTRY, MaskGenerator, make_generator, register
from .block import BlockMask
from .factory import from_config
from .foreground import ForegroundMask, parse_threshold
from .grid import (
    Window,
    check_threshold,
    expand_grid,
    foreground_grid,
    grid_shape,
    otsu_thresholds,
    subvolume_means,
)
from .ops import LOSSES, EmptyMaskCounter, apply_mask, masked_l1, masked_loss, patch_normalise, voxel_error
from .random import RandomMask, random_grid
from .teacher import AnatoMask, HardPatchMask, TeacherGuidedMask, compose_mask, ema_momentum, hard_share

__all__ = [
    "AnatoMask",
    "HardPatchMask",
    "TeacherGuidedMask",
    "compose_mask",
    "ema_momentum",
    "hard_share",
    "REGISTRY",
    "EmptyMaskCounter",
    "BlockMask",
    "ForegroundMask",
    "MaskGenerator",
    "RandomMask",
    "Window",
    "apply_mask",
    "check_threshold",
    "expand_grid",
    "foreground_grid",
    "from_config",
    "grid_shape",
    "make_generator",
    "masked_l1",
    "masked_loss",
    "patch_normalise",
    "voxel_error",
    "LOSSES",
    "otsu_thresholds",
    "parse_threshold",
    "random_grid",
    "register",
    "subvolume_means",
]
