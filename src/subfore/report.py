"""The shared read-outs: Markdown tables with the best value of each column in bold, grouped bar charts, and
per-class Dice. Used by evaluate, probe and study; imports nothing of subfore's beyond io."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .io import save_figure

ABSENT_RULE = ("a class absent from a case's ground truth is excluded from that case's Dice and NSD and from their "
               "means (reported as null), not counted as 0 or 1")
Cell = tuple[float | None, str]  # (the value that decides "best", the text shown)


def markdown_table(first: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[Cell]]]) -> list[str]:
    """Lines of a Markdown table; per column the highest value is bold when there are at least two rows."""
    best = [max((cells[i][0] for _, cells in rows if cells[i][0] is not None), default=None)
            for i in range(len(columns))]
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, cells in rows:
        shown = [f"**{text}**" if len(rows) > 1 and v is not None and v == b else text
                 for (v, text), b in zip(cells, best)]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return lines


def bar_chart(path: str | Path, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]],
              ylabel: str, errors: Sequence[Sequence[float | None]] | None = None, ylim: tuple | None = (0, 1),
              rotation: int = 45, group_width: float = 0.6, pad: float = 2.0) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar (and colour) per series; None draws as 0.

    The figure is max(6, group_width · groups · series + pad) inches wide.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6, group_width * len(groups) * n + pad), 4))
    for i, (label, values) in enumerate(series):
        err = [e or 0 for e in errors[i]] if errors else None
        ax.bar(x + i * width, [v or 0.0 for v in values], width, yerr=err, capsize=3 if err else 0, label=label)
    ax.set_xticks(x + 0.4 - width / 2, list(groups), rotation=rotation, ha="right")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, n_classes: int, regions: bool = False) -> torch.Tensor:
    """Dice per class (B, K) in float32, NaN where the class is absent from the label (MONAI's ignore_empty rule).

    pred, label: (B, 1, *spatial) integer labels → classes 1…n_classes−1; with ``regions``, (B, K, *spatial)
    binary masks → every channel. Counted per class (no one-hot copy of the volume), then
    2·|P∩G| / (|P| + |G|) as MONAI's compute_dice computes it.
    """
    # Plain tensors: counts over MetaTensors would carry (and try to slice) their batched metadata.
    pred = pred.as_tensor() if hasattr(pred, "as_tensor") else torch.as_tensor(pred)
    label = (label.as_tensor() if hasattr(label, "as_tensor") else torch.as_tensor(label)).to(pred.device)
    if regions:
        p, g = pred.bool().flatten(2), label.bool().flatten(2)
        inter, n_pred, n_true = (p & g).sum(2), p.sum(2), g.sum(2)
    else:
        b = pred.shape[0]
        p, g = pred.reshape(b, -1).long(), label.reshape(b, -1).long()
        offset = torch.arange(b, device=p.device)[:, None] * n_classes  # one bincount for the whole batch
        count = lambda x: torch.bincount(x.flatten(), minlength=b * n_classes).view(b, n_classes)  # noqa: E731
        inter = count((g + offset)[p == g])
        n_pred, n_true = count(p + offset), count(g + offset)
        inter, n_pred, n_true = inter[:, 1:], n_pred[:, 1:], n_true[:, 1:]
    dice = 2.0 * inter.float() / (n_pred + n_true).float()
    return torch.where(n_true > 0, dice, torch.full_like(dice, float("nan")))


def write_table(results: list[dict], path: Path, metric: str = "dice") -> str:
    """evaluate's metrics.md: methods × classes table of mean ``metric`` (%), best per column in bold (the seeds'
    tables)."""
    classes = results[0]["classes"]
    fmt = lambda v: "–" if v is None else f"{100 * v:.2f}"  # noqa: E731
    values = [[r["mean"][metric].get(c) for c in classes] + [r["mean"][f"mean_{metric}"]] for r in results]
    rows = [(r["method"], [(v, fmt(v)) for v in vals]) for r, vals in zip(results, values)]
    table = markdown_table("method", [*classes, "**AVG**"], rows)
    text = f"{metric.upper()} (%), {ABSENT_RULE}.\n\n" + "\n".join(table) + "\n"
    Path(path).write_text(text)
    return text


def plot_bars(results: list[dict], path: Path) -> None:
    """evaluate's metrics.png: per-class mean Dice bars, one colour per method."""
    classes = results[0]["classes"]
    bar_chart(path, classes, [(r["method"], [r["mean"]["dice"].get(c) for c in classes]) for r in results], "Dice")


def line_chart(path: str | Path, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], xlabel: str,
               ylabel: str, hline: tuple[str, float] | None = None) -> Path:
    """Lines of (x, y) points, one per series, with an optional labelled horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, pts in series:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[1], color="k", ls="--", label=hline[0])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
