"""A chunked, compressed on-disk store of preprocessed volumes (blosc2), read one crop at a time.

One store per (preset, storage dtype) under ``data.cache_dir``; every run and rank with the same preprocessing
shares it::

    store-<key>/manifest.json             key, volumes, failed: merged from the records below
    store-<key>/records/<id>.json         one finished volume (written last, atomically)
    store-<key>/failed/<id>.json          one unreadable source (--skip-bad, or the file that stopped a run)
    store-<key>/volumes/<id>.b2nd         image (C, X, Y, Z), data.store_dtype, chunks and blocks from the ROI
    store-<key>/volumes/<id>.label.b2nd   label (1, X, Y, Z) uint8, when the datalist has one
    store-<key>/builds.log                one JSON line per volume built (source, host, pid, rank, seconds)

A volume counts as finished only when its record exists and names the source's current size and mtime: a
write killed half-way leaves a ``.partial`` file and no record, so it is rebuilt and never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import SubforeError
from ..datalist import as_list, case_id
from ..presets import Preset

log = logging.getLogger(__name__)

STORE_FORMAT = 1
BLOCK = 16  # blosc2 block side (voxels): the masking subvolume, the smallest unit a crop decodes
CHUNK = 96  # blosc2 chunk side (voxels), in whole blocks
DTYPES = {"float16": np.float16, "float32": np.float32}


# --- identity ---------------------------------------------------------------------------------------------
def source_signature(item: dict, key: str = "image") -> dict:
    """Size (bytes) and newest mtime (ns) over the files of ``item[key]`` (image channels, DICOM folders)."""
    size, mtime = 0, 0
    for p in map(Path, as_list(item.get(key))):
        files = [f for f in p.iterdir() if f.is_file()] if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    return {"size": size, "mtime_ns": mtime}


def source_text(item: dict) -> str | list[str]:
    image = item["image"]
    return [str(p) for p in image] if isinstance(image, (list, tuple)) else str(image)


def volume_id(item: dict) -> str:
    """File-safe, unique per source: the case name plus a hash of the image path(s)."""
    blob = json.dumps(source_text(item))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in case_id(item))[:60]
    return f"{safe}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def chunk_shapes(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for a (C, X, Y, Z) array: ``CHUNK``³ chunks of 16³ blocks, whatever ROI reads them.

    Blocks are 16³ (one masking subvolume; blosc2 decodes whole blocks). The chunk side does not depend on the
    run that builds the store, so runs with other ROIs share it as well as the first: 96³ read random crops of
    64³–160³ within 1–14 % of the best of the chunk sides measured (48–128; docs/benchmarks.md).
    """
    spatial = shape[1:]
    blocks = tuple(min(BLOCK, s) for s in spatial)
    chunks = tuple(min(s, CHUNK) for s in spatial)
    return (shape[0], *chunks), (1, *blocks)


# --- the store --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreSpec:
    """Where a store lives and what its volumes hold (picklable: worker processes receive it)."""

    root: Path
    preset: Preset
    dtype: str = "float16"
    threshold: float | str = 0.1  # λ in normalised units (or "otsu"), for each volume's foreground_share
    subvolume: int = 16

    @staticmethod
    def key(preset: Preset, dtype: str) -> dict:
        key = {"format": STORE_FORMAT, "preset": preset.model_dump(mode="json"), "dtype": dtype}
        w = preset.reference_window
        if w is not None:  # its volumes carry the foreground reference too (stores without one keep their key)
            key["reference_window"] = [w.a_min, w.a_max, w.b_min, w.b_max]
        return key

    @classmethod
    def under(cls, cache_dir: str | Path, preset: Preset, dtype: str = "float16", **kw) -> "StoreSpec":
        """The store for ``preset`` and ``dtype`` inside ``cache_dir`` (its folder name hashes the key)."""
        if dtype not in DTYPES:
            raise SubforeError(f"data.store_dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        blob = json.dumps(cls.key(preset, dtype), sort_keys=True).encode()
        return cls(Path(cache_dir) / f"store-{hashlib.sha1(blob).hexdigest()[:12]}", preset, dtype, **kw)

    def path(self, kind: str, vid: str) -> Path:
        suffix = {"record": ".json", "failed": ".json", "image": ".b2nd", "label": ".label.b2nd",
                  "reference": ".reference.b2nd"}[kind]
        folder = {"record": "records", "failed": "failed"}.get(kind, "volumes")
        return self.root / folder / f"{vid}{suffix}"

    def record(self, item: dict) -> dict | None:
        """The record of ``item`` if it was built from the source as it is now (and holds the item's label, if it
        has one), else None."""
        p = self.path("record", volume_id(item))
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        try:
            if rec.get("signature") != source_signature(item):
                return None
            if item.get("label") and (rec.get("source_label") != str(item["label"])
                                      or rec.get("label_signature") != source_signature(item, "label")):
                return None
        except OSError:
            return None
        files = [(rec["store"], rec["bytes"])] + [(rec[k], rec[f"{k}_bytes"]) for k in ("label", "reference") if k in rec]
        for rel, size in files:
            f = self.root / rel
            if not f.is_file() or f.stat().st_size != size:
                return None
        return rec

    def failure(self, item: dict) -> dict | None:
        """The recorded failure of ``item`` if its source has not changed since, else None (it is retried)."""
        try:
            fail = json.loads(self.path("failed", volume_id(item)).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        try:
            changed = fail.get("signature") != full_signature(item)
        except OSError:
            changed = False
        return None if changed else fail


def full_signature(item: dict) -> dict:
    sig = source_signature(item)
    return {**sig, "label": source_signature(item, "label")} if item.get("label") else sig


class StoreWriteError(SubforeError):
    """The store itself cannot be written (disk full, quota, permissions): never a bad source, never skipped."""


@contextmanager
def locked(path: Path, blocking: bool = True):
    """An exclusive flock on ``path`` (works across NFS clients); yields False when ``blocking`` is off and another
    process holds it. Where the filesystem has no locks (Lustre without -o flock) it proceeds unlocked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as exc:  # ENOLCK / ENOSYS: no lock support on this mount
            log.warning("%s: no file locks on this filesystem (%s); concurrent builders may redo work", path,
                        exc.strerror)
        yield True


def store_spec(data, preset: Preset, threshold: float | str, subvolume: int) -> StoreSpec:
    """The store a pretraining's ``data`` section reads: ``preset``, ``data.store_dtype``, ROI and λ (normalised, or
    "otsu") under ``data.cache_dir``."""
    if data.cache_dir is None:
        raise SubforeError("data.cache_dir is null: the store needs a folder (set data.cache_dir)")
    return StoreSpec.under(data.cache_dir, preset, data.store_dtype, threshold=threshold, subvolume=subvolume)


def store_for(cfg) -> StoreSpec:
    """The store a PretrainConfig reads (its preset and λ as ``cfg.foreground_threshold`` resolves them)."""
    return store_spec(cfg.data, cfg.data.preset_obj(), cfg.foreground_threshold()[0], cfg.masking.subvolume_size)
