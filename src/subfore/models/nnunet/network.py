"""nnU-Net v2 inside SubFore: ResEnc backbones built from plans, preprocessing from plans, export to nnU-Net.

    >>> net = build_network(load_architecture("nnUNetResEncUNetMPlans.json", "3d_fullres"), 1, 1)
    >>> export_nnunet("runs/resenc", "resenc.pth", plans="nnUNetResEncUNetLPlans.json")   # for -pretrained_weights

Networks are built by nnU-Net's own ``get_network_from_plans`` (dynamic-network-architectures underneath), so
the state_dict keys are exactly those ``nnUNetv2_train`` builds. Needs the ``nnunet`` extra (docs/nnunet.md).
"""

from __future__ import annotations

import copy
import math
import pydoc
from pathlib import Path
from typing import Any

from ...data.plans import plans_configuration, read_plans
from ...errors import ConfigError, SubforeError

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
    """The ``architecture`` entry (network_class_name, arch_kwargs, _kw_requires_import) of a 3D configuration."""
    conf = plans_configuration(read_plans(path), configuration, path)
    arch = conf.get("architecture")
    if not isinstance(arch, dict) or not {"network_class_name", "arch_kwargs"} <= set(arch):
        raise ConfigError(f"{path}: configuration '{configuration}' has no 'architecture' entry (plans of "
                          f"nnU-Net < 2.4?); plan again with nnUNetv2_plan_experiment")
    arch = {"network_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
            "_kw_requires_import": list(arch.get("_kw_requires_import", []))}
    if len(total_strides(arch)) != 3:
        raise ConfigError(f"{path}: configuration '{configuration}' is not 3D; use 3d_fullres (or 3d_lowres)")
    return arch


def architecture(name: str, plans: str | Path | None, configuration: str = "3d_fullres",
                 inline: dict | None = None) -> dict:
    """The architecture of ``model.name`` resenc (``inline``, else from the plans) or resenc_l (fixed)."""
    if name == "resenc_l":
        return copy.deepcopy(RESENC_L)
    if inline is not None and plans is None:
        return {"network_class_name": inline["network_class_name"], "arch_kwargs": copy.deepcopy(inline["arch_kwargs"]),
                "_kw_requires_import": list(inline.get("_kw_requires_import", []))}
    if plans is None:
        raise ConfigError("model.name resenc needs model.nnunet_plans (an nnU-Net plans JSON)")
    return load_architecture(plans, configuration)


def plan_record(name: str, plans: str | Path | None, configuration: str = "3d_fullres",
                inline: dict | None = None) -> dict:
    """The pretraining's plan as plain data (kept in encoder.json and in exports): file, names, configuration."""
    if name == "resenc" and plans is None and inline is not None:
        return {"plans": None, "configuration": None, "plans_name": "model.nnunet_architecture",
                "plan": {"architecture": architecture(name, None, inline=inline)}}
    if name == "resenc_l":
        return {"plans": None, "configuration": None, "plans_name": "nnssl ResEnc-L",
                "plan": {"architecture": copy.deepcopy(RESENC_L), "spacing": list(RESENC_L_SPACING),
                         "patch_size": list(RESENC_L_PATCH)}}
    loaded = read_plans(plans)
    return {"plans": str(Path(plans).resolve()), "configuration": configuration,
            "plans_name": loaded.get("plans_name"), "dataset_name": loaded.get("dataset_name"),
            "plan": plans_configuration(loaded, configuration, plans)}


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


def describe(name: str, plans: str | Path | None, configuration: str) -> str:
    if name == "resenc_l":
        return "resenc_l (nnssl's ResEnc-L)"
    return f"the '{configuration}' network of {plans}" if plans else "the network of model.nnunet_architecture"


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
def _builder():
    """nnU-Net's get_network_from_plans, or (nnunetv2 absent) the same few lines over dynamic-network-architectures."""
    try:
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        return get_network_from_plans
    except ImportError:
        pass
    try:
        import dynamic_network_architectures  # noqa: F401
    except ImportError:
        raise SubforeError(f"the resenc models need nnU-Net's network code; install it with: {INSTALL}") from None

    def build(cls_name, arch_kwargs, requires_import, input_channels, output_channels, allow_init=True,
              deep_supervision=None):
        kwargs = dict(arch_kwargs)
        for key in requires_import:
            if kwargs[key] is not None:
                kwargs[key] = pydoc.locate(kwargs[key])
        cls = pydoc.locate(cls_name)
        if cls is None:
            raise SubforeError(f"network class {cls_name} not found")
        if deep_supervision is not None:
            kwargs["deep_supervision"] = deep_supervision
        net = cls(input_channels=input_channels, num_classes=output_channels, **kwargs)
        if hasattr(net, "initialize") and allow_init:
            net.apply(net.initialize)
        return net

    return build


def build_network(arch: dict, in_channels: int, out_channels: int):
    """nnU-Net's network for ``arch``: (B, in_channels, *roi) → (B, out_channels, *roi) at full resolution.

    Deep supervision is off, so the decoder's lower-resolution seg_layers take no part in the forward pass;
    they are frozen (requires_grad False) so that DDP does not wait for their gradients and AdamW skips them.
    """
    try:
        net = _builder()(arch["network_class_name"], arch["arch_kwargs"], arch.get("_kw_requires_import", []),
                         in_channels, out_channels, allow_init=True, deep_supervision=False)
    except (ImportError, ModuleNotFoundError) as exc:
        raise SubforeError(f"{arch['network_class_name']}: cannot build it ({exc}); Primus needs timm, which the "
                           f"nnunet extra leaves out") from None
    seg = getattr(getattr(net, "decoder", None), "seg_layers", None)
    if seg is None:
        raise ConfigError(f"{arch['network_class_name']}: not a U-Net with decoder.seg_layers; subfore's nnU-Net "
                          f"backbones are ResidualEncoderUNet and PlainConvUNet")
    for layer in list(seg)[:-1]:
        layer.requires_grad_(False)
    return net


def in_projection_keys(net) -> tuple[str, ...]:
    """Module prefixes of the first convolution (its weight has the input channels), including decoder.encoder.*."""
    base = tuple(getattr(net, "keys_to_in_proj", ()))
    return base + tuple(f"decoder.{k}" for k in base)
