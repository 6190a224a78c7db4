"""Moved to :mod:`subfore.models.nnunet` (networks, export) and :mod:`subfore.data.plans` (plans, preset); these
names stay importable."""

from .data.plans import plans_configuration, preset_from_plans, read_plans
from .models.nnunet.export import ExportReport, export_nnunet, match_weights
from .models.nnunet.network import RESENC_L, architecture, build_network, load_architecture

__all__ = ["ExportReport", "RESENC_L", "architecture", "build_network", "export_nnunet", "load_architecture",
           "match_weights", "plans_configuration", "preset_from_plans", "read_plans"]
