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
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, SubforeError
from .datalist import _as_list, case_id
from .presets import Preset

log = logging.getLogger(__name__)

STORE_FORMAT = 1
BLOCK = 16  # blosc2 block side (voxels): the masking subvolume, the smallest unit a crop decodes
DTYPES = {"float16": np.float16, "float32": np.float32}


# --- identity ---------------------------------------------------------------------------------------------
def source_signature(item: dict, key: str = "image") -> dict:
    """Size (bytes) and newest mtime (ns) over the files of ``item[key]`` (image channels, DICOM folders)."""
    size, mtime = 0, 0
    for p in map(Path, _as_list(item.get(key))):
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


def chunk_shapes(shape: Sequence[int], roi: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for a (C, X, Y, Z) array read in ``roi`` crops.

    Blocks are 16³ (one masking subvolume; blosc2 decodes whole blocks); a chunk spans about ⅔ of the ROI per
    axis, rounded up to whole blocks, so a random crop touches 2-3 chunks per axis and decodes little it drops.
    """
    spatial = shape[1:]
    blocks = tuple(min(BLOCK, s) for s in spatial)
    chunks = tuple(min(s, max(BLOCK, math.ceil(2 * r / 3 / BLOCK) * BLOCK)) for s, r in zip(spatial, roi))
    return (shape[0], *chunks), (1, *blocks)


# --- the store --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreSpec:
    """Where a store lives and what its volumes hold (picklable: worker processes receive it)."""

    root: Path
    preset: Preset
    dtype: str = "float16"
    roi: tuple[int, int, int] = (96, 96, 96)
    threshold: float | str = 0.1  # λ in normalised units (or "otsu"), for each volume's foreground_share
    subvolume: int = 16

    @staticmethod
    def key(preset: Preset, dtype: str) -> dict:
        return {"format": STORE_FORMAT, "preset": preset.model_dump(mode="json"), "dtype": dtype}

    @classmethod
    def under(cls, cache_dir: str | Path, preset: Preset, dtype: str = "float16", **kw) -> "StoreSpec":
        """The store for ``preset`` and ``dtype`` inside ``cache_dir`` (its folder name hashes the key)."""
        if dtype not in DTYPES:
            raise SubforeError(f"data.store_dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        blob = json.dumps(cls.key(preset, dtype), sort_keys=True).encode()
        return cls(Path(cache_dir) / f"store-{hashlib.sha1(blob).hexdigest()[:12]}", preset, dtype, **kw)

    def path(self, kind: str, vid: str) -> Path:
        suffix = {"record": ".json", "failed": ".json", "image": ".b2nd", "label": ".label.b2nd"}[kind]
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
        files = [(rec["store"], rec["bytes"])] + ([(rec["label"], rec["label_bytes"])] if "label" in rec else [])
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
            changed = fail.get("signature") != _full_signature(item)
        except OSError:
            changed = False
        return None if changed else fail


def _full_signature(item: dict) -> dict:
    sig = source_signature(item)
    return {**sig, "label": source_signature(item, "label")} if item.get("label") else sig


class StoreWriteError(SubforeError):
    """The store itself cannot be written (disk full, quota, permissions): never a bad source, never skipped."""


@contextmanager
def _locked(path: Path, blocking: bool = True):
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


def store_for(cfg) -> StoreSpec:
    """The store a PretrainConfig reads: its preset, ``data.store_dtype``, ROI and λ under ``data.cache_dir``."""
    d, mk = cfg.data, cfg.masking
    if d.cache_dir is None:
        raise SubforeError("data.cache_dir is null: the store needs a folder (set data.cache_dir)")
    return StoreSpec.under(d.cache_dir, d.preset_obj(), d.store_dtype, roi=tuple(d.roi),
                           threshold=cfg.foreground_threshold(), subvolume=mk.subvolume_size)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def body_bbox(image: np.ndarray) -> list[list[int]]:
    """[[x0, x1], [y0, y1], [z0, z1]] (half-open) of the voxels above the volume's minimum in any channel.

    After the CT window that is everything denser than the window floor (air is the minimum); for MRI it is the
    non-background region. A constant volume gives the whole volume.
    """
    body = (image > image.min(axis=tuple(range(1, image.ndim)), keepdims=True)).any(0)
    if not body.any():
        return [[0, s] for s in body.shape]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def foreground_share(image: torch.Tensor, size: int, threshold: float | str) -> float:
    """Share of the volume's ``size``³ subvolumes (zero-padded to whole ones) whose mean is ≥ λ; image (C, X, Y, Z)."""
    from ..masking.grid import foreground_grid

    pad = [p for s in reversed(image.shape[1:]) for p in (0, -s % size)]
    x = torch.nn.functional.pad(image.float(), pad)[None]
    return round(float(foreground_grid(x, size, threshold).float().mean()), 6)


def build_volume(spec: StoreSpec, item: dict, rank: int = 0) -> dict:
    """Preprocess one datalist item with the spec's preset and write it into the store; return its record.

    Raises DataError naming the file when it cannot be read or does not fit the storage dtype.
    """
    import blosc2
    from monai.transforms import Compose

    from .dataset import load_item
    from .transforms import preprocess

    t0 = time.perf_counter()
    vid = volume_id(item)
    signature = source_signature(item)  # before reading: a source rewritten meanwhile is rebuilt next time
    label_signature = source_signature(item, "label") if item.get("label") else None
    keys = ["image", "label"] if item.get("label") else ["image"]
    data = load_item(Compose(preprocess(spec.preset, keys)), {k: item[k] for k in keys})
    image = data["image"]
    image = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()
    where = str(_as_list(item["image"])[0])
    arr = image.numpy().astype(DTYPES[spec.dtype])
    if not np.isfinite(arr).all():
        raise DataError(where, f"preprocessed values exceed {spec.dtype}'s range (set data.store_dtype: float32)")
    chunks, blocks = chunk_shapes(arr.shape, spec.roi)
    cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE], "nthreads": 1}
    spec.root.joinpath("volumes").mkdir(parents=True, exist_ok=True)
    record = {
        "source": source_text(item), "store": f"volumes/{vid}.b2nd", "shape": list(arr.shape),
        "spacing": list(spec.preset.array_spacing), "dtype": spec.dtype, "chunks": list(chunks),
        "blocks": list(blocks), "body_bbox": body_bbox(arr), "signature": signature,
        "foreground_share": foreground_share(image, spec.subvolume, spec.threshold),
        "foreground_threshold": spec.threshold, "subvolume_size": spec.subvolume,
    }
    outputs = [("image", arr, chunks, blocks)]
    if "label" in keys:
        lab = data["label"]
        lab = (lab.as_tensor() if hasattr(lab, "as_tensor") else torch.as_tensor(lab)).round()
        if lab.min() < 0 or lab.max() > 255:
            raise DataError(item["label"], f"label values {int(lab.min())}…{int(lab.max())} do not fit uint8")
        outputs.append(("label", lab.numpy().astype(np.uint8), (1, *chunks[1:]), blocks))
        record["source_label"], record["label_signature"] = str(item["label"]), label_signature
    try:
        for kind, a, ch, bl in outputs:
            final = spec.path(kind, vid)
            # Left by a writer killed mid-write (the caller holds this volume's lock, so none is live).
            for stale in final.parent.glob(f".{final.name}.*.partial"):
                stale.unlink(missing_ok=True)
            tmp = final.with_name(f".{final.name}.{socket.gethostname()}-{os.getpid()}.partial")
            blosc2.asarray(np.ascontiguousarray(a), urlpath=str(tmp), chunks=ch, blocks=bl, cparams=cparams,
                           mode="w")
            _fsync(tmp)
            os.replace(tmp, final)
            rel = final.relative_to(spec.root).as_posix()
            size = final.stat().st_size
            if kind == "image":
                record["bytes"] = size
            else:
                record["label"], record["label_bytes"] = rel, size
        spec.path("record", vid).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(spec.path("record", vid), json.dumps(record, indent=1))
        spec.path("failed", vid).unlink(missing_ok=True)
        line = {"source": record["source"], "host": socket.gethostname(), "pid": os.getpid(), "rank": rank,
                "seconds": round(time.perf_counter() - t0, 3), "time": time.time()}
        with open(spec.root / "builds.log", "a") as fh:  # one short O_APPEND write per line
            fh.write(json.dumps(line) + "\n")
    except Exception as exc:  # noqa: BLE001 - ENOSPC, EDQUOT, EACCES, blosc2's own write errors
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise StoreWriteError(f"{spec.root}: cannot write the store ({type(exc).__name__}: {reason})") from exc
    return record


