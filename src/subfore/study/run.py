"""The masking study: pretrain → finetune → evaluate for every arm and seed, with identical budgets.

Each (arm, seed) runs in ``STUDY_DIR/ARM/seedS/``; its ``result.json`` is the completion marker, so an
interrupted study resumes where it stopped. Arms are strategy names with ``+`` modifiers:
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
from ..engine.run import device_for
from ..errors import ConfigError
from ..evaluate import evaluate
from ..finetune import finetune
from ..io import read_jsonl, write_json
from ..models.artifact import read_encoder
from ..pretrain import pretrain
from ..probe import PROBE_VERSION, Probe, load_into
from .config import StudyConfig, existing, with_overrides, expand_arms, finetune_config, parse_arm
from .protocol import check_protocol, describe_protocol
from .report import summarize

log = logging.getLogger(__name__)


def run_one(cfg: StudyConfig, arm: str, over: dict | None, seed: int) -> dict:
    """Pretrain (unless scratch), finetune and evaluate one arm and seed; write and return its result."""
    st = cfg.study
    run = Path(st.study_dir) / arm / f"seed{seed}"
    t0 = time.time()
    encoder = None
    pre_curve: list = []
    if over is not None:
        tree = with_overrides(cfg.pretrain, {**over, "run_dir": str(run / "pretrain"), "seed": seed})
        tree.setdefault("data", {})["train"] = st.pretrain_data + existing(st.pretrain_data_optional)
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
    return (result.get("probe") or {}).get("version") != PROBE_VERSION


def _write_result(run: Path, result: dict) -> None:
    write_json(run / "result.json", result)


def probe_arm(cfg: StudyConfig, arm: str, seed: int) -> dict:
    """The linear probe of one arm's frozen network: its pretrained encoder, or for scratch its random init."""
    st = cfg.study
    over = dict(next((o for a, o in expand_arms(cfg) if a == arm), None) or {})
    pcfg = load_config(None, [], PretrainConfig, base=with_overrides(cfg.pretrain, {**over, "data.train": "unused"}))
    # The probe runs where pretraining ran.
    probe = Probe(st.probe, pcfg.model, pcfg.data.channels, pcfg.data.roi, pcfg.data.preset_obj(),
                  device_for(pcfg.train.accelerator))
    net = probe.network(seed=seed)
    encoder = Path(st.study_dir) / arm / f"seed{seed}" / "pretrain" / "encoder.pt"
    if parse_arm(arm) is not None:
        _, state = read_encoder(encoder)
        load_into(net, state, pcfg.model.name, encoder)
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
