"""docs/api.md's script runs as written and does what it says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_cli_calls_the_api(tmp_path, monkeypatch):
    import subfore.api as api
    from subfore.cli import main
    from subfore.preempt import STOP

    (tmp_path / "pre.yaml").write_text(f"run_dir: {tmp_path / 'run'}\ndata: {{train: {tmp_path / 'none'}}}\n")
    calls = []
    monkeypatch.setattr(api, "pretrain", lambda cfg, resume=None: calls.append((cfg.run_dir, resume)) or "enc.pt")
    try:
        with pytest.raises(SystemExit) as done:
            main(["pretrain", "--config", str(tmp_path / "pre.yaml"), "--resume-if-exists"])
    finally:
        STOP.restore()
    assert done.value.code == 0 and calls == [(str(tmp_path / "run"), "auto")]


def test_encoder_json_of_every_format_reads_and_a_newer_one_is_refused(tmp_path):
    from subfore.errors import SubforeError
    from subfore.models.artifact import ENCODER_FORMAT, EncoderMeta, read_encoder_meta, write_encoder

    # As format 1 was written before it carried its version: no "format" key, no "nnunet" key.
    old = {"model": {"name": "basicunet", "feature_size": 8}, "in_channels": 1, "roi": [32, 32, 32], "step": 3,
           "preset": {"modality": "ct", "spacing": [4.0, 4.0, 4.0]}}
    (tmp_path / "encoder.json").write_text(json.dumps(old))
    meta = read_encoder_meta(tmp_path / "encoder.pt")
    assert (meta.format, meta.name, meta.step, meta.roi, meta.preset.spacing) == (1, "basicunet", 3, (32, 32, 32),
                                                                                    (4.0, 4.0, 4.0))
    out = tmp_path / "new"
    write_encoder(out, {}, meta)
    written = json.loads((out / "encoder.json").read_text())
    assert written["format"] == ENCODER_FORMAT and "nnunet" not in written and written["step"] == 3
    assert EncoderMeta.model_validate(written) == meta
    (tmp_path / "encoder.json").write_text(json.dumps({**old, "format": ENCODER_FORMAT + 1}))
    with pytest.raises(SubforeError, match=f"format {ENCODER_FORMAT + 1} is newer"):
        read_encoder_meta(tmp_path)
    (tmp_path / "encoder.json").write_text(json.dumps({k: v for k, v in old.items() if k != "roi"}))
    with pytest.raises(SubforeError, match=r"not an encoder.json written by subfore pretrain \(KeyError: 'roi'\)"):
        read_encoder_meta(tmp_path)
