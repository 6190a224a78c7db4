"""The weights a pretraining leaves, and the one reader for every weights file a user names.

Written: ``encoder.pt`` (a plain state_dict without the output layer), ``encoder.safetensors`` (the same tensors,
encoder.json in its header) and ``encoder.json`` (typed metadata: backbone, input channels, crop, preset, masking,
data, step). Read (:func:`read_weights`): those, a model folder of ``subfore export hub``, nnssl checkpoints, nnU-Net
``-pretrained_weights`` and training checkpoints, Lightning checkpoints and plain state_dicts, in ``.pt``/``.pth``/
``.ckpt`` or ``.safetensors``; pickles are loaded with ``weights_only=True`` only (:func:`subfore.io.load_torch`).

Format 1 is today's; files written before the ``format`` key existed read as format 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.plans import plans_configuration, preset_from_plan
from ..data.presets import Preset
from ..errors import SubforeError
from ..io import load_torch, read_safetensors, torch_save, write_json, write_safetensors
from .nnunet import nnssl

ENCODER_FORMAT = 1


class EncoderMeta(BaseModel):
    """encoder.json: what the weights in encoder.pt belong to."""

    model_config = ConfigDict(extra="ignore")

    format: int = Field(ENCODER_FORMAT, description="encoder.json format version")
    model: dict[str, Any] = Field(..., description="the pretraining's model section (name, sizes, nnU-Net plans)")
    in_channels: int = Field(1, ge=1)
    roi: tuple[int, int, int]
    step: int | None = Field(None, description="optimiser steps the weights were trained for")
    preset: Preset
    nnunet: dict[str, Any] | None = Field(None, description="nnU-Net families: the architecture and plan")
    masking: dict[str, Any] | None = Field(None, description="the pretraining's masking section")
    data: dict[str, Any] | None = Field(None, description="volumes: how many trained; source: the datalist")
    probe: dict[str, Any] | None = Field(None, description="the last linear-probe score, if one was run")
    subfore_version: str | None = None
    source: str | None = Field(None, description="read from another tool's file: what it was")

    @property
    def name(self) -> str:
        return str(self.model["name"])

    def dump(self) -> dict[str, Any]:
        """As JSON data; top-level nulls left out (as format 1 has always written them)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if v is not None}


FORMATS = ("pt", "safetensors")
HEADER_KEY = "subfore_encoder"  # the safetensors header entry holding encoder.json


