"""nnU-Net v2 inside SubFore: ResEnc backbones built from plans, preprocessing from plans, export to nnU-Net.

    >>> net = build_network(load_architecture("nnUNetResEncUNetMPlans.json", "3d_fullres"), 1, 1)
    >>> export_nnunet("runs/resenc", "resenc.pth", plans="nnUNetResEncUNetLPlans.json")   # for -pretrained_weights

Networks are dynamic-network-architectures' classes, built as nnU-Net's ``get_network_from_plans`` builds them
(the state_dict keys are exactly those ``nnUNetv2_train`` has), from names resolved by the allow-list in
:mod:`.architecture` only. Needs the ``nnunet`` extra (docs/nnunet.md).
"""

from __future__ import annotations

import copy
import inspect
import math
from pathlib import Path
from typing import Any

from ...data.plans import plans_configuration, read_plans
from ...errors import ConfigError, SubforeError
from ..checkpointing import checkpoint_modules
from .architecture import check as checked
from .architecture import network_class, op_classes, scan

INSTALL = ('pip install -e ".[nnunet]" && pip install --no-deps nnunetv2==2.8.1 '
           'dynamic-network-architectures==0.4.4 (docs/nnunet.md)')
MODELS = ("resenc", "resenc_l")
SEG = ".seg_layers."  # what nnU-Net's load_pretrained_weights skips: the class-count-dependent 1×1×1 heads

