"""Rerun one run of a finished study and compare its numbers, one by one, with those its results.json records."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..data.phantoms import ensure_phantoms
from ..errors import ConfigError, DataError
from ..provenance import code_version
from .config import StudyConfig, expand_arms

# Identical on the same machine and build; the tolerance only absorbs JSON's float round trip.
RTOL = 1e-6


def numbers(run: dict) -> dict[str, float | None]:
    """Every number of one run's result, by a readable key: losses per step, Dice/NSD per test and class, probe."""
    out: dict[str, float | None] = {}
    for key in ("pretrain_loss", "finetune_val_dice"):
        out.update({f"{key} step {step}": value for step, value in run.get(key) or []})
    for test, r in sorted((run.get("tests") or {}).items()):
        for metric in ("dice", "nsd"):
            out.update({f"{test} {metric} {c}": v for c, v in r[metric].items()})
        out.update({f"{test} mean_dice": r["mean_dice"], f"{test} mean_nsd": r["mean_nsd"]})
    probe = run.get("probe")
    if probe:
        out.update({f"probe dice {c}": v for c, v in probe.get("dice", {}).items()})
        out["probe mean_dice"] = probe.get("mean_dice")
    return out


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)):
        return (a is None and b is None) or (a is not None and b is not None and math.isnan(a) and math.isnan(b))
    return a == b or abs(a - b) <= RTOL * max(1.0, abs(a))


def compare(recorded: dict, rerun: dict) -> list[tuple[str, float | None, float | None, bool]]:
    """(key, recorded, rerun, match) for every number either run has."""
    a, b = numbers(recorded), numbers(rerun)
    return [(k, a.get(k), b.get(k), k in a and k in b and same(a[k], b[k])) for k in dict.fromkeys([*a, *b])]


def find_run(results: dict, arm: str, seed: int, labels: int | None, source: Path) -> dict:
    runs = [r for r in results["runs"] if r["arm"] == arm and r["seed"] == seed and r.get("labels") == labels]
    if not runs:
        have = sorted({(r["arm"], r["seed"], r.get("labels")) for r in results["runs"]}, key=str)
        raise DataError(source, f"has no run arm {arm!r} seed {seed}" + ("" if labels is None else f" labels {labels}")
                        + f"; it has (arm, seed, labels): {', '.join(map(str, have))}")
    return runs[0]


def reproduce(results_path: str | Path, arm: str, seed: int, labels: int | None = None,
              out: str | Path | None = None, config: StudyConfig | None = None,
              overrides: list[str] | None = None) -> dict:
    """Rerun (arm, seed[, labels]) of the study whose results.json is ``results_path`` in ``out`` (new), from the
    config results.json records with ``overrides`` (or from ``config``), in the working directory the study ran in
    (its paths are relative to it); returns {"lines", "matched", "total", "data_changed", "code"}."""
    from ..config import load_config
    from .run import provenance, run_one

    source = Path(results_path)
    try:
        results = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(source, f"is not a readable results.json ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        raise DataError(source, "is not a study's results.json (no 'runs' list; a run's own result.json is not one)")
    recorded = find_run(results, arm, seed, labels, source)
    if config is None:
        if not isinstance(results.get("config"), dict):
            raise DataError(source, "records no study config (written before studies recorded theirs): pass --config")
        config = load_config(None, list(overrides or []), StudyConfig, base=results["config"])
    if out is None:
        out = Path("runs") / "reproduce" / (f"{arm}_seed{seed}" + ("" if labels is None else f"_labels{labels}"))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists and is not empty; a reproduction starts from nothing (give --out)")
    cfg = config.model_copy(update={"study": config.study.model_copy(update={"study_dir": str(out)})})
    over = dict(expand_arms(cfg)).get(arm, "missing")
    if over == "missing":
        raise ConfigError(f"arm {arm!r} is not in the recorded study config's arms {cfg.study.arms}")
    for ph in cfg.study.phantoms:
        ensure_phantoms(ph)
    lines = []
    code_then, code_now = recorded.get("code") or results.get("code"), code_version()
    lines.append(f"code: recorded {_code(code_then)}, now {_code(code_now)}")
    data_changed = []
    if isinstance(results.get("data"), dict):
        now = provenance(cfg)["data"]
        for role in dict.fromkeys([*results["data"], *now]):
            then_files, now_files = results["data"].get(role, {}), now.get(role, {})
            for path in dict.fromkeys([*then_files, *now_files]):
                if path not in now_files:
                    data_changed.append(f"{role}: {path} was read then, is not now")
                elif path not in then_files:
                    data_changed.append(f"{role}: {path} is read now, was not then")
                elif now_files[path] != then_files[path]:
                    data_changed.append(f"{role}: {path} has other contents (sha256)")
        lines += [f"data differs: {d}" for d in data_changed] or ["data: the same files, each with its recorded sha256"]
    rerun = run_one(cfg, arm, over, seed, labels)
    rows = compare(recorded, rerun)
    for key, a, b, ok in rows:
        lines.append(f"{'match  ' if ok else 'DIFFERS'} {key}: recorded {_num(a)}, rerun {_num(b)}")
    matched = sum(ok for *_, ok in rows)
    lines.append(f"{matched} of {len(rows)} numbers match ({arm}, seed {seed}"
                 + ("" if labels is None else f", {labels} labelled cases") + f"; rerun in {out})")
    return {"lines": lines, "matched": matched, "total": len(rows), "data_changed": data_changed, "code": code_now}


def _code(c: dict | None) -> str:
    if not c or not c.get("commit"):
        return "unknown (no commit recorded)" if not c else f"subfore {c.get('version')} (no git commit)"
    return f"{c['commit'][:12]}{' + uncommitted changes' if c.get('dirty') else ''}"


def _num(v: float | None) -> str:
    return "absent" if v is None else repr(v)
