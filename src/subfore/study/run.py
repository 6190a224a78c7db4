"""The masking study: pretrain → finetune → evaluate for every arm and seed, with identical budgets.

Each (arm, seed) runs in ``STUDY_DIR/ARM/seedS/``; its ``result.json`` is the completion marker, so an
interrupted study resumes where it stopped. With ``study.label_fractions`` an arm and seed pretrains once
(``seedS/pretrain``) and finetunes once per number of labelled cases N (``seedS/labelsN/``, its own
result.json). Arms are strategy names with ``+`` modifiers:
``scratch`` (no pretraining), ``random``, ``block``, ``foreground``, ``foreground+otsu`` (λ by Otsu),
``anatomask``, ``hpm``, ``anatomask+gate`` / ``hpm+gate`` (foreground-gated teachers).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..config import PretrainConfig, load_config
from ..data.phantoms import ensure_phantoms
from ..engine.run import device_for, inference_precision
from ..errors import ConfigError
from ..evaluate import evaluate
from ..finetune import finetune
from ..io import read_jsonl, write_json
from ..models.artifact import read_encoder
from ..pretrain import pretrain
from ..probe import PROBE_VERSION, Probe, load_into
from ..provenance import code_version, platform_info
from .config import StudyConfig, existing, with_overrides, expand_arms, finetune_config, parse_arm
from .protocol import check_protocol, describe_protocol, label_counts
from .report import summarize

log = logging.getLogger(__name__)


def run_dir(cfg: StudyConfig, arm: str, seed: int, labels: int | None = None) -> Path:
    """Where one run's result.json lies: ``STUDY_DIR/ARM/seedS`` (``/labelsN`` with label fractions)."""
    run = Path(cfg.study.study_dir) / arm / f"seed{seed}"
    return run if labels is None else run / f"labels{labels}"


def pretrain_arm(cfg: StudyConfig, arm: str, over: dict, seed: int) -> tuple[Path, float]:
    """Pretrain one arm and seed (resuming a half-finished run; a finished one is reused as is); (encoder, seconds)."""
    st = cfg.study
    t0 = time.time()
    tree = with_overrides(cfg.pretrain, {**over, "run_dir": str(run_dir(cfg, arm, seed) / "pretrain"), "seed": seed})
    tree.setdefault("data", {})["train"] = st.pretrain_data + existing(st.pretrain_data_optional)
    pcfg = load_config(None, [], PretrainConfig, base=tree)
    done = Path(pcfg.run_dir) / "encoder.pt"
    if _finished(Path(pcfg.run_dir), pcfg):  # another label count of this arm and seed pretrained it already
        return done, 0.0
    encoder = pretrain(pcfg, resume="auto")
    return encoder, time.time() - t0


def _finished(run: Path, pcfg: PretrainConfig) -> bool:
    """Whether ``run`` holds this very pretraining, trained to its last step and exported."""
    import yaml

    try:
        same = yaml.safe_load((run / "config.yaml").read_text()) == pcfg.model_dump(mode="json")
        step = json.loads((run / "encoder.json").read_text()).get("step")
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return same and step == pcfg.train.max_steps and (run / "encoder.pt").is_file()


def run_one(cfg: StudyConfig, arm: str, over: dict | None, seed: int, labels: int | None = None,
            probe: dict | None = None) -> dict:
    """Pretrain (unless scratch), finetune and evaluate one arm and seed (on ``labels`` cases); write its result."""
    st = cfg.study
    base = run_dir(cfg, arm, seed)
    run = run_dir(cfg, arm, seed, labels)
    t0 = time.time()
    encoder, pre_s = None, 0.0
    pre_curve: list = []
    if over is not None:
        encoder, pre_s = pretrain_arm(cfg, arm, over, seed)
        pre_curve = _curve(base / "pretrain" / "metrics.jsonl", "loss")
    t1 = time.time()
    fcfg = finetune_config(cfg, run / "finetune", seed, labels)
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
    result = {"arm": arm, "seed": seed, **({} if labels is None else {"labels": labels}), "checkpoint": best.name,
              "tests": tests, "pretrain_loss": pre_curve,
              "finetune_val_dice": _curve(run / "finetune" / "metrics.jsonl", "val_dice"),
              # pretrain_s: this call's pretraining (0 when an earlier label count already pretrained this seed).
              "wall_s": round(time.time() - t0, 1), "pretrain_s": round(pre_s, 1),
              "finetune_s": round(time.time() - t1, 1), "code": code_version(),
              # Bit-identical numbers need the same CPU kernels and library builds as well as the same code.
              "platform": platform_info(device_for(fcfg.train.accelerator))}
    if st.probe is not None:
        result["probe"] = probe if probe is not None else probe_arm(cfg, arm, seed)
    _write_result(run, result)
    return result


