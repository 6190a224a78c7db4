"""Moved to :mod:`subfore.models.nnunet` (networks, export) and :mod:`subfore.data.plans` (plans, preset); these
names stay importable."""

from .config import link_config
from .data.plans import plans_configuration, preset_from_plans, read_plans
from .models.nnunet.export import ExportReport, export_nnunet, match_weights
from .models.nnunet.network import (
    INSTALL,
    MODELS,
    RESENC_L,
    RESENC_L_PATCH,
    RESENC_L_SPACING,
    SEG,
    architecture,
    build_network,
    describe,
    in_projection_keys,
    load_architecture,
    plan_record,
    plans_extract,
    resolve_plans,
    total_strides,
)

__all__ = ["ExportReport", "INSTALL", "MODELS", "RESENC_L", "RESENC_L_PATCH", "RESENC_L_SPACING", "SEG", "architecture",
           "build_network", "describe", "export_nnunet", "in_projection_keys", "link_config", "load_architecture",
           "match_weights", "plan_record", "plans_extract", "resolve_plans", "plans_configuration", "preset_from_plans", "read_plans", "total_strides"]
