"""Applying a mask grid to voxels and the masked reconstruction loss."""

from __future__ import annotations

import torch

from .grid import to_grid

FILLS = ("noise", "zero", "mean")


def apply_mask(
    x: torch.Tensor,
    mask: torch.Tensor,
    fill: str | torch.Tensor = "noise",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace the masked voxels of ``x`` (B, C, D, H, W); visible voxels are returned unchanged.

    mask: grid (B, nz, ny, nx) or voxels (B, 1, D, H, W), True = masked; the subvolume size is
    D // nz. fill: ``"noise"`` N(0, 1) (the SubFore paper), ``"zero"``, ``"mean"`` (each sample's
    mean intensity), or a tensor broadcastable to (B, C, 1, 1, 1) such as a learned mask token.
    """
    size = x.shape[2] // mask.shape[1] if mask.ndim == 4 else 1
    voxels = to_grid(mask, size)
    if voxels.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not tile the volume {tuple(x.shape)}")
    if isinstance(fill, torch.Tensor):
        value = fill.to(x.dtype).view(1, -1, 1, 1, 1) if fill.ndim <= 1 else fill.to(x.dtype)
    elif fill == "noise":
        value = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    elif fill == "zero":
        value = torch.zeros((), device=x.device, dtype=x.dtype)
    elif fill == "mean":
        value = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    else:
        raise ValueError(f"fill must be one of {FILLS} or a tensor, got {fill!r}")
    return torch.where(voxels, value, x)


class EmptyMaskCounter:
    """Counts loss calls that found no masked voxel, without a device sync until read.

    Owned by whoever trains (the pretraining module keeps one and saves it in its checkpoints). A count restored
    from a checkpoint stays a host int beside the device count, so that nothing crosses between them per step.
    """

    def __init__(self) -> None:
        self._base = 0
        self._count: torch.Tensor | None = None

    def add(self, empty: torch.Tensor) -> None:
        e = empty.detach().long()
        self._count = e if self._count is None else self._count + e

    def total(self) -> torch.Tensor | int:
        """The count so far: a device scalar (read it when logging) or, before any add, a host int."""
        return self._base if self._count is None else self._count + self._base

    @property
    def value(self) -> int:
        return int(self.total())

    def reset(self, start: int = 0) -> None:
        self._base, self._count = int(start), None


LOSSES = ("l1", "mse")


def voxel_error(pred: torch.Tensor, target: torch.Tensor, loss: str = "l1") -> torch.Tensor:
    """Per-voxel error in fp32: |pred − target| (``l1``, SubFore) or (pred − target)² (``mse``, MAE)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    diff = pred.float() - target.float()
    return diff.abs() if loss == "l1" else diff.square()


def masked_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, loss: str = "l1",
    counter: EmptyMaskCounter | None = None,
) -> torch.Tensor:
    """Mean per-voxel error (:func:`voxel_error`) over masked voxels only, in fp32; 0 (and ``counter`` + 1) when
    nothing is masked.

    pred, target: (B, C, D, H, W); mask: grid (B, nz, ny, nx) or voxels (B, 1, D, H, W), True = masked.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    size = pred.shape[2] // mask.shape[1] if mask.ndim == 4 else 1
    voxels = to_grid(mask, size)
    # Outside autocast and in fp32: a bf16 sum of millions of voxels rounds (256 is its largest exact step).
    with torch.autocast(pred.device.type, enabled=False):
        err = torch.where(voxels, voxel_error(pred, target, loss), 0.0).sum()
        count = voxels.sum() * pred.shape[1]  # int64: exact
    if counter is not None:
        counter.add(count == 0)
    return err / count.clamp_min(1).float()


def masked_l1(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, counter: EmptyMaskCounter | None = None
) -> torch.Tensor:
    """Mean |pred − target| over masked voxels only (SubFore's loss): :func:`masked_loss` with ``l1``."""
    return masked_loss(pred, target, mask, "l1", counter)


def patch_normalise(x: torch.Tensor, size: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's ``norm_pix_loss`` target: each size³ patch of x (B, C, D, H, W) to zero mean, unit variance over its
    voxels and channels. Returns (normalised x, mean, std), mean and std broadcast to x's shape."""
    with torch.autocast(x.device.type, enabled=False):
        xf = x.float()
        mean = torch.nn.functional.avg_pool3d(xf, size, size).mean(1, keepdim=True)
        sq = torch.nn.functional.avg_pool3d(xf.square(), size, size).mean(1, keepdim=True)
        # MAE divides by the unbiased variance's root; with 16³ voxels a patch the difference is 1 part in 8192.
        n = size**3 * x.shape[1]
        var = (sq - mean.square()).clamp_min(0) * n / max(n - 1, 1)
        mean = expand_to(mean, size, x.shape)
        std = expand_to((var + eps).sqrt(), size, x.shape)
        return (xf - mean) / std, mean, std


def expand_to(cells: torch.Tensor, size: int, shape: torch.Size) -> torch.Tensor:
    """(B, 1, nz, ny, nx) per-cell values as voxels broadcast to ``shape`` (B, C, D, H, W)."""
    for dim in (2, 3, 4):
        cells = cells.repeat_interleave(size, dim)
    return cells.expand(shape)