# nnssl's ResEnc-L (Wald et al., CVPR 2025), written as an nnU-Net plans 'architecture' entry: 6 stages, 3³
# kernels, stride 2 after the stem, [1, 3, 4, 6, 6, 6] residual blocks, one conv per decoder stage.
RESENC_L: dict[str, Any] = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {
        "n_stages": 6,
        "features_per_stage": [32, 64, 128, 256, 320, 320],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 6,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
        "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
        "n_conv_per_stage_decoder": [1] * 5,
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
RESENC_L_SPACING = (1.0, 1.0, 1.0)
RESENC_L_PATCH = (160, 160, 160)


def load_architecture(path: str | Path, configuration: str = "3d_fullres") -> dict:
    """The checked ``architecture`` entry (network_class_name, arch_kwargs, _kw_requires_import) of a plans file."""
    return extract_architecture(plans_extract(path, configuration), path)


def plans_extract(path: str | Path, configuration: str = "3d_fullres") -> dict:
    """What a run keeps of a plans file (read here, once): a plans dict with that one configuration resolved.

    Holds the configuration (its ``architecture`` checked against the allow-list), ``transpose_forward``/
    ``_backward``, the foreground intensity properties, the plans' names and the file it came from: everything the
    network and the ``nnunet`` preset need, so that a checkpoint carrying it needs no plans file.
    """
    plans = read_plans(path)
    scan(plans, path)  # every configuration's entry, the one inherited from too: a plans file never names code
    conf = plans_configuration(plans, configuration, path)
    arch = conf.get("architecture")
    if not isinstance(arch, dict) or not {"network_class_name", "arch_kwargs"} <= set(arch):
        raise ConfigError(f"{path}: configuration '{configuration}' has no 'architecture' entry (plans of "
                          f"nnU-Net < 2.4?); plan again with nnUNetv2_plan_experiment")
    conf["architecture"] = checked(arch, path, f"configurations.{configuration}.architecture.")
    if len(total_strides(conf["architecture"])) != 3:
        raise ConfigError(f"{path}: configuration '{configuration}' is not 3D; use 3d_fullres (or 3d_lowres)")
    keep = ("plans_name", "dataset_name", "transpose_forward", "transpose_backward",
            "foreground_intensity_properties_per_channel")
    return {"plans_file": str(Path(path).resolve()), "configuration": configuration,
            **{k: copy.deepcopy(plans[k]) for k in keep if k in plans}, "configurations": {configuration: conf}}


def extract_architecture(extract: dict, source: Any = "model.nnunet_plan") -> dict:
    """The checked architecture of a :func:`plans_extract` (from a plans file, a config or a checkpoint)."""
    name = extract.get("configuration")
    conf = (extract.get("configurations") or {}).get(name) if isinstance(extract, dict) else None
    if not isinstance(conf, dict):
        raise ConfigError(f"{source}: the plans extract has no configuration {name!r}")
    return checked(conf.get("architecture"), source, f"configurations.{name}.architecture.")


def resolve_plans(model) -> None:
    """Read ``model.nnunet_plans`` once into ``model.nnunet_plan`` (unless it already holds that file's extract)."""
    if not model.nnunet_plans:
        return
    have = model.nnunet_plan or {}
    if have.get("configuration") == model.nnunet_configuration and have.get("given") == str(model.nnunet_plans):
        return  # a resolved config (config.yaml, a checkpoint's): the extract stands for the file, present or not
    extract = plans_extract(model.nnunet_plans, model.nnunet_configuration)
    model.nnunet_plan = {"given": str(model.nnunet_plans), **extract}


def network_from_weights(model) -> bool:
    """Does the model section leave the network to the pretrained weights (``model.name: resenc``, nothing else)?"""
    return model.name == "resenc" and not model.nnunet_plans and model.nnunet_plan is None and \
        model.nnunet_architecture is None


def architecture(model) -> dict:
    """The checked architecture of a model section: resenc_l's (fixed), the plans' (read once), or inline."""
    if model.name == "resenc_l":
        return copy.deepcopy(RESENC_L)
    resolve_plans(model)
    if model.nnunet_plan is not None:
        return extract_architecture(model.nnunet_plan)
    if model.nnunet_architecture is not None:
        return checked(model.nnunet_architecture, None, "model.nnunet_architecture.")
    raise ConfigError("model.name resenc needs its network: model.nnunet_plans (an nnU-Net plans JSON), "
                      "model.nnunet_architecture, or (finetuning) pretrained weights that carry it (an nnssl or "
                      "nnU-Net checkpoint, a subfore resenc run)")


def plan_record(model) -> dict:
    """The pretraining's plan as plain data (kept in encoder.json and in exports): file, names, configuration."""
    if model.name == "resenc_l":
        return {"plans": None, "configuration": None, "plans_name": "nnssl ResEnc-L",
                "plan": {"architecture": copy.deepcopy(RESENC_L), "spacing": list(RESENC_L_SPACING),
                         "patch_size": list(RESENC_L_PATCH)}}
    resolve_plans(model)
    extract = model.nnunet_plan
    if extract is None:
        return {"plans": None, "configuration": None, "plans_name": "model.nnunet_architecture",
                "plan": {"architecture": architecture(model)}}
    name = extract["configuration"]
    return {"plans": extract.get("plans_file"), "configuration": name, "plans_name": extract.get("plans_name"),
            "dataset_name": extract.get("dataset_name"), "plan": copy.deepcopy(extract["configurations"][name])}


def total_strides(arch: dict) -> tuple[int, ...]:
    """The downsampling factor of the bottleneck along each axis: the product of the stage strides."""
    kw = arch["arch_kwargs"]
    n = int(kw["n_stages"])
    strides = kw["strides"] if isinstance(kw["strides"], (list, tuple)) else [kw["strides"]] * n
    dims = next((len(s) for s in strides if isinstance(s, (list, tuple))), 3)
    out = [1] * dims
    for s in strides:
        for a, v in enumerate(s if isinstance(s, (list, tuple)) else [s] * dims):
            out[a] *= int(v)
    return tuple(out)


def describe(model) -> str:
    if model.name == "resenc_l":
        return "resenc_l (nnssl's ResEnc-L)"
    plans = model.nnunet_plans or (model.nnunet_plan or {}).get("plans_file")
    if plans:
        return f"the '{model.nnunet_configuration}' network of {plans}"
    return "the network of model.nnunet_architecture"


def check_roi_for(arch: dict, roi, description: str, subvolume_size: int | None = None) -> None:
    """Reject a crop the network's strides do not divide, or one that leaves a single voxel at the bottleneck."""
    roi = [int(r) for r in roi]
    factors = total_strides(arch)
    bottleneck = [r // f for r, f in zip(roi, factors)]
    # Instance norm needs more than one voxel per channel in training: a 1×1×1 bottleneck fails in the first step.
    if any(r % f for r, f in zip(roi, factors)) or math.prod(bottleneck) < 2:
        steps = [math.lcm(f, subvolume_size or 1) for f in factors]
        good = [max(s, -(-r // s) * s) for r, s in zip(roi, steps)]
        if math.prod(g // f for g, f in zip(good, factors)) < 2:
            good = [2 * g for g in good]
        raise ConfigError(
            f"data.roi {roi}: {description} downsamples by {list(factors)} along the axes; "
            f"every side must be a multiple of that and the bottleneck larger than one voxel, e.g. {good}"
        )


# --- networks ---------------------------------------------------------------------------------------
def build_network(arch: dict, in_channels: int, out_channels: int, checkpointing: bool = False):
    """nnU-Net's network for ``arch``: (B, in_channels, *roi) → (B, out_channels, *roi) at full resolution.

    The class and ops come from the allow-list (:mod:`.architecture`), never from the names themselves: the same
    class nnU-Net's ``get_network_from_plans`` builds, so the state_dict keys are those ``nnUNetv2_train`` has.
    Deep supervision is off, so the decoder's lower-resolution seg_layers take no part in the forward pass;
    they are frozen (requires_grad False) so that DDP does not wait for their gradients and AdamW skips them.
    checkpointing (``model.checkpointing``): each encoder stage (``encoder.stages[i]``) is recomputed in backward.
    """
    arch = checked(arch, None, "architecture.")
    try:
        cls = network_class(arch)
    except ImportError:
        raise SubforeError(f"the resenc models need nnU-Net's network code; install it with: {INSTALL}") from None
    kwargs = op_classes(arch)
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise SubforeError(f"architecture: {cls.__name__} takes no keyword {unknown[0]!r}")
    kwargs["deep_supervision"] = False
    try:
        net = cls(input_channels=in_channels, num_classes=out_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SubforeError(f"architecture: {cls.__name__} cannot be built from these keyword arguments "
                           f"({type(exc).__name__}: {first})") from None
    if hasattr(net, "initialize"):
        net.apply(net.initialize)
    seg = net.decoder.seg_layers
    for layer in list(seg)[:-1]:
        layer.requires_grad_(False)
    if checkpointing:
        checkpoint_modules(net.encoder.stages)
    return net


def in_projection_keys(net) -> tuple[str, ...]:
    """Module prefixes of the first convolution (its weight has the input channels), including decoder.encoder.*."""
    base = tuple(getattr(net, "keys_to_in_proj", ()))
    return base + tuple(f"decoder.{k}" for k in base)
