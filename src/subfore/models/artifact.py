"""The weights a pretraining leaves, and the one reader for every weights file a user names.

Written: ``encoder.pt`` (a plain state_dict without the output layer), ``encoder.safetensors`` (the same tensors,
encoder.json in its header) and ``encoder.json`` (typed metadata: backbone, input channels, crop, preset, masking,
data, step). Read (:func:`read_weights`): those, a model folder of ``subfore export hub``, nnssl checkpoints, nnU-Net
``-pretrained_weights`` and training checkpoints, Lightning checkpoints and plain state_dicts, in ``.pt``/``.pth``/
``.ckpt`` or ``.safetensors``; pickles are loaded with ``weights_only=True`` only (:func:`subfore.io.load_torch`).

Format 1 is today's; files written before the ``format`` key existed read as format 1.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.plans import plans_configuration, preset_from_plan
from ..data.presets import Preset
from ..errors import SubforeError
from ..io import load_torch, read_safetensors, torch_save, write_json, write_safetensors
from .nnunet import architecture, nnssl

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
#: the weights file of a folder, in the order they are looked for: a model folder's, then a run's
FOLDER_FILES = ("model.safetensors", "encoder.safetensors", "encoder.pt")
#: the metadata a weights file may have beside it: a run's encoder.json, a model folder's config.json
META_FILES = ("encoder.json", "config.json")


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
    """Validate encoder.json content (from a file, a safetensors header or a model folder's config.json); every
    architecture it names is checked against the allow-list first."""
    architecture.scan(meta, source)
    if isinstance(meta, dict):  # entries scan() cannot recognise (no class-name key) are checked by where they sit
        model, nnunet = meta.get("model"), meta.get("nnunet")
        if isinstance(model, dict) and model.get("nnunet_architecture") is not None:
            architecture.check(model["nnunet_architecture"], source, "model.nnunet_architecture.")
        if isinstance(model, dict) and isinstance(model.get("nnunet_plan"), dict):
            from .nnunet.network import extract_architecture

            extract_architecture(model["nnunet_plan"], source)
        if isinstance(nnunet, dict) and nnunet.get("architecture") is not None:
            architecture.check(nnunet["architecture"], source, "nnunet.architecture.")
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
    """A weights file as read: its tensors (keys normalised), its format, and what it says of itself."""

    path: Path
    state: dict[str, torch.Tensor]
    kind: str  # the format's name (:data:`WEIGHT_FORMATS`), as reports print it
    meta: EncoderMeta | None = None
    family: str | None = None  # the backbone it belongs to, where the file says (also when meta could not be made)
    why_no_meta: str | None = None
    #: the file describes a whole network (nnssl, nnU-Net): its architecture must be the configured one
    whole_architecture: bool = False
    #: the checked nnU-Net architecture the file names (None: not an nnU-Net network, or it names none)
    architecture: dict | None = None
    #: keys renamed from another layout (MONAI's released SwinUNETR self-supervised weights), as they are now
    renamed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family is None and self.meta is not None:
            self.family = self.meta.name
        if self.architecture is None and self.meta is not None:
            self.architecture = meta_architecture(self.meta)

    def describe(self) -> str:
        return f"{self.path} ({self.kind})"


def meta_architecture(meta: EncoderMeta) -> dict | None:
    """The nnU-Net architecture an encoder.json describes (checked when it was parsed), or None."""
    from .nnunet.network import RESENC_L, extract_architecture

    m = meta.model
    if m["name"] == "resenc_l":
        return copy.deepcopy(RESENC_L)
    arch = (meta.nnunet or {}).get("architecture") or m.get("nnunet_architecture")
    if arch is None and isinstance(m.get("nnunet_plan"), dict):
        arch = extract_architecture(m["nnunet_plan"])
    return copy.deepcopy(arch)


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
    """The encoder.json (or a model folder's config.json) beside a weights file, parsed and checked."""
    for name in META_FILES:
        meta_path = path.with_name(name)
        if meta_path.is_file():
            try:
                data = json.loads(meta_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SubforeError(f"{meta_path}: not valid JSON ({exc})") from None
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                return parse_meta(data, meta_path)
            architecture.scan(data, meta_path)  # used or not, a file beside the weights never names code
    return None


def meta_from_nnunet(init: dict, source: str | Path) -> EncoderMeta | None:
    """encoder.json for an nnU-Net training checkpoint (its ``init_args``: plans, configuration, dataset.json)."""
    plans, configuration = init.get("plans"), init.get("configuration")
    if not isinstance(plans, dict) or not isinstance(configuration, str) or not isinstance(
            plans.get("configurations"), dict):
        return None
    conf = plans_configuration(plans, configuration, source)
    arch = conf.get("architecture")
    if not isinstance(arch, dict):
        return None
    arch = architecture.check(arch, source, f"init_args.plans.configurations.{configuration}.architecture.")
    channels = len((init.get("dataset_json") or {}).get("channel_names") or {"0": None})
    return EncoderMeta(model={"name": "resenc", "nnunet_architecture": arch}, in_channels=channels,
                       roi=tuple(int(p) for p in conf["patch_size"]),
                       preset=preset_from_plan(plans, conf, source, configuration, channels),
                       source=f"nnU-Net checkpoint ({configuration})")


# --- the weight formats: one recogniser each, tried in order ------------------------------------------------------
@dataclass(frozen=True)
class WeightsFormat:
    """One pickled format a user may hand in: how it is recognised and read."""

    kind: str
    #: the pickle's top-level dict → is it this format?
    recognise: Callable[[dict], bool]
    #: (path, the pickle's top-level dict, subfore's own encoder.json in it or None) → the file as read
    read: Callable[[Path, dict, "EncoderMeta | None"], WeightsFile]


def _nnssl(path: Path, obj: dict, own: EncoderMeta | None) -> WeightsFile:
    plan = nnssl.check_plan(obj["nnssl_adaptation_plan"], path)
    family, arch = nnssl.subfore_architecture(plan, path)
    found = WeightsFile(path, _normalise(obj["network_weights"], path), "nnssl checkpoint", own, family,
                        whole_architecture=True, architecture=arch)
    if own is None:
        try:  # the preprocessing is needed by the probe only: finetune and --init-from load without it
            found.meta = parse_meta(nnssl.encoder_meta(plan, path), path)
        except SubforeError as exc:
            found.why_no_meta = str(exc)
    return found


def _nnunet_checkpoint(path: Path, obj: dict, own: EncoderMeta | None) -> WeightsFile:
    meta = own or meta_from_nnunet(obj["init_args"], path)
    return WeightsFile(path, _normalise(obj["network_weights"], path), "nnU-Net training checkpoint", meta,
                       "resenc" if meta is None else None, whole_architecture=True)


def _nnunet_weights(path: Path, obj: dict, own: EncoderMeta | None) -> WeightsFile:
    return WeightsFile(path, _normalise(obj["network_weights"], path), "nnU-Net weights", own,
                       whole_architecture=True)


def _wrapped(key: str, kind: str) -> Callable[[Path, dict, EncoderMeta | None], WeightsFile]:
    return lambda path, obj, own: _released(WeightsFile(path, _normalise(obj[key], path), kind, own or _beside(path)))


def _plain(path: Path, obj: dict, own: EncoderMeta | None) -> WeightsFile:
    return _released(WeightsFile(path, _normalise(obj, path), "state_dict", own or _beside(path)))


_SWIN_TOP = ("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")


def _released(found: WeightsFile) -> WeightsFile:
    """MONAI's released SwinUNETR self-supervised weights (``model_swinvit.pt``, the layout ``SwinUNETR.load_from``
    reads) name the Swin encoder without its ``swinViT.`` parent and its MLP layers fc1/fc2: renamed to MONAI's."""
    keys = list(found.state)
    if any(k.startswith("swinViT.") for k in keys) or not any(k.startswith(_SWIN_TOP) for k in keys):
        return found
    state, renamed = {}, []
    for k, v in found.state.items():
        if k.startswith(_SWIN_TOP):
            k = "swinViT." + k.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
            renamed.append(k)
        state[k] = v
    found.state, found.renamed = state, tuple(renamed)
    found.kind = "SwinUNETR self-supervised, MONAI's released layout"
    found.family = found.family or "swinunetr"
    return found


def _has(key: str) -> Callable[[dict], bool]:
    return lambda obj: isinstance(obj.get(key), dict)


#: The pickled formats, tried in order; the last takes any dict of tensors. Before these, :func:`read_weights`
#: resolves a folder (:data:`FOLDER_FILES`) and reads ``.safetensors`` files (a model folder's or any other).
#: A new format is one entry here.
WEIGHT_FORMATS: tuple[WeightsFormat, ...] = (
    WeightsFormat("nnssl checkpoint", lambda o: _has("network_weights")(o) and "nnssl_adaptation_plan" in o, _nnssl),
    WeightsFormat("nnU-Net training checkpoint", lambda o: _has("network_weights")(o) and _has("init_args")(o),
                  _nnunet_checkpoint),
    WeightsFormat("nnU-Net weights", _has("network_weights"), _nnunet_weights),  # -pretrained_weights
    WeightsFormat("Lightning checkpoint", lambda o: _has("state_dict")(o) and "pytorch-lightning_version" in o,
                  _wrapped("state_dict", "Lightning checkpoint")),
    WeightsFormat("state_dict", _has("state_dict"), _wrapped("state_dict", "state_dict")),
    WeightsFormat("model", _has("model"), _wrapped("model", "model")),
    WeightsFormat("module", _has("module"), _wrapped("module", "module")),
    WeightsFormat("state_dict", lambda o: True, _plain),
)


def folder_weights(path: Path) -> Path | None:
    """The weights file of a model folder or run folder (the first of :data:`FOLDER_FILES` there), or None."""
    return next((path / n for n in FOLDER_FILES if (path / n).is_file()), None)


def read_weights(path: str | Path) -> WeightsFile:
    """Any weights file a user names → its tensors and what it says of itself; one-line errors otherwise.

    path: a file (``.pt``/``.pth``/``.ckpt``/``.safetensors``), RUN_DIR (encoder.safetensors or encoder.pt) or a
    model folder (model.safetensors). No pickle runs code (:func:`subfore.io.load_torch`), and every architecture
    the file names is checked against the allow-list (:mod:`subfore.models.nnunet.architecture`) first.
    """
    path = Path(path)
    if path.is_dir():
        inner = folder_weights(path)
        if inner is None:
            raise SubforeError(f"{path}: a folder without {', '.join(FOLDER_FILES[:-1])} or {FOLDER_FILES[-1]}")
        return read_weights(inner)
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
        kind = "subfore model folder" if path.name == FOLDER_FILES[0] else "safetensors"
        return _released(WeightsFile(path, _normalise(state, path), kind, meta))
    obj = load_torch(path, "weights file", safetensors=True)
    if not isinstance(obj, dict):
        raise SubforeError(f"{path}: holds no state_dict of tensors")
    architecture.scan({k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}, path)
    ours = obj.get("subfore") if isinstance(obj.get("subfore"), dict) else {}
    own = parse_meta(ours["encoder"], path) if isinstance(ours.get("encoder"), dict) else None
    fmt = next(f for f in WEIGHT_FORMATS if f.recognise(obj))
    return fmt.read(path, obj, own)


def read_encoder(path: str | Path) -> tuple[EncoderMeta, dict[str, torch.Tensor]]:
    """(what the weights belong to, the state_dict) of RUN_DIR, encoder.pt/.safetensors, a model folder, or an nnssl
    or nnU-Net checkpoint: any file that names its architecture."""
    path = Path(path)
    if path.is_dir() and folder_weights(path) is None:
        raise SubforeError(f"{path / 'encoder.pt'}: no such encoder (pretraining writes RUN_DIR/encoder.pt)")
    if not path.exists():
        raise SubforeError(f"{path}: no such encoder (pretraining writes RUN_DIR/encoder.pt)")
    inner = folder_weights(path) if path.is_dir() else path
    if inner.name == "encoder.pt" and not inner.with_name("encoder.json").is_file():
        read_encoder_meta(inner)  # a run folder's encoder.pt is described by its encoder.json: say it is missing
    found = read_weights(path)
    if found.why_no_meta:
        raise SubforeError(found.why_no_meta)
    if found.meta is None:
        raise SubforeError(f"{found.path}: this {found.kind} file names no architecture; give a subfore run (with "
                           f"its encoder.json), a model folder, an nnssl or an nnU-Net training checkpoint")
    return found.meta, found.state
