"""The masking study: pretrain → finetune → evaluate for every arm and seed, with identical budgets.

Each (arm, seed) runs in ``STUDY_DIR/ARM/seedS/``; its ``result.json`` is the completion marker, so an
interrupted study resumes where it stopped. Arms are strategy names with ``+`` modifiers:
``scratch`` (no pretraining), ``random``, ``block``, ``foreground``, ``foreground+otsu`` (λ by Otsu),
``anatomask``, ``hpm``, ``anatomask+gate`` / ``hpm+gate`` (foreground-gated teachers).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from .config import PretrainConfig, Strict, load_config, set_dotted
from .engine import device_for
from .errors import ConfigError
from .finetune import FinetuneConfig
from .masking import REGISTRY

log = logging.getLogger(__name__)

DEFAULT_ARMS = ["scratch", "random", "block", "foreground", "foreground+otsu", "anatomask", "hpm", "anatomask+gate"]
MODIFIERS = {"otsu": {"masking.threshold": "otsu"}, "gate": {"masking.gate": "foreground"}}


class TestSet(Strict):
    """A labelled test set: a datalist (``data`` + ``split``), or one ``image`` with its ``label``."""

    name: str
    data: str | list[str] | None = None
    image: str | None = None
    label: str | None = None
    split: str = "validation"
    label_map: dict[int, int] | None = Field(None, description="this set's ids → the finetuned model's ids")
    optional: bool = Field(False, description="skip (with a note) when the data is absent, e.g. ../shared/data")


class PhantomSet(Strict):
    dir: str
    n: int = Field(8, ge=1)
    seed: int = 0
    spacing: tuple[float, float, float] = (0.8, 0.8, 2.5)


class StudySection(Strict):
    """The ``study:`` section: arms, seeds, data and the sweep."""

    study_dir: str = "runs/study"
    arms: list[str] = Field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    phantoms: list[PhantomSet] = Field(default_factory=list, description="generated when absent")
    pretrain_data: list[str] = Field(..., description="unlabelled datalists (images only are used)")
    pretrain_data_optional: list[str] = Field(default_factory=list, description="used where present")
    finetune_data: str | list[str]
    finetune_val: str | list[str] | None = None
    test: list[TestSet]
    sweep: dict[str, list[Any]] | None = Field(None, description="one key → values, e.g. {masking.ratio: [0.4, 0.8]}")

    @field_validator("arms")
    @classmethod
    def _arms(cls, arms: list[str]) -> list[str]:
        for arm in arms:
            parse_arm(arm)
        return arms

    @field_validator("sweep")
    @classmethod
    def _one_key(cls, sweep):
        if sweep is not None and len(sweep) != 1:
            raise ValueError("sweep takes exactly one key (an ablation over one setting)")
        return sweep


class StudyConfig(Strict):
    """``subfore study`` config: ``study`` plus partial ``pretrain`` and ``finetune`` configs shared by every arm."""

    study: StudySection
    pretrain: dict[str, Any] = Field(default_factory=dict)
    finetune: dict[str, Any] = Field(default_factory=dict)


def parse_arm(arm: str) -> dict[str, Any] | None:
    """Pretraining overrides for an arm name (None for ``scratch``)."""
    base = arm.split("[")[0]
    if base == "scratch":
        return None
    strategy, *mods = base.split("+")
    if strategy not in REGISTRY:
        raise ValueError(f"arm {arm!r}: unknown strategy {strategy!r}; registered: {', '.join(sorted(REGISTRY))}")
    out: dict[str, Any] = {"masking.strategy": strategy}
    for m in mods:
        if m not in MODIFIERS:
            raise ValueError(f"arm {arm!r}: unknown modifier {m!r}; known: {', '.join(MODIFIERS)}")
        out.update(MODIFIERS[m])
    return out


def expand_arms(cfg: StudyConfig) -> list[tuple[str, dict[str, Any] | None]]:
    """(name, overrides) per arm; with a sweep, every pretrained arm once per value."""
    arms = []
    sweep = cfg.study.sweep
    for arm in cfg.study.arms:
        over = parse_arm(arm)
        if sweep and over is not None:
            (key, values), = sweep.items()
            arms += [(f"{arm}[{key}={v}]", {**over, key: v}) for v in values]
        else:
            arms.append((arm, over))
    return arms


def _tree(base: dict, overrides: dict[str, Any]) -> dict:
    tree = copy.deepcopy(base)
    for k, v in overrides.items():
        set_dotted(tree, k, v)
    return tree


def _existing(paths: list[str]) -> list[str]:
    return [p for p in paths if Path(p).exists()]


def run_one(cfg: StudyConfig, arm: str, over: dict | None, seed: int) -> dict:
    """Pretrain (unless scratch), finetune and evaluate one arm and seed; write and return its result."""
    from .evaluate import evaluate
    from .finetune import finetune
    from .pretrain import pretrain

    st = cfg.study
    run = Path(st.study_dir) / arm / f"seed{seed}"
    t0 = time.time()
    encoder = None
    pre_curve: list = []
    if over is not None:
        tree = _tree(cfg.pretrain, {**over, "run_dir": str(run / "pretrain"), "seed": seed})
        tree.setdefault("data", {})["train"] = st.pretrain_data + _existing(st.pretrain_data_optional)
        pcfg = load_config(None, [], PretrainConfig, base=tree)
        encoder = pretrain(pcfg, resume="auto")
        pre_curve = _curve(run / "pretrain" / "metrics.jsonl", "loss")
    ft_tree = _tree(cfg.finetune, {"run_dir": str(run / "finetune"), "seed": seed})
    ft_tree.setdefault("data", {})["train"] = st.finetune_data
    if st.finetune_val is not None:
        ft_tree["data"]["val"] = st.finetune_val
    fcfg = load_config(None, [], FinetuneConfig, base=ft_tree)
    # A half-finished run (pretraining or finetuning) continues exactly where it stopped.
    best = finetune(fcfg, pretrained=encoder, resume="auto")
    tests = {}
    for t in st.test:
        data, split = t.data, t.split
        sources = [t.image, t.label] if t.image else (data if isinstance(data, list) else [data])
        if t.optional and not all(s and Path(s).exists() for s in sources):
            continue
        if t.image:
            data, split = run / f"test_{t.name}.dataset.json", "validation"
            entry = {"image": str(Path(t.image).resolve()), "label": str(Path(t.label).resolve()) if t.label else None}
            data.write_text(json.dumps({"validation": [entry]}))
        r = evaluate(best, data, run / f"test_{t.name}.json", split=split, label_map=t.label_map, method=arm,
                     device=device_for(fcfg.train.accelerator))
        tests[t.name] = {"dice": r["mean"]["dice"], "nsd": r["mean"]["nsd"], "mean_dice": r["mean"]["mean_dice"],
                         "mean_nsd": r["mean"]["mean_nsd"], "classes": r["classes"]}
    result = {"arm": arm, "seed": seed, "tests": tests, "pretrain_loss": pre_curve,
              "finetune_val_dice": _curve(run / "finetune" / "metrics.jsonl", "val_dice"),
              "wall_s": round(time.time() - t0, 1)}
    tmp = run / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(run / "result.json")
    return result


def _curve(path: Path, key: str) -> list[list[float]]:
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [[r["step"], r[key]] for r in rows if key in r]


def study(cfg: StudyConfig) -> Path:
    """Run every arm × seed not yet finished, then write results.json, results.md, dice.png and curves.png."""
    from .phantoms import PhantomSpec, write_phantoms

    st = cfg.study
    out = Path(st.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ph in st.phantoms:
        if not (Path(ph.dir) / "dataset.json").exists():
            write_phantoms(ph.dir, n=ph.n, seed=ph.seed, spec=PhantomSpec(spacing=ph.spacing))
    if not st.pretrain_data and not _existing(st.pretrain_data_optional):
        raise ConfigError("study.pretrain_data: no pretraining data")
    results = []
    for arm, over in expand_arms(cfg):
        for seed in st.seeds:
            marker = out / arm / f"seed{seed}" / "result.json"
            if marker.exists():
                log.warning("skipping finished %s seed %d", arm, seed)
                results.append(json.loads(marker.read_text()))
                continue
            print(f"== {arm}, seed {seed}", flush=True)
            results.append(run_one(cfg, arm, over, seed))
    summarize(results, out)
    return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(results: list[dict], out: Path) -> None:
    """results.json, results.md (arms × classes, mean ± std over seeds, best in bold), dice.png, curves.png."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    tests = list(dict.fromkeys(t for r in results for t in r["tests"]))
    (out / "results.json").write_text(json.dumps({"arms": arms, "runs": results}, indent=2))
    md = ["# Study results", "", "Dice (%) per class, mean ± std over seeds; best mean per column in **bold**. "
          "A class absent from a test set's ground truth is excluded (–).", ""]
    summary: dict[str, dict[str, tuple]] = {}
    for test in tests:
        classes = next(r["tests"][test]["classes"] for r in results if test in r["tests"])
        cols = classes + ["mean_dice", "mean_nsd"]
        table = {}
        for arm in arms:
            runs = [r["tests"][test] for r in results if r["arm"] == arm and test in r["tests"]]
            table[arm] = [_mean_std([run["dice"].get(c) if c in classes else run[c] for run in runs]) for c in cols]
            summary.setdefault(test, {})[arm] = table[arm][-2]
        best = [max((table[a][i][0] for a in arms if table[a][i][0] is not None), default=None) for i in range(len(cols))]
        md += [f"## {test}", "", "| arm | " + " | ".join(classes) + " | **mean Dice** | mean NSD |",
               "|" + "---|" * (len(cols) + 1)]
        for arm in arms:
            cells = []
            for (m, s), b in zip(table[arm], best):
                cell = "–" if m is None else f"{100 * m:.1f} ± {100 * s:.1f}"
                cells.append(f"**{cell}**" if m is not None and m == b and len(arms) > 1 else cell)
            md.append(f"| {arm} | " + " | ".join(cells) + " |")
        md.append("")
    (out / "results.md").write_text("\n".join(md))
    _plots(results, arms, tests, summary, out)


def _plots(results, arms, tests, summary, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(arms) * max(1, len(tests))), 4))
    width = 0.8 / max(1, len(tests))
    for i, test in enumerate(tests):
        ms = [summary[test].get(a, (None, None)) for a in arms]
        x = [j + i * width for j in range(len(arms))]
        ax.bar(x, [m or 0 for m, _ in ms], width, yerr=[s or 0 for _, s in ms], capsize=3, label=test)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(arms))], arms, rotation=30, ha="right")
    ax.set_ylabel("mean Dice (± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "dice.png", dpi=110)
    plt.close(fig)
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
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
