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
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .config import PretrainConfig, Strict, load_config, set_dotted
from .engine import device_for
from .data.datalist import case_id, load_datalists
from .errors import ConfigError, SubforeError
from .models import HEAD_PREFIX
from .finetune import FinetuneConfig, finetune_cases
from .masking import REGISTRY
from .probe import ProbeSettings

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

    @model_validator(mode="after")
    def _source(self) -> "TestSet":
        if (self.data is None) == (self.image is None):
            raise ValueError(f"test '{self.name}': give either data (a labelled datalist) or image with label")
        if self.image is not None and self.label is None:
            raise ValueError(f"test '{self.name}': image needs its label")
        return self


class FinetuneTrain(Strict):
    """The labelled cases finetuning trains on: a datalist and its split."""

    data: str | list[str]
    split: Literal["training", "validation", "test"] = "training"


class FinetuneVal(Strict):
    """The cases that select the checkpoint: a datalist and split, or a ``holdout`` of the last N training cases."""

    data: str | list[str] | None = None
    split: Literal["training", "validation", "test"] = "validation"
    holdout: int | None = Field(None, ge=1, description="the last N cases of finetune_train (then not trained on)")

    @model_validator(mode="after")
    def _one(self) -> "FinetuneVal":
        if (self.data is None) == (self.holdout is None):
            raise ValueError("give either data (with split) or holdout")
        return self


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
    finetune_train: FinetuneTrain
    finetune_val: FinetuneVal | None = Field(None, description="none: no validation, select must be 'last'")
    select: Literal["best", "last"] = Field("best", description="the finetuned checkpoint that is scored")
    test: list[TestSet]
    sweep: dict[str, list[Any]] | None = Field(None, description="one key → values, e.g. {masking.ratio: [0.4, 0.8]}")
    probe: ProbeSettings | None = Field(None, description="a linear probe of every arm's frozen network (scratch: "
                                        "its random init), a second read-out beside finetune Dice")

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

    @model_validator(mode="after")
    def _selection(self) -> "StudySection":
        if self.select == "best" and self.finetune_val is None:
            raise ValueError("select 'best' needs finetune_val (a datalist or a holdout); or select: last")
        return self


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


def finetune_config(cfg: StudyConfig, run_dir: Path | str, seed: int) -> FinetuneConfig:
    """The finetuning config of one arm: the shared ``finetune:`` section plus the study's named data."""
    st = cfg.study
    tree = _tree(cfg.finetune, {"run_dir": str(run_dir), "seed": seed, "data.train": st.finetune_train.data,
                                "data.train_split": st.finetune_train.split, "finetune.select": st.select})
    for key in ("val", "val_split", "holdout"):
        tree.setdefault("data", {}).pop(key, None)  # the study names the validation set, nothing else does
    if st.finetune_val is not None and st.finetune_val.holdout:
        tree["data"]["holdout"] = st.finetune_val.holdout
    elif st.finetune_val is not None:
        tree["data"].update(val=st.finetune_val.data, val_split=st.finetune_val.split)
    return load_config(None, [], FinetuneConfig, base=tree)


# --- the protocol: which case plays which role --------------------------------------------------------
def _text_key(source: str, split: str) -> str:
    """A datalist that does not exist yet (a placeholder path) is compared by its resolved path and split."""
    return f"{Path(source).expanduser().resolve()}:{split}"


def _cases(sources: str | list[str] | None, split: str) -> tuple[dict[str, str], set[str]]:
    """({resolved image file: case id} for the datalists that exist, {text keys} for those that do not)."""
    files: dict[str, str] = {}
    texts: set[str] = set()
    for src in ([] if sources is None else [sources] if isinstance(sources, str) else sources):
        texts.add(_text_key(src, split))
        if Path(src).expanduser().exists():
            for item in load_datalists(src, split):
                files[_file_key(item)] = case_id(item)
    return files, texts


def _file_key(item: dict) -> str:
    image = item["image"]
    return str(Path(image[0] if isinstance(image, list) else image).resolve())


