"""Moved to :mod:`subfore.data.phantoms`; these names stay importable."""

from .data.phantoms import (
    BTCV_NAMES,
    HU,
    LABELS,
    NOISE_HU,
    PhantomSpec,
    ensure_phantoms,
    make_phantom,
    write_nnunet_raw,
    write_phantoms,
)

__all__ = ["BTCV_NAMES", "HU", "LABELS", "NOISE_HU", "PhantomSpec", "ensure_phantoms", "make_phantom",
           "write_nnunet_raw", "write_phantoms"]
