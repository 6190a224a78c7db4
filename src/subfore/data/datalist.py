"""Datalists — lists of ``{"image": path(s), "label"?: path}`` — from the layouts users already have.

Accepted sources: a decathlon-style ``dataset.json``; an nnU-Net raw dataset folder (v1 or v2);
a folder of images (NIfTI, NRRD, or DICOM series as sub-folders); a folder holding one DICOM
series; a glob pattern; a single image file.
"""

from __future__ import annotations

import glob as _glob
import json
from pathlib import Path

from ..errors import DataError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SPLIT_KEYS = ("training", "validation", "test")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def is_dicom_dir(path: Path) -> bool:
    """A folder that directly holds DICOM files (by suffix or the DICM magic at byte 128)."""
    if not path.is_dir():
        return False
    for f in sorted(path.iterdir())[:20]:
        if f.is_file():
            if f.suffix.lower() == ".dcm":
                return True
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _from_decathlon(json_path: Path, split: str) -> list[dict]:
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(json_path, f"not a readable JSON file ({exc})") from None
    if not isinstance(meta, dict):
        raise DataError(json_path, "expected a JSON object with 'training'/'validation'/'test' lists")
    if split not in meta:
        have = [k for k in SPLIT_KEYS if k in meta]
        raise DataError(json_path, f"has no '{split}' list (it has: {', '.join(have) or 'none'})")
    entries = meta[split]
    if not isinstance(entries, list):
        raise DataError(json_path, f"'{split}' must be a list")
    base = json_path.parent
    items = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(json_path, f"entry {i} of '{split}' has no 'image'")
        item = dict(entry)
        item["image"] = _resolve(base, entry["image"])
        if entry.get("label") is not None:
            item["label"] = _resolve(base, entry["label"])
        else:
            item.pop("label", None)
        items.append(item)
    return items


def _resolve(base: Path, value: str | list[str]) -> str | list[str]:
    if isinstance(value, list):
        return [_resolve(base, v) for v in value]  # type: ignore[misc]
    p = Path(value)
    p = p if p.is_absolute() else (base / p)
    if not p.exists():
        # nnU-Net v1's dataset.json names "case.nii.gz" for files stored as "case_0000.nii.gz".
        for suffix in IMAGE_SUFFIXES:
            if p.name.endswith(suffix):
                alt = p.with_name(p.name[: -len(suffix)] + "_0000" + suffix)
                if alt.exists():
                    return str(alt.resolve())
    return str(p.resolve()) if p.exists() else str(p)


def _from_nnunet(folder: Path, split: str) -> list[dict]:
    if split == "validation":
        # nnU-Net keeps validation in its own splits file; a raw folder has no separate split.
        raise DataError(folder, "an nnU-Net raw folder has no 'validation' split; give a decathlon dataset.json")
    images_dir = folder / ("imagesTr" if split != "test" else "imagesTs")
    labels_dir = folder / "labelsTr"
    meta = {}
    if (folder / "dataset.json").exists():
        try:
            meta = json.loads((folder / "dataset.json").read_text())
        except json.JSONDecodeError as exc:
            raise DataError(folder / "dataset.json", f"not valid JSON ({exc})") from None
    ending = meta.get("file_ending", ".nii.gz")
    n_channels = len(meta.get("channel_names", meta.get("modality", {"0": "CT"})))
    files = sorted(images_dir.glob(f"*_0000{ending}"))
    if not files:
        raise DataError(images_dir, f"no nnU-Net images '*_0000{ending}' found")
    items = []
    for f in files:
        case = f.name[: -len(f"_0000{ending}")]
        chans = [images_dir / f"{case}_{c:04d}{ending}" for c in range(n_channels)]
        item: dict = {"image": str(chans[0]) if n_channels == 1 else [str(c) for c in chans]}
        label = labels_dir / f"{case}{ending}"
        if split != "test" and label.exists():
            item["label"] = str(label)
        items.append(item)
    return items


def _from_folder(folder: Path) -> list[dict]:
    items = [{"image": str(p)} for p in sorted(folder.iterdir()) if is_image_file(p)]
    items += [{"image": str(p)} for p in sorted(folder.iterdir()) if is_dicom_dir(p)]
    return items


def load_datalist(source: str | Path, split: str = "training", check_files: bool = True) -> list[dict]:
    """Read a datalist from a dataset.json, an nnU-Net raw folder, a folder, a glob or one image.

    Paths come back absolute. Raises DataError naming the source when it holds no image, and
    (with ``check_files``) naming the first listed file that does not exist.
    """
    src = Path(source).expanduser()
    if split not in SPLIT_KEYS:
        raise DataError(src, f"unknown split {split!r}; choose one of {', '.join(SPLIT_KEYS)}")
    if any(ch in str(source) for ch in "*?[") and not src.exists():
        items = [{"image": str(Path(p).resolve())} for p in sorted(_glob.glob(str(src), recursive=True))]
        if not items:
            raise DataError(source, "the glob pattern matches no file")
        return items
    if not src.exists():
        raise DataError(src, "no such file or folder")
    if src.is_file() and src.suffix.lower() == ".json":
        items = _from_decathlon(src, split)
    elif src.is_file():
        if not is_image_file(src):
            raise DataError(src, f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)} or a DICOM folder)")
        items = [{"image": str(src.resolve())}]
    elif (src / "imagesTr").is_dir():
        items = _from_nnunet(src, split)
    elif (src / "dataset.json").is_file():
        items = _from_decathlon(src / "dataset.json", split)
    elif is_dicom_dir(src):
        items = [{"image": str(src.resolve())}]
    else:
        items = _from_folder(src)
    if not items:
        raise DataError(src, f"no image found for split '{split}'")
    if check_files:
        for item in items:
            for key in ("image", "label"):
                for p in as_list(item.get(key)):
                    if not Path(p).exists():
                        raise DataError(p, f"listed in {src} but does not exist")
    return items


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def first_source(sources: str | Path | list) -> str:
    """The first of one or more datalist sources, for messages."""
    return str(sources[0] if isinstance(sources, (list, tuple)) else sources)


def load_datalists(sources: str | Path | list, split: str = "training") -> list[dict]:
    """Concatenate the datalists of one or more sources (e.g. BTCV + TCIA Covid19 + LUNA16)."""
    sources = sources if isinstance(sources, (list, tuple)) else [sources]
    items: list[dict] = []
    for s in sources:
        items += load_datalist(s, split)
    return items


def case_id(item: dict) -> str:
    """A short name for a datalist entry (file name without suffix, or folder name)."""
    image = as_list(item["image"])[0]
    name = _case_name(Path(image))
    return name[:-5] if name.endswith("_0000") else name
