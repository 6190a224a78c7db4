"""nnU-Net v2 inside SubFore: ResEnc backbones built from plans, preprocessing from plans, export to nnU-Net.

    >>> net = build_network(load_architecture("nnUNetResEncUNetMPlans.json", "3d_fullres"), 1, 1)
    >>> export_nnunet("runs/resenc", "resenc.pth", plans="nnUNetResEncUNetLPlans.json")   # for -pretrained_weights

Networks are built by nnU-Net's own ``get_network_from_plans`` (dynamic-network-architectures underneath), so
the state_dict keys are exactly those ``nnUNetv2_train`` builds. Needs the ``nnunet`` extra (docs/nnunet.md).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import pydoc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, SubforeError

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


# --- plans ------------------------------------------------------------------------------------------
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


def architecture(name: str, plans: str | Path | None, configuration: str = "3d_fullres") -> dict:
    """The architecture of ``model.name`` resenc (from the plans) or resenc_l (fixed)."""
    if name == "resenc_l":
        return copy.deepcopy(RESENC_L)
    if plans is None:
        raise ConfigError("model.name resenc needs model.nnunet_plans (an nnU-Net plans JSON)")
    return load_architecture(plans, configuration)


def plan_record(name: str, plans: str | Path | None, configuration: str = "3d_fullres") -> dict:
    """The pretraining's plan as plain data (kept in encoder.json and in exports): file, names, configuration."""
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
    return "resenc_l (nnssl's ResEnc-L)" if name == "resenc_l" else f"the '{configuration}' network of {plans}"


