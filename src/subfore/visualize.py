"""Looking at masks and intensities: the show-mask figure (paper Fig. 2) and the intensity analysis (Fig. 1b/3b)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.transforms import Compose  # noqa: E402

from .data.dataset import load_item  # noqa: E402
from .data.presets import Preset  # noqa: E402
from .data.transforms import center_transforms, preprocess  # noqa: E402
from .errors import DataError  # noqa: E402
from .io import check_output, save_figure, write_json  # noqa: E402
from .masking import expand_grid, foreground_grid, make_generator, subvolume_means  # noqa: E402
from .masking.foreground import parse_threshold  # noqa: E402
from .masking.grid import otsu_thresholds  # noqa: E402


def load_crop(image: str | Path, preset: Preset, roi: Sequence[int]) -> torch.Tensor:
    """Preprocess one volume and take its central ROI crop (padded when smaller): (1, C, *roi), normalised."""
    data = load_item(center_transforms(preset, roi), {"image": str(image)})
    return torch.as_tensor(data["image"]).float().unsqueeze(0)


def mid_planes(vol: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal and sagittal mid slices of a (D, H, W) RAS volume, oriented for display."""
    d, h, w = vol.shape
    return [
        ("axial", vol[:, :, w // 2].T),
        ("coronal", vol[:, h // 2, :].T),
        ("sagittal", vol[d // 2, :, :].T),
    ]


def show_mask(
    image: str | Path,
    out: str | Path,
    preset: Preset,
    strategy: str = "foreground",
    ratio: float = 0.6,
    threshold: float | str = 0.1,
    size: int = 16,
    roi: Sequence[int] = (96, 96, 96),
    seed: int = 0,
    json_out: str | Path | None = None,
) -> dict:
    """Draw three mid planes of the central crop with the foreground grid (outlined) and the mask (red).

    Returns ``{"subvolumes", "foreground", "masked", "threshold"}`` and writes it to ``json_out``.
    """
    check_output(out)
    if json_out is not None:
        check_output(json_out, option="--json")
    x = load_crop(image, preset, roi)
    thr = parse_threshold(threshold, window=preset.window)
    options = {"threshold": thr} if strategy == "foreground" else {}
    gen = make_generator(strategy, ratio=ratio, size=size, **options)
    mask = gen(x, generator=torch.Generator().manual_seed(seed))
    fg = foreground_grid(x, size, thr)
    lam = float(otsu_thresholds(subvolume_means(x, size).flatten(1))[0]) if thr == "otsu" else float(thr)
    stats = {
        "subvolumes": int(fg.numel()),
        "foreground": int(fg.sum()),
        "masked": int(mask.sum()),
        "threshold": lam,
        "strategy": strategy,
        "ratio": ratio,
    }
    if preset.window is not None:
        stats["threshold_hu"] = preset.window.to_hu(lam)
    vol = x[0].mean(0).numpy()
    fgv = expand_grid(fg, size)[0, 0].numpy()
    mv = expand_grid(mask, size)[0, 0].numpy()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (name, sl), (_, f), (_, m) in zip(axes, mid_planes(vol), mid_planes(fgv), mid_planes(mv)):
        ax.imshow(sl, cmap="gray", origin="lower", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(~m.astype(bool), m), cmap="autumn", alpha=0.45, origin="lower")
        ax.contour(f.astype(float), levels=[0.5], colors="cyan", linewidths=0.8, origin="lower")
        for k in range(0, sl.shape[0] + 1, size):
            ax.axhline(k - 0.5, color="white", lw=0.3, alpha=0.4)
        for k in range(0, sl.shape[1] + 1, size):
            ax.axvline(k - 0.5, color="white", lw=0.3, alpha=0.4)
        ax.set_title(name)
        ax.set_axis_off()
    fig.suptitle(
        f"{Path(image).name}: {strategy} ρ={ratio}, λ={lam:.3f} — {stats['foreground']}/{stats['subvolumes']} "
        f"foreground (cyan), {stats['masked']} masked (red)"
    )
    save_figure(fig, out, dpi=110, bbox_inches="tight")
    if json_out:
        write_json(json_out, stats)
    return stats


def _entropy(values: np.ndarray, bins: int = 32) -> float:
    hist, _ = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist[hist > 0] / max(hist.sum(), 1)
    return float(-(p * np.log2(p)).sum())


def analyze(
    images: Sequence[str | Path],
    out_dir: str | Path,
    preset: Preset,
    labels: Sequence[str | Path] | None = None,
    size: int = 16,
    threshold: float = 0.1,
) -> dict:
    """Intensity histograms of labelled organs vs background and mean entropy per subvolume class.

    Writes ``intensity.png`` and ``analysis.json`` into ``out_dir``; intensities are normalised.
    """
    if labels and len(labels) != len(images):
        raise DataError(labels[0], f"{len(labels)} label files for {len(images)} images; give one per image")
    out = check_output(out_dir, "folder")
    organ_vals, bg_vals, ent = [], [], {"foreground": [], "background": []}
    for i, image in enumerate(images):
        keys = ["image", "label"] if labels else ["image"]
        item = {"image": str(image)}
        if labels:
            item["label"] = str(labels[i])
        data = load_item(Compose(preprocess(preset, keys)), item)
        vol = torch.as_tensor(data["image"]).float()[0].numpy()
        if labels:
            lab = torch.as_tensor(data["label"])[0].numpy() > 0
            organ_vals.append(vol[lab])
            bg_vals.append(vol[~lab])
        else:
            bg_vals.append(vol.ravel())
        # Entropy per subvolume over the volume cropped to whole subvolumes.
        d, h, w = (s - s % size for s in vol.shape)
        if min(d, h, w) == 0:
            continue
        blocks = vol[:d, :h, :w].reshape(d // size, size, h // size, size, w // size, size)
        blocks = blocks.transpose(0, 2, 4, 1, 3, 5).reshape(-1, size**3)
        fg = blocks.mean(1) >= threshold
        for b, is_fg in zip(blocks, fg):
            ent["foreground" if is_fg else "background"].append(_entropy(b))
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 51)
    if organ_vals:
        ax.hist(np.concatenate(organ_vals), bins=bins, density=True, alpha=0.6, label="labelled organs")
    ax.hist(np.concatenate(bg_vals), bins=bins, density=True, alpha=0.6, label="background" if labels else "all voxels")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"λ = {threshold}")
    ax.set_xlabel("normalised intensity")
    ax.set_ylabel("density")
    ax.legend()
    save_figure(fig, out / "intensity.png", dpi=110, bbox_inches="tight")
    result = {
        "images": [str(p) for p in images],
        "threshold": threshold,
        "subvolume_size": size,
        "mean_entropy_bits": {k: (float(np.mean(v)) if v else None) for k, v in ent.items()},
        "subvolumes": {k: len(v) for k, v in ent.items()},
    }
    if organ_vals:
        ov, bv = np.concatenate(organ_vals), np.concatenate(bg_vals)
        result["organ_fraction_at_or_above_threshold"] = float((ov >= threshold).mean())
        result["background_fraction_below_threshold"] = float((bv < threshold).mean())
    write_json(out / "analysis.json", result)
    return result


def save_snapshot(views: dict, size: int, out: Path, step: int) -> None:
    """Input, masked input, reconstruction and |error| for one crop, mid slices in three planes.

    views: ``x``, ``x_in``, ``pred`` (1, C, D, H, W) normalised and ``mask`` (1, nz, ny, nx).
    """
    x, x_in, pred = (views[k][0, 0].numpy() for k in ("x", "x_in", "pred"))
    err = np.abs(pred - x)
    cols = [("input", x, "gray", (0, 1)), ("masked input", np.clip(x_in, 0, 1), "gray", (0, 1)),
            ("reconstruction", pred, "gray", (0, 1)), ("|error|", err, "magma", (0, 0.5))]
    fig, axes = plt.subplots(3, 4, figsize=(12, 9))
    for c, (title, vol, cmap, (lo, hi)) in enumerate(cols):
        for r, (plane, sl) in enumerate(mid_planes(vol)):
            ax = axes[r, c]
            ax.imshow(sl, cmap=cmap, vmin=lo, vmax=hi, origin="lower")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title)
            if c == 0:
                ax.text(2, 2, plane, color="yellow", fontsize=8)
    fig.suptitle(f"step {step}: {int(views['mask'].sum())} of {views['mask'].numel()} subvolumes masked")
    save_figure(fig, out, dpi=110, bbox_inches="tight")
