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


def summarize(results: list[dict], out: Path, protocol: dict | None = None, provenance: dict | None = None) -> None:
    """results.json, results.md (arms × classes, mean ± std over seeds, best in bold), dice.png, curves.png; with
    label fractions also labels.md's tables and labels.png (Dice against labelled cases per arm)."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    write_json(out / "results.json", {"arms": arms, "protocol": protocol, **(provenance or {}), "runs": results})
    counts = sorted({r["labels"] for r in results if "labels" in r})
    if counts:
        _labels(results, arms, list(dict.fromkeys(t for r in results for t in r["tests"])), counts, out, protocol)
        # The per-class tables and curves below read the runs with the most labelled cases.
        results = [r for r in results if r.get("labels") == counts[-1]]
    tests = list(dict.fromkeys(t for r in results for t in r["tests"]))
    md = ["# Study results", "", "Dice (%) per class, mean ± std over seeds; best mean per column in **bold**. "
          "A class absent from a test set's ground truth is excluded (–).", ""]
    if counts:
        md += [f"Runs finetuned on {counts[-1]} labelled cases, the most of study.label_fractions; every count, "
               "paired by seed: labels.md and labels.png.", ""]
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
        if ax.get_legend_handles_labels()[0]:  # a panel no arm has a curve for stays without a legend
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "curves.png", dpi=110)


def _labels(results, arms, tests, counts, out: Path, protocol) -> None:
    """labels.md: mean Dice ± std over seeds per arm and number of labelled cases, and each arm − scratch paired by
    seed; labels.png: mean Dice against labelled cases per arm and test set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def dice(arm, n, test):
        return {r["seed"]: r["tests"][test]["mean_dice"] for r in results
                if r["arm"] == arm and r.get("labels") == n and test in r["tests"]}

    md = ["# Dice against labelled finetuning cases", "",
          "Mean Dice (%) over seeds ± std, per arm and number of labelled cases; then each arm minus scratch, "
          "paired by seed (mean ± std of the per-seed differences, and the per-seed values).", ""]
    if protocol:
        md += ["Protocol:", ""] + [f"- {line}" for line in describe_protocol(protocol)] + [""]
    fig, axes = plt.subplots(1, len(tests), figsize=(5 * max(1, len(tests)), 4), squeeze=False)
    for test, ax in zip(tests, axes[0]):
        rows = []
        for arm in arms:
            cells = [_mean_std(list(dice(arm, n, test).values())) for n in counts]
            rows.append((arm, [(m, _cell(m, s)) for m, s in cells]))
            ax.errorbar(counts, [100 * m if m is not None else float("nan") for m, _ in cells],
                        yerr=[100 * (s or 0) for _, s in cells], label=arm, marker="o", capsize=3,
                        color=f"C{arms.index(arm) % 10}")
        md += [f"## {test}", ""] + markdown_table("arm", [f"{n} labelled" for n in counts], rows) + [""]
        if "scratch" in arms:
            md += [f"### {test}: arm − scratch, paired by seed", "", "| arm | " + " | ".join(
                f"{n} labelled" for n in counts) + " |", "|---|" + "---|" * len(counts)]
            for arm in arms:
                if arm == "scratch":
                    continue
                cells = []
                for n in counts:
                    a, s = dice(arm, n, test), dice("scratch", n, test)
                    diffs = [100 * (a[k] - s[k]) for k in sorted(set(a) & set(s))
                             if a[k] is not None and s[k] is not None]
                    m, sd = _mean_std([d / 100 for d in diffs])
                    cells.append("–" if m is None else f"{100 * m:+.1f} ± {100 * sd:.1f} ("
                                 + ", ".join(f"{d:+.1f}" for d in diffs) + ")")
                md.append(f"| {arm} | " + " | ".join(cells) + " |")
            md.append("")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_xlabel("labelled finetuning cases")
        ax.set_ylabel("mean Dice (%)")
        ax.set_title(test)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "labels.png", dpi=110)
    write_text(out / "labels.md", "\n".join(md))
