"""Export a pretraining to nnU-Net v2's ``-pretrained_weights`` layout, checked with nnU-Net's own loader.

    >>> export_nnunet("runs/resenc", "resenc.pth", plans="nnUNetResEncUNetLPlans.json")
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import SubforeError
from ...io import torch_save
from ..artifact import read_encoder_meta
from ..weights import repeat_stem
from .network import MODELS, SEG, architecture, build_network, in_projection_keys, load_architecture


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
    run = Path(run_dir)
    if run.is_file():
        run = run.parent
    meta_path, weights_path = run / "encoder.json", run / "encoder.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise SubforeError(f"{run}: no encoder.pt and encoder.json; give the run_dir of a 'subfore pretrain' run")
    meta = read_encoder_meta(meta_path)
    model = meta.model
    if model.get("name") not in MODELS:
        raise SubforeError(f"{run}: pretrained a {model.get('name')!r} network; only {' and '.join(MODELS)} "
                           f"export to nnU-Net")
    if configuration is not None and plans is None:
        raise SubforeError("--configuration names a configuration of --plans; give --plans too")
    source_arch = (meta.nnunet or {}).get("architecture") or architecture(
        model["name"], model.get("nnunet_plans"), model.get("nnunet_configuration", "3d_fullres"))
    c_pre = meta.in_channels
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
        "pretraining": {"run_dir": str(run.resolve()), "step": meta.step, "model": model,
                        "in_channels": c_pre, "roi": list(meta.roi), "preset": meta.preset.model_dump(mode="json"),
                        "masking": config.get("masking"), "architecture": source_arch,
                        "plan": {k: v for k, v in (meta.nnunet or {}).items() if k != "architecture"}},
        "target": {"plans": None if plans is None else str(Path(plans).resolve()), "configuration": configuration,
                   "architecture": arch, "in_channels": c_out, "stem_repeated": adapted},
    }
    out = Path(out)
    torch_save({"network_weights": weights, "subfore": json.loads(json.dumps(metadata))}, out)
    how = _load_and_compare(out, arch, c_out, weights)
    return ExportReport(path=out, tensors=len(weights), unique=len(distinct),
                        parameters=sum(weights[k].numel() for k in distinct.values()),
                        target=where, in_channels=c_out, checked_with=how, adapted=adapted)
