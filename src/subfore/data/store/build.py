"""Building the store: preprocess each volume once (in parallel, sharded, resumable), record failures, merge
the manifest, and wait for other ranks' shards."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ...errors import DataError, SubforeError
from ...io import atomic_path, write_text
from ...masking.grid import foreground_grid
from ..datalist import as_list, load_datalists
from ..dataset import load_item, named_error
from ..phantoms import ensure_phantoms
from ..transforms import preprocess
from ..presets import Preset
from .spec import (
    DTYPES,
    StoreSpec,
    StoreWriteError,
    full_signature,
    locked,
    chunk_shapes,
    source_signature,
    source_text,
    store_for,
    volume_id,
)

log = logging.getLogger(__name__)


AIR_HU = -500.0  # denser than this is tissue (fat is ≈ −100 HU), thinner is air or lung


def body_level(preset: Preset) -> float | None:
    """The normalised value above which a voxel is body: ``AIR_HU`` through the preset's HU window (its floor, when
    the window starts above it), or None without a window (MRI, z-scores): then the volume's minimum."""
    w = preset.reference_window or preset.window
    return None if w is None else w.to_normalised(max(AIR_HU, w.a_min))


def body_bbox(image: np.ndarray, level: float | None = None) -> list[list[int]]:
    """[[x0, x1], [y0, y1], [z0, z1]] (half-open) of the body: the largest connected group of voxels above ``level``
    (any channel; default: the volume's minimum). image: (C, X, Y, Z) normalised.

    Air around the patient and inside the scanner bore is below the level; the table, the blanket and other
    objects not touching the body are separate groups and left out. A volume with nothing above the level gives
    the whole volume.
    """
    floor = image.min(axis=tuple(range(1, image.ndim)), keepdims=True) if level is None else level
    dense = (image > floor).any(0)
    if not dense.any():
        return [[0, s] for s in dense.shape]
    groups, n = ndimage.label(dense)
    sizes = np.bincount(groups.ravel(), minlength=n + 1)
    sizes[0] = 0
    body = groups == int(sizes.argmax())
    box = []
    for axis in range(3):
        hit = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append([int(hit[0]), int(hit[-1]) + 1])
    return box


def foreground_share(image: torch.Tensor, size: int, threshold: float | str) -> float:
    """Share of the volume's ``size``³ subvolumes (zero-padded to whole ones) whose mean is ≥ λ; image (C, X, Y, Z)."""
    pad = [p for s in reversed(image.shape[1:]) for p in (0, -s % size)]
    x = torch.nn.functional.pad(image.float(), pad)[None]
    return round(float(foreground_grid(x, size, threshold).float().mean()), 6)


def compression() -> dict:
    """blosc2's compression parameters for stored volumes: zstd level 5 over bit-shuffled values, one thread."""
    import blosc2

    return {"codec": blosc2.Codec.ZSTD, "clevel": 5, "filters": [blosc2.Filter.BITSHUFFLE], "nthreads": 1}


def build_volume(spec: StoreSpec, item: dict, rank: int = 0) -> dict:
    """Preprocess one datalist item with the spec's preset and write it into the store; return its record.

    Raises DataError naming the file when it cannot be read or does not fit the storage dtype.
    """
    import blosc2
    from monai.transforms import Compose

    t0 = time.perf_counter()
    vid = volume_id(item)
    signature = source_signature(item)  # before reading: a source rewritten meanwhile is rebuilt next time
    label_signature = source_signature(item, "label") if item.get("label") else None
    keys = ["image", "label"] if item.get("label") else ["image"]
    data = load_item(Compose(preprocess(spec.preset, keys, reference=True)), {k: item[k] for k in keys})
    image = data["image"]
    image = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()
    where = str(as_list(item["image"])[0])
    arr = image.numpy().astype(DTYPES[spec.dtype])
    if not np.isfinite(arr).all():
        raise DataError(where, f"preprocessed values exceed {spec.dtype}'s range (set data.store_dtype: float32)")
    # What the foreground (and the body) is decided on: the reference where the preset has one, else the image.
    ref = data.get("reference")
    ref = None if ref is None else (ref.as_tensor() if hasattr(ref, "as_tensor") else torch.as_tensor(ref)).float()
    decide = image if ref is None else ref
    chunks, blocks = chunk_shapes(arr.shape)
    cparams = compression()
    spec.root.joinpath("volumes").mkdir(parents=True, exist_ok=True)
    record = {
        "source": source_text(item), "store": f"volumes/{vid}.b2nd", "shape": list(arr.shape),
        "spacing": list(spec.preset.array_spacing), "dtype": spec.dtype, "chunks": list(chunks),
        "blocks": list(blocks), "body_bbox": body_bbox(decide.numpy(), body_level(spec.preset)), "signature": signature,
        "foreground_share": foreground_share(decide, spec.subvolume, spec.threshold),
        "foreground_threshold": spec.threshold, "subvolume_size": spec.subvolume,
    }
    outputs = [("image", arr, chunks, blocks)]
    if ref is not None:
        outputs.append(("reference", ref.numpy().astype(DTYPES[spec.dtype]), chunks, blocks))
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
            with atomic_path(final, fsync=True, suffix=".partial") as tmp:
                blosc2.asarray(np.ascontiguousarray(a), urlpath=str(tmp), chunks=ch, blocks=bl, cparams=cparams,
                               mode="w")
            rel = final.relative_to(spec.root).as_posix()
            size = final.stat().st_size
            if kind == "image":
                record["bytes"] = size
            else:
                record[kind], record[f"{kind}_bytes"] = rel, size
        spec.path("record", vid).parent.mkdir(parents=True, exist_ok=True)
        write_text(spec.path("record", vid), json.dumps(record, indent=1), fsync=True)
        spec.path("failed", vid).unlink(missing_ok=True)
        line = {"source": record["source"], "host": socket.gethostname(), "pid": os.getpid(), "rank": rank,
                "seconds": round(time.perf_counter() - t0, 3), "time": time.time()}
        with open(spec.root / "builds.log", "a") as fh:  # one short O_APPEND write per line
            fh.write(json.dumps(line) + "\n")
    except Exception as exc:  # noqa: BLE001 - ENOSPC, EDQUOT, EACCES, blosc2's own write errors
        raise write_error(spec.root, exc, sum(a.nbytes for _, a, _, _ in outputs)) from exc
    return record


