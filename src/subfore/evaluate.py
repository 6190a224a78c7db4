"""Scoring and inference: per-class Dice, NSD (and HD95), the evaluate report, and predict on the input's grid."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from monai.transforms import Compose, Invertd, LoadImaged

from .data.brats import convention_of, from_regions
from .data.datalist import case_id, load_datalists
from .data.dataset import load_item
from .data.transforms import preprocess
from .errors import DataError, SubforeError
from .finetune import eval_transforms, label_transforms, load_finetuned, predict_volume

ABSENT_RULE = ("a class absent from a case's ground truth is excluded from that case's Dice and NSD and from their "
               "means (reported as null), not counted as 0 or 1")
HD95_RULE = ("HD95 of a class the prediction misses, or predicts where the ground truth has none, is the image "
             "diagonal in mm (the BraTS evaluation's rule); absent from both: excluded (null)")
GRIDS = ("label", "resampled")


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
    dice = DiceMetric(include_background=bg, reduction="none", ignore_empty=True)(p, y)[0]
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
        raw_label = Compose([LoadImaged("label", image_only=True, ensure_channel_first=True), *label_transforms(cfg)])
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    write_table([result], out.with_suffix(".md"))
    plot_bars([result], out.with_suffix(".png"))
    return result


def write_table(results: list[dict], path: Path, metric: str = "dice") -> str:
    """Methods × classes Markdown table of mean ``metric`` (%), best per column in bold, like the seeds' tables."""
    classes = results[0]["classes"]
    rows = [[r["mean"][metric].get(c) for c in classes] + [r["mean"][f"mean_{metric}"]] for r in results]
    best = [max((v for v in col if v is not None), default=None) for col in zip(*rows)]
    fmt = lambda v, b: "–" if v is None else (f"**{100 * v:.2f}**" if len(rows) > 1 and v == b else f"{100 * v:.2f}")  # noqa: E731
    lines = [f"| method | {' | '.join(classes)} | **AVG** |", "|" + "---|" * (len(classes) + 2)]
    for r, row in zip(results, rows):
        lines.append(f"| {r['method']} | " + " | ".join(fmt(v, b) for v, b in zip(row, best)) + " |")
    text = f"{metric.upper()} (%), {ABSENT_RULE}.\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot_bars(results: list[dict], path: Path) -> None:
    """Per-class mean Dice bars, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = results[0]["classes"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(classes) * len(results) + 2), 4))
    for i, r in enumerate(results):
        vals = [r["mean"]["dice"].get(c) or 0.0 for c in classes]
        ax.bar(np.arange(len(classes)) + i * width, vals, width, label=r["method"])
    ax.set_xticks(np.arange(len(classes)) + 0.4 - width / 2, classes, rotation=45, ha="right")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    roi: Sequence[int] | None = None,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    device: str = "cpu",
    precision: str = "32",
) -> list[Path]:
    """Write one label NIfTI per input on the input's own grid (shape, affine, orientation) plus an overlay PNG."""
    cfg, net = load_finetuned(checkpoint, device)
    preset = cfg.data.preset_obj()
    pre = Compose(preprocess(preset, ["image"]))
    invert = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True, to_tensor=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for item in load_datalists(list(inputs), "training"):
        d = load_item(pre, item)
        image = d["image"]
        pred = predict_volume(net, torch.as_tensor(image)[None].float(), roi or cfg.data.roi,
                              overlap if overlap is not None else cfg.finetune.sw_overlap,
                              sw_batch_size or cfg.finetune.sw_batch_size, cfg.sigmoid, precision).cpu()[0]
        if cfg.sigmoid:  # TC/WT/ET → the label ids of the convention the network was trained on
            pred = from_regions(pred, cfg.data.brats_labels or "msd")
        # Invertd replays the image's recorded operations backwards onto the prediction.
        d["pred"] = MetaTensor(pred.float(), meta=image.meta, applied_operations=image.applied_operations)
        restored = invert(d)["pred"]
        labels = np.asarray(restored[0]).round().astype(np.uint8)
        affine = np.asarray(restored.affine, dtype=np.float64)
        name = case_id(item)
        path = out_dir / f"{name}_seg.nii.gz"
        tmp = out_dir / f".{name}_seg.tmp.nii.gz"
        nib.save(nib.Nifti1Image(labels, affine), tmp)
        tmp.replace(path)
        _overlay(np.asarray(image[0]), np.asarray(pred[0]), out_dir / f"{name}_overlay.png", name)
        written.append(path)
    if not written:
        raise SubforeError("no input image found")
    return written


def _overlay(image: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .visualize import mid_planes

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, (plane, sl), (_, lab) in zip(axes, mid_planes(image), mid_planes(labels)):
        ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(lab == 0, lab), cmap="tab20", vmin=0, vmax=19, alpha=0.5, origin="lower",
                  interpolation="nearest")
        ax.set_title(plane)
        ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
