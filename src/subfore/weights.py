"""Loading pretrained weights into a segmentation network, from the checkpoint layouts users already have.

Accepted: a raw state_dict, ``{"state_dict": …}`` (Lightning; keys ``net.``/``model.``), ``{"model": …}``,
keys prefixed ``module.``, and ``swin_vit.`` for ``swinViT.`` (MONAI research-contributions). A
1-channel first layer can be adapted to C input channels (``repeat`` scaled by 1/C, or ``reinit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import SubforeError
from .models import ENCODER_PREFIX, HEAD_PREFIX


@dataclass
class LoadReport:
    """What a pretrained load did; ``str()`` is the report printed to the user."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    encoder_loaded: int = 0
    encoder_total: int = 0

    def __str__(self) -> str:
        lines = [
            f"pretrained weights from {self.source}: {len(self.loaded)} tensors loaded "
            f"({self.encoder_loaded}/{self.encoder_total} of the encoder), {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        ]
        if self.adapted:
            lines.append(f"  input channels adapted: {', '.join(self.adapted)}")
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatched", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", … (+{len(keys) - 6})" if len(keys) > 6 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file in any of the accepted layouts, with keys normalised."""
    path = Path(path)
    if not path.exists():
        raise SubforeError(f"{path}: no such pretrained checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files fail in many ways
        raise SubforeError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model", "module", "network_weights"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SubforeError(f"{path}: holds no state_dict of tensors")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "net.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("teacher."):
            continue
        out[k.replace("swin_vit.", "swinViT.")] = v
    return out


def _adapt(src: torch.Tensor, dst: torch.Tensor, mode: str) -> torch.Tensor | None:
    """A first-layer kernel (out, c_src, …) adapted to (out, c_dst, …), or None when it is not one."""
    if src.ndim < 3 or src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:] or src.shape[1] == dst.shape[1]:
        return None
    if mode == "reinit":
        return dst.clone()
    if src.shape[1] != 1:
        return src.mean(1, keepdim=True).repeat(1, dst.shape[1], *([1] * (src.ndim - 2))) / dst.shape[1]
    return src.repeat(1, dst.shape[1], *([1] * (src.ndim - 2))) / dst.shape[1]


def load_pretrained(net: nn.Module, path: str | Path, family: str, adapt_in_channels: str = "repeat") -> LoadReport:
    """Load ``path`` into ``net`` (family ``swinunetr``/``unetr``/``basicunet``) non-strictly and report.

    Fails when no encoder key matched: the silent failure where a prefix mismatch loads nothing.
    """
    if adapt_in_channels not in ("repeat", "reinit"):
        raise SubforeError(f"finetune.adapt_in_channels must be 'repeat' or 'reinit', got {adapt_in_channels!r}")
    source = read_state_dict(path)
    target = net.state_dict()
    report = LoadReport(source=str(path))
    head = HEAD_PREFIX[family]
    usable = {}
    for k, v in source.items():
        if k not in target:
            report.unexpected.append(k)
        elif v.shape == target[k].shape:
            usable[k] = v
        elif (adapted := _adapt(v, target[k], adapt_in_channels)) is not None:
            usable[k] = adapted
            report.adapted.append(f"{k} {tuple(v.shape[:2])} → {tuple(target[k].shape[:2])} ({adapt_in_channels})")
        elif not k.startswith(head):
            report.mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}")
    enc = ENCODER_PREFIX[family]
    report.encoder_total = sum(k.startswith(enc) for k in target)
    report.encoder_loaded = sum(k.startswith(enc) for k in usable)
    if report.encoder_loaded == 0:
        sample = ", ".join(list(source)[:3])
        raise SubforeError(
            f"{path}: no encoder key matched a {family} network (expected keys starting '{enc}', the file has "
            f"e.g. {sample}); is it a checkpoint of another architecture?"
        )
    if report.mismatched:
        raise SubforeError(
            f"{path}: {len(report.mismatched)} tensors do not fit this {family} (e.g. {report.mismatched[0]}); "
            f"check model.feature_size and the other model keys against the pretraining"
        )
    net.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in target if k not in usable)
    return report
