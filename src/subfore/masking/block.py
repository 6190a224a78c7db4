"""Block masking (BEiT/SimMIM's blockwise variant in 3D): contiguous cuboids of subvolumes."""

from __future__ import annotations

import math

import torch

from .base import MaskGenerator, register
from .grid import device_ints, exact_count, select_lowest, uniform_noise


@register("block")
class BlockMask(MaskGenerator):
    """Paint random cuboids of subvolumes, in order, until round(ρ·n) subvolumes are masked.

    Each cuboid has sides drawn uniformly from [min_side, max_side] subvolumes per axis
    (``max_side`` defaults to half the grid). The count is exact: the cuboid that crosses the
    target is masked only in part (a random subset of its new cells).
    """

    def __init__(self, ratio: float = 0.6, size: int = 16, min_side: int = 1, max_side: int | None = None) -> None:
        super().__init__(ratio, size)
        if min_side < 1 or (max_side is not None and max_side < min_side):
            raise ValueError(f"block sides need 1 ≤ min_side ≤ max_side, got {min_side}, {max_side}")
        self.min_side = min_side
        self.max_side = max_side

    def build(self, x, grid, generator):
        self.last_stats = {}
        b, dev = x.shape[0], x.device
        # From host ints: reading a device tensor (or copying one there) would wait for the device.
        n = math.prod(grid)
        sides_hi = [min(g, self.max_side) if self.max_side else max(g // 2, 1) for g in grid]
        dims, hi = device_ints(grid, dev), device_ints(sides_hi, dev)
        lo = device_ints([min(self.min_side, h) for h in sides_hi], dev)
        # Enough cuboids that the union nearly always reaches the target; any shortfall is topped up at random.
        m = 2 * n
        u = uniform_noise((b, m, 3), dev, generator)
        sides = lo + (u * (hi - lo + 1)).long()
        u = uniform_noise((b, m, 3), dev, generator)
        starts = (u * (dims - sides + 1)).long()
        coords = torch.stack(torch.meshgrid(*(torch.arange(g, device=dev) for g in grid), indexing="ij"), -1).view(1, 1, n, 3)
        inside = ((coords >= starts[:, :, None]) & (coords < (starts + sides)[:, :, None])).all(-1)  # (B, m, n)
        covered = inside.any(1)
        # argmax returns the first True: the index of the cuboid that first covers each cell.
        first = torch.where(covered, inside.float().argmax(1).float(), float(m))
        priority = first + uniform_noise((b, n), dev, generator)
        k = exact_count(torch.full((b,), n, device=dev), self.ratio)
        return select_lowest(priority, k).view(b, *grid)
