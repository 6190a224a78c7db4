"""One precision: ``train.precision: auto`` decided from the accelerator a run uses, and validation and inference
computing at the run's precision (the loss and metrics in fp32)."""

from __future__ import annotations

import pytest
import torch

from subfore.engine.run import autocast_of, inference_precision, resolve_precision


@pytest.fixture
def cuda_with_bf16(monkeypatch):
    """A machine that reports a CUDA GPU with bf16 (no GPU is touched: only the two queries are patched)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


@pytest.mark.parametrize("accelerator, expected", [("cpu", "32"), ("auto", "bf16-mixed"), ("gpu", "bf16-mixed"),
                                                   ("cuda", "bf16-mixed")])
def test_auto_follows_the_accelerator_on_a_machine_with_a_gpu(cuda_with_bf16, accelerator, expected):
    assert resolve_precision("auto", accelerator) == expected
    assert inference_precision("auto", accelerator) == ("32" if expected == "32" else "bf16")


def test_auto_without_a_gpu_is_fp32_and_explicit_settings_stay(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert [resolve_precision("auto", a) for a in ("auto", "gpu", "cpu")] == ["32", "32", "32"]
    assert resolve_precision("16-mixed", "cpu") == "16-mixed"
    assert [autocast_of(p) for p in ("bf16-mixed", "16-mixed", "32-true", "64")] == ["bf16", "fp16", "32", "32"]


def test_finetuning_validation_runs_at_the_training_precision(phantom_dir, tmp_path, monkeypatch):
    """A bf16-mixed CPU finetuning validates its sliding windows under bf16 autocast (it used to force fp32)."""
    import subfore.finetune.module as module
    from subfore.config import FinetuneConfig, load_config
    from subfore.finetune import finetune

    seen = []
    real = module.predict_volume

    def recording(net, image, roi, overlap, sw_batch_size, sigmoid, precision="32"):
        seen.append((precision, torch.is_autocast_enabled("cpu")))
        return real(net, image, roi, overlap, sw_batch_size, sigmoid, precision)

    monkeypatch.setattr(module, "predict_volume", recording)
    tree = {"run_dir": str(tmp_path / "ft"),
            "data": {"train": str(phantom_dir / "dataset.json"), "val": str(phantom_dir / "dataset.json"),
                     "roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0], "samples_per_volume": 2, "num_workers": 0},
            "model": {"name": "basicunet", "feature_size": 4, "out_channels": 14},
            "train": {"max_steps": 1, "batch_size": 2, "val_every": 1, "ckpt_every": 1, "log_every": 1,
                      "progress_bar": False, "accelerator": "cpu", "precision": "bf16-mixed"}}
    finetune(load_config(None, [], FinetuneConfig, base=tree))
    # Lightning's own autocast is on around validation_step too; predict_volume keeps it on (bf16), not off (32).
    assert seen and all(p == "bf16" for p, _ in seen), seen


@pytest.mark.parametrize("device, expected", [("cuda", True), ("cpu", False)])
def test_cudnn_autotuning_is_on_for_runs_on_cuda_only(monkeypatch, tmp_path, device, expected):
    """Fixed-size 3D crops: cuDNN picks its fastest kernels once (Trainer(benchmark=True)) where the run is on CUDA."""
    import subfore.engine.run as run
    from subfore.config import TrainConfig

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not expected)
    monkeypatch.setattr(run, "device_for", lambda accelerator: device)
    run.make_trainer(tmp_path, TrainConfig(accelerator="cpu", devices=1, progress_bar=False), [], False)
    assert torch.backends.cudnn.benchmark is expected
