"""benchmarks/gpu_check.py --tiny: the GPU check's code paths on a CPU, every row present and every figure real."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WARMUP, STEPS = 1, 2


def expected_rows() -> list[str]:
    return [f"{config}/{loop}/ckpt={ckpt}/compile={comp}" for config in ("subfore", "mae")
            for loop in ("plain", "engine") for ckpt in ("off", "on") for comp in ("off", "on")] + ["store"]


def test_tiny_gpu_check_measures_every_row(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--warmup",
                           str(WARMUP), "--steps", str(STEPS), "--out", str(out), "--run-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(expected_rows())
    assert report["platform"]["torch"] == torch.__version__ and report["platform"]["device"].startswith("CPU")
    assert list(tmp_path.glob("subfore-gpu-check-*")) == []  # the rows' scratch folders are gone

    for name, r in rows.items():
        if name == "store":
            continue
        if r["compile"]:  # minutes of C++ compilation on a CPU: listed, not run, in --tiny
            assert r["status"] == "skipped" and "--tiny" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        # The optimiser really stepped as often as asked, and the clock covered the timed steps only.
        assert (r["steps_timed"], r["steps_total"]) == (STEPS, WARMUP + STEPS), r
        assert r["batch"] == 1 and r["roi"] == [32, 32, 32]
        for key in ("samples_per_s", "step_s", "peak_mem_mb", "loss") if r["loop"] == "plain" else \
                ("samples_per_s", "step_s", "peak_mem_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert math.isclose(r["samples_per_s"] * r["step_s"], r["batch"], rel_tol=1e-9)
        # model.checkpointing reaches the network the row trains: checkpointed forwards only when it is on.
        calls = r["checkpoint_calls_per_step"]
        assert (calls > 0) if r["checkpointing"] else (calls == 0), (name, calls)
        assert r["graphs_compiled"] == 0  # nothing compiled without train.compile
        assert r["model"] == ("basicunet" if r["config"] == "subfore" else "unetr")

    store = rows["store"]
    assert store["status"] == "ok", store
    assert store["batch_shape"] == [1, 1, 32, 32, 32] and store["crops"] == 4  # 4 batches of 1 crop
    assert math.isfinite(store["crops_per_s"]) and store["crops_per_s"] > 0

    # The table: one line per training row with its figures (or why not), and the store's line.
    for name, r in rows.items():
        if name == "store":
            assert re.search(r"^\| pretraining's loader \| [0-9.]+ \|", proc.stdout, re.M), proc.stdout
            continue
        config, loop, ckpt, comp = (part.split("=")[-1] for part in name.split("/"))
        cells = rf"^\| {config} \| {loop} \| {ckpt} \| {comp} \| "
        figure = r"[0-9.]+ \| " if r["status"] == "ok" else r"– \| "
        assert re.search(cells + figure, proc.stdout, re.M), (name, proc.stdout)
