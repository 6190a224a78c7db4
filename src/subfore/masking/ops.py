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

    Owned by whoever trains (the pretraining module keeps one and saves it in its checkpoints).
    """

    def __init__(self) -> None:
        self._count: torch.Tensor | None = None

    def add(self, empty: torch.Tensor) -> None:
        e = empty.detach().long()
        self._count = e if self._count is None else self._count + e.to(self._count.device)

    @property
    def value(self) -> int:
        return 0 if self._count is None else int(self._count)

    def reset(self) -> None:
        self._count = None


def masked_l1(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, counter: EmptyMaskCounter | None = None
) -> torch.Tensor:
    """Mean |pred − target| over masked voxels only, in fp32; 0 (and ``counter`` + 1) when nothing is masked.

    pred, target: (B, C, D, H, W); mask: grid (B, nz, ny, nx) or voxels (B, 1, D, H, W), True = masked.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    size = pred.shape[2] // mask.shape[1] if mask.ndim == 4 else 1
    voxels = to_grid(mask, size)
    # Outside autocast and in fp32: a bf16 sum of millions of voxels rounds (256 is its largest exact step).
    with torch.autocast(pred.device.type, enabled=False):
        err = torch.where(voxels, (pred.float() - target.float()).abs(), 0.0).sum()
        count = voxels.sum() * pred.shape[1]  # int64: exact
    if counter is not None:
        counter.add(count == 0)
    return err / count.clamp_min(1).float()
