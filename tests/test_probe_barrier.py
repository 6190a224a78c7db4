"""Rank 0's side work in pretraining (the probe, snapshots, encoder export) under 2 processes (gloo): the other
rank waits for it in a barrier, bounded by the process group's timeout, which is ``train.timeout_min``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SUBFORE = str(Path(sys.executable).with_name("subfore"))

# Imported by both ranks (on PYTHONPATH). At train start each rank writes its process group's timeout as gloo holds
# it; SUBFORE_TEST_SLOW_PROBE="SECONDS,TIMEOUT_S" makes rank 0's probe sleep and shortens the group's timeout.
SITE = '''
import json, os, time
from datetime import timedelta
from subfore.pretrain.run import RunArtifacts

def on_train_start(self, trainer, module):
    import torch
    import torch.distributed.distributed_c10d as c10d
    slow = os.environ.get("SUBFORE_TEST_SLOW_PROBE")
    if slow:
        c10d._set_pg_timeout(timedelta(seconds=float(slow.split(",")[1])), None)
    gloo = c10d._get_default_group()._get_backend(torch.device("cpu"))
    path = os.path.join(os.environ["SUBFORE_TEST_OUT"], f"timeout_rank{trainer.global_rank}.json")
    with open(path, "w") as f:
        json.dump(gloo.options._timeout.total_seconds(), f)

_probe_now = RunArtifacts._probe_now

def probe_now(self, trainer, module):
    slow = os.environ.get("SUBFORE_TEST_SLOW_PROBE")
    if slow:
        time.sleep(float(slow.split(",")[0]))
    _probe_now(self, trainer, module)

RunArtifacts.on_train_start = on_train_start
RunArtifacts._probe_now = probe_now
'''


def _run(phantom_dir: Path, tmp: Path, *args: str, slow: str | None = None) -> subprocess.CompletedProcess:
    tree = {
        "run_dir": str(tmp / "run"),
        "seed": 0,
        "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "num_workers": 0,
                 "cache_dir": str(phantom_dir.parent / "cache_runs")},
        "model": {"name": "basicunet", "feature_size": 4},
        "masking": {"strategy": "foreground", "ratio": 0.6, "subvolume_size": 8},
        "optim": {"warmup_steps": 1},
        # Probed at step 1 of 2: rank 1 then waits for rank 0 before step 2's gradient all-reduce.
        "train": {"max_steps": 2, "batch_size": 1, "ckpt_every": 2, "log_every": 1, "progress_bar": False,
                  "accelerator": "cpu", "devices": 2, "timeout_min": 5},
        "probe": {"data": str(phantom_dir / "dataset.json"), "label_map": {1: 1, 6: 2}, "steps": 5, "every": 1},
    }
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(tree))
    (tmp / "site").mkdir()
    (tmp / "site" / "sitecustomize.py").write_text(SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp / "site"), os.environ.get("PYTHONPATH", "")]),
           "SUBFORE_TEST_OUT": str(tmp)}
    env.pop("SUBFORE_TEST_SLOW_PROBE", None)
    if slow:
        env["SUBFORE_TEST_SLOW_PROBE"] = slow
    return subprocess.run([SUBFORE, *args, "pretrain", "--config", str(tmp / "cfg.yaml")], capture_output=True,
                          text=True, env=env, timeout=300)


def test_two_processes_probe_and_the_group_timeout_of_train_timeout_min(phantom_dir, tmp_path):
    proc = _run(phantom_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "probe_dice" in r] == [1, 2]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # train.timeout_min 5 → 300 s on both ranks (torch's default for gloo: 30 min; train.timeout_min's: 60).
    assert [json.loads((tmp_path / f"timeout_rank{r}.json").read_text()) for r in (0, 1)] == [300.0, 300.0]