def record_failure(spec: StoreSpec, item: dict, error: str) -> None:
    p = spec.path("failed", volume_id(item))
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        sig = _full_signature(item)
    except OSError:
        sig = None
    _atomic_write(p, json.dumps({"source": source_text(item), "error": error, "signature": sig}))


def write_manifest(spec: StoreSpec) -> dict:
    """Merge every record and failure into manifest.json (under a lock: shards on other nodes merge too)."""
    spec.root.mkdir(parents=True, exist_ok=True)
    with _locked(spec.root / ".manifest.lock"):
        volumes, failed = [], []
        for folder, out in (("records", volumes), ("failed", failed)):
            for p in sorted((spec.root / folder).glob("*.json")):
                try:
                    out.append(json.loads(p.read_text()))
                except (OSError, json.JSONDecodeError):
                    continue  # being replaced right now; the next merge reads it
        key = {**StoreSpec.key(spec.preset, spec.dtype), "spacing": list(spec.preset.array_spacing),
               "window": _window(spec.preset)}
        manifest = {"key": key, "volumes": volumes, "failed": failed}
        _atomic_write(spec.root / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _window(preset: Preset) -> list[float] | None:
    w = preset.window
    return None if w is None else [w.a_min, w.a_max, w.b_min, w.b_max]


# --- preprocessing ----------------------------------------------------------------------------------------
def unique_items(items: Iterable[dict]) -> list[dict]:
    """Items in datalist order, each source once (train and val lists may share volumes)."""
    seen, out = set(), []
    for item in items:
        vid = volume_id(item)
        if vid not in seen:
            seen.add(vid)
            out.append(item)
    return out


def _build_job(args) -> tuple[int, str, str | None]:
    """Build one volume under its lock → (index, outcome, message); outcome built | busy | done | bad | store."""
    spec, item, index, rank = args
    with _locked(spec.root / "locks" / f"{volume_id(item)}.lock", blocking=False) as mine:
        if not mine:
            return index, "busy", None  # another process is building it; wait_for_store sees it finish
        if spec.record(item) is not None:
            return index, "done", None  # finished by another process meanwhile
        try:
            build_volume(spec, item, rank)
            return index, "built", None
        except StoreWriteError as exc:
            return index, "store", str(exc)
        except SubforeError as exc:
            return index, "bad", str(exc)
        except Exception as exc:  # noqa: BLE001 - any decoding failure becomes one named line
            from .dataset import named_error

            return index, "bad", str(named_error(exc, item))


def preprocess_store(spec: StoreSpec, items: Sequence[dict], *, workers: int = 1, shard: tuple[int, int] = (0, 1),
                     skip_bad: bool = False, progress: bool = True, rank: int = 0) -> dict:
    """Build every volume of shard ``k`` of ``n`` (items k, k+n, …) that the store lacks; merge the manifest.

    Returns {"built", "skipped", "failed"} counts for this shard. A bad file raises DataError naming it
    (after recording it under ``failed``); with ``skip_bad`` it is only recorded.
    """
    k, n = shard
    mine = unique_items(items)[k::n]
    todo = [(i, item) for i, item in enumerate(mine) if spec.record(item) is None]
    counts = {"built": 0, "skipped": len(mine) - len(todo), "failed": 0, "busy": 0}
    error = None
    if todo:
        bar = _progress(len(todo), f"preprocessing {len(todo)} of {len(mine)} volumes", progress)
        jobs = [(spec, item, i, rank) for i, item in todo]
        try:
            for i, outcome, err in _run_jobs(jobs, workers):
                bar.update(1)
                if outcome == "store":
                    raise StoreWriteError(err)
                if outcome != "bad":
                    counts[{"built": "built", "done": "skipped", "busy": "busy"}[outcome]] += 1
                    continue
                record_failure(spec, mine[i], err)
                counts["failed"] += 1
                if not skip_bad:
                    error = err
                    break
                log.warning("skipping unreadable volume (--skip-bad or data.skip_bad): %s", err)
        finally:
            bar.close()
    write_manifest(spec)
    if error is not None:
        raise DataError(None, error)
    return counts


def preprocess_config(cfg, workers: int = 1, shard: tuple[int, int] = (0, 1), skip_bad: bool | None = None,
                      progress: bool = True) -> tuple[StoreSpec, dict]:
    """``subfore preprocess``: build shard ``k``/``n`` of a PretrainConfig's ``data.train`` + ``data.val`` store.

    Returns the spec and this shard's counts plus the merged manifest's totals (``volumes``, ``failed``).
    """
    from .datalist import load_datalists

    d = cfg.data
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise SubforeError(f"--shard {k}/{n}: K must be 0 … N−1 (SLURM: --shard $SLURM_ARRAY_TASK_ID/N with "
                           f"--array=0-{max(n, 1) - 1})")
    from ..pretrain import ensure_phantoms

    ensure_phantoms(cfg)
    items = unique_items(load_datalists(d.train, d.train_split) + (load_datalists(d.val, d.val_split) if d.val
                                                                    else []))
    spec = store_for(cfg)
    counts = preprocess_store(spec, items, workers=workers, shard=shard,
                              skip_bad=d.skip_bad if skip_bad is None else skip_bad, progress=progress)
    # Of this config's volumes (the store may also hold other datasets with the same preprocessing):
    return spec, {**counts, "listed": len(items), "volumes": sum(spec.record(i) is not None for i in items),
                  "failed_total": sum(spec.failure(i) is not None for i in items)}


def _run_jobs(jobs: list, workers: int):
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            yield _build_job(job)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # Not fork: the parent may hold torch/OpenMP threads that a forked child would inherit locked. A forkserver
    # that has imported this module (torch, MONAI) but run nothing forks workers that start at once.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["subfore._quiet", __name__, "subfore.data.transforms"])
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_one_thread) as pool:
        submitted = {pool.submit(_build_job, job): job for job in jobs[:2 * workers]}
        pending = set(submitted)
        queue = iter(jobs[2 * workers:])
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    nxt = next(queue, None)
                    if nxt is not None:
                        new = pool.submit(_build_job, nxt)
                        submitted[new] = nxt
                        pending.add(new)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        raise SubforeError(f"{source_text(submitted[fut][1])}: a preprocessing worker died while "
                                           f"building it or a neighbour (out of memory? try fewer --workers); "
                                           f"rerun to continue") from None
        finally:
            for fut in pending:
                fut.cancel()


