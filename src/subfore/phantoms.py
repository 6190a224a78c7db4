"""Moved to :mod:`subfore.data.phantoms`; this name stays importable."""

from .data.phantoms import BTCV_NAMES, HU, LABELS, PhantomSpec, ensure_phantoms, make_phantom, write_nnunet_raw, \
    write_phantoms

__all__ = ["BTCV_NAMES", "HU", "LABELS", "PhantomSpec", "ensure_phantoms", "make_phantom", "write_nnunet_raw",
           "write_phantoms"]
