"""The study's read-out: results.json, results.md (arms × classes, mean ± std over seeds), dice.png, curves.png."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..io import save_figure, write_json, write_text
from ..report import bar_chart, markdown_table
from .protocol import describe_protocol


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _cell(mean: float | None, std: float | None) -> str:
    return "–" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def summarize(results: list[dict], out: Path, protocol: dict | None = None) -> None:
    """results.json, results.md (arms × classes, mean ± std over seeds, best in bold), dice.png, curves.png."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    tests = list(dict.fromkeys(t for r in results for t in r["tests"]))
    write_json(out / "results.json", {"arms": arms, "protocol": protocol, "runs": results})
    md = ["# Study results", "", "Dice (%) per class, mean ± std over seeds; best mean per column in **bold**. "
          "A class absent from a test set's ground truth is excluded (–).", ""]
    if protocol:
        md += ["Protocol:", ""] + [f"- {line}" for line in describe_protocol(protocol)] + [""]
    summary: dict[str, dict[str, tuple]] = {}
    for test in tests:
        classes = next(r["tests"][test]["classes"] for r in results if test in r["tests"])
        cols = classes + ["mean_dice", "mean_nsd"]
        table = {}
        for arm in arms:
            runs = [r["tests"][test] for r in results if r["arm"] == arm and test in r["tests"]]
            table[arm] = [_mean_std([run["dice"].get(c) if c in classes else run[c] for run in runs]) for c in cols]
            summary.setdefault(test, {})[arm] = table[arm][-2]
        rows = [(arm, [(m, _cell(m, s)) for m, s in table[arm]]) for arm in arms]
        md += [f"## {test}", ""] + markdown_table("arm", [*classes, "**mean Dice**", "mean NSD"], rows)
        md.append("")
    probed = [r for r in results if r.get("probe")]
    if probed:
        md += ["## Linear probe (frozen network; scratch: its random init)", "",
               "Mean Dice (%) of a linear 1×1×1 head on the frozen network's last decoder features, mean ± std over "
               "seeds: the pretraining's own read-out, without finetuning noise.", "",
               "| arm | probe mean Dice | finetune mean Dice (first test set) |", "|---|---|---|"]
        first = tests[0] if tests else None
        for arm in arms:
            m, sd = _mean_std([r["probe"]["mean_dice"] for r in probed if r["arm"] == arm])
            summary.setdefault("linear probe", {})[arm] = (m, sd)
            fm, fs = summary.get(first, {}).get(arm, (None, None)) if first else (None, None)
            md.append(f"| {arm} | {_cell(m, sd)} | {_cell(fm, fs)} |")
        md.append("")
    write_text(out / "results.md", "\n".join(md))
    _plots(results, arms, tests + (["linear probe"] if probed else []), summary, out)


def _plots(results, arms, tests, summary, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(test, [summary[test].get(a, (None, None))[0] for a in arms]) for test in tests]
    errors = [[summary[test].get(a, (None, None))[1] for a in arms] for test in tests]
    bar_chart(out / "dice.png", arms, series, "mean Dice (± std over seeds)", errors=errors, ylim=None, rotation=30,
              group_width=1.1, pad=0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for arm in arms:
        runs = [r for r in results if r["arm"] == arm]
        for k, (key, ax) in enumerate((("pretrain_loss", axes[0]), ("finetune_val_dice", axes[1]))):
            curves = [r[key] for r in runs if r[key]]
            if not curves:
                continue
            steps = [p[0] for p in curves[0]]
            mean = [statistics.fmean(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
            # One colour per arm in both panels, although scratch has no pretraining curve.
            ax.plot(steps, mean, label=arm, color=f"C{arms.index(arm) % 10}",
                    marker="." if key == "finetune_val_dice" else None)
    axes[0].set_title("pretraining masked L1 (mean over seeds; each arm on its own masks)")
    axes[1].set_title("finetune validation Dice (mean over seeds)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "curves.png", dpi=110)
