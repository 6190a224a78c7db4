"""Moved to :mod:`subfore.models.weights`; these names stay importable."""

from .models.weights import LoadReport, load_pretrained, read_state_dict

__all__ = ["LoadReport", "load_pretrained", "read_state_dict"]
