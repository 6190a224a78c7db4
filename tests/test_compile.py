"""``train.compile``: the console script compiles the network in place; losses, checkpoints and exports are the
eager run's, and a compiled run resumes.

The runs use torch.compile's ``aot_eager`` backend (set by a sitecustomize this test writes): dynamo captures the
graphs and AOTAutograd traces forward and backward as with inductor, without inductor's C++ build, whose first
step took 167 s for this network on a 2-core CPU (2026-12-07; fs 8: 209 s, docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

SUBFORE = str(Path(sys.executable).with_name("subfore"))

# Imported by every process of the runs (on PYTHONPATH): picks the backend, and at exit writes torch._dynamo's
# counters, the proof that something was compiled.
SITE = '''
import atexit, json, os
import subfore.engine.compile
subfore.engine.compile.BACKEND = "aot_eager"

def _dump():
    from torch._dynamo.utils import counters
    with open(os.environ["SUBFORE_TEST_COUNTERS"], "w") as f:
        json.dump({k: dict(v) for k, v in counters.items()}, f)

atexit.register(_dump)
'''


def _config(phantom_dir: Path, tmp: Path) -> Path:
    tree = {
        "run_dir": str(tmp / "unused"),
        "seed": 0,
        "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "num_workers": 0,
                 "cache_dir": str(phantom_dir.parent / "cache_runs")},
        "model": {"name": "basicunet", "feature_size": 4},
        "masking": {"strategy": "foreground", "ratio": 0.6, "subvolume_size": 8},
        "optim": {"warmup_steps": 1},
        "train": {"max_steps": 2, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress_bar": False},
    }
    path = tmp / "compile.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _pretrain(tmp: Path, cfg: Path, name: str, *sets: str, resume: bool = False) -> tuple[Path, dict]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    counters = tmp / f"{name}.counters.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "SUBFORE_TEST_COUNTERS": str(counters)}
    run = tmp / name
    args = [SUBFORE, "pretrain", "--config", str(cfg), "--set", f"run_dir={run}", *(f"--set={s}" for s in sets)]
    proc = subprocess.run(args + (["--resume"] if resume else []), capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, json.loads(counters.read_text())


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _state(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt.get("state_dict", ckpt)


def test_compiled_run_trains_as_the_eager_run_and_resumes(phantom_dir, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cfg = _config(phantom_dir, tmp_path)
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(_pretrain, tmp_path, cfg, "compiled", "train.compile=true"),
                pool.submit(_pretrain, tmp_path, cfg, "eager")]
        (compiled, c_counts), (eager, e_counts) = [j.result() for j in jobs]
    # Compiled: dynamo captured graphs and AOTAutograd traced them; eager: nothing was compiled.
    assert c_counts["stats"]["unique_graphs"] >= 1 and c_counts["aot_autograd"]["total"] >= 1
    assert e_counts.get("stats", {}).get("unique_graphs", 0) == 0
    # The same losses: AOTAutograd's decompositions (inductor's fused kernels likewise) sum fp32 in another order,
    # a few ulp per op; 1e-4 relative is far below what a different mask, crop or update changes (≥ 1e-2 here).
    got, ref = _losses(compiled), _losses(eager)
    assert list(got) == list(ref) == [1, 2]
    assert list(got.values()) == pytest.approx(list(ref.values()), rel=1e-4, abs=0)
    # Checkpoints and the exported encoder have the eager network's keys (no _orig_mod. prefix), and its weights.
    for rel in ("checkpoints/last.ckpt", "encoder.pt"):
        mine, theirs = _state(compiled / rel), _state(eager / rel)
        assert list(mine) == list(theirs)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-3, atol=1e-5)
    # The compiled run's last.ckpt resumes, compiled, into step 3.
    _, r_counts = _pretrain(tmp_path, cfg, "compiled", "train.compile=true", "train.max_steps=3", resume=True)
    assert r_counts["stats"]["unique_graphs"] >= 1
    assert list(_losses(compiled)) == [1, 2, 3]
    assert torch.load(compiled / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
