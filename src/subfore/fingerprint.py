"""How much foreground do your crops hold? Decide before pretraining whether foreground masks will differ from random.

Random training crops (the config's preset, ROI and subvolume size) are cut into subvolumes; the share whose mean
is ≥ λ is the crop's foreground share f. Foreground masking masks round(ρ·n_fg) of n subvolumes, so its expected
masked share is ρ·f (ρ where f = 0: such a crop falls back to random masking); random masking masks round(ρ·n)/n.
When f is near 1 for most crops, the two strategies hand the network almost the same masks.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from monai.utils import set_determinism

from .config import PretrainConfig
from .data.datalist import case_id, load_datalists
from .io import check_output, save_figure, write_json
from .masking import foreground_grid
from .masking.grid import exact_count
from .progress import track
from .pretrain.data import crop_volumes, resolve


def crop_shares(crops: torch.Tensor, size: int, threshold, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per crop: (foreground share f, share masked by foreground masking at ``ratio``); crops (K, C, *roi)."""
    fg = foreground_grid(crops, size, threshold).flatten(1)
    n_fg = fg.sum(1)
    # A crop without foreground falls back to random masking over all n subvolumes.
    masked = torch.where(n_fg > 0, exact_count(n_fg, ratio), exact_count(torch.full_like(n_fg, fg.shape[1]), ratio))
    return n_fg.double() / fg.shape[1], masked.double() / fg.shape[1]


def fingerprint(datalist: str | list[str], cfg: PretrainConfig, out_dir: str | Path, crops: int = 64,
                seed: int = 0, progress: bool = True) -> dict:
    """Sample ``crops`` random training crops of ``datalist``; write DIR/fingerprint.json and foreground_share.png.

    progress: a bar and a line per volume on stderr."""
    check_output(out_dir, "folder")
    d, mk = cfg.data, cfg.masking
    plan = resolve(cfg, read_data=False, check_roi=False)  # preset and λ exactly as pretraining resolves them
    items = load_datalists(datalist, d.train_split)
    preset, threshold = plan.preset, plan.threshold
    # Only as many volumes as there are crops to draw: a datalist of 10k CTs is not read whole for 64 crops.
    g = torch.Generator().manual_seed(seed)
    items = [items[i] for i in torch.randperm(len(items), generator=g)[:crops].tolist()]
    per_volume = max(1, math.ceil(crops / len(items)))
    shares, masked = [], []
    for sample in _crops(plan, items, per_volume, seed, progress):
        f, m = crop_shares(sample[None].float(), mk.subvolume_size, threshold, mk.ratio)
        shares.append(float(f[0]))
        masked.append(float(m[0]))
    shares, masked = shares[:crops], masked[:crops]
    n = math.prod(r // mk.subvolume_size for r in d.roi)
    f = torch.tensor(shares, dtype=torch.float64)
    result = {
        "datalist": datalist, "volumes": len(items), "crops": len(shares), "roi": list(d.roi),
        "subvolume_size": mk.subvolume_size, "subvolumes_per_crop": n, "ratio": mk.ratio,
        "threshold": mk.threshold, "preset": preset.model_dump(mode="json"), "seed": seed,
        "foreground_share": {"mean": round(float(f.mean()), 6), "median": round(float(f.median()), 6),
                             "p10": round(float(f.quantile(0.1)), 6), "p90": round(float(f.quantile(0.9)), 6),
                             "per_crop": [round(v, 6) for v in shares]},
        "expected_masked_share": {"foreground": round(sum(masked) / len(masked), 6),
                                  "random": round(int(exact_count(torch.tensor(n), mk.ratio)) / n, 6)},
        "fallback_share": round(sum(v == 0 for v in shares) / len(shares), 6),
    }
    out = Path(out_dir)
    write_json(out / "fingerprint.json", result)
    _histogram(result, out / "foreground_share.png")
    return result


def _crops(plan, items: list[dict], per_volume: int, seed: int, progress: bool = False):
    """What the foreground is decided on (the image, or its reference where the preset carries one), (C, *roi), of
    ``per_volume`` random training crops of each item, cut as pretraining cuts them."""
    volumes = crop_volumes(plan, items, per_volume)
    order = track(range(len(volumes)), "fingerprint", lambda i: case_id(items[i]), progress)
    if plan.cfg.data.cache_dir is not None:
        for i in order:
            for sample in volumes.draw(i, seed + i):
                yield sample.get("reference", sample["image"])
        return
    # From the source files: one transform stream seeded once, so the crops are those of earlier versions.
    set_determinism(seed)
    volumes.inner.transform.set_random_state(seed)
    try:
        for i in order:
            for sample in volumes[i]:
                yield torch.as_tensor(sample.get("reference", sample["image"]))
    finally:
        set_determinism(None)


def summary_line(result: dict) -> str:
    fs, ms = result["foreground_share"], result["expected_masked_share"]
    return (f"{result['crops']} crops of {result['volumes']} volumes: foreground share mean {fs['mean']:.2f} "
            f"(p10 {fs['p10']:.2f}, p90 {fs['p90']:.2f}); masked share foreground {ms['foreground']:.2f} vs random "
            f"{ms['random']:.2f}; {100 * result['fallback_share']:.0f} % of crops would fall back")


def _histogram(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(result["foreground_share"]["per_crop"], bins=20, range=(0, 1), color="C0")
    ax.axvline(result["foreground_share"]["mean"], color="k", ls="--", label="mean")
    ax.set_xlabel(f"foreground share of a crop's {result['subvolume_size']}³ subvolumes (mean ≥ λ)")
    ax.set_ylabel("crops")
    ax.set_title(f"masked share: foreground {result['expected_masked_share']['foreground']:.2f}, "
                 f"random {result['expected_masked_share']['random']:.2f}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