def _one_thread() -> None:
    # N worker processes on N cores: one torch thread each (in-process builds keep the caller's threads).
    torch.set_num_threads(1)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm  # Lightning's own progress-bar dependency

    # disable=None: shown on a terminal only, so logs and piped stderr keep one line per error.
    return tqdm(total=total, desc=desc, unit="vol", dynamic_ncols=True, disable=None if enabled else True)


def wait_for_store(spec: StoreSpec, items: Sequence[dict], skip_bad: bool, poll_s: float = 2.0,
                   stall_s: float = 3600.0) -> None:
    """Block until every item has a record (or, with ``skip_bad``, a failure): the other ranks' shards.

    A failure recorded by another rank without ``skip_bad`` stops this rank with the same line; so does an hour
    (``stall_s``) in which no missing volume was finished (a rank that died, or a store other ranks cannot see).
    """
    waiting = unique_items(items)
    start, said = time.monotonic(), False
    while True:
        left = []
        for item in waiting:
            if spec.record(item) is not None:
                continue
            fail = spec.failure(item)
            if fail is not None and not skip_bad:
                raise DataError(None, fail["error"])
            if fail is None:
                left.append(item)
        if not left:
            return
        if not said:
            log.warning("waiting for %d volume(s) that other ranks are building into %s (data.cache_dir must be "
                        "one folder that every rank sees)", len(left), spec.root)
            said = True
        if len(left) < len(waiting):
            start = time.monotonic()
        elif time.monotonic() - start > stall_s:
            raise SubforeError(f"{spec.root}: {len(left)} volume(s) still missing and none finished in "
                               f"{stall_s:.0f} s (first: {source_text(left[0])}); is another rank down, or "
                               f"data.cache_dir not shared between nodes?")
        waiting = left
        time.sleep(poll_s)


