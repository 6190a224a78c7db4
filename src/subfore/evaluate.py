"""Scoring: per-class Dice, NSD (and HD95) of a finetuned checkpoint or of any tool's label files, each prediction
compared with its ground truth in physical space on the label's own grid; the evaluate report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric
from monai.transforms import Invertd, LoadImage, ResampleToMatch

from .data.brats import convention_of, named_labels
from .data.datalist import IMAGE_SUFFIXES, as_list, case_id, load_datalists
from .data.dataset import check_labels, load_item
from .data.transforms import RemapLabels, eval_transforms, label_checks, label_problem
from .errors import DataError, SubforeError, root_message
from .inference import check_window, load_finetuned, predict, predict_volume, restore_labels, run_precision
from .io import check_output, write_json
from .progress import track
from .report import ABSENT_RULE, plot_bars, write_table

HD95_RULE = ("HD95 of a class the prediction misses, or predicts where the ground truth has none, is the image "
             "diagonal in mm (the BraTS evaluation's rule); absent from both: excluded (null)")
GRIDS = ("label", "resampled")
# Two grids are one when their voxel centres agree this closely: NIfTI stores its affine in float32 (≈1e-5 mm at
# 200 mm from the origin), so exact equality would resample copies of the same grid for nothing.
ORIGIN_TOL_MM = 1e-3
AXIS_TOL = 1e-4  # relative to the largest spacing, on the affine's 3×3 (direction × spacing)

__all__ = ["ABSENT_RULE", "GRIDS", "HD95_RULE", "case_metrics", "evaluate", "evaluate_predictions", "find_prediction",
           "grids_agree", "on_label_grid", "predict"]  # predict: its former home


def case_metrics(pred: torch.Tensor, label: torch.Tensor, n_classes: int, spacing: Sequence[float],
                 tolerance_mm: float = 2.0, hd95: bool = False, regions: bool = False) -> dict[str, list]:
    """Dice, NSD (and HD95) per foreground class for one case; NaN where the class is absent from the label.

    pred, label: (1, 1, D, H, W) integer labels, or (1, K, D, H, W) binary regions with ``regions``.
    spacing: voxel size in mm (NSD tolerance and HD95 are in mm). Returns lists over classes 1…K-1 (or all regions).
    HD95 follows :data:`HD95_RULE`: the image diagonal in mm when exactly one of prediction and label has the class.

    Memory is bounded by a few boolean copies of the volume, whatever K: each class is scored from its own masks,
    its surface distances on the bounding box of prediction ∪ label (padded: the surfaces are MONAI's, unchanged).
    """
    pred = pred.as_tensor() if hasattr(pred, "as_tensor") else torch.as_tensor(pred)
    label = (label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)).to(pred.device)
    classes = range(pred.shape[1]) if regions else range(1, n_classes)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape[2:], spacing)))
    # Padding of the crop: one voxel keeps MONAI's edges (the erosion sees background around the masks) and the
    # tolerance in voxels keeps each surface's distances whole; MONAI crops to the masks itself within it.
    pad = [1 + math.ceil(tolerance_mm / s) for s in spacing]
    nsd_metric = SurfaceDiceMetric([tolerance_mm], include_background=True, reduction="none")
    hd_metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    out: dict[str, list] = {"dice": [], "nsd": []} | ({"hd95": []} if hd95 else {})
    nan = float("nan")
    if not regions:  # voxel counts of every class in three passes (a bool .sum() per class is ~10× slower)
        pred, label = compact(pred, n_classes), compact(label, n_classes)
        fp, fy = pred.flatten(), label.flatten()
        n_pred, n_true = (torch.bincount(f, minlength=n_classes).tolist() for f in (fp, fy))
        n_inter = torch.bincount(fy[fp == fy], minlength=n_classes).tolist()
        del fp, fy
        slices = [_presence(pred[0, 0], n_classes, a) | _presence(label[0, 0], n_classes, a) for a in range(3)]
    for c in classes:
        if regions:
            p, y = pred[0, c].bool(), label[0, c].bool()
            n_p, n_y, inter = int(p.count_nonzero()), int(y.count_nonzero()), int((p & y).count_nonzero())
        else:
            n_p, n_y, inter = n_pred[c], n_true[c], n_inter[c]
        out["dice"].append(2.0 * inter / (n_p + n_y) if n_y else nan)  # MONAI's compute_dice, ignore_empty
        if n_p and n_y:
            if regions:
                box = _box([(p | y).any(dim=[b for b in range(3) if b != a]) for a in range(3)], pad)
                pc, yc = p[box], y[box]
            else:  # the class's own masks on its box only
                box = _box([present[:, c] for present in slices], pad)
                pc, yc = pred[0, 0][box] == c, label[0, 0][box] == c
            pc, yc = pc[None, None].float(), yc[None, None].float()
            out["nsd"].append(float(nsd_metric(pc, yc, spacing=list(spacing))[0, 0]))
            if hd95:
                out["hd95"].append(float(hd_metric(pc, yc, spacing=list(spacing))[0, 0]))
        else:  # no surface to compare: NSD 0 for a missed or spurious class (MONAI's), HD95 the diagonal
            out["nsd"].append(0.0 if n_y else nan)
            if hd95:
                out["hd95"].append(diagonal if n_p or n_y else nan)
    return out


def _presence(labels: torch.Tensor, n_classes: int, axis: int) -> torch.Tensor:
    """(slices along ``axis``, n_classes) bool: which ids occur in each slice of a (D, H, W) label map."""
    return torch.stack([torch.bincount(labels.select(axis, i).flatten(), minlength=n_classes)[:n_classes] > 0
                        for i in range(labels.shape[axis])])


def _box(hits: Sequence[torch.Tensor], pad: Sequence[int]) -> tuple[slice, ...]:
    """The bounding box of a mask from its per-axis occupancy (one bool per slice), widened by ``pad`` voxels."""
    box = []
    for hit, extra in zip(hits, pad):
        where = hit.nonzero()
        box.append(slice(max(int(where[0]) - extra, 0), min(int(where[-1]) + 1 + extra, len(hit))))
    return tuple(box)


def _clean(v: float) -> float | None:
    return None if v is None or math.isnan(v) or math.isinf(v) else round(float(v), 6)


def _nanmean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v) and not math.isinf(v)]
    return round(sum(vals) / len(vals), 6) if vals else None


# --- physical space -----------------------------------------------------------------------------------------
def _affine(t: torch.Tensor) -> np.ndarray:
    return np.asarray(t.affine if isinstance(t, MetaTensor) else torch.eye(4), dtype=np.float64)


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(0))


def grids_agree(a: np.ndarray, a_shape: Sequence[int], b: np.ndarray, b_shape: Sequence[int]) -> bool:
    """Whether two grids (4×4 voxel → mm affines, spatial shapes) place every voxel centre at the same point."""
    if tuple(a_shape) != tuple(b_shape):
        return False
    axes_tol = AXIS_TOL * float(_spacing(b).max())
    return bool(np.abs(a[:3, :3] - b[:3, :3]).max() <= axes_tol and np.abs(a[:3, 3] - b[:3, 3]).max() <= ORIGIN_TOL_MM)


def _uncovered_mm(pred: np.ndarray, pred_shape: Sequence[int], label: np.ndarray, label_shape: Sequence[int]) -> float:
    """How far (mm) the label's voxel centres reach outside the prediction's voxels (0 when all lie inside)."""
    # The grids are affine images of boxes, so the label's 8 corner voxel centres bound all of them.
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in label_shape], indexing="ij")).reshape(3, -1)
    idx = (np.linalg.inv(pred) @ label @ np.vstack([corners, np.ones(corners.shape[1])]))[:3]
    upper = np.asarray(pred_shape, dtype=np.float64)[:, None] - 0.5
    over = np.maximum(np.maximum(-0.5 - idx, idx - upper), 0.0) * _spacing(pred)[:, None]
    return float(np.sqrt((over ** 2).sum(0)).max())


def _differences(pred: np.ndarray, pred_shape: Sequence[int], label: np.ndarray, label_shape: Sequence[int]) -> str:
    """What differs between a prediction's grid and a label's, in words (mm, RAS)."""
    fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
    parts = []
    codes = "".join(nib.aff2axcodes(pred)), "".join(nib.aff2axcodes(label))
    if codes[0] != codes[1]:
        parts.append(f"orientation {codes[0]} vs {codes[1]}")
    sp, sl = _spacing(pred), _spacing(label)
    if not np.allclose(sp, sl, rtol=AXIS_TOL, atol=0):
        parts.append(f"spacing {fmt(sp)} vs {fmt(sl)} mm")
    shift = pred[:3, 3] - label[:3, 3]
    if np.abs(shift).max() > ORIGIN_TOL_MM:
        parts.append(f"origin differs by {fmt(np.round(shift, 3) + 0.0)} mm")
    if tuple(pred_shape) != tuple(label_shape):
        parts.append(f"shape {tuple(pred_shape)} vs {tuple(label_shape)}")
    return ", ".join(parts) or "directions differ"


def on_label_grid(pred: MetaTensor, label: MetaTensor, pred_file: str | Path,
                  label_file: str | Path) -> tuple[MetaTensor, bool]:
    """``pred`` (C, X, Y, Z) on ``label``'s grid (C', X', Y', Z'), and whether it had to be resampled.

    Grids that agree (:func:`grids_agree`) are returned as they are; otherwise the prediction is resampled by the
    two affines with nearest neighbour (an axis flip or permutation maps voxel for voxel). Raises DataError naming
    both files when some label voxel centre lies outside the prediction's voxels (another field of view).
    """
    pa, la = _affine(pred), _affine(label)
    p_shape, l_shape = tuple(pred.shape[1:]), tuple(label.shape[1:])
    if grids_agree(pa, p_shape, la, l_shape):
        return pred, False
    outside = _uncovered_mm(pa, p_shape, la, l_shape)
    if outside > ORIGIN_TOL_MM:
        raise DataError(pred_file, f"does not cover the field of view of {label_file} "
                                   f"({_differences(pa, p_shape, la, l_shape)}; label voxels lie up to "
                                   f"{outside:.1f} mm outside it), so it cannot be resampled onto the label's grid")
    # "border": a label centre within half a voxel of the prediction's edge takes the edge voxel (still nearest).
    out = ResampleToMatch(mode="nearest", padding_mode="border")(pred.float(), label)
    if not grids_agree(_affine(out), out.shape[1:], la, l_shape):
        raise RuntimeError(f"{pred_file}: resampling left it off the grid of {label_file}; not scoring it")
    return out, True


# --- the report ---------------------------------------------------------------------------------------------
def _case_entry(item: dict, scored: Sequence[str], metrics: dict[str, list], spacing: Sequence[float],
                **extra) -> dict:
    return {"case": case_id(item), "image": str(item["image"]), **extra,
            "spacing_mm": [round(float(v), 4) for v in spacing],
            **{k: {c: _clean(v) for c, v in zip(scored, vals)} for k, vals in metrics.items()}}


def _report(head: dict, scored: Sequence[str], cases: list[dict], hd95: bool, out: str | Path) -> dict:
    """Means per class and overall next to the cases; metrics.json, metrics.md and metrics.png written."""
    metric_names = ["dice", "nsd"] + (["hd95"] if hd95 else [])
    mean = {k: {c: _nanmean([case[k][c] for case in cases]) for c in scored} for k in metric_names}
    for k in metric_names:
        mean[f"mean_{k}"] = _nanmean(list(mean[k].values()))
    result = {**head, "absent_class_rule": ABSENT_RULE, **({"hd95_rule": HD95_RULE} if hd95 else {}),
              "cases": cases, "mean": mean}
    out = write_json(out, result)
    write_table([result], out.with_suffix(".md"))
    plot_bars([result], out.with_suffix(".png"))
    return result


def evaluate(
    checkpoint: str | Path,
    data: str | Path | list,
    out: str | Path,
    split: str = "validation",
    tolerance_mm: float = 2.0,
    hd95: bool = False,
    roi: Sequence[int] | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "auto",
    method: str | None = None,
    label_map: dict[int, int] | None = None,
    grid: str = "label",
    progress: bool = True,
) -> dict:
    """Score a finetuned checkpoint on a labelled datalist; write metrics.json, a Markdown table and a bar chart.

    label_map: ``{src: dst}`` for this test set's labels (e.g. TotalSegmentator → BTCV), replacing the
    checkpoint's own ``data.label_map``. grid: ``label`` scores on each ground truth's own grid (predictions are
    inverted onto the image's grid, as nnU-Net evaluates, then resampled by nearest neighbour onto the label's
    where the two files' affines differ); ``resampled`` scores on the training spacing (faster, approximate).
    Every label is read and checked before any inference. progress: a bar and a line per case on stderr.
    """
    if grid not in GRIDS:
        raise SubforeError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    check_output(out)
    cfg, net = load_finetuned(checkpoint, device)
    roi = check_window(cfg, roi)
    precision = run_precision(cfg, precision, device)
    if label_map is not None:
        cfg.data.label_map = {int(k): int(v) for k, v in label_map.items()}
    items = load_datalists(data, split)
    unlabeled = [i["image"] for i in items if "label" not in i]
    if unlabeled:
        raise DataError(unlabeled[0], f"has no label in split '{split}': evaluate needs labels")
    preset = cfg.data.preset_obj()
    if cfg.data.regions == "brats":  # this data's own label ids decide its regions; else the training data's
        found = convention_of(data if isinstance(data, list) else [str(data)])
        cfg.data.brats_labels = found[0] if found else cfg.data.brats_labels
    # On the label's grid the label is read untouched, not through the image's chain (whose shape check would refuse
    # a label stored transposed).
    transform = eval_transforms(cfg, preset, with_label=grid == "resampled")
    d = cfg.data
    raw_label = label_checks(d.label_map, d.regions, d.brats_labels, cfg.model.out_channels)
    check_labels(items, raw_label)  # a bad label stops the command now, not after the inference before it
    if grid == "label":
        invert = Invertd("pred", transform=transform, orig_keys="image", nearest_interp=True, to_tensor=True)
    names = cfg.class_names()
    scored = names if cfg.sigmoid else names[1:]
    cases = []
    for item in track(items, "evaluate", case_id, progress):
        d = load_item(transform, item)
        image = torch.as_tensor(d["image"])[None].float()
        pred = predict_volume(net, image, roi, overlap if overlap is not None else cfg.finetune.sw_overlap,
                              sw_batch_size or cfg.finetune.sw_batch_size, cfg.sigmoid, precision).cpu()
        if grid == "resampled":
            label, resampled = torch.as_tensor(d["label"])[None], False
            spacing = preset.array_spacing  # the preprocessed array's axes (nnU-Net's order under its preset)
        else:
            # The prediction goes back through the image's recorded orientation and resampling onto the image's
            # grid; the label is read untouched, so every voxel of the ground truth is scored once, at its own size.
            # A label file stored on another grid than its image (flipped, permuted, other spacing) is reached
            # through the two affines, never by comparing arrays index for index.
            img = d["image"]
            on_image = restore_labels(pred[0], img, preset.axes)
            if on_image is None:
                d["pred"] = MetaTensor(pred[0].float(), meta=img.meta, applied_operations=img.applied_operations)
                on_image = invert(d)["pred"]
            own = load_item(raw_label, {"label": item["label"]})["label"]
            on_image, resampled = on_label_grid(on_image, own, as_list(item["image"])[0], item["label"])
            pred = compact(on_image, cfg.model.out_channels)[None]
            label = compact(own, cfg.model.out_channels)[None]
            spacing = tuple(float(v) for v in _spacing(_affine(own)))
        m = case_metrics(pred, label, cfg.model.out_channels, spacing, tolerance_mm, hd95, cfg.sigmoid)
        cases.append(_case_entry(item, scored, m, spacing, resampled=resampled))
    head = {"checkpoint": str(checkpoint), "method": method or Path(cfg.run_dir).name, "split": split,
            "classes": scored, "nsd_tolerance_mm": tolerance_mm, "grid": grid,
            "spacing_mm": list(preset.array_spacing) if grid == "resampled" else "each label's own"}
    return _report(head, scored, cases, hd95, out)


# --- any tool's label files ---------------------------------------------------------------------------------
def _stem(name: str) -> str | None:
    """A label file's name without its image suffix; None for a file MONAI would not read as an image."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def find_prediction(folder: str | Path, case: str) -> Path:
    """The one label file for ``case`` in ``folder``: ``CASE`` or ``CASE_seg`` with any suffix MONAI reads.

    Raises DataError naming the case and the folder when there is none or more than one.
    """
    folder = Path(folder)
    found = sorted(p for p in folder.iterdir() if p.is_file() and _stem(p.name) in (case, f"{case}_seg"))
    if not found:
        raise DataError(folder, f"holds no prediction for case {case!r} (looked for {case}.nii.gz, "
                                f"{case}_seg.nii.gz and the other suffixes {', '.join(IMAGE_SUFFIXES[1:])})")
    if len(found) > 1:
        raise DataError(folder, f"holds {len(found)} predictions for case {case!r} "
                                f"({', '.join(p.name for p in found)}); keep one")
    return found[0]


def _dataset_names(data: str | Path | list) -> dict[int, str]:
    """{id: name} from the datalist sources' dataset.json ``labels`` ({} when none names them)."""
    found: dict[int, str] = {}
    where = None
    for path, names in named_labels([str(s) for s in as_list(data)]):
        if names and found and names != found:
            raise DataError(path, f"names other labels than {where}; score one dataset at a time")
        if names:
            found, where = names, path
    return found


def _classes(names: dict[int, str], label_map: dict[int, int] | None) -> tuple[int | None, dict[int, str]]:
    """The number of classes the ground truth declares (None: read from the files) and a name per class id."""
    if label_map:
        merged: dict[int, list[str]] = {}
        for src, dst in sorted(label_map.items()):
            if dst and src in names:
                merged.setdefault(dst, []).append(names[src])
        return max(label_map.values()) + 1, {d: "+".join(n) for d, n in merged.items()}
    named = [i for i in names if i > 0]
    return (max(named) + 1 if named else None), names


def _read_labels(loader: LoadImage, path: str | Path, mapping: dict[int, int] | None) -> MetaTensor:
    """A label file as (1, X, Y, Z) ids in the file's dtype (through ``{src: dst}`` where given), its affine in RAS
    mm; a file that cannot be read, is not one 3D map or holds no label ids raises DataError naming it."""
    try:
        t = loader(str(path))
    except Exception as exc:  # noqa: BLE001 - readers fail in many types (EOFError, ImageFileError, ...)
        raise DataError(path, f"cannot be read as a label map ({root_message(exc)})") from None
    if t.ndim != 4:
        raise DataError(path, f"expected a 3D label map, got a {t.ndim - 1}D image of shape {tuple(t.shape[1:])}")
    if t.shape[0] != 1:
        raise DataError(path, f"has {t.shape[0]} channels or volumes of shape {tuple(t.shape[1:])}; expected one 3D "
                              f"label map")
    problem = label_problem(t)
    if problem:
        raise DataError(path, problem)
    ids = _label_ids(t.as_tensor())
    if mapping:
        t = RemapLabels(mapping)(t)
        ids = _label_ids(t.as_tensor())
    t.meta["label_ids"] = ids  # read once: the class checks below need no second pass
    return t


def _label_ids(t: torch.Tensor) -> list[int]:
    """The ids present in a label array that :func:`label_problem` accepted, without a sorted copy of an integer
    volume."""
    if not t.is_floating_point() and t.dtype != torch.bool:
        return torch.bincount(t.flatten()).nonzero().flatten().tolist()  # counts per id: no int64 copy
    return [int(v) for v in torch.unique(t)]


def compact(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer label ids in the smallest dtype that holds ``n_classes`` (uint8 up to 256): a 512²×300 case is 79 MB."""
    dtype = torch.uint8 if n_classes <= 256 else torch.int16 if n_classes <= 32768 else torch.int32
    labels = labels.as_tensor() if hasattr(labels, "as_tensor") else torch.as_tensor(labels)
    return labels.round().to(dtype) if labels.is_floating_point() else labels.to(dtype)


def evaluate_predictions(
    predictions: str | Path,
    data: str | Path | list,
    out: str | Path,
    split: str = "validation",
    tolerance_mm: float = 2.0,
    hd95: bool = False,
    method: str | None = None,
    label_map: dict[int, int] | None = None,
    prediction_label_map: dict[int, int] | None = None,
    progress: bool = True,
) -> dict:
    """Score label files written by any tool (nnU-Net, TotalSegmentator, ``subfore predict``) on a labelled datalist.

    predictions: a folder of ``CASE.nii.gz`` or ``CASE_seg.nii.gz`` (or .nii, .nrrd, .mha, …), matched to the
    datalist's cases by name. label_map / prediction_label_map: ``{src: dst}`` for the ground truth / for the
    predictions (unlisted ids → background). The classes are the dataset.json ``labels`` (through ``label_map``),
    or ids 1…max over all files. Each prediction is compared on its label's grid (:func:`on_label_grid`); the
    rules and outputs are those of :func:`evaluate`.
    """
    folder = Path(predictions)
    if not folder.is_dir():
        raise DataError(folder, "no such folder of predictions")
    check_output(out)
    label_map = {int(k): int(v) for k, v in label_map.items()} if label_map else None
    prediction_label_map = {int(k): int(v) for k, v in prediction_label_map.items()} if prediction_label_map else None
    items = load_datalists(data, split)
    unlabeled = [i["image"] for i in items if "label" not in i]
    if unlabeled:
        raise DataError(unlabeled[0], f"has no label in split '{split}': evaluate needs labels")
    ids = [case_id(i) for i in items]
    twice = sorted({c for c in ids if ids.count(c) > 1})
    if twice:
        raise DataError(folder, f"the datalist names case {twice[0]!r} more than once; predictions are matched by name")
    files = [find_prediction(folder, c) for c in ids]  # every case found before any is scored
    declared, names = _classes(_dataset_names(data), label_map)
    # The file's own dtype: uint8 labels stay 1 byte per voxel (float32 would take four, nibabel's float64 eight).
    load = LoadImage(image_only=True, ensure_channel_first=True, dtype=None)
    scores, top = [], 0
    for item, file in track(list(zip(items, files)), "evaluate", lambda pair: case_id(pair[0]), progress):
        label = _read_labels(load, item["label"], label_map)
        pred = _read_labels(load, file, prediction_label_map)
        for t, path, option in ((label, item["label"], "--label-map"), (pred, file, "--prediction-label-map")):
            beyond = [v for v in t.meta["label_ids"] if declared is not None and v >= declared]
            if beyond:
                raise DataError(path, f"label ids {beyond[:8]} are not among the dataset's classes 0…{declared - 1} "
                                      f"(dataset.json labels or --label-map); map them with {option}")
        n = max(2, max(pred.meta["label_ids"] + label.meta["label_ids"]) + 1)
        pred, resampled = on_label_grid(pred, label, file, item["label"])
        spacing = tuple(float(v) for v in _spacing(_affine(label)))
        p, y = compact(pred, n)[None], compact(label, n)[None]
        del pred, label
        scores.append((item, file, resampled, spacing, case_metrics(p, y, n, spacing, tolerance_mm, hd95)))
        top = max(top, n)
    n_classes = declared or top
    scored = [names.get(i, f"class_{i}") for i in range(1, n_classes)]
    cases = []
    for item, file, resampled, spacing, m in scores:
        # A class above a case's own highest id is in neither file: every metric of it is null (the absent rule).
        padded = {k: v + [float("nan")] * (n_classes - 1 - len(v)) for k, v in m.items()}
        cases.append(_case_entry(item, scored, padded, spacing, prediction=str(file.resolve()), resampled=resampled))
    head = {"checkpoint": None, "predictions": str(folder), "method": method or folder.resolve().name,
            "split": split, "classes": scored, "nsd_tolerance_mm": tolerance_mm, "grid": "label",
            "spacing_mm": "each label's own"}
    return _report(head, scored, cases, hd95, out)
