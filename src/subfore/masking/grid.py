"""The subvolume grid shared by every masking strategy: block means, foreground, thresholds, selection.

Shapes: a volume batch ``x`` is (B, C, D, H, W) in normalised units (0…1 for the ``ct`` preset);
a grid is (B, nz, ny, nx) with one cell per non-overlapping ``size``³ subvolume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

Threshold = float | str | torch.Tensor


def grid_shape(spatial: tuple[int, ...] | torch.Size, size: int) -> tuple[int, int, int]:
    """Number of subvolumes along each axis of a (D, H, W) crop; every axis must divide by ``size``."""
    if size < 1:
        raise ValueError(f"subvolume size must be a positive integer, got {size}")
    if len(spatial) != 3:
        raise ValueError(f"expected 3 spatial dimensions (D, H, W), got {tuple(spatial)}")
    bad = [int(s) for s in spatial if int(s) % size]
    if bad:
        raise ValueError(
            f"crop {tuple(int(s) for s in spatial)} does not divide into {size}³ subvolumes "
            f"({bad} not a multiple of {size}); choose a ROI that is a multiple of the subvolume size"
        )
    return tuple(int(s) // size for s in spatial)  # type: ignore[return-value]


def _check_volume(x: torch.Tensor) -> None:
    if x.ndim != 5:
        raise ValueError(f"expected a batch of volumes (B, C, D, H, W), got shape {tuple(x.shape)}")


def subvolume_means(x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Mean of each non-overlapping ``size``³ block, averaged over channels.

    x: (B, C, D, H, W) → (B, nz, ny, nx), same dtype and device.
    """
    _check_volume(x)
    grid_shape(x.shape[2:], size)
    return F.avg_pool3d(x.float(), kernel_size=size, stride=size).mean(dim=1).to(x.dtype)