def records_for(spec: StoreSpec, items: Sequence[dict], skip_bad: bool) -> list[dict]:
    """The records of ``items`` in order; failed ones dropped with ``skip_bad``, else DataError naming them."""
    out, skipped = [], 0
    for item in items:
        rec = spec.record(item)
        if rec is None:
            fail = spec.failure(item)
            if fail is not None and skip_bad:
                skipped += 1
                continue
            raise DataError(None, fail["error"]) if fail else DataError(
                source_text(item) if isinstance(item["image"], str) else item["image"][0],
                f"not in the store {spec.root} (run subfore preprocess)")
        out.append(rec)
    if skipped:
        log.warning("left out %d unreadable volume(s) listed under 'failed' in %s (data.skip_bad)", skipped,
                    spec.root / "manifest.json")
    return out


# --- reading ----------------------------------------------------------------------------------------------
class _Handles:
    """At most ``size`` open blosc2 arrays per process (least recently used closed first)."""

    def __init__(self, size: int = 32) -> None:
        self.size, self.open = size, OrderedDict()

    def get(self, path: Path):
        import blosc2

        key = str(path)
        if key in self.open:
            self.open.move_to_end(key)
            return self.open[key]
        # No mmap: mapped pages would count towards the worker's memory and grow with the volumes it reads.
        arr = blosc2.open(key, mode="r")
        self.open[key] = arr
        if len(self.open) > self.size:
            self.open.popitem(last=False)
        return arr


