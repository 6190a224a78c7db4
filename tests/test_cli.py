"""The command line as a user meets it: outputs written, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REAL_CT, REAL_SEG, needs_real_ct
from helpers import write_nifti


def run(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "subfore", *map(str, args)], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def test_show_mask_on_phantom_writes_png_and_counts(phantom_dir, tmp_path):
    png, js = tmp_path / "m.png", tmp_path / "m.json"
    run("show-mask", phantom_dir / "imagesTr" / "phantom_000.nii.gz", "--out", png, "--json", js, check=True)
    stats = json.loads(js.read_text())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["subvolumes"] == 216 and stats["threshold"] == pytest.approx(0.1)
    assert stats["masked"] == round(0.6 * stats["foreground"])


@needs_real_ct
def test_show_mask_on_real_ct(tmp_path):
    png, js = tmp_path / "real.png", tmp_path / "real.json"
    run("show-mask", REAL_CT, "--out", png, "--json", js, "--seed", 1, check=True)
    stats = json.loads(js.read_text())
    assert stats["subvolumes"] == 216
    # Real abdominal CT in a 96³ crop at 1.5 mm: air around the body is background, the body is not.
    assert 0 < stats["foreground"] < stats["subvolumes"]
    assert stats["masked"] == round(0.6 * stats["foreground"])
    assert png.stat().st_size > 10_000


@needs_real_ct
def test_analyze_real_ct_with_labels(tmp_path):
    run("analyze", REAL_CT, "--labels", REAL_SEG, "--out", tmp_path, check=True)
    result = json.loads((tmp_path / "analysis.json").read_text())
    ent = result["mean_entropy_bits"]
    assert ent["foreground"] > ent["background"]  # the paper's Fig. 3a claim, on real data
    # Organs (lungs included in TotalSegmentator's labels) sit above λ far more often than background does.
    assert result["organ_fraction_at_or_above_threshold"] > 0.8
    assert result["organ_fraction_at_or_above_threshold"] > 1 - result["background_fraction_below_threshold"]
    assert (tmp_path / "intensity.png").exists()


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda p: p / "missing.nii.gz", "missing.nii.gz: no such file"),
        (lambda p: write_nifti(p / "flat.nii.gz", np.zeros((30, 30), np.int16)), "flat.nii.gz: expected a 3D volume"),
        (lambda p: write_nifti(p / "nan.nii.gz", np.full((30, 30, 30), np.nan, np.float32)), "nan.nii.gz: contains"),
        (lambda p: (p / "trunc.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage") and p / "trunc.nii.gz", "trunc.nii.gz"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, make, expected):
    path = make(tmp_path)
    proc = run("show-mask", path, "--out", tmp_path / "x.png")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_threshold_at_b_min_is_rejected_on_the_command_line(phantom_dir, tmp_path):
    proc = run("show-mask", phantom_dir / "imagesTr" / "phantom_000.nii.gz", "--out", tmp_path / "x.png",
               "--threshold", "0")
    assert proc.returncode == 1 and "b_min" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run("--debug", "show-mask", tmp_path / "missing.nii.gz", "--out", tmp_path / "x.png")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("raised, code, line", [
    (KeyError("state_dict"), 1, "error: internal error, a bug in subfore (KeyError: 'state_dict'); rerun with "
                                "--debug for the traceback and report it"),
    (MemoryError(), 1, "error: out of memory (MemoryError); lower train.batch_size, data.roi or --sw-batch-size, or "
                       "set model.checkpointing: true"),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1, "error: out of memory (CUDA out of memory. "
                                                                          "Tried to allocate 2.00 GiB); lower"),
    (KeyboardInterrupt(), 130, "stopped: interrupted (Ctrl-C)"),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 45000ms for recv "
                  "operation to complete"), 1, "error: a rank waited longer than train.timeout_min for the others ("),
])
def test_every_exception_leaves_the_cli_as_one_line(raised, code, line, tmp_path, monkeypatch, capsys):
    import subfore.api
    from subfore.cli.app import main

    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(subfore.api, "pretrain", fail)
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--config", "configs/pretrain/demo_cpu.yaml", "--set", f"run_dir={tmp_path / 'run'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_.value.code == code and len(err) == 1 and err[0].startswith(line), err
    # --debug: the traceback, as raised (Ctrl-C as Typer's own exit 130)
    with pytest.raises(SystemExit if isinstance(raised, KeyboardInterrupt) else type(raised)):
        main(["--debug", "pretrain", "--config", "configs/pretrain/demo_cpu.yaml"])
