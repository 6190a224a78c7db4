"""Scoring and inference: per-class Dice, NSD (and HD95), the evaluate report, and predict on the input's grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.metrics import HausdorffDistanceMetric, SurfaceDiceMetric
from monai.transforms import Compose, Invertd, LoadImaged

from .data.brats import convention_of
from .data.datalist import case_id, load_datalists
from .data.dataset import load_item
from .data.transforms import eval_transforms, label_transforms
from .errors import DataError, SubforeError
from .inference import load_finetuned, predict, predict_volume
from .io import write_json
from .report import ABSENT_RULE, dice_per_class, plot_bars, write_table

HD95_RULE = ("HD95 of a class the prediction misses, or predicts where the ground truth has none, is the image "
             "diagonal in mm (the BraTS evaluation's rule); absent from both: excluded (null)")
GRIDS = ("label", "resampled")

__all__ = ["ABSENT_RULE", "GRIDS", "HD95_RULE", "case_metrics", "evaluate", "predict"]  # predict: its former home


def case_metrics(pred: torch.Tensor, label: torch.Tensor, n_classes: int, spacing: Sequence[float],
                 tolerance_mm: float = 2.0, hd95: bool = False, regions: bool = False) -> dict[str, list]:
    """Dice, NSD (and HD95) per foreground class for one case; NaN where the class is absent from the label.

    pred, label: (1, 1, D, H, W) integer labels, or (1, K, D, H, W) binary regions with ``regions``.
    spacing: voxel size in mm (NSD tolerance and HD95 are in mm). Returns lists over classes 1…K-1 (or all regions).
    HD95 follows :data:`HD95_RULE`: the image diagonal in mm when exactly one of prediction and label has the class.
    """
    if regions:
        p, y = pred.float(), label.float()
    else:
        p = F.one_hot(pred[:, 0].long(), n_classes).permute(0, 4, 1, 2, 3).float()
        y = F.one_hot(label[:, 0].long(), n_classes).permute(0, 4, 1, 2, 3).float()
    bg = regions  # include_background for regions (every channel is a class)
    dice = dice_per_class(pred, label, n_classes, regions)[0]
    n = p.shape[1] - (0 if bg else 1)
    nsd = SurfaceDiceMetric([tolerance_mm] * n, include_background=bg, reduction="none")(p, y, spacing=list(spacing))[0]
    absent = y[0, (0 if bg else 1):].flatten(1).sum(1) == 0
    nsd = nsd.masked_fill(absent, float("nan"))
    out = {"dice": dice.tolist(), "nsd": nsd.tolist()}
    if hd95:
        hd = HausdorffDistanceMetric(include_background=bg, percentile=95, reduction="none")(p, y, spacing=list(spacing))[0]
        missing = p[0, (0 if bg else 1):].flatten(1).sum(1) == 0
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape[2:], spacing)))
        hd = torch.where(absent ^ missing, torch.full_like(hd, diagonal), hd)
        out["hd95"] = hd.masked_fill(absent & missing, float("nan")).tolist()
    return out


def _clean(v: float) -> float | None:
    return None if v is None or math.isnan(v) or math.isinf(v) else round(float(v), 6)


def _nanmean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v) and not math.isinf(v)]
    return round(sum(vals) / len(vals), 6) if vals else None


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
    precision: str = "32",
    method: str | None = None,
    label_map: dict[int, int] | None = None,
    grid: str = "label",
) -> dict:
    """Score a finetuned checkpoint on a labelled datalist; write metrics.json, a Markdown table and a bar chart.

    label_map: ``{src: dst}`` for this test set's labels (e.g. TotalSegmentator → BTCV), replacing the
    checkpoint's own ``data.label_map``. grid: ``label`` scores on each ground truth's own grid (predictions are
    inverted onto it, as nnU-Net evaluates); ``resampled`` scores on the training spacing (faster, approximate).
    """
    if grid not in GRIDS:
        raise SubforeError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    cfg, net = load_finetuned(checkpoint, device)
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
    transform = eval_transforms(cfg, preset)
    if grid == "label":
        invert = Invertd("pred", transform=transform, orig_keys="image", nearest_interp=True, to_tensor=True)
        d = cfg.data
        raw_label = Compose([LoadImaged("label", image_only=True, ensure_channel_first=True),
                             *label_transforms(d.label_map, d.regions, d.brats_labels, cfg.model.out_channels)])
    names = cfg.class_names()
    scored = names if cfg.sigmoid else names[1:]
    roi = roi or cfg.data.roi
    cases = []
    for item in items:
        d = load_item(transform, item)
        image, label = torch.as_tensor(d["image"])[None].float(), torch.as_tensor(d["label"])[None]
        pred = predict_volume(net, image, roi, overlap if overlap is not None else cfg.finetune.sw_overlap,
                              sw_batch_size or cfg.finetune.sw_batch_size, cfg.sigmoid, precision).cpu()
        spacing = preset.array_spacing  # the preprocessed array's axes (nnU-Net's order under its preset)
        if grid == "label":
            # The prediction goes back through the image's recorded orientation and resampling; the label is read
            # untouched, so every voxel of the ground truth is scored once, at its own size.
            img = d["image"]
            d["pred"] = MetaTensor(pred[0].float(), meta=img.meta, applied_operations=img.applied_operations)
            pred = torch.as_tensor(invert(d)["pred"])[None].round().to(torch.uint8 if cfg.sigmoid else torch.long)
            own = load_item(raw_label, {"label": item["label"]})["label"]
            label = torch.as_tensor(own)[None]
            spacing = tuple(float(v) for v in np.sqrt((np.asarray(own.affine)[:3, :3] ** 2).sum(0)))
            if pred.shape[2:] != label.shape[2:]:
                raise DataError(item["label"], f"label grid {tuple(label.shape[2:])} differs from its image's "
                                               f"{tuple(pred.shape[2:])}; score with --grid resampled")
        m = case_metrics(pred, label, cfg.model.out_channels, spacing, tolerance_mm, hd95, cfg.sigmoid)
        cases.append({"case": case_id(item), "image": str(item["image"]), "spacing_mm": [round(v, 4) for v in spacing],
                      **{k: {c: _clean(v) for c, v in zip(scored, vals)} for k, vals in m.items()}})
    metric_names = ["dice", "nsd"] + (["hd95"] if hd95 else [])
    mean = {k: {c: _nanmean([case[k][c] for case in cases]) for c in scored} for k in metric_names}
    for k in metric_names:
        mean[f"mean_{k}"] = _nanmean(list(mean[k].values()))
    result = {
        "checkpoint": str(checkpoint), "method": method or Path(cfg.run_dir).name, "split": split,
        "classes": scored, "nsd_tolerance_mm": tolerance_mm, "grid": grid,
        "spacing_mm": list(preset.array_spacing) if grid == "resampled" else "each label's own",
        "absent_class_rule": ABSENT_RULE, **({"hd95_rule": HD95_RULE} if hd95 else {}), "cases": cases, "mean": mean,
    }
    out = write_json(out, result)
    write_table([result], out.with_suffix(".md"))
    plot_bars([result], out.with_suffix(".png"))
    return result