def write_encoder(run_dir: str | Path, state: dict[str, torch.Tensor], meta: EncoderMeta,
                  formats: tuple[str, ...] = FORMATS) -> Path:
    """Write RUN_DIR/encoder.json and the weights in ``formats`` (encoder.pt, encoder.safetensors), each atomically.

    Returns the path of the first format written.
    """
    run_dir = Path(run_dir)
    paths = []
    for fmt in formats:
        if fmt == "pt":
            paths.append(torch_save(state, run_dir / "encoder.pt"))
        elif fmt == "safetensors":
            paths.append(write_safetensors(run_dir / "encoder.safetensors", state, header(meta)))
        else:
            raise SubforeError(f"export.formats: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    write_json(run_dir / "encoder.json", meta.dump())
    for fmt, name in (("pt", "encoder.pt"), ("safetensors", "encoder.safetensors")):
        if fmt not in formats:  # a format no longer written must not be read as this run's weights
            (run_dir / name).unlink(missing_ok=True)
    return paths[0]


def header(meta: EncoderMeta) -> dict[str, str]:
    """The safetensors metadata carrying ``meta`` (safetensors headers hold strings only)."""
    return {"format": "pt", HEADER_KEY: json.dumps(meta.dump())}


def read_encoder_meta(path: str | Path) -> EncoderMeta:
    """The encoder.json beside ``path`` (RUN_DIR/encoder.pt or .safetensors, the json itself, or RUN_DIR)."""
    path = Path(path)
    meta_path = path / "encoder.json" if path.is_dir() else path.with_name("encoder.json")
    if not meta_path.is_file():
        raise SubforeError(f"{meta_path}: missing; the probe reads the architecture from the encoder.json beside "
                           f"encoder.pt")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubforeError(f"{meta_path}: not valid JSON ({exc})") from None
    return parse_meta(meta, meta_path)


def parse_meta(meta: Any, source: str | Path) -> EncoderMeta:
    """Validate encoder.json content (from a file, a safetensors header or a model folder's config.json)."""
    if isinstance(meta, dict) and isinstance(meta.get("format"), int) and meta["format"] > ENCODER_FORMAT:
        raise SubforeError(f"{source}: encoder.json format {meta['format']} is newer than this subfore reads "
                           f"(format {ENCODER_FORMAT}); upgrade subfore")
    try:
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "name" not in meta["model"]:
            raise KeyError("model")
        return EncoderMeta.model_validate(meta)
    except (KeyError, ValidationError) as exc:
        if isinstance(exc, ValidationError):
            e = exc.errors()[0]
            key = ".".join(str(p) for p in e["loc"])
            why = f"KeyError: {key!r}" if e["type"] == "missing" else f"{key}: {e['msg']}"
        else:
            why = f"KeyError: {exc}"
        raise SubforeError(f"{source}: not an encoder.json written by subfore pretrain ({why})") from None


@dataclass
class WeightsFile:
    """A weights file as read: its tensors (keys normalised), what kind of file it was, and what it says of itself."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str
    meta: EncoderMeta | None = None
    family: str | None = None  # the backbone it belongs to, where the file says (also when meta could not be made)
    why_no_meta: str | None = None

    def __post_init__(self) -> None:
        if self.family is None and self.meta is not None:
            self.family = self.meta.name

    def describe(self) -> str:
        return f"{self.path} ({self.kind})"


def _normalise(state: dict, source: Path) -> dict[str, torch.Tensor]:
    """Keys without ``module.``/``net.``/``model.`` prefixes, ``swin_vit.`` → ``swinViT.``, no EMA teacher."""
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SubforeError(f"{source}: holds no state_dict of tensors")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "net.", "model."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("teacher."):
            continue
        out[k.replace("swin_vit.", "swinViT.")] = v
    return out


def _beside(path: Path) -> EncoderMeta | None:
    for name in ("encoder.json", "config.json"):
        meta_path = path.with_name(name)
        if meta_path.is_file():
            try:
                data = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SubforeError(f"{meta_path}: not valid JSON ({exc})") from None
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                return parse_meta(data, meta_path)
    return None


def meta_from_nnssl(plan: dict, source: str | Path) -> EncoderMeta:
    """encoder.json for an nnssl checkpoint: its architecture, channels, patch and preprocessing (nnU-Net order)."""
    name, arch = nnssl.subfore_architecture(plan, str(source))
    pretrain = plan["pretrain_plan"]
    conf_name, conf = next(iter(pretrain["configurations"].items()))
    if not conf.get("spacing"):
        raise SubforeError(f"{source}: the nnssl pretraining did not resample (spacing None); subfore needs the "
                           f"spacing its network saw")
    channels = int(plan["pretrain_num_input_channels"])
    preset = preset_from_plan(pretrain, conf, source, conf_name, channels)
    model = {"name": name, **({"nnunet_architecture": arch} if arch else {})}
    roi = tuple(int(p) for p in conf["patch_size"])
    return EncoderMeta(model=model, in_channels=channels, roi=roi, preset=preset, source="nnssl checkpoint")


def meta_from_nnunet(init: dict, source: str | Path) -> EncoderMeta | None:
    """encoder.json for an nnU-Net training checkpoint (its ``init_args``: plans, configuration, dataset.json)."""
    plans, configuration = init.get("plans"), init.get("configuration")
    if not isinstance(plans, dict) or not isinstance(configuration, str):
        return None
    conf = plans_configuration(plans, configuration, source)
    arch = conf.get("architecture")
    if not isinstance(arch, dict):
        return None
    channels = len((init.get("dataset_json") or {}).get("channel_names") or {"0": None})
    model = {"name": "resenc", "nnunet_architecture": {
        "network_class_name": arch["network_class_name"], "arch_kwargs": arch["arch_kwargs"],
        "_kw_requires_import": list(arch.get("_kw_requires_import", []))}}
    return EncoderMeta(model=model, in_channels=channels, roi=tuple(int(p) for p in conf["patch_size"]),
                       preset=preset_from_plan(plans, conf, source, configuration, channels),
                       source=f"nnU-Net checkpoint ({configuration})")


def read_weights(path: str | Path) -> WeightsFile:
    """Any weights file a user names → its tensors and what it says of itself; one-line errors otherwise.

    path: a file (``.pt``/``.pth``/``.ckpt``/``.safetensors``), RUN_DIR (encoder.safetensors or encoder.pt) or a
    model folder (model.safetensors). No pickle runs code: see :func:`subfore.io.load_torch`.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "encoder.safetensors", "encoder.pt"):
            if (path / name).is_file():
                return read_weights(path / name)
        raise SubforeError(f"{path}: a folder without model.safetensors, encoder.safetensors or encoder.pt")
    if not path.exists():
        raise SubforeError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        state, head = read_safetensors(path)
        if HEADER_KEY in head:
            try:
                meta = parse_meta(json.loads(head[HEADER_KEY]), path)
            except json.JSONDecodeError as exc:
                raise SubforeError(f"{path}: its '{HEADER_KEY}' header is not valid JSON ({exc})") from None
        else:
            meta = _beside(path)
        kind = "subfore model folder" if path.name == "model.safetensors" else "safetensors"
        return WeightsFile(path, _normalise(state, path), kind, meta)
    obj = load_torch(path, "weights file")
    if not isinstance(obj, dict):
        raise SubforeError(f"{path}: holds no state_dict of tensors")
    ours = obj.get("subfore") if isinstance(obj.get("subfore"), dict) else {}
    own = parse_meta(ours["encoder"], path) if isinstance(ours.get("encoder"), dict) else None
    if isinstance(obj.get("network_weights"), dict):
        if "nnssl_adaptation_plan" in obj:
            plan = nnssl.check_plan(obj["nnssl_adaptation_plan"], str(path))
            family, _ = nnssl.subfore_architecture(plan, str(path))
            found = WeightsFile(path, _normalise(obj["network_weights"], path), "nnssl checkpoint", own, family)
            if own is None:
                try:  # the preprocessing is needed by the probe only: finetune and --init-from load without it
                    found.meta = meta_from_nnssl(plan, path)
                except SubforeError as exc:
                    found.why_no_meta = str(exc)
            return found
        init = obj.get("init_args") if isinstance(obj.get("init_args"), dict) else {}
        return WeightsFile(path, _normalise(obj["network_weights"], path), "nnU-Net weights",
                           own or meta_from_nnunet(init, path))
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            kind = "Lightning checkpoint" if key == "state_dict" and "pytorch-lightning_version" in obj else key
            return WeightsFile(path, _normalise(obj[key], path), kind, own or _beside(path))
    return WeightsFile(path, _normalise(obj, path), "state_dict", _beside(path))


