"""model.checkpointing on every backbone: same outputs, gradients and state_dict keys, and the checkpointed stages
really run twice (forward, then recomputed in backward) while the rest of the network runs once."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.utils.checkpoint
import yaml
from torch import nn

from subfore.config import ModelConfig
from subfore.errors import ConfigError
from subfore.models.checkpointing import is_checkpointed
from subfore.models.registry import BACKBONES, resolve_backbone

SUBFORE = str(Path(sys.executable).with_name("subfore"))

# A 3-stage nnU-Net ResEnc with 4…16 features: the resenc code path at 16³ in milliseconds.
TINY_RESENC = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "arch_kwargs": {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_blocks_per_stage": [1, 2, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
VIT = {"feature_size": 4, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2}
#: backbone → (model section, roi, the checkpointed stages' prefixes)
CASES = {
    "basicunet": ({"name": "basicunet", "feature_size": 2}, (32, 32, 32),
                  ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4.")),
    "unetr": ({"name": "unetr", **VIT}, (32, 32, 32), ("vit.blocks.",)),
    "resenc": ({"name": "resenc", "nnunet_architecture": TINY_RESENC}, (16, 16, 16), ("encoder.stages.",)),
    "mae": ({"name": "unetr", "encoding": "visible", **VIT}, (32, 32, 32), ("vit.blocks.",)),
}
DECODER = SimpleNamespace(width=16, depth=1, heads=2)


def build(case: str, checkpointing: bool) -> nn.Module:
    section, roi, _ = CASES[case]
    backbone = resolve_backbone(ModelConfig(**section, checkpointing=checkpointing))
    torch.manual_seed(0)
    if case == "mae":
        return backbone.build_visible(1, roi, DECODER, False)
    return backbone.build(1, 2, roi)


def inputs(case: str) -> tuple:
    roi = CASES[case][1]
    x = torch.randn(2 if case == "mae" else 1, 1, *roi, generator=torch.Generator().manual_seed(1))
    if case == "mae":  # 2×2×2 patches; samples with 5 and 3 visible patches share the padded batch
        mask = torch.zeros(2, 8, dtype=torch.bool)
        mask[0, :3] = True
        mask[1, 2:7] = True
        return x, mask.view(2, 2, 2, 2)
    return (x,)


def loss_of(out) -> torch.Tensor:
    out = out[0] if isinstance(out, tuple) else out
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()


def count_calls(net: nn.Module) -> dict[str, int]:
    """Forward calls per convolution and linear layer (by module name), counted by forward hooks."""
    calls: dict[str, int] = {}
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv3d, nn.Linear)):
            calls[name] = 0
            module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointing_keeps_outputs_gradients_and_keys(case):
    plain, ckpt = build(case, False), build(case, True)
    assert list(ckpt.state_dict()) == list(plain.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), k
    args = inputs(case)
    out_plain, out_ckpt = plain(*args), ckpt(*args)
    loss_of(out_plain).backward()
    loss_of(out_ckpt).backward()
    torch.testing.assert_close(out_ckpt[0] if case == "mae" else out_ckpt,
                               out_plain[0] if case == "mae" else out_plain, rtol=1e-6, atol=1e-7)
    grads = 0
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)
            grads += 1
    assert grads == sum(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointed_stages_are_recomputed_in_backward(case):
    """Training: each conv/linear layer of a checkpointed stage runs twice per step, every other layer once.

    Early stop off: by default the recomputation ends once every saved tensor is back, which can leave a stage's
    last layer (one whose output nothing saves) out; this counts every layer.
    """
    prefixes = CASES[case][2]
    for checkpointing in (False, True):
        net = build(case, checkpointing).train()
        calls = count_calls(net)
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            out = net(*inputs(case))
            ran = {k for k, v in calls.items() if v}  # not nnU-Net's lower seg layers (deep supervision is off)
            assert {calls[k] for k in ran} == {1}
            loss_of(out).backward()
        inside = {k: calls[k] for k in ran if k.startswith(prefixes)}
        outside = {k: calls[k] for k in ran if not k.startswith(prefixes)}
        assert inside and outside
        assert set(inside.values()) == {2 if checkpointing else 1}, inside
        assert set(outside.values()) == {1}, outside


@pytest.mark.parametrize("case", ["basicunet", "mae"])
def test_ema_teacher_copy_is_checkpointed_on_its_own_modules_and_runs_once_without_grad(case):
    student = build(case, True)
    teacher = copy.deepcopy(student).requires_grad_(False).eval()  # as MaskedImageModel builds its EMA teacher
    stages = [m for m in teacher.modules() if is_checkpointed(m)]
    assert len(stages) == (5 if case == "basicunet" else 12)
    assert all(m.forward.module is m for m in stages)  # bound to the copy, not to the student
    calls = count_calls(teacher)
    with torch.no_grad():
        out_teacher = teacher(*inputs(case))
        out_student = student.eval()(*inputs(case))
    assert set(calls.values()) == {1}
    torch.testing.assert_close(out_teacher[0] if case == "mae" else out_teacher,
                               out_student[0] if case == "mae" else out_student, rtol=0, atol=0)
    # The student in training mode under no_grad (the teacher's scoring pass, validation) is not checkpointed.
    calls = count_calls(student.train())
    with torch.no_grad():
        student(*inputs(case))
    assert set(calls.values()) == {1}


def test_every_registered_backbone_honours_checkpointing():
    """swinunetr by MONAI's use_checkpoint; the rest by checkpointed encoder stages (resenc_l's six). Nothing is
    checkpointed without the setting (test_checkpointed_stages_are_recomputed_in_backward)."""
    expected = {"swinunetr": 0, "unetr": 12, "basicunet": 5, "resenc": 3, "resenc_l": 6}
    assert set(BACKBONES) == set(expected)
    for name, count in expected.items():
        section = {"resenc": {"nnunet_architecture": TINY_RESENC}, "unetr": VIT}.get(name, {"feature_size": 12})
        roi = (16, 16, 16) if name == "resenc" else (64, 64, 64)
        net = resolve_backbone(ModelConfig(name=name, checkpointing=True, **section)).build(1, 1, roi)
        assert sum(is_checkpointed(m) for m in net.modules()) == count, name
        if name == "swinunetr":
            assert all(block.use_checkpoint for block in net.swinViT.layers1[0].blocks)


def test_batchnorm_with_running_statistics_is_refused():
    arch = copy.deepcopy(TINY_RESENC)
    arch["arch_kwargs"]["norm_op"] = "torch.nn.modules.batchnorm.BatchNorm3d"
    backbone = resolve_backbone(ModelConfig(name="resenc", nnunet_architecture=arch, checkpointing=True))
    with pytest.raises(ConfigError, match=r"^model\.checkpointing: the network's BatchNorm3d layers keep running"):
        backbone.build(1, 1, (16, 16, 16))
    resolve_backbone(ModelConfig(name="resenc", nnunet_architecture=arch)).build(1, 1, (16, 16, 16))


def test_console_pretrain_with_checkpointing_in_two_processes(phantom_dir, tmp_path):
    """`subfore pretrain --set model.checkpointing=true` on the tiny ResEnc, 2 steps, DDP over 2 processes."""
    tree = {
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "num_workers": 0,
                 "cache_dir": str(phantom_dir.parent / "cache_runs")},
        "model": {"name": "resenc", "nnunet_architecture": TINY_RESENC},
        "masking": {"strategy": "foreground", "ratio": 0.6, "subvolume_size": 16},
        "optim": {"warmup_steps": 1},
        "train": {"max_steps": 2, "batch_size": 1, "ckpt_every": 2, "log_every": 1, "progress_bar": False,
                  "accelerator": "cpu", "devices": 2},
    }
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    proc = subprocess.run([SUBFORE, "pretrain", "--config", str(cfg), "--set", "model.checkpointing=true"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["checkpointing"] is True
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
