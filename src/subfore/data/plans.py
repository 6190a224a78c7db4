"""nnU-Net plans as data: reading a plans file, resolving a configuration, and the ``nnunet`` preprocessing preset
they describe (spacing, normalisation per channel, axis order). Pure JSON: no torch, no nnU-Net import."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import ConfigError
from .presets import ChannelNorm, Preset


def read_plans(path: str | Path) -> dict:
    """The plans JSON as a dict; one-line errors for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such nnU-Net plans file (nnUNet_preprocessed/DatasetXXX_Name/*Plans.json)")
    try:
        plans = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(plans, dict) or not isinstance(plans.get("configurations"), dict):
        raise ConfigError(f"{p}: not an nnU-Net plans file (no 'configurations')")
    return plans


def plans_configuration(plans: dict, name: str, source: str | Path = "plans") -> dict:
    """One configuration with ``inherits_from`` resolved as nnU-Net does (the parent updated by the child)."""
    confs = plans["configurations"]
    chain, seen = [], set()
    while True:
        if name not in confs:
            raise ConfigError(f"{source}: no configuration '{name}'; the plans have {', '.join(confs)}")
        if name in seen:
            raise ConfigError(f"{source}: configuration '{name}' inherits from itself")
        seen.add(name)
        chain.append(confs[name])
        parent = confs[name].get("inherits_from")
        if parent is None:
            break
        name = parent
    out: dict = {}
    for conf in reversed(chain):
        out.update(copy.deepcopy(conf))
    out.pop("inherits_from", None)
    return out


def preset_from_plans(path: str | Path, configuration: str = "3d_fullres", channels: int = 1) -> Preset:
    """The ``nnunet`` Preset: the configuration's spacing, its normalisation per channel, nnU-Net's axis order."""
    plans = read_plans(path)
    return preset_from_plan(plans, plans_configuration(plans, configuration, path), path, configuration, channels)


def preset_from_plan(plans: dict, conf: dict, path: str | Path, configuration: str, channels: int = 1) -> Preset:
    """The ``nnunet`` Preset of one resolved configuration of ``plans`` (an nnU-Net or nnssl plan as a dict)."""
    spacing = [float(s) for s in conf.get("spacing") or []]
    if len(spacing) != 3:
        raise ConfigError(f"{path}: configuration '{configuration}' is not 3D (spacing {spacing})")
    forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    backward = [int(a) for a in plans.get("transpose_backward", [forward.index(i) for i in range(3)])]
    # nnU-Net arrays are SimpleITK's (z, y, x) order, then transpose_forward; MONAI's are (x, y, z) after RAS.
    sitk = [spacing[backward[j]] for j in range(3)]
    axes = tuple(2 - forward[i] for i in range(3))
    schemes = list(conf.get("normalization_schemes", []))
    masks = list(conf.get("use_mask_for_norm", [False] * len(schemes)))
    props = plans.get("foreground_intensity_properties_per_channel", {})
    if len(schemes) != channels:
        raise ConfigError(f"{path}: the plans normalise {len(schemes)} channel(s) but data.channels is {channels}")
    norms = []
    for c, scheme in enumerate(schemes):
        p = props.get(str(c), {})
        if scheme == "CTNormalization" and not {"mean", "std", "percentile_00_5", "percentile_99_5"} <= set(p):
            raise ConfigError(f"{path}: CTNormalization of channel {c} needs its foreground intensity properties, "
                              f"which the plans lack")
        if scheme not in ChannelNorm.SCHEMES:
            raise ConfigError(f"{path}: normalisation '{scheme}' of channel {c} is not one of nnU-Net's built-in "
                              f"schemes ({', '.join(ChannelNorm.SCHEMES)})")
        norms.append(ChannelNorm(scheme=scheme, use_mask=bool(masks[c]) if c < len(masks) else False,
                                 mean=p.get("mean"), std=p.get("std"), lower=p.get("percentile_00_5"),
                                 upper=p.get("percentile_99_5")))
    return Preset(modality="nnunet", spacing=tuple(reversed(sitk)), channels=channels, norms=tuple(norms), axes=axes)
