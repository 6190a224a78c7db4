"""docs/api.md's script runs as written and does what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_doc_script_runs(tmp_path):
    text = (ROOT / "docs" / "api.md").read_text()
    (script,) = re.findall(r"```python\n(.*?)```", text, re.S)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "runs" / "api_demo"
    meta = json.loads((root / "pretrain" / "encoder.json").read_text())
    assert meta["format"] == 1 and meta["step"] == 4 and meta["model"]["name"] == "basicunet"
    assert (root / "finetune" / "checkpoints" / "best.ckpt").is_file()
    assert "pretrained weights from" in (root / "finetune" / "pretrained_load.txt").read_text()
    scores = json.loads((root / "metrics.json").read_text())
    assert proc.stdout.strip().splitlines()[-1] == str(scores["mean"]["mean_dice"])


def test_api_names_are_the_clis():
    import subfore.api as api
    from subfore import evaluate, inference, pretrain, probe

    assert api.pretrain is pretrain.pretrain and api.evaluate is evaluate.evaluate
    assert api.predict is inference.predict and api.probe is probe.probe_encoder