def check_protocol(cfg: StudyConfig) -> dict:
    """Resolve every role's cases without training; raise ConfigError naming the first test case that is also a
    finetuning training or validation case (the same file, or the same datalist and split for placeholders).

    Returns the protocol: case counts per role, and per test set the cases that were also pretraining data.
    """
    st = cfg.study
    fcfg = finetune_config(cfg, Path(st.study_dir) / "check", st.seeds[0] if st.seeds else 0)
    d = fcfg.data
    train_src = d.train
    roles: dict[str, tuple[dict[str, str], set[str]]] = {}
    sources = [train_src] if isinstance(train_src, str) else list(train_src)
    ft_texts = {_text_key(x, d.train_split) for x in sources}
    if all(Path(x).expanduser().exists() for x in sources):
        train_items, val_items = finetune_cases(fcfg)
        roles["finetuning training"] = ({_file_key(i): case_id(i) for i in train_items}, ft_texts)
        val_files = {_file_key(i): case_id(i) for i in (val_items or [])}
    else:
        # Which cases train and which are held out is unknown until every datalist exists: every case of the
        # ones that do exist counts as both, so a leak is never missed.
        files, _ = _cases(sources, d.train_split)
        roles["finetuning training"] = (files, ft_texts)
        val_files = dict(files)
    if d.holdout:
        roles["finetuning validation"] = (val_files, ft_texts)
    elif d.val:
        files, texts = _cases(d.val, d.val_split)
        roles["finetuning validation"] = (files, texts)
    pre_split = cfg.pretrain.get("data", {}).get("train_split", "training")
    pre_files, pre_texts = _cases(st.pretrain_data + _existing(st.pretrain_data_optional), pre_split)
    protocol: dict[str, Any] = {
        "finetune_train": {"data": st.finetune_train.data, "split": st.finetune_train.split,
                           "limit_train": d.limit_train, "cases": len(roles["finetuning training"][0]) or None},
        "finetune_val": None if st.finetune_val is None else {
            **st.finetune_val.model_dump(exclude_none=True), "cases": len(roles["finetuning validation"][0]) or None},
        "select": st.select, "pretrain_volumes": len(pre_files) or None, "test": {}, "pretrain_overlap": {},
    }
    for t in st.test:
        if t.image:
            files = {str(Path(t.image).resolve()): case_id({"image": t.image})}
            texts: set[str] = set()
        else:
            if t.optional and not all(Path(x).exists() for x in ([t.data] if isinstance(t.data, str) else t.data)):
                files, texts = {}, {_text_key(x, t.split) for x in ([t.data] if isinstance(t.data, str) else t.data)}
            else:
                files, texts = _cases(t.data, t.split)
        for role, (rfiles, rtexts) in roles.items():
            both = sorted(set(files) & set(rfiles))
            if both:
                raise ConfigError(f"study.test '{t.name}': case {files[both[0]]} ({both[0]}) is also a {role} case "
                                  f"({len(both)} shared); test cases must never train or select the checkpoint")
            same = sorted(texts & rtexts)
            if same:
                raise ConfigError(f"study.test '{t.name}': datalist and split {same[0]} are also the {role} data; "
                                  f"test cases must never train or select the checkpoint")
        protocol["test"][t.name] = len(files) or None
        overlap = sorted(files[f] for f in set(files) & set(pre_files))
        overlap += sorted(x for x in texts & pre_texts)
        if overlap:
            protocol["pretrain_overlap"][t.name] = overlap
    return protocol


def describe_protocol(protocol: dict) -> list[str]:
    """Human-readable lines for ``subfore study --check`` and the study log."""
    n = lambda v: "?" if v is None else str(v)  # noqa: E731 - unknown until a placeholder datalist exists
    ft, val = protocol["finetune_train"], protocol["finetune_val"]
    lines = [f"finetune training: {n(ft['cases'])} cases ({ft['data']} '{ft['split']}'"
             + (f", first {ft['limit_train']}" if ft["limit_train"] else "") + ")"]
    if val is None:
        lines.append("finetune validation: none")
    elif "holdout" in val:
        lines.append(f"finetune validation: the last {val['holdout']} training cases (holdout), not trained on")
    else:
        lines.append(f"finetune validation: {n(val['cases'])} cases ({val['data']} '{val['split']}')")
    lines.append(f"checkpoint scored: {protocol['select']}")
    lines += [f"test '{name}': {n(k)} cases, none used for training or selection" for name, k in protocol["test"].items()]
    lines.append(f"pretraining: {n(protocol['pretrain_volumes'])} volumes")
    for name, cases in protocol["pretrain_overlap"].items():
        lines.append(f"warning: test '{name}' cases were also pretraining data: {', '.join(cases)}")
    return lines


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
    fcfg = finetune_config(cfg, run / "finetune", seed)
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
    result = {"arm": arm, "seed": seed, "checkpoint": best.name, "tests": tests, "pretrain_loss": pre_curve,
              "finetune_val_dice": _curve(run / "finetune" / "metrics.jsonl", "val_dice"),
              "wall_s": round(time.time() - t0, 1)}
    if st.probe is not None:
        result["probe"] = probe_arm(cfg, arm, seed)
    _write_result(run, result)
    return result


