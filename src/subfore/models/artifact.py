"""The encoder artifact a pretraining leaves: ``encoder.pt`` (a plain state_dict without the output layer) and
``encoder.json`` (typed metadata: the backbone, input channels, crop, preset and step). One writer, one reader;
finetune, probe, study and the nnU-Net export all read it here.

Format 1 is today's; files written before the ``format`` key existed read as format 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..data.presets import Preset
from ..errors import SubforeError
from ..io import torch_save, write_json

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

    @property
    def name(self) -> str:
        return str(self.model["name"])


def write_encoder(run_dir: str | Path, state: dict[str, torch.Tensor], meta: EncoderMeta) -> Path:
    """Write RUN_DIR/encoder.pt and RUN_DIR/encoder.json (each atomically); return the .pt path."""
    run_dir = Path(run_dir)
    path = torch_save(state, run_dir / "encoder.pt")
    # Absent rather than null at the top level (step, nnunet), as format 1 has always written them.
    dumped = {k: v for k, v in meta.model_dump(mode="json").items() if v is not None}
    write_json(run_dir / "encoder.json", dumped)
    return path


def read_encoder_meta(path: str | Path) -> EncoderMeta:
    """The encoder.json beside ``path`` (RUN_DIR/encoder.pt, the json itself, or RUN_DIR)."""
    path = Path(path)
    meta_path = path / "encoder.json" if path.is_dir() else path.with_name("encoder.json")
    if not meta_path.is_file():
        raise SubforeError(f"{meta_path}: missing; the probe reads the architecture from the encoder.json beside "
                           f"encoder.pt")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SubforeError(f"{meta_path}: not valid JSON ({exc})") from None
    if isinstance(meta, dict) and isinstance(meta.get("format"), int) and meta["format"] > ENCODER_FORMAT:
        raise SubforeError(f"{meta_path}: encoder.json format {meta['format']} is newer than this subfore reads "
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
        raise SubforeError(f"{meta_path}: not an encoder.json written by subfore pretrain ({why})") from None


def read_encoder(path: str | Path) -> tuple[EncoderMeta, dict[str, torch.Tensor]]:
    """(encoder.json, the encoder's state_dict) of RUN_DIR/encoder.pt (or RUN_DIR)."""
    path = Path(path)
    pt = path / "encoder.pt" if path.is_dir() else path
    if not pt.is_file():
        raise SubforeError(f"{pt}: no such encoder (pretraining writes RUN_DIR/encoder.pt)")
    meta = read_encoder_meta(pt)
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SubforeError(f"{pt}: not a readable encoder ({type(exc).__name__})") from None
    return meta, state