def write_error(root: Path, exc: BaseException, needed: int) -> StoreWriteError:
    """One line for a failed store write: a full disk or quota says so, with the free space found.

    blosc2 reports a full disk as "Error while creating the NDArray" without its errno, so the free space on the
    store's filesystem is measured here: less than the volume's uncompressed size counts as full.
    """
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else (str(exc).splitlines() or [""])[0]
    errno_ = getattr(exc, "errno", None)
    try:
        free = shutil.disk_usage(root if root.exists() else root.parent).free
    except OSError:
        free = None
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    if errno_ == errno.EDQUOT:
        return StoreWriteError(f"{root}: cannot write the store: disk quota exceeded ({reason}; "
                               f"{mb(free) if free is not None else 'unknown'} free on its filesystem)")
    if errno_ == errno.ENOSPC or (free is not None and free < needed):
        return StoreWriteError(f"{root}: cannot write the store: no space left ({mb(free) if free is not None else '?'}"
                               f" free on its filesystem, a volume needs up to {mb(needed)}; {type(exc).__name__}: "
                               f"{reason})")
    return StoreWriteError(f"{root}: cannot write the store ({type(exc).__name__}: {reason})")


def record_failure(spec: StoreSpec, item: dict, error: str) -> None:
    p = spec.path("failed", volume_id(item))
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        sig = full_signature(item)
    except OSError:
        sig = None
    write_text(p, json.dumps({"source": source_text(item), "error": error, "signature": sig}), fsync=True)


def write_manifest(spec: StoreSpec) -> dict:
    """Merge every record and failure into manifest.json (under a lock: shards on other nodes merge too)."""
    spec.root.mkdir(parents=True, exist_ok=True)
    with locked(spec.root / ".manifest.lock"):
        volumes, failed = [], []
        for folder, out in (("records", volumes), ("failed", failed)):
            for p in sorted((spec.root / folder).glob("*.json")):
                try:
                    entry = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # being replaced right now; the next merge reads it
                if folder == "failed" and not all(Path(s).exists() for s in as_list(entry.get("source"))):
                    p.unlink(missing_ok=True)  # its file was deleted: nothing left to retry or report
                    continue
                out.append(entry)
        key = {**StoreSpec.key(spec.preset, spec.dtype), "spacing": list(spec.preset.array_spacing),
               "window": _window(spec.preset)}
        manifest = {"key": key, "volumes": volumes, "failed": failed}
        write_text(spec.root / "manifest.json", json.dumps(manifest, indent=1), fsync=True)
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
    with locked(spec.root / "locks" / f"{volume_id(item)}.lock", blocking=False) as mine:
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
    d = cfg.data
    k, n = shard
    if not (n >= 1 and 0 <= k < n):
        raise SubforeError(f"--shard {k}/{n}: K must be 0 … N−1 (SLURM: --shard $SLURM_ARRAY_TASK_ID/N with "
                           f"--array=0-{max(n, 1) - 1})")
    ensure_phantoms(cfg.data.phantoms)
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
    ctx.set_forkserver_preload(["subfore._quiet", __name__])
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
    from ...progress import bar

    return bar(total, desc, enabled, unit="vol")


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