def read_crop(array, start: Sequence[int], roi: Sequence[int]) -> np.ndarray:
    """Voxels [start, start + roi) of a (C, X, Y, Z) array; outside the array: 0 (the padding SpatialPad adds).

    Only the chunks (blocks) that the crop touches are decoded.
    """
    shape = array.shape[1:]
    out = np.zeros((array.shape[0], *roi), np.float32)
    src, dst = [slice(None)], [slice(None)]
    for s, r, size in zip(start, roi, shape):
        lo, hi = max(s, 0), min(s + r, size)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def padded_origin(shape: Sequence[int], roi: Sequence[int]) -> list[int]:
    """Where the padded volume starts in array coordinates (≤ 0): SpatialPad's symmetric padding to the ROI."""
    return [-(max(r - s, 0) // 2) for s, r in zip(shape, roi)]


def crop_starts(shape: Sequence[int], roi: Sequence[int], bbox: Sequence[Sequence[int]] | None, n: int,
                generator: torch.Generator) -> torch.Tensor:
    """``n`` random crop corners (n, 3) in array coordinates, uniform over the padded volume.

    With ``bbox`` (half-open per axis) the crop stays inside the box where the box is larger than the ROI, and
    covers the whole box where it is not.
    """
    origin = torch.tensor(padded_origin(shape, roi))
    size = torch.tensor([max(s, r) for s, r in zip(shape, roi)])
    roi_t = torch.tensor(list(roi))
    lo, hi = origin.clone(), origin + size - roi_t
    if bbox is not None:
        b0, b1 = torch.tensor([b[0] for b in bbox]), torch.tensor([b[1] for b in bbox])
        inside = (b1 - b0) >= roi_t
        lo = torch.where(inside, torch.maximum(lo, b0), torch.maximum(lo, b1 - roi_t))
        hi = torch.where(inside, torch.minimum(hi, b1 - roi_t), torch.minimum(hi, b0))
        hi = torch.maximum(hi, lo)
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    return lo + (u * (hi - lo + 1).double()).floor().long().clamp_max(hi - lo)


class StoreCrops(torch.utils.data.Dataset):
    """Crops of stored volumes: ``draw(i, seed)`` → ``samples`` random ROI crops of volume i (training), and
    ``self[i]`` → the centre crop of volume i (validation), each ``{"image": (C, *roi) float32}`` plus the item's
    other keys (e.g. ``weight``)."""

    def __init__(self, spec: StoreSpec, records: Sequence[dict], roi: Sequence[int], samples: int = 1,
                 crop: str = "anywhere", extras: Sequence[dict] | None = None) -> None:
        self.root, self.records, self.roi = spec.root, list(records), tuple(int(r) for r in roi)
        self.samples, self.crop = samples, crop
        self.extras = list(extras) if extras is not None else [{} for _ in self.records]
        self._handles: _Handles | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _array(self, i: int):
        if self._handles is None:  # opened in the process that reads (loader workers each open their own)
            self._handles = _Handles()
        return self._handles.get(self.root / self.records[i]["store"])

    def crop_at(self, i: int, start: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(read_crop(self._array(i), [int(s) for s in start], self.roi))

    def draw(self, i: int, seed: int) -> list[dict]:
        rec = self.records[i]
        g = torch.Generator().manual_seed(int(seed))
        bbox = rec["body_bbox"] if self.crop == "body" else None
        starts = crop_starts(rec["shape"][1:], self.roi, bbox, self.samples, g)
        return [{"image": self.crop_at(i, s.tolist()), **self.extras[i]} for s in starts]

    def __getitem__(self, i: int) -> dict:
        shape = self.records[i]["shape"][1:]
        # CenterSpatialCrop of the padded volume: centre P // 2, start centre − roi // 2.
        origin = padded_origin(shape, self.roi)
        start = [o + max(s, r) // 2 - r // 2 for o, s, r in zip(origin, shape, self.roi)]
        return {"image": self.crop_at(i, start), **self.extras[i]}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = None  # open files do not travel to loader workers
        return state