def _stale_probe(result: dict) -> bool:
    return (result.get("probe") or {}).get("version") != PROBE_VERSION


def _write_result(run: Path, result: dict) -> None:
    write_json(run / "result.json", result)


def probe_arm(cfg: StudyConfig, arm: str, seed: int) -> dict:
    """The linear probe of one arm's frozen network: its pretrained encoder, or for scratch its random init."""
    st = cfg.study
    over = dict(next((o for a, o in expand_arms(cfg) if a == arm), None) or {})
    pcfg = load_config(None, [], PretrainConfig, base=with_overrides(cfg.pretrain, {**over, "data.train": "unused"}))
    # The probe runs where pretraining ran, at its precision.
    t = pcfg.train
    probe = Probe(st.probe, pcfg.model, pcfg.data.channels, pcfg.data.roi, pcfg.data.preset_obj(),
                  device_for(t.accelerator), precision=inference_precision(t.precision, t.accelerator))
    net = probe.network(seed=seed)
    encoder = Path(st.study_dir) / arm / f"seed{seed}" / "pretrain" / "encoder.pt"
    if parse_arm(arm) is not None:
        _, state = read_encoder(encoder)
        load_into(net, state, pcfg.model.name, encoder, pcfg.model.encoding)
    return {**probe.run(net), "version": PROBE_VERSION}


def _curve(path: Path, key: str) -> list[list[float]]:
    rows = read_jsonl(path)
    return [[r["step"], r[key]] for r in rows if key in r]


def study(cfg: StudyConfig) -> Path:
    """Run every arm × seed not yet finished, then write results.json, results.md, dice.png and curves.png."""
    st = cfg.study
    check_protocol(cfg)  # before anything is written: an overlapping protocol never starts
    out = Path(st.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    for ph in st.phantoms:
        ensure_phantoms(ph)
    if not st.pretrain_data and not existing(st.pretrain_data_optional):
        raise ConfigError("study.pretrain_data: no pretraining data")
    protocol = check_protocol(cfg)  # again, now that generated data exists: file by file
    for line in describe_protocol(protocol):
        (log.warning if line.startswith("warning") else log.info)(line)
        print(line, flush=True)
    counts = label_counts(cfg) or [None]
    results = []
    for arm, over in expand_arms(cfg):
        for seed in st.seeds:
            probe = None  # one probe per arm and seed: it does not depend on the labelled cases
            for labels in counts:
                marker = run_dir(cfg, arm, seed, labels) / "result.json"
                if marker.exists():
                    log.warning("skipping finished %s seed %d%s", arm, seed, "" if labels is None else f" labels {labels}")
                    done = json.loads(marker.read_text())
                    if st.probe is not None and _stale_probe(done):  # finished before this probe was configured
                        done["probe"] = probe or probe_arm(cfg, arm, seed)
                        _write_result(marker.parent, done)
                    probe = done.get("probe") or probe
                    results.append(done)
                    continue
                print(f"== {arm}, seed {seed}" + ("" if labels is None else f", {labels} labelled cases"), flush=True)
                results.append(run_one(cfg, arm, over, seed, labels, probe=probe))
                probe = results[-1].get("probe")
    summarize(results, out, protocol, provenance(cfg))
    return out


def provenance(cfg: StudyConfig) -> dict:
    """What results.json records of its origin: the code now, the study config, and sha256 of every file read."""
    from ..data.datalist import load_datalists
    from ..finetune.data import finetune_cases
    from ..provenance import items_digest

    st = cfg.study
    counts = [n for n in (label_counts(cfg) or []) if n is not None]
    # The cases the largest run trained on (the first N are a prefix of any larger N).
    fcfg = finetune_config(cfg, Path(st.study_dir) / "check", st.seeds[0] if st.seeds else 0,
                           max(counts) if counts else None)
    train, val = finetune_cases(fcfg)
    pre_split = cfg.pretrain.get("data", {}).get("train_split", "training")
    pre_items = load_datalists(st.pretrain_data + existing(st.pretrain_data_optional), pre_split)
    data = {"pretrain": items_digest(pre_items, keys=("image",)),  # pretraining reads images only
            "finetune_train": items_digest(train), "finetune_val": items_digest(val or [])}
    for t in st.test:
        if t.image:
            if Path(t.image).exists() and Path(t.label).exists():
                data[f"test {t.name}"] = items_digest([{"image": t.image, "label": t.label}])
        elif not t.optional or all(Path(x).exists() for x in ([t.data] if isinstance(t.data, str) else t.data)):
            data[f"test {t.name}"] = items_digest(load_datalists(t.data, t.split))
    return {"code": code_version(), "config": cfg.model_dump(mode="json"), "data": data}
