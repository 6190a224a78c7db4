"""Export a pretraining to nnU-Net v2: its ``-pretrained_weights`` layout (nnU-Net ≥ 2.4, checked with nnU-Net's own
loader) and an nnssl checkpoint (nnU-Net's main branch: ``nnUNetv2_preprocess_like_nnssl`` + ``PretrainedTrainer``).

    >>> export_nnunet("runs/resenc", "resenc.pth", plans="nnUNetResEncUNetLPlans.json")
    >>> export_nnssl("runs/resenc", "resenc_nnssl.pth")
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import __version__
from ...data.presets import Preset
from ...errors import SubforeError
from ...io import atomic_path, load_torch, torch_save
from ..artifact import EncoderMeta, meta_architecture, read_encoder
from ..weights import repeat_stem
from . import nnssl
from .network import MODELS, RESENC_L, RESENC_L_PATCH, SEG, build_network, in_projection_keys, load_architecture


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
            src = repeat_stem(src, c_out)
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
        weights = load_torch(path)["network_weights"]
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
    if configuration is not None and plans is None:
        raise SubforeError("--configuration names a configuration of --plans; give --plans too")
    if plans is not None:  # the plans first: a file that names code is refused before anything else is read
        configuration = configuration or "3d_fullres"
        target = load_architecture(plans, configuration), f"{plans} (configuration '{configuration}')"
    run, meta, state = _read_run(run_dir)
    model = meta.model
    source_arch = _architecture(meta)
    c_pre = meta.in_channels
    c_out = c_pre if in_channels is None else int(in_channels)
    if c_out < 1:
        raise SubforeError(f"--in-channels must be at least 1, got {c_out}")
    if plans is not None:
        arch, where = target
    else:
        arch, where = source_arch, "the pretraining's own architecture"
    target_net = build_network(arch, c_out, 2)
    weights, adapted = match_weights(state, target_net.state_dict(), in_projection_keys(target_net), c_pre, c_out,
                                     where, str(run))
    distinct = {}
    for key, ref in target_net.state_dict().items():
        if SEG not in key:
            distinct.setdefault(ref.untyped_storage().data_ptr(), key)
    config = _config(run)
    metadata = {
        "format": "subfore nnU-Net pretrained weights 1",
        "pretraining": {"run_dir": str(run.resolve()), "step": meta.step, "model": model,
                        "in_channels": c_pre, "roi": list(meta.roi), "preset": meta.preset.model_dump(mode="json"),
                        "masking": meta.masking or config.get("masking"), "architecture": source_arch,
                        "plan": {k: v for k, v in (meta.nnunet or {}).items() if k != "architecture"}},
        "target": {"plans": None if plans is None else str(Path(plans).resolve()), "configuration": configuration,
                   "architecture": arch, "in_channels": c_out, "stem_repeated": adapted},
    }
    out = Path(out)
    target_meta = meta.model_copy(update={"model": _inline(model, arch), "in_channels": c_out})
    metadata["encoder"] = target_meta.dump()  # what subfore's readers (finetune, probe, --init-from) take from it
    torch_save({"network_weights": weights, "subfore": json.loads(json.dumps(metadata))}, out)
    how = _load_and_compare(out, arch, c_out, weights)
    return ExportReport(path=out, tensors=len(weights), unique=len(distinct),
                        parameters=sum(weights[k].numel() for k in distinct.values()),
                        target=where, in_channels=c_out, checked_with=how, adapted=adapted)


def _read_run(run_dir: str | Path) -> tuple[Path, EncoderMeta, dict]:
    """(RUN_DIR, encoder.json, the encoder's tensors) of a resenc/resenc_l pretraining."""
    run = Path(run_dir)
    if not run.exists():
        raise SubforeError(f"{run}: no such run; give the run_dir of a 'subfore pretrain' run (or its model folder)")
    meta, state = read_encoder(run)
    run = run if run.is_dir() else run.parent
    if meta.name not in MODELS:
        raise SubforeError(f"{run}: pretrained a {meta.name!r} network; only {' and '.join(MODELS)} export to "
                           f"nnU-Net")
    return run, meta, state


def _architecture(meta: EncoderMeta) -> dict:
    arch = meta_architecture(meta)
    if arch is None:
        raise SubforeError(f"{meta.source or 'encoder.json'}: names no nnU-Net architecture")
    return arch


def _inline(model: dict, arch: dict) -> dict:
    """The model section of a file that carries its own architecture (no plans file needed to rebuild it)."""
    if model["name"] == "resenc_l" and arch == RESENC_L:
        return {"name": "resenc_l"}
    return {"name": "resenc", "nnunet_architecture": arch}


def _config(run: Path) -> dict:
    if not (run / "config.yaml").is_file():
        return {}
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text()) or {}


