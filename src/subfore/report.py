"""The shared read-outs: Markdown tables with the best value of each column in bold, grouped bar charts, and
per-class Dice. Used by evaluate, probe and study; imports nothing of subfore's beyond io."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .io import save_figure

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
              rotation: int = 45, group_width: float = 0.6) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar (and colour) per series; None draws as 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = max(len(series), 1)
    width = 0.8 / n
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6, group_width * len(groups) * n + 2), 4))
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
    """Dice per class (B, K), NaN where the class is absent from the label (MONAI's ignore_empty rule).

    pred, label: (B, 1, *spatial) integer labels → classes 1…n_classes−1; with ``regions``, (B, K, *spatial)
    binary masks → every channel.
    """
    from monai.metrics import compute_dice

    if regions:
        return compute_dice(pred.float(), label.float().to(pred.device), include_background=True, ignore_empty=True)
    onehot = lambda t: torch.nn.functional.one_hot(t[:, 0].long(), n_classes).movedim(-1, 1).float()  # noqa: E731
    return compute_dice(onehot(pred), onehot(label.to(pred.device)), include_background=False, ignore_empty=True)
