"""Loading pretrained weights into a segmentation network, from any format
:data:`subfore.models.artifact.WEIGHT_FORMATS` reads (docs/architecture.md, "Weight formats"): subfore runs and
model folders, safetensors, nnssl and nnU-Net checkpoints, Lightning checkpoints, plain state_dicts and MONAI's
released SwinUNETR self-supervised layout. A first layer of another channel count is adapted to C input channels
(``repeat`` scaled by 1/C, or ``reinit``), whatever the format.

A pretraining's output head (``out.``, ``final_conv.``, HPM's loss channel with it) is never loaded, whatever
its shape; a load that fills less than ``min_encoder`` of the encoder's tensors is refused; a file that carries a
whole nnU-Net architecture must describe the configured network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import SubforeError
from .artifact import WeightsFile, read_weights
from .nnunet.architecture import first_difference
from .registry import backbone_spec


@dataclass
class LoadReport:
    """What a pretrained load did; ``str()`` is the report printed to the user."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    renamed: int = 0
    head: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)
    not_pretrained: list[str] = field(default_factory=list)
    encoder_loaded: int = 0
    encoder_total: int = 0

    def __str__(self) -> str:
        lines = [
            f"pretrained weights from {self.source}: {len(self.loaded)} tensors loaded "
            f"({self.encoder_loaded}/{self.encoder_total} of the encoder), {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
            + (f", {len(self.not_pretrained)} not in the pretraining" if self.not_pretrained else "")
        ]
        if self.renamed:
            lines.append(f"  renamed from the released SwinUNETR self-supervised layout: {self.renamed} tensors")
        if self.adapted:
            lines.append(f"  input channels adapted: {', '.join(self.adapted)}")
        for name, keys in (("skipped, the pretraining's output head (never loaded)", self.head),
                           ("expected missing, not in a v1 SwinUNETR pretraining (left at init)", self.expected_missing),
                           ("not part of an MAE pretraining (model.encoding visible trains the ViT with a decoder of "
                            "its own, not exported; left at init)", self.not_pretrained),
                           ("missing (left at init)", self.missing),
                           ("unexpected, no such tensor in this network (skipped)", self.unexpected),
                           ("mismatched", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", … (+{len(keys) - 6})" if len(keys) > 6 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file in any of the accepted layouts, with keys normalised (no pickle code runs)."""
    return read_weights(path).state


_V2_BLOCK = re.compile(r"^swinViT\.layers[1-4]c\.")  # SwinUNETR v2's residual conv blocks


def repeat_stem(src: torch.Tensor, channels: int) -> torch.Tensor:
    """A first-layer kernel (out, c, …) spread over ``channels`` inputs: the channel mean, repeated, divided by C.

    A C-channel input of C copies of one image then gives the pretrained response.
    """
    return src.mean(1, keepdim=True).repeat(1, channels, *([1] * (src.ndim - 2))) / channels


def _adapt(src: torch.Tensor, dst: torch.Tensor, mode: str) -> torch.Tensor | None:
    """A first-layer kernel (out, c_src, …) adapted to (out, c_dst, …), or None when it is not one."""
    if src.ndim < 3 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:] or src.shape[1] == dst.shape[1]:
        return None
    if mode == "reinit":
        return dst.clone()
    return repeat_stem(src, dst.shape[1])


def check_family(found: WeightsFile, family: str) -> None:
    """Refuse, in one line, weights whose own metadata names another backbone family."""
    if found.family is not None and found.family != family:
        raise SubforeError(f"{found.path}: a {found.family} pretraining ({found.kind}), but this network is a "
                           f"{family}; set model.name: {found.family} (and its sizes) or give weights of a {family}")


def check_architecture(found: WeightsFile, architecture: dict | None, target: dict[str, torch.Tensor],
                       usable: dict[str, torch.Tensor], keys: list[str]) -> None:
    """nnssl and nnU-Net files carry a whole architecture: it must be this network's in everything but the input
    channels (the first difference named), and every one of ``keys`` must load (the stem adapted or not)."""
    if architecture is not None and found.architecture is not None:
        diff = first_difference(architecture, found.architecture)
        if diff:
            raise SubforeError(f"{found.describe()}: its architecture differs from this network's (model.name and "
                               f"plans): first difference {diff}")
    for key in keys:
        if key not in usable:
            src = found.state.get(key)
            have = "absent" if src is None else str(list(src.shape))
            raise SubforeError(f"{found.describe()}: its architecture differs from this network's (model.name and "
                               f"plans): first difference {key}: {have} in the file, {list(target[key].shape)} here")


def load_pretrained(net: nn.Module, path: str | Path | WeightsFile, family: str, adapt_in_channels: str = "repeat",
                    min_encoder: float = 0.9, head: bool = False, architecture: dict | None = None) -> LoadReport:
    """Load ``path`` (or the file :func:`~subfore.models.artifact.read_weights` read) into ``net`` (a network of
    backbone ``family``) non-strictly and report.

    Refuses (one line) when less than ``min_encoder`` of the encoder's tensors load (v2-only SwinUNETR blocks
    missing from a v1 pretraining do not count against it), when a tensor fits no shape, or, for nnssl and nnU-Net
    files, when their architecture differs from ``architecture`` (the network's own, nnU-Net families) in anything
    but the input channels. A first layer of another channel count is adapted (``repeat``: the channel mean over C,
    repeated; ``reinit``: left at init) for every format. head: also load the output layer where its shape fits
    (continuing a pretraining: the same reconstruction task); a finetuning never loads it.
    """
    if adapt_in_channels not in ("repeat", "reinit"):
        raise SubforeError(f"finetune.adapt_in_channels must be 'repeat' or 'reinit', got {adapt_in_channels!r}")
    found = path if isinstance(path, WeightsFile) else read_weights(path)
    path = found.path
    check_family(found, family)
    source = found.state
    target = net.state_dict()
    report = LoadReport(source=found.describe())
    report.renamed = sum(k in target for k in found.renamed)
    spec = backbone_spec(family)
    usable = {}
    out_layer = spec.head
    for k, v in source.items():
        if k.startswith(out_layer) and not (head and k in target and v.shape == target[k].shape):
            report.head.append(k)  # a reconstruction (or HPM loss) output is no segmentation head, whatever its shape
        elif k not in target:
            report.unexpected.append(k)
        elif v.shape == target[k].shape:
            usable[k] = v
        elif (adapted := _adapt(v, target[k], adapt_in_channels)) is not None:
            usable[k] = adapted
            report.adapted.append(f"{k} {tuple(v.shape[:2])} → {tuple(target[k].shape[:2])} ({adapt_in_channels})")
        else:
            report.mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
    enc = spec.encoder
    encoder_keys = spec.encoder_keys(target)
    if found.whole_architecture:
        check_architecture(found, architecture, target, usable, encoder_keys)
    if family == "swinunetr" and not any(_V2_BLOCK.match(k) for k in source):
        report.expected_missing = sorted(k for k in encoder_keys if _V2_BLOCK.match(k))
    report.encoder_total = len(encoder_keys) - len(report.expected_missing)
    report.encoder_loaded = sum(k in usable for k in encoder_keys)
    if report.encoder_loaded == 0:
        sample = ", ".join(list(source)[:3])
        raise SubforeError(
            f"{path}: no encoder key matched a {family} network (expected keys starting "
            f"'{enc[0]}', the file has "
            f"e.g. {sample}); is it a checkpoint of another architecture?"
        )
    if report.mismatched:
        raise SubforeError(
            f"{path}: {len(report.mismatched)} tensors do not fit this {family} (e.g. {report.mismatched[0]}); "
            f"check model.feature_size and the other model keys against the pretraining"
        )
    share = report.encoder_loaded / max(report.encoder_total, 1)
    if share < min_encoder:
        absent = next(k for k in encoder_keys if k not in usable and k not in report.expected_missing)
        raise SubforeError(
            f"{path}: only {report.encoder_loaded} of the {report.encoder_total} encoder tensors of this {family} "
            f"loaded ({share:.0%} < finetune.min_encoder_loaded {min_encoder:g}; e.g. {absent} is missing); "
            f"lower finetune.min_encoder_loaded to accept a partial load"
        )
    net.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in target if k not in usable and k not in report.expected_missing)
    if found.meta is not None and found.meta.model.get("encoding") == "visible":
        report.not_pretrained = [k for k in report.missing if not k.startswith(enc)]
        report.missing = [k for k in report.missing if k.startswith(enc)]
    return report