def nnunet_order(preset: Preset, roi) -> tuple[list[float], list[int], list[int]]:
    """(spacing mm, patch size, transpose_forward) in nnU-Net's array order for a subfore preset and crop.

    nnunet presets already work in nnU-Net's order; ct and mri crops are RAS (x, y, z), nnU-Net's SimpleITK arrays
    (z, y, x), written with transpose_forward [0, 1, 2], the order nnUNetv2_preprocess_like_nnssl assumes.
    """
    if preset.axes is not None:
        return list(preset.array_spacing), [int(r) for r in roi], [2 - a for a in preset.axes]
    return list(reversed(preset.spacing)), [int(r) for r in reversed(list(roi))], [0, 1, 2]


def normalisation(preset: Preset) -> tuple[list[str], list[bool]]:
    """The normalisation schemes and use_mask flags an nnssl plan records for ``preset``."""
    if preset.norms:
        return [n.scheme for n in preset.norms], [n.use_mask for n in preset.norms]
    if preset.modality == "ct":
        name = (f"subfore ct window [{preset.a_min:g}, {preset.a_max:g}] HU -> [{preset.b_min:g}, {preset.b_max:g}], "
                f"clipped")
    else:
        name = f"subfore mri percentiles [{preset.lower_percentile:g}, {preset.upper_percentile:g}] -> [0, 1], clipped"
    return [name] * preset.channels, [False] * preset.channels


@dataclass
class NnsslReport:
    """What ``subfore export nnssl`` wrote and how it was checked; ``str()`` is the printed report."""

    path: Path
    tensors: int
    architecture: str
    spacing: list[float]
    patch_size: list[int]
    checked_with: str

    def __str__(self) -> str:
        return "\n".join([
            f"wrote {self.path}: nnssl checkpoint, {self.tensors} tensors, {self.architecture}, pretrained at "
            f"spacing {self.spacing} mm, patch {self.patch_size} (nnU-Net's axis order); loaded back with "
            f"{self.checked_with}",
            f"  nnUNetv2_preprocess_like_nnssl -d DATASET -n NAME -pc {self.path} -am like_pretrained",
            "  nnUNetv2_train_pretrained DATASET 3d_fullres FOLD -p ptPlans__NAME... -tr PretrainedTrainer"])


def export_nnssl(run_dir: str | Path, out: str | Path) -> NnsslReport:
    """Write RUN_DIR's pretrained network as an nnssl checkpoint for nnU-Net's ``PretrainedTrainer``.

    The file holds ``network_weights`` (every tensor but the output layer), the ``nnssl_adaptation_plan`` (the
    architecture as nnssl serialises it, the pretraining's spacing, patch size and normalisation in nnU-Net's axis
    order, the channel count, the encoder/stem/in-projection keys), ``citations`` and subfore's own encoder.json;
    it is then loaded back the way PretrainedTrainer loads it.
    """
    run, meta, state = _read_run(run_dir)
    arch = _architecture(meta)
    net = build_network(arch, meta.in_channels, 2)
    weights, _ = match_weights(state, net.state_dict(), in_projection_keys(net), meta.in_channels, meta.in_channels,
                               "the pretraining's own architecture", str(run))
    spacing, patch, forward = nnunet_order(meta.preset, meta.roi)
    schemes, use_mask = normalisation(meta.preset)
    record = (meta.nnunet or {}).get("plan") or {}
    recommended = [int(p) for p in record.get("patch_size") or (RESENC_L_PATCH if meta.name == "resenc_l" else patch)]
    name = f"subfore_{run.name}"
    plan = {
        "architecture_plans": nnssl.architecture_plans(meta.name, arch),
        "pretrain_plan": {
            "dataset_name": name, "plans_name": "subfore", "original_median_spacing_after_transp": spacing,
            "image_reader_writer": "SimpleITKIO", "transpose_forward": forward,
            "transpose_backward": [forward.index(i) for i in range(3)],
            "configurations": {"subfore": nnssl.configuration_plan(name, spacing, patch, schemes, use_mask)},
            "experiment_planner_used": "subfore"},
        "pretrain_num_input_channels": meta.in_channels,
        "recommended_downstream_patchsize": recommended,
        "key_to_encoder": net.key_to_encoder, "key_to_stem": net.key_to_stem,
        "keys_to_in_proj": list(getattr(net, "keys_to_in_proj", ())), "key_to_lpe": None,
    }
    strategy = (meta.masking or _config(run).get("masking") or {}).get("strategy")
    payload = {"nnssl_adaptation_plan": plan,
               "citations": nnssl.citations(meta.name, strategy),
               "subfore": {"format": "subfore nnssl checkpoint 1", "version": __version__,
                           "encoder": meta.model_copy(update={"model": _inline(meta.model, arch)}).dump()}}
    out = Path(out)
    if out.is_dir():
        raise SubforeError(f"{out}: a folder; --out names the .pth file to write")
    # Plain data only (JSON round trip), so that torch.load(weights_only=True) reads every part of it. Checked
    # under a temporary name: a file that fails the check never takes the name.
    with atomic_path(out) as tmp:
        torch.save({"network_weights": weights, **json.loads(json.dumps(payload))}, tmp)
        how = check_nnssl(tmp, weights)
    return NnsslReport(out, len(weights), plan["architecture_plans"]["arch_class_name"], spacing, patch, how)