def otsu_thresholds(values: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold per row of ``values`` (B, N) → (B,), computed on a ``bins``-bin histogram.

    Vectorised over the batch: each row gets its own histogram between its min and max, and the
    threshold maximises the between-class variance. A constant row returns its value.
    """
    v = values.float().flatten(1)
    lo = v.min(dim=1, keepdim=True).values
    hi = v.max(dim=1, keepdim=True).values
    span = (hi - lo).clamp_min(1e-12)
    idx = ((v - lo) / span * bins).long().clamp_(0, bins - 1)
    hist = torch.zeros(v.shape[0], bins, device=v.device).scatter_add_(1, idx, torch.ones_like(v))
    p = hist / hist.sum(dim=1, keepdim=True)
    centres = lo + (torch.arange(bins, device=v.device) + 0.5) / bins * span  # (B, bins)
    w0 = p.cumsum(1)
    m0 = (p * centres).cumsum(1)
    mt = m0[:, -1:]
    between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
    between[:, -1] = -1  # a split with an empty upper class is no split
    k = between.argmax(dim=1, keepdim=True)
    # The threshold is the upper edge of bin k: cells strictly above it form the bright class.
    upper = lo + (k + 1).float() / bins * span
    return torch.where(hi > lo, upper, lo).squeeze(1)


def resolve_threshold(means: torch.Tensor, threshold: Threshold) -> torch.Tensor:
    """Per-sample threshold (B, 1, 1, 1) for a grid of means (B, nz, ny, nx)."""
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be a number or 'otsu', got {threshold!r}")
        return otsu_thresholds(means.flatten(1)).view(-1, 1, 1, 1)
    if isinstance(threshold, (int, float)):  # a fill: copying a number to a GPU waits for it
        return torch.full((), float(threshold), dtype=means.dtype, device=means.device)
    t = torch.as_tensor(threshold, dtype=means.dtype, device=means.device)
    return t.view(-1, 1, 1, 1) if t.ndim else t


def foreground_grid(x: torch.Tensor, size: int = 16, threshold: Threshold = 0.1) -> torch.Tensor:
    """True where a subvolume's mean ≥ ``threshold`` (normalised units, or ``"otsu"`` per volume).

    x: (B, C, D, H, W) → BoolTensor (B, nz, ny, nx).
    """
    means = subvolume_means(x, size)
    return means >= resolve_threshold(means, threshold)


def expand_grid(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Blow a grid (B, nz, ny, nx) up to voxels (B, 1, nz·size, ny·size, nx·size)."""
    return repeat(grid, "b z y x -> b 1 (z p) (y q) (x r)", p=size, q=size, r=size)


def to_grid(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Accept a grid (B, nz, ny, nx) or a voxel mask (B, 1, D, H, W); return the voxel mask."""
    if mask.ndim == 4:
        return expand_grid(mask, size)
    if mask.ndim == 5:
        return mask
    raise ValueError(f"mask must be a grid (B, nz, ny, nx) or voxels (B, 1, D, H, W), got {tuple(mask.shape)}")


def device_ints(values, device: torch.device) -> torch.Tensor:
    """Host ints as an int64 vector on ``device``, made by fills: a copy from the host would wait for a GPU."""
    return torch.stack([torch.full((), int(v), dtype=torch.int64, device=device) for v in values])


def uniform_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) noise drawn from ``generator`` (which must live on ``device``)."""
    return torch.rand(shape, device=device, generator=generator)


def select_lowest(priority: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mark the ``k[b]`` cells of lowest priority in each row.

    priority: (B, N) float, ``inf`` for cells that may never be chosen; k: (B,) int.
    Returns BoolTensor (B, N) with exactly min(k[b], #finite cells) True per row.
    """
    order = priority.argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(priority.shape[1], device=priority.device).expand_as(order))
    return (rank < k.view(-1, 1)) & torch.isfinite(priority)


def exact_count(n: torch.Tensor, ratio: float) -> torch.Tensor:
    """round(ratio · n), elementwise, half to even as Python's ``round`` does."""
    return torch.round(n.to(torch.float64) * ratio).long()


def flat(grid: torch.Tensor) -> torch.Tensor:
    """(B, nz, ny, nx) → (B, N)."""
    return rearrange(grid, "b z y x -> b (z y x)")


@dataclass(frozen=True)
class Window:
    """An intensity window: HU in [a_min, a_max] maps linearly to [b_min, b_max] (clipped)."""

    a_min: float = -175.0
    a_max: float = 250.0
    b_min: float = 0.0
    b_max: float = 1.0

    def __post_init__(self) -> None:
        if not (self.a_max > self.a_min and self.b_max > self.b_min):
            raise ValueError(f"window needs a_max > a_min and b_max > b_min, got {self}")

    def to_normalised(self, hu: float) -> float:
        """HU → normalised units (unclipped)."""
        return self.b_min + (hu - self.a_min) / (self.a_max - self.a_min) * (self.b_max - self.b_min)

    def to_hu(self, value: float) -> float:
        """Normalised units → HU."""
        return self.a_min + (value - self.b_min) / (self.b_max - self.b_min) * (self.a_max - self.a_min)


def check_threshold(threshold: float, window: Window | None = None) -> float:
    """Reject a λ that would make every subvolume foreground under ``window``; return λ unchanged."""
    if window is None:
        window = Window()
    if not math.isfinite(threshold):
        raise ValueError(f"foreground threshold must be finite, got {threshold}")
    if threshold <= window.b_min:
        raise ValueError(
            f"foreground threshold λ={threshold:g} is at or below the window's lowest output "
            f"b_min={window.b_min:g}: after clipping every voxel is ≥ b_min, so every subvolume would be "
            f"'foreground' and foreground masking would silently become random masking. Use b_min=0 "
            f"(the published code's window) or a λ above b_min"
        )
    if threshold > window.b_max:
        raise ValueError(
            f"foreground threshold λ={threshold:g} is above the window's highest output b_max={window.b_max:g}: "
            f"no subvolume could ever be foreground"
        )
    return threshold