def check_roi(name: str, roi, plans: str | Path | None = None, configuration: str = "3d_fullres",
              subvolume_size: int | None = None) -> None:
    """Reject a crop the network's strides do not divide, or one that leaves a single voxel at the bottleneck."""
    roi = [int(r) for r in roi]
    factors = total_strides(architecture(name, plans, configuration))
    bottleneck = [r // f for r, f in zip(roi, factors)]
    # Instance norm needs more than one voxel per channel in training: a 1×1×1 bottleneck fails in the first step.
    if any(r % f for r, f in zip(roi, factors)) or math.prod(bottleneck) < 2:
        steps = [math.lcm(f, subvolume_size or 1) for f in factors]
        good = [max(s, -(-r // s) * s) for r, s in zip(roi, steps)]
        if math.prod(g // f for g, f in zip(good, factors)) < 2:
            good = [2 * g for g in good]
        raise ConfigError(
            f"data.roi {roi}: {describe(name, plans, configuration)} downsamples by {list(factors)} along the axes; "
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
    net.subfore_nnunet = {"architecture": copy.deepcopy(arch)}
    return net


def in_projection_keys(net) -> tuple[str, ...]:
    """Module prefixes of the first convolution (its weight has the input channels), including decoder.encoder.*."""
    base = tuple(getattr(net, "keys_to_in_proj", ()))
    return base + tuple(f"decoder.{k}" for k in base)


# --- preprocessing ------------------------------------------------------------------------------------
def preset_from_plans(path: str | Path, configuration: str = "3d_fullres", channels: int = 1):
    """The ``nnunet`` Preset: the configuration's spacing, its normalisation per channel, nnU-Net's axis order."""
    from .data.presets import ChannelNorm, Preset

    plans = read_plans(path)
    conf = plans_configuration(plans, configuration, path)
    spacing = [float(s) for s in conf.get("spacing", [])]
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


def link_config(cfg) -> None:
    """Cross-section settings of a run config: the plans behind ``data.preset: nnunet`` and its default λ.

    The default foreground threshold under this preset is "-132.5 HU" (the papers' λ = 0.1 in their −175…250 HU
    window) for CTNormalization, 'otsu' for the other schemes; it is written into the config, so config.yaml
    and resumed runs keep it.
    """
    data, model = cfg.data, cfg.model
    if data.preset != "nnunet":
        return
    if not model.nnunet_plans:
        raise ConfigError("data.preset nnunet takes the spacing and normalisation from model.nnunet_plans: set it "
                          "to the nnU-Net plans JSON")
    data.link_plans(model.nnunet_plans, model.nnunet_configuration)
    masking = getattr(cfg, "masking", None)
    if masking is not None and "threshold" not in masking.model_fields_set:
        masking.threshold = "-132.5 HU" if data.preset_obj().window is not None else "otsu"


# --- export -----------------------------------------------------------------------------------------
@dataclass
class ExportReport:
    """What ``subfore export nnunet`` wrote and how it was checked; ``str()`` is the printed report."""

    path: Path
    tensors: int
    unique: int
    parameters: int
    target: str
    in_channels: int
    checked_with: str
    adapted: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {self.path}: {self.tensors} tensors ({self.unique} distinct, {self.parameters:,} values) "
                 f"for {self.target}, {self.in_channels} input channel(s); loaded back with {self.checked_with}"]
        if self.adapted:
            lines.append(f"  stem repeated over {self.in_channels} channels and divided by {self.in_channels}: "
                         f"{', '.join(self.adapted)}")
        lines.append(f"  nnUNetv2_train DATASET CONFIGURATION FOLD -p PLANS -pretrained_weights {self.path}")
        return "\n".join(lines)


def _shape(t) -> str:
    return "absent" if t is None else str(list(t.shape))


def match_weights(state: dict, target: dict, stem: tuple[str, ...], c_pre: int, c_out: int, where: str,
                  run: str) -> tuple[dict, list[str]]:
    """Every non-seg_layers tensor of ``target`` taken from ``state`` (fp32, CPU), stem adapted to ``c_out``.

    Fails with one line naming the first key that does not fit, with both shapes.
    """
    import torch

    out, adapted = {}, []
    for key, ref in target.items():
        if SEG in key:
            continue
        src = state.get(key)
        if src is not None and src.shape != ref.shape and key.startswith(stem) and src.ndim == ref.ndim \
                and src.shape[0] == ref.shape[0] and src.shape[2:] == ref.shape[2:] and src.shape[1] == c_pre:
            if c_pre != 1:
                raise SubforeError(f"--in-channels {c_out}: {run} was pretrained on {c_pre} channels; only a "
                                   f"1-channel stem can be spread over other channel counts")
            # Repeated and divided by C: a C-channel input of C copies of one image gives the pretrained response.
            src = src.repeat(1, c_out, *([1] * (src.ndim - 2))) / c_out
            adapted.append(key)
        if src is None or src.shape != ref.shape:
            raise SubforeError(f"{where} does not fit the network pretrained in {run}: first mismatch {key}: "
                               f"{_shape(ref)} in the plans, {_shape(src)} pretrained")
        out[key] = src.detach().to("cpu", torch.float32).contiguous().clone()
    extra = [k for k in state if SEG not in k and k not in target]
    if extra:
        raise SubforeError(f"{where} does not fit the network pretrained in {run}: first mismatch {extra[0]}: "
                           f"absent in the plans, {_shape(state[extra[0]])} pretrained")
    return out, adapted


def _load_and_compare(path: Path, arch: dict, in_channels: int, expected: dict) -> str:
    """Load ``path`` into a fresh network from ``arch`` with nnU-Net's loader (or its checks) and compare."""
    import torch

    net = build_network(arch, in_channels, 2)
    try:
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    except ImportError:
        load_pretrained_weights = None
    if load_pretrained_weights is not None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a banner per load
                load_pretrained_weights(net, str(path))
        except (AssertionError, KeyError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SubforeError(f"{path}: nnU-Net's load_pretrained_weights refuses it ({first})") from None
        how = "nnunetv2.run.load_pretrained_weights"
    else:
        # The same checks as nnU-Net's loader: every non-seg_layers key, same shape; then load.
        weights = torch.load(path, map_location="cpu", weights_only=True)["network_weights"]
        model = net.state_dict()
        for key, ref in model.items():
            if SEG not in key and (key not in weights or weights[key].shape != ref.shape):
                raise SubforeError(f"{path}: {key} is {_shape(weights.get(key))}, the network needs {_shape(ref)}")
        model.update({k: v for k, v in weights.items() if k in model and SEG not in k})
        net.load_state_dict(model)
        how = "subfore's copy of nnU-Net's loader checks (nnunetv2 not installed)"
    for key, value in net.state_dict().items():
        if SEG not in key and not torch.equal(value, expected[key]):
            # Aliases (encoder.* / decoder.encoder.*, .conv / .all_modules.0) share storage: unequal copies show here.
            raise SubforeError(f"{path}: {key} differs after loading; duplicated names carry different values")
    return how


def export_nnunet(run_dir: str | Path, out: str | Path, plans: str | Path | None = None,
                  configuration: str | None = None, in_channels: int | None = None) -> ExportReport:
    """Write RUN_DIR's pretrained network as ``{'network_weights': …}`` for ``nnUNetv2_train -pretrained_weights``.

    The target network is built from ``plans``/``configuration`` (default: the pretraining's own architecture)
    with ``in_channels`` inputs; the file is then loaded back with nnU-Net's ``load_pretrained_weights``.
    """
    import torch

    from .models import save_atomic

    run = Path(run_dir)
    if run.is_file():
        run = run.parent
    meta_path, weights_path = run / "encoder.json", run / "encoder.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise SubforeError(f"{run}: no encoder.pt and encoder.json; give the run_dir of a 'subfore pretrain' run")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise SubforeError(f"{meta_path}: not valid JSON ({exc})") from None
    model = meta.get("model", {})
    if model.get("name") not in MODELS:
        raise SubforeError(f"{run}: pretrained a {model.get('name')!r} network; only {' and '.join(MODELS)} "
                           f"export to nnU-Net")
    if configuration is not None and plans is None:
        raise SubforeError("--configuration names a configuration of --plans; give --plans too")
    source_arch = (meta.get("nnunet") or {}).get("architecture") or architecture(
        model["name"], model.get("nnunet_plans"), model.get("nnunet_configuration", "3d_fullres"))
    c_pre = int(meta.get("in_channels", 1))
    c_out = c_pre if in_channels is None else int(in_channels)
    if c_out < 1:
        raise SubforeError(f"--in-channels must be at least 1, got {c_out}")
    if plans is not None:
        configuration = configuration or "3d_fullres"
        arch, where = load_architecture(plans, configuration), f"{plans} (configuration '{configuration}')"
    else:
        arch, where = source_arch, "the pretraining's own architecture"
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    target_net = build_network(arch, c_out, 2)
    weights, adapted = match_weights(state, target_net.state_dict(), in_projection_keys(target_net), c_pre, c_out,
                                     where, str(run))
    distinct = {}
    for key, ref in target_net.state_dict().items():
        if SEG not in key:
            distinct.setdefault(ref.untyped_storage().data_ptr(), key)
    config = {}
    if (run / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    metadata = {
        "format": "subfore nnU-Net pretrained weights 1",
        "pretraining": {"run_dir": str(run.resolve()), "step": meta.get("step"), "model": model,
                        "in_channels": c_pre, "roi": meta.get("roi"), "preset": meta.get("preset"),
                        "masking": config.get("masking"), "architecture": source_arch,
                        "plan": {k: v for k, v in (meta.get("nnunet") or {}).items() if k != "architecture"}},
        "target": {"plans": None if plans is None else str(Path(plans).resolve()), "configuration": configuration,
                   "architecture": arch, "in_channels": c_out, "stem_repeated": adapted},
    }
    out = Path(out)
    save_atomic({"network_weights": weights, "subfore": json.loads(json.dumps(metadata))}, out)
    how = _load_and_compare(out, arch, c_out, weights)
    return ExportReport(path=out, tensors=len(weights), unique=len(distinct),
                        parameters=sum(weights[k].numel() for k in distinct.values()),
                        target=where, in_channels=c_out, checked_with=how, adapted=adapted)
