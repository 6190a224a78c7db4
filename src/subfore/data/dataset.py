"""Datasets that cache preprocessed volumes on disk and name the file when one fails to load."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from monai.data import Dataset, PersistentDataset
from torch.utils.data import Dataset as TorchDataset

from ..errors import DataError, SubforeError, root_message, source_name

log = logging.getLogger(__name__)


def cache_path(cache_dir: str | Path, *parts) -> Path:
    """A cache sub-folder keyed by everything deterministic that shapes the cached voxels."""
    blob = json.dumps([p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts], sort_keys=True)
    return Path(cache_dir) / hashlib.sha1(blob.encode()).hexdigest()[:16]


def named_error(exc: BaseException, item: dict) -> SubforeError:
    """The SubforeError inside ``exc``'s cause chain, or a DataError naming ``item``'s image and the root cause."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, SubforeError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, SubforeError):
        return cause
    key = "image" if "image" in item else "label"  # a label checked alone is named by itself
    return DataError(source_name(item, key), f"failed to load ({root_message(exc)})")


def load_item(transform: Callable, item: dict):
    """Apply ``transform`` to one datalist entry; any failure becomes a DataError naming the file."""
    try:
        return transform(item)
    except Exception as exc:  # noqa: BLE001 - decoding failures come in many types
        raise named_error(exc, item) from exc


def check_labels(items: Sequence[dict], checks: Callable) -> None:
    """Read and check every item's label (``checks``: :func:`~subfore.data.transforms.label_checks`) before any
    inference, so that a bad label stops the command at once, named, not after the cases before it ran."""
    for item in items:
        if "label" in item:
            load_item(checks, {"label": item["label"]})


class SafeDataset(TorchDataset):
    """Wrap a MONAI dataset: a failing item raises DataError(path, cause), or is skipped once with ``skip_bad``.

    A skipped item is logged once and replaced by the next loadable item, so the loader never stalls.
    """

    def __init__(self, inner: Dataset, skip_bad: bool = False) -> None:
        self.inner = inner
        self.skip_bad = skip_bad
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.inner)

    def draw(self, index: int, seed: int):
        """Item ``index`` with the random transforms seeded from ``seed`` (step-indexed training draws)."""
        self.inner.transform.set_random_state(seed=seed)
        return self[index]

    def __getitem__(self, index: int):
        n = len(self.inner)
        for attempt in range(n):
            i = (index + attempt) % n
            if i in self.bad:
                continue
            try:
                return self.inner[i]
            except Exception as exc:  # noqa: BLE001 - any decoding failure becomes a named DataError
                err = named_error(exc, self.inner.data[i])
                if not self.skip_bad:
                    raise err from exc
                self.bad.add(i)
                log.warning("skipping unreadable item (data.skip_bad=true): %s", err)
        raise DataError(None, f"every one of the {n} items failed to load; last: {err}")


def make_dataset(
    items: Sequence[dict],
    transform: Callable,
    cache_dir: str | Path | None = None,
    cache_key: Sequence = (),
    skip_bad: bool = False,
) -> SafeDataset:
    """A dataset over ``items``; with ``cache_dir`` its deterministic prefix is cached on disk (PersistentDataset).

    cache_key: objects (e.g. the Preset and ROI) whose change must invalidate the cache.
    """
    if cache_dir is None:
        inner: Dataset = Dataset(list(items), transform)
    else:
        path = cache_path(cache_dir, *cache_key)
        path.mkdir(parents=True, exist_ok=True)
        inner = PersistentDataset(list(items), transform, cache_dir=path)
    return SafeDataset(inner, skip_bad=skip_bad)
