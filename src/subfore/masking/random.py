"""Random subvolume masking (SimMIM/MAE style): every subvolume is a candidate."""

from __future__ import annotations

import torch

from .base import MaskGenerator, register
from .grid import exact_count, select_lowest, uniform_noise


def random_grid(
    shape: tuple[int, int, int, int],
    ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    exact: bool = True,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask ``ratio`` of the candidate cells of a (B, nz, ny, nx) grid uniformly at random.

    exact: round(ratio · n_candidates) cells per sample; else an independent Bernoulli(ratio) draw per cell.
    candidates: optional BoolTensor (B, nz, ny, nx); cells outside it are never masked (default: all).
    """
    noise = uniform_noise(shape, device, generator)
    if candidates is None:
        candidates = torch.ones(shape, dtype=torch.bool, device=device)
    if not exact:
        return (noise < ratio) & candidates
    b = shape[0]
    flat_cand = candidates.reshape(b, -1)
    priority = noise.reshape(b, -1).masked_fill(~flat_cand, float("inf"))
    k = exact_count(flat_cand.sum(1), ratio)
    return select_lowest(priority, k).view(shape)


@register("random")
class RandomMask(MaskGenerator):
    """Mask ρ of all subvolumes: exactly round(ρ·n) per sample, or Bernoulli(ρ) with ``exact=False``."""

    def __init__(self, ratio: float = 0.6, size: int = 16, exact: bool = True) -> None:
        super().__init__(ratio, size)
        self.exact = exact

    def build(self, x, grid, generator):
        self.last_stats = {}
        return random_grid((x.shape[0], *grid), self.ratio, x.device, generator, self.exact)