def check_nnssl(path: str | Path, expected: dict) -> str:
    """Load an nnssl checkpoint as nnU-Net main's PretrainedTrainer does and compare every encoder and stem tensor.

    With nnU-Net's main branch installed its own ``build_network_architecture`` and ``load_pretrained_weights`` run;
    otherwise the same steps here (build from the plan, load the stem and encoder submodules strictly).
    """
    path = Path(path)
    ckpt = load_torch(path, "nnssl checkpoint")
    plan = nnssl.check_plan(ckpt.get("nnssl_adaptation_plan"), str(path))
    conf = next(iter(plan["pretrain_plan"]["configurations"].values()))
    ap = plan["architecture_plans"]
    try:
        from nnunetv2.training.nnUNetTrainer.pretraining.pretrainedTrainer import PretrainedTrainer
    except ImportError:
        PretrainedTrainer = None
    c = int(plan["pretrain_num_input_channels"])
    if PretrainedTrainer is not None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                net = PretrainedTrainer.build_network_architecture(
                    ap["arch_class_name"], ap["arch_kwargs"], ap["arch_kwargs_requiring_import"] or [],
                    plan["recommended_downstream_patchsize"], c, 2, enable_deep_supervision=False)
                PretrainedTrainer.load_pretrained_weights(
                    net, str(path), c, c, conf["patch_size"], plan["recommended_downstream_patchsize"],
                    plan["key_to_encoder"], plan["key_to_stem"], tuple(plan["keys_to_in_proj"]), plan["key_to_lpe"])
        except (AssertionError, ImportError, KeyError, NotImplementedError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SubforeError(f"{path}: nnU-Net's PretrainedTrainer cannot load it ({type(exc).__name__}: "
                               f"{first})") from None
        how = "nnU-Net's PretrainedTrainer.load_pretrained_weights"
    else:
        name, arch = nnssl.subfore_architecture(plan, str(path))
        net = build_network(RESENC_L if name == "resenc_l" else arch, c, 2)
        weights = ckpt["network_weights"]
        for key in (plan["key_to_encoder"], plan["key_to_stem"]):
            part = {k[len(key) + 1:]: v for k, v in weights.items() if k.startswith(key + ".")}
            try:
                net.get_submodule(key).load_state_dict(part)  # strict, as PretrainedTrainer loads them
            except (AttributeError, RuntimeError) as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise SubforeError(f"{path}: its {key} does not load into the network its plan describes "
                                   f"({first})") from None
        how = "subfore's copy of PretrainedTrainer's loading (nnU-Net main not installed)"
    prefixes = (plan["key_to_encoder"] + ".", plan["key_to_stem"] + ".")
    compared = 0
    for key, value in net.state_dict().items():
        if key.startswith(prefixes):
            compared += 1
            if not torch.equal(value.cpu(), expected[key]):
                raise SubforeError(f"{path}: {key} differs after loading it as nnU-Net does")
    if compared == 0:
        raise SubforeError(f"{path}: no tensor under {', '.join(prefixes)} in the network its plan describes")
    return how
