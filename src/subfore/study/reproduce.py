"""Rerun one run of a finished study and compare its numbers, one by one, with those its results.json records: exactly
on the platform that recorded them, against the arm's seed spread on any other."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..data.phantoms import ensure_phantoms
from ..errors import ConfigError, DataError
from ..provenance import PLATFORM_FIELDS, code_version
from .config import StudyConfig, expand_arms

# Identical on the same platform and code; the tolerance only absorbs JSON's float round trip.
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


def spreads(results: dict, recorded: dict) -> dict[str, tuple[float, int]]:
    """{number: (max − min, seeds)} over the seeds of the recorded run's arm and label count (2 seeds or more)."""
    values: dict[str, list[float]] = {}
    for run in results["runs"]:
        if run["arm"] == recorded["arm"] and run.get("labels") == recorded.get("labels"):
            for key, v in numbers(run).items():
                if v is not None and not math.isnan(v):
                    values.setdefault(key, []).append(v)
    return {k: (max(v) - min(v), len(v)) for k, v in values.items() if len(v) > 1}


def platform_differs(then: dict | None, now: dict | None) -> list[str] | None:
    """The platform fields (:data:`PLATFORM_FIELDS`) that differ between two records; None when either is missing."""
    if not then or not now:
        return None
    return [f for f in PLATFORM_FIELDS if then.get(f) != now.get(f)]


def judge(rows: list[tuple[str, float | None, float | None, bool]], spread: dict[str, tuple[float, int]]
          ) -> tuple[list[str], int]:
    """(a line per number: its difference, within or outside its seed spread; how many fail) on another platform."""
    lines, failed = [], 0
    for key, a, b, ok in rows:
        head = f"{key}: recorded {_num(a)}, rerun {_num(b)}"
        if a is None or b is None or math.isnan(a) or math.isnan(b):  # absent or NaN on a side: no difference
            lines.append(f"{'match  ' if ok else 'DIFFERS'} {head}" + ("" if ok else ": not comparable"))
        elif key not in spread:  # one seed: nothing to weigh a difference against
            lines.append(f"{'match  ' if ok else 'DIFFERS'} {head}, difference {b - a:+.6g}; no seed spread "
                         "(fewer than 2 seeds record it): exact comparison only")
        else:
            width, seeds = spread[key]
            ok = ok or abs(b - a) <= width + RTOL * max(1.0, abs(a))
            lines.append(f"{'within ' if ok else 'OUTSIDE'} {head}, difference {b - a:+.6g}, "
                         f"{'within' if ok else 'outside'} the seed spread {width:.6g} (max − min of {seeds} seeds)")
        failed += not ok
    return lines, failed


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
    (its paths are relative to it); returns {"lines", "matched", "total", "data_changed", "code", "platform",
    "same_platform", "failed", "passed"}."""
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
        data_now = provenance(cfg)["data"]
        for role in dict.fromkeys([*results["data"], *data_now]):
            then_files, now_files = results["data"].get(role, {}), data_now.get(role, {})
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
    matched = sum(ok for *_, ok in rows)
    then, now = recorded.get("platform"), rerun.get("platform")  # where the number was recorded, where it was rerun
    differs = platform_differs(then, now)
    same_platform = differs == []
    which = f"({arm}, seed {seed}" + ("" if labels is None else f", {labels} labelled cases") + f"; rerun in {out})"
    if same_platform:
        lines.insert(0, f"platform: the same as recorded ({_platform(now)}): every number must match exactly")
        for key, a, b, ok in rows:
            lines.append(f"{'match  ' if ok else 'DIFFERS'} {key}: recorded {_num(a)}, rerun {_num(b)}")
        failed = len(rows) - matched
        lines.append(f"{matched} of {len(rows)} numbers match {which}")
    else:
        if differs is None:
            missing = "the record has no platform (written before runs recorded theirs)" if not then else \
                "the rerun records no platform"
            head = f"platform unknown: {missing}; now {_platform(now)}"
        else:
            head = "platform differs: " + "; ".join(f"{f} recorded {then.get(f)!r}, now {now.get(f)!r}"
                                                    for f in differs)
        lines.insert(0, head + ": numbers reproduce exactly only on the recording platform; each is judged against "
                     "the arm's seed spread (max − min over its seeds in results.json)")
        judged, failed = judge(rows, spreads(results, recorded))
        lines += judged
        lines.append(f"{matched} of {len(rows)} numbers match exactly; {len(rows) - failed} of {len(rows)} agree "
                     f"within the seed spread, {failed} do not {which}")
    return {"lines": lines, "matched": matched, "total": len(rows), "data_changed": data_changed, "code": code_now,
            "platform": now, "same_platform": same_platform, "failed": failed,
            "passed": failed == 0 and not data_changed}


def _code(c: dict | None) -> str:
    if not c or not c.get("commit"):
        return "unknown (no commit recorded)" if not c else f"subfore {c.get('version')} (no git commit)"
    return f"{c['commit'][:12]}{' + uncommitted changes' if c.get('dirty') else ''}"


def _platform(p: dict | None) -> str:
    if not p:
        return "unknown"
    gpu = f" {p.get('gpu')}, CUDA {p.get('cuda')}, cuDNN {p.get('cudnn')}" if p.get("gpu") else ""
    return (f"{p.get('cpu')}, {p.get('cpu_capability')}, {p.get('threads')} threads, {p.get('device')}{gpu}; "
            f"Python {p.get('python')}, torch {p.get('torch')}, numpy {p.get('numpy')}, MONAI {p.get('monai')}, "
            f"Lightning {p.get('lightning')}")


def _num(v: float | None) -> str:
    return "absent" if v is None else repr(v)
