"""SubFore: mask ρ of the foreground subvolumes only; background stays visible."""

from __future__ import annotations

import torch

from .base import MaskGenerator, register
from .grid import Threshold, Window, check_threshold, foreground_grid
from .random import random_grid


def parse_threshold(
    threshold: Threshold | None = 0.1, threshold_hu: float | None = None, window: Window | None = None
) -> Threshold:
    """Resolve λ from normalised units, HU (via ``window``) or ``"otsu"``; reject a λ that selects everything."""
    if threshold_hu is not None:
        window = window or Window()
        return check_threshold(window.to_normalised(float(threshold_hu)), window)
    if threshold is None:
        raise ValueError("give a foreground threshold (normalised, 'otsu') or threshold_hu")
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be a number, a HU value via threshold_hu, or 'otsu'; got {threshold!r}")
        return threshold
    return check_threshold(float(threshold), window)


@register("foreground")
class ForegroundMask(MaskGenerator):
    """Mask ρ of each sample's foreground subvolumes (mean ≥ λ); never a background one.

    exact: round(ρ·n_fg) per sample; ``exact=False`` draws Bernoulli(ρ) per foreground subvolume as the
    paper's code does. A sample with no foreground falls back to random masking over all subvolumes;
    ``last_stats["fallbacks"]`` counts such samples.
    threshold: λ in normalised units, or ``"otsu"`` (per volume); ``threshold_hu`` gives λ in HU,
    converted with ``window`` (default −175…250 HU → 0…1).
    """

    def __init__(
        self,
        ratio: float = 0.6,
        size: int = 16,
        threshold: Threshold | None = 0.1,
        threshold_hu: float | None = None,
        window: Window | None = None,
        exact: bool = True,
    ) -> None:
        super().__init__(ratio, size)
        self.threshold = parse_threshold(threshold, threshold_hu, window)
        self.exact = exact

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """The foreground grid (B, nz, ny, nx) of ``x``."""
        return foreground_grid(self.foreground_source(x), self.size, self.threshold)

    def build(self, x, grid, generator):
        fg = self.candidates(x)
        empty = ~fg.flatten(1).any(1)
        # A sample without foreground gets all cells as candidates: random masking, counted as a fallback.
        cand = fg | empty.view(-1, 1, 1, 1)
        mask = random_grid(fg.shape, self.ratio, x.device, generator, self.exact, cand)
        self.last_stats = {
            "foreground_fraction": fg.float().mean(),
            "fallbacks": empty.sum(),
        }
        return mask