def _stale_probe(result: dict) -> bool:
    from .probe import PROBE_VERSION

    return (result.get("probe") or {}).get("version") != PROBE_VERSION


def _write_result(run: Path, result: dict) -> None:
    tmp = run / ".result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(run / "result.json")


def probe_arm(cfg: StudyConfig, arm: str, seed: int) -> dict:
    """The linear probe of one arm's frozen network: its pretrained encoder, or for scratch its random init."""
    import torch

    from .engine import device_for as device  # the probe runs where pretraining ran
    from .probe import PROBE_VERSION, Probe

    st = cfg.study
    over = dict(next((o for a, o in expand_arms(cfg) if a == arm), None) or {})
    pcfg = load_config(None, [], PretrainConfig, base=_tree(cfg.pretrain, {**over, "data.train": "unused"}))
    probe = Probe(st.probe, pcfg.model.model_dump(mode="json"), pcfg.data.channels, pcfg.data.roi,
                  pcfg.data.preset_obj(), device(pcfg.train.accelerator))
    net = probe.network(seed=seed)
    encoder = Path(st.study_dir) / arm / f"seed{seed}" / "pretrain" / "encoder.pt"
    if parse_arm(arm) is not None:
        missing, unexpected = net.load_state_dict(torch.load(encoder, map_location="cpu", weights_only=True),
                                                  strict=False)
        head = HEAD_PREFIX[pcfg.model.name]
        if unexpected or any(not k.startswith(head) for k in missing):
            raise SubforeError(f"{encoder}: does not fit the arm's network (e.g. {(unexpected or missing)[0]})")
    return {**probe.run(net), "version": PROBE_VERSION}


def _curve(path: Path, key: str) -> list[list[float]]:
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [[r["step"], r[key]] for r in rows if key in r]


def study(cfg: StudyConfig) -> Path:
    """Run every arm × seed not yet finished, then write results.json, results.md, dice.png and curves.png."""
    from .phantoms import PhantomSpec, write_phantoms

    st = cfg.study
    check_protocol(cfg)  # before anything is written: an overlapping protocol never starts
    out = Path(st.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ph in st.phantoms:
        if not (Path(ph.dir) / "dataset.json").exists():
            write_phantoms(ph.dir, n=ph.n, seed=ph.seed, spec=PhantomSpec(spacing=ph.spacing))
    if not st.pretrain_data and not _existing(st.pretrain_data_optional):
        raise ConfigError("study.pretrain_data: no pretraining data")
    protocol = check_protocol(cfg)  # again, now that generated data exists: file by file
    for line in describe_protocol(protocol):
        (log.warning if line.startswith("warning") else log.info)(line)
        print(line, flush=True)
    results = []
    for arm, over in expand_arms(cfg):
        for seed in st.seeds:
            marker = out / arm / f"seed{seed}" / "result.json"
            if marker.exists():
                log.warning("skipping finished %s seed %d", arm, seed)
                done = json.loads(marker.read_text())
                if st.probe is not None and _stale_probe(done):  # finished before this probe was configured
                    done["probe"] = probe_arm(cfg, arm, seed)
                    _write_result(marker.parent, done)
                results.append(done)
                continue
            print(f"== {arm}, seed {seed}", flush=True)
            results.append(run_one(cfg, arm, over, seed))
    summarize(results, out, protocol)
    return out


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(results: list[dict], out: Path, protocol: dict | None = None) -> None:
    """results.json, results.md (arms × classes, mean ± std over seeds, best in bold), dice.png, curves.png."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    tests = list(dict.fromkeys(t for r in results for t in r["tests"]))
    (out / "results.json").write_text(json.dumps({"arms": arms, "protocol": protocol, "runs": results}, indent=2))
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
            cell = lambda a, b: "–" if a is None else f"{100 * a:.1f} ± {100 * b:.1f}"  # noqa: E731
            md.append(f"| {arm} | {cell(m, sd)} | {cell(fm, fs)} |")
        md.append("")
    (out / "results.md").write_text("\n".join(md))
    _plots(results, arms, tests + (["linear probe"] if probed else []), summary, out)


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
