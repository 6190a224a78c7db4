"""The linear probe (frozen network vs random init) and the foreground fingerprint, through the console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import write_nifti

SIX = {1: 1, 6: 2}  # spleen, liver


def _run(*args):
    return subprocess.run(["subfore", *map(str, args)], capture_output=True, text=True)


def _pretrain_config(phantom_dir, tmp_path, steps: int, **probe) -> dict:
    return {
        "run_dir": str(tmp_path / f"run{steps}"),
        "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "spacing": [4.0, 4.0, 4.0],
                 "cache_dir": str(tmp_path / "cache"), "num_workers": 0},
        "model": {"name": "basicunet", "feature_size": 8},
        "train": {"max_steps": steps, "batch_size": 2, "log_every": 1, "ckpt_every": steps, "progress_bar": False},
        **({"probe": {"data": str(phantom_dir / "dataset.json"), "label_map": SIX, "steps": 100, **probe}}
           if probe else {}),
    }


@pytest.fixture(scope="module")
def pretrained(phantom_dir, tmp_path_factory):
    """A short pretraining that probes itself at steps 2 and 4 (probe.every 2)."""
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "pre.yaml").write_text(yaml.safe_dump(_pretrain_config(phantom_dir, tmp, 4, every=2)))
    proc = _run("pretrain", "--config", tmp / "pre.yaml")
    assert proc.returncode == 0, proc.stderr
    return tmp / "run4"


def test_pretraining_logs_probe_dice_and_its_baseline(pretrained):
    rows = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in rows if "probe_dice" in r]
    assert [r["step"] for r in probes] == [2, 4]
    assert "probe_baseline" in probes[0] and "probe_baseline" not in probes[1]
    assert (pretrained / "probe_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_cli_writes_json_markdown_and_chart_and_is_reproducible(pretrained, phantom_dir, tmp_path):
    args = ["probe", "--encoder", pretrained / "encoder.pt", "--data", phantom_dir / "dataset.json", "--label-map",
            json.dumps(SIX), "--steps", "100", "--device", "cpu"]
    a, b = _run(*args, "--out", tmp_path / "a.json"), _run(*args, "--out", tmp_path / "b.json")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ra, rb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert ra["pretrained"] == rb["pretrained"] and ra["baseline"] == rb["baseline"]  # a fixed protocol
    assert set(ra["pretrained"]["dice"]) == {"class_1", "class_2"}
    assert ra["difference"] == pytest.approx(ra["pretrained"]["mean_dice"] - ra["baseline"]["mean_dice"], abs=1e-6)
    assert ra["protocol"]["train_volumes"] == 3 and ra["protocol"]["test_volumes"] == 1
    assert a.stdout.startswith("linear probe (100 steps, 3 train / 1 test volumes): mean Dice")
    assert (tmp_path / "a.md").read_text().startswith("linear probe") and (tmp_path / "a.png").stat().st_size > 0
    # The probe of the pretraining's last step is the number logged at that step.
    logged = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines() if "probe_dice" in x][-1]
    assert ra["pretrained"]["mean_dice"] == pytest.approx(logged["probe_dice"], abs=1e-6)


@pytest.fixture(scope="module")
def longer(tmp_path_factory):
    """60 steps on 8 phantoms at 4 mm: long enough for the probe to read more than a random init does."""
    from subfore.phantoms import PhantomSpec, write_phantoms

    tmp = tmp_path_factory.mktemp("longer")
    write_phantoms(tmp / "ph8", n=8, seed=3, spec=PhantomSpec(spacing=(2.0, 2.0, 3.0)))
    cfg = {"run_dir": str(tmp / "run"), "seed": 0,
           "data": {"train": str(tmp / "ph8" / "dataset.json"), "roi": [32, 32, 32], "spacing": [4.0, 4.0, 4.0],
                    "cache_dir": str(tmp / "cache"), "num_workers": 0},
           "model": {"name": "basicunet", "feature_size": 8},
           "train": {"max_steps": 60, "batch_size": 4, "log_every": 10, "ckpt_every": 60, "progress_bar": False}}
    (tmp / "pre.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run("pretrain", "--config", tmp / "pre.yaml")
    assert proc.returncode == 0, proc.stderr
    return tmp


def test_shuffled_encoder_scores_at_or_below_random_init(longer, tmp_path):
    import shutil

    state = torch.load(longer / "run" / "encoder.pt", weights_only=True)
    g = torch.Generator().manual_seed(0)
    shuffled = {k: v.flatten()[torch.randperm(v.numel(), generator=g)].view_as(v) if v.is_floating_point() else v
                for k, v in state.items()}
    (tmp_path / "shuffled").mkdir()
    torch.save(shuffled, tmp_path / "shuffled" / "encoder.pt")
    shutil.copy(longer / "run" / "encoder.json", tmp_path / "shuffled" / "encoder.json")
    args = ["--data", longer / "ph8" / "dataset.json", "--label-map", "{1: 1, 6: 2, 7: 3}", "--steps", "200",
            "--device", "cpu"]
    out = {}
    for name, enc in (("pretrained", longer / "run" / "encoder.pt"), ("shuffled", tmp_path / "shuffled" / "encoder.pt")):
        proc = _run("probe", "--encoder", enc, *args, "--out", tmp_path / f"{name}.json")
        assert proc.returncode == 0, proc.stderr
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    base = out["pretrained"]["baseline"]["mean_dice"]
    assert out["shuffled"]["baseline"]["mean_dice"] == base  # the same random init, the same protocol
    # Random inits of this network probe within ≈ 0.03 of each other here (seeds 0, 1, 2: 0.179, 0.164, 0.190;
    # docs/probe.md); a shuffled encoder lands in that band, the pretrained one clearly above it (0.244 vs 0.179).
    assert out["shuffled"]["pretrained"]["mean_dice"] <= base + 0.02, out["shuffled"]
    assert out["pretrained"]["pretrained"]["mean_dice"] >= base + 0.04, out["pretrained"]


def test_probe_refuses_an_encoder_without_its_json(tmp_path):
    torch.save({}, tmp_path / "encoder.pt")
    proc = _run("probe", "--encoder", tmp_path / "encoder.pt", "--data", tmp_path, "--out", tmp_path / "p.json")
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {tmp_path / 'encoder.json'}: missing; the probe reads the architecture "
                                   f"from the encoder.json beside encoder.pt")


@pytest.mark.parametrize("store", [False, True], ids=["from-files", "from-store"])
def test_fingerprint_matches_a_hand_count(tmp_path, store):
    # Two 32³ volumes at the preset's spacing, so each crop is the whole volume: 8 subvolumes of 16³.
    lit = np.full((32, 32, 32), -1000, np.int16)
    lit[:16, :16, :16] = lit[16:, :16, :16] = lit[:16, 16:, 16:] = 40  # 3 soft-tissue subvolumes (mean ≥ λ)
    write_nifti(tmp_path / "lit.nii.gz", lit)
    write_nifti(tmp_path / "air.nii.gz", np.full((32, 32, 32), -1000, np.int16))  # no foreground: falls back
    cfg = {"data": {"train": str(tmp_path), "roi": [32, 32, 32], "spacing": [1.5, 1.5, 1.5],
                    "cache_dir": str(tmp_path / "cache") if store else None},
           "model": {"name": "basicunet"}, "masking": {"ratio": 0.6, "subvolume_size": 16, "threshold": 0.1}}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run("fingerprint", tmp_path, "--config", tmp_path / "pre.yaml", "--out", tmp_path / "fp", "--crops", "2")
    assert proc.returncode == 0, proc.stderr
    fp = json.loads((tmp_path / "fp" / "fingerprint.json").read_text())
    # air: f = 0 (fallback: random, round(0.6·8) = 5 of 8); lit: f = 3/8, round(0.6·3) = 2 of 8 masked.
    assert sorted(fp["foreground_share"]["per_crop"]) == [0.0, 0.375]
    assert fp["foreground_share"]["mean"] == pytest.approx(0.1875)
    assert fp["expected_masked_share"] == {"foreground": pytest.approx((5 / 8 + 2 / 8) / 2), "random": 0.625}
    assert fp["fallback_share"] == 0.5
    assert (tmp_path / "fp" / "foreground_share.png").read_bytes()[:4] == b"\x89PNG"
    if store:  # the store's manifest records each whole volume's share at the config's λ: the same hand count
        (manifest,) = (tmp_path / "cache").glob("store-*/manifest.json")
        shares = {Path(v["source"]).name: v["foreground_share"] for v in json.loads(manifest.read_text())["volumes"]}
        assert shares == {"air.nii.gz": 0.0, "lit.nii.gz": 0.375}
