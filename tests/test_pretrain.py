"""Few-step pretraining runs on phantoms: artifacts, export, resume, strategies and faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from monai.networks.nets import UNETR, SwinUNETR

from subfore.config import load_config
from subfore.errors import ConfigError, SubforeError
from subfore.masking import REGISTRY
from subfore.pretrain import pretrain


def base_config(phantom_dir, tmp_path, **sections) -> dict:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "num_workers": 0,
                 # one store per session (as tests/test_runs.py): its key is the preset, so runs share it
                 "cache_dir": str(phantom_dir.parent / "cache_runs")},
        "model": {"name": "basicunet", "feature_size": 4},
        "masking": {"strategy": "foreground", "ratio": 0.6, "subvolume_size": 16},
        "optim": {"warmup_steps": 1},
        "train": {"max_steps": 2, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress_bar": False},
    }
    for key, value in sections.items():
        cfg[key].update(value)
    return cfg


def run_cfg(tree, overrides=(), resume=None):
    return pretrain(load_config(None, list(overrides), base=tree), resume=resume)


def test_swinunetr_run_writes_every_artifact_and_exports_encoder(phantom_dir, tmp_path):
    tree = base_config(
        phantom_dir, tmp_path,
        data={"roi": [64, 64, 64], "val": str(phantom_dir / "dataset.json")},
        model={"name": "swinunetr", "feature_size": 12},
        train={"max_steps": 3, "batch_size": 1, "ckpt_every": 2, "snapshot_every": 2, "val_every": 2},
    )
    encoder = run_cfg(tree)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["feature_size"] == 12
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    for r in train_lines:
        assert {"step", "loss", "lr", "masked_fraction", "foreground_fraction", "fallbacks"} <= set(r)
        assert 0 < r["masked_fraction"] <= r["foreground_fraction"] + 1e-6  # foreground masking: only fg is masked
    assert any("val_loss" in r for r in lines)
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step_000001.png", "step_000002.png"]
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    # The exported encoder loads into MONAI's SwinUNETR with 14 classes, no swinViT key missing.
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_v2=True)
    state = torch.load(encoder, weights_only=True)
    result = net.load_state_dict(state, strict=False)
    assert not [k for k in result.missing_keys if k.startswith("swinViT.")]
    assert set(result.missing_keys) == {"out.conv.conv.weight", "out.conv.conv.bias"}
    assert not result.unexpected_keys
    assert torch.equal(net.swinViT.patch_embed.proj.weight, state["swinViT.patch_embed.proj.weight"])


def test_unetr_encoder_export_loads_into_monai_unetr(phantom_dir, tmp_path):
    vit = {"name": "unetr", "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}
    tree = base_config(phantom_dir, tmp_path, data={"roi": [64, 64, 64]}, model=vit, train={"batch_size": 1})
    encoder = run_cfg(tree)
    net = UNETR(in_channels=1, out_channels=14, img_size=(64, 64, 64), feature_size=8, hidden_size=96, mlp_dim=192,
                num_heads=4)
    result = net.load_state_dict(torch.load(encoder, weights_only=True), strict=False)
    assert not [k for k in result.missing_keys if k.startswith("vit.")]
    assert not result.unexpected_keys


@pytest.mark.parametrize("strategy", sorted(REGISTRY))
def test_each_registered_strategy_trains(phantom_dir, tmp_path, strategy):
    tree = base_config(phantom_dir, tmp_path, masking={"strategy": strategy, "fill": "token"})
    run_cfg(tree)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    masked = [r["masked_fraction"] for r in lines]
    assert all(0 < m < 1 for m in masked)


def test_resume_continues_step_count_and_optimizer_state(phantom_dir, tmp_path):
    tree = base_config(phantom_dir, tmp_path, train={"max_steps": 3, "ckpt_every": 3})
    run_cfg(tree)
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt_path, weights_only=False)
    assert first["global_step"] == 3
    adam_step = lambda ck: float(next(iter(ck["optimizer_states"][0]["state"].values()))["step"])  # noqa: E731
    assert adam_step(first) == 3
    run_cfg(tree, ["train.max_steps=5"], resume="last")
    second = torch.load(ckpt_path, weights_only=False)
    assert second["global_step"] == 5
    assert adam_step(second) == 5  # continued from 3, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 5
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_empty_mask_count_belongs_to_the_run_and_survives_resume(phantom_dir, tmp_path):
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for name in ("a", "b"):  # two runs in one process: each counts its own
        tree = base_config(phantom_dir, tmp_path, masking={"ratio": 0.0}, train={"max_steps": 2})
        tree["run_dir"] = str(tmp_path / name)
        run_cfg(tree)
        assert [r["empty_masks"] for r in rows(tmp_path / name)] == [1, 2]
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["subfore"]["empty_masks"] == 2
    run_cfg(tree, ["train.max_steps=3"], resume="last")
    assert [r["empty_masks"] for r in rows(tmp_path / "b")] == [1, 2, 3]


def test_non_finite_losses_stop_after_max_bad_steps(phantom_dir, tmp_path, monkeypatch):
    import subfore.pretrain.module as engine

    monkeypatch.setattr(engine, "masked_loss", lambda pred, target, mask, loss="l1", counter=None: pred.sum() * float("nan"))
    tree = base_config(phantom_dir, tmp_path, train={"max_steps": 5, "max_bad_steps": 3})
    with pytest.raises(SubforeError, match="3 non-finite losses in a row"):
        run_cfg(tree)


def test_bad_data_file_stops_with_its_path_or_is_skipped(phantom_dir, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not a volume")
    good = str(phantom_dir / "imagesTr" / "phantom_000.nii.gz")
    tree = base_config(phantom_dir, tmp_path, data={"train": [str(bad), good]}, train={"batch_size": 1})
    with pytest.raises(SubforeError, match="broken.nii.gz"):
        run_cfg(tree)
    run_cfg(tree, ["data.skip_bad=true"])
    assert (tmp_path / "run" / "encoder.pt").exists()


def test_bad_config_keys_name_the_key(phantom_dir, tmp_path):
    tree = base_config(phantom_dir, tmp_path)
    with pytest.raises(ConfigError, match="unknown key 'masking.ratoi'"):
        load_config(None, ["masking.ratoi=0.5"], base=tree)
    with pytest.raises(ConfigError, match="'train.max_steps'"):
        load_config(None, ["train.max_steps=many"], base=tree)
    with pytest.raises(ConfigError, match="'masking.strategy'.*registered"):
        load_config(None, ["masking.strategy=checkerboard"], base=tree)
    with pytest.raises(ConfigError, match="missing key 'data.train'"):
        load_config(None, [], base={"data": {}})
    cfg = load_config(None, ["masking.threshold=-132.5 HU"], base=tree)
    assert cfg.masking.threshold_kwargs() == {"threshold": None, "threshold_hu": -132.5}
    with pytest.raises(ConfigError, match=r"train.batch_size \(3\) counts crops.*samples_per_volume \(2\)"):
        load_config(None, ["train.batch_size=3", "data.samples_per_volume=2"], base=tree)
    assert load_config(None, ["model.name=unetr"], base=tree).optim.lr == 1e-4  # the paper's UNETR rate


def test_swinunetr_rejects_small_roi_and_b_min_threshold(phantom_dir, tmp_path):
    tree = base_config(phantom_dir, tmp_path, model={"name": "swinunetr", "feature_size": 12})
    with pytest.raises(ConfigError, match="SwinUNETR needs every side ≥ 64"):
        run_cfg(tree)
    tree = base_config(phantom_dir, tmp_path, data={"window": [-175, 250, 0.1, 1.0]})
    # λ is resolved once, by the config (PretrainConfig.foreground_threshold), which names the key.
    with pytest.raises(ConfigError, match=r"masking.threshold 0.1: .*b_min"):
        run_cfg(tree)


def test_cli_bad_key_is_one_line(phantom_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(phantom_dir, tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "subfore", "pretrain", "--config", str(cfg), "--set",
                           "optim.learning_rate=1"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --set optim.learning_rate=1: unknown key 'optim.learning_rate'"


@pytest.mark.parametrize("name", ["demo_cpu", "paper_swinunetr", "paper_unetr"])
def test_shipped_configs_validate(name):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "pretrain" / f"{name}.yaml")
    assert cfg.masking.strategy == "foreground" and cfg.masking.ratio == 0.6 and cfg.masking.subvolume_size == 16
    if name.startswith("paper"):
        assert cfg.data.roi == (96, 96, 96) and cfg.train.batch_size == 4
        assert cfg.optim.lr == {"paper_swinunetr": 8e-4, "paper_unetr": 1e-4}[name]


def test_paper_config_without_data_names_the_missing_datalist(tmp_path):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "configs" / "pretrain" / "paper_swinunetr.yaml",
                      [f"run_dir={tmp_path}"])
    with pytest.raises(SubforeError, match="/path/to/BTCV/dataset.json: no such file"):
        pretrain(cfg)
