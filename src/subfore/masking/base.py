"""The mask-generator protocol and the registry that builds generators by name."""

from __future__ import annotations

from typing import Callable

import torch

from .grid import grid_shape

REGISTRY: dict[str, type["MaskGenerator"]] = {}


def register(name: str) -> Callable[[type["MaskGenerator"]], type["MaskGenerator"]]:
    """Class decorator: make a generator available to ``make_generator(name)`` and ``masking.strategy``."""

    def deco(cls: type[MaskGenerator]) -> type[MaskGenerator]:
        REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


class MaskGenerator:
    """Builds a boolean mask grid (B, nz, ny, nx), True = masked, for a batch x (B, C, D, H, W).

    Subclasses implement ``build``. After each call ``last_stats`` holds tensors (no device sync)
    describing the mask: ``masked_fraction`` and, where meaningful, ``foreground_fraction`` and
    ``fallbacks`` (samples that had to fall back to random masking).
    """

    name = "base"

    def __init__(self, ratio: float = 0.6, size: int = 16) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mask ratio must lie in [0, 1], got {ratio}")
        if int(size) != size or size < 1:
            raise ValueError(f"subvolume size must be a positive integer, got {size}")
        self.ratio = float(ratio)
        self.size = int(size)
        self.last_stats: dict[str, torch.Tensor] = {}
        self.reference: torch.Tensor | None = None

    def foreground_source(self, x: torch.Tensor) -> torch.Tensor:
        """The volumes subvolume means are taken of for the foreground decision: the call's reference, else x."""
        return x if self.reference is None else self.reference

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None,
                 reference: torch.Tensor | None = None) -> torch.Tensor:
        """Mask grid (B, nz, ny, nx) for x (B, C, D, H, W).

        reference: (B, C', D, H, W), what the foreground is decided on when it is not x itself (the papers' HU
        window beside an nnU-Net-normalised input); see :meth:`foreground_source`.
        """
        if x.ndim != 5:
            raise ValueError(f"expected a batch of volumes (B, C, D, H, W), got shape {tuple(x.shape)}")
        if reference is not None and (reference.shape[0] != x.shape[0] or reference.shape[2:] != x.shape[2:]):
            raise ValueError(f"reference {tuple(reference.shape)} does not match the batch {tuple(x.shape)}")
        grid = grid_shape(x.shape[2:], self.size)
        self.reference = reference
        mask = self.build(x, grid, generator)
        self.last_stats.setdefault("masked_fraction", mask.float().mean())
        return mask

    def build(self, x: torch.Tensor, grid: tuple[int, int, int], generator: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio}, size={self.size})"


def make_generator(name: str, ratio: float = 0.6, size: int = 16, **options) -> MaskGenerator:
    """Build a registered mask generator, e.g. ``make_generator("foreground", ratio=0.6, threshold=0.1)``."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown masking strategy {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None
    try:
        return cls(ratio=ratio, size=size, **options)
    except TypeError as exc:
        raise ValueError(f"masking strategy {name!r}: {exc}") from None