def read_encoder(path: str | Path) -> tuple[EncoderMeta, dict[str, torch.Tensor]]:
    """(what the weights belong to, the state_dict) of RUN_DIR, encoder.pt/.safetensors, a model folder, or an nnssl
    or nnU-Net checkpoint: any file that names its architecture."""
    path = Path(path)
    if path.is_dir() and not any((path / n).is_file() for n in ("model.safetensors", "encoder.safetensors",
                                                               "encoder.pt")):
        raise SubforeError(f"{path / 'encoder.pt'}: no such encoder (pretraining writes RUN_DIR/encoder.pt)")
    if not path.exists():
        raise SubforeError(f"{path}: no such encoder (pretraining writes RUN_DIR/encoder.pt)")
    pt = path / "encoder.pt" if path.is_dir() else path
    if pt.name == "encoder.pt" and pt.is_file() and not pt.with_name("encoder.json").is_file() and not (
            path.is_dir() and any((path / n).is_file() for n in ("model.safetensors", "encoder.safetensors"))):
        read_encoder_meta(pt)  # a run folder's encoder.pt is described by its encoder.json: say it is missing
    found = read_weights(path)
    if found.why_no_meta:
        raise SubforeError(found.why_no_meta)
    if found.meta is None:
        raise SubforeError(f"{found.path}: this {found.kind} file names no architecture; give a subfore run (with "
                           f"its encoder.json), a model folder, an nnssl or an nnU-Net training checkpoint")
    return found.meta, found.state
