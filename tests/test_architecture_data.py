"""Architectures are data: a file that names code (``subprocess.Popen`` as a network's nonlinearity) is refused in
one line by every command that reads it, and the code never runs.

The payload is the one that ran before the allow-list existed: ``nonlin: subprocess.Popen`` with ``nonlin_kwargs
{args: [touch, MARKER]}`` listed among the keywords to import, planted in each file kind users hand in.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from subfore.errors import SubforeError
from subfore.models.nnunet import architecture
from subfore.models.nnunet.network import RESENC_L

SUBFORE = str(Path(sys.executable).parent / "subfore")


def payload(marker: Path) -> dict:
    """A plans 'architecture' entry whose nonlinearity would run ``touch MARKER`` when built by name."""
    arch = copy.deepcopy(RESENC_L)
    arch["arch_kwargs"]["nonlin"] = "subprocess.Popen"
    arch["arch_kwargs"]["nonlin_kwargs"] = {"args": ["touch", str(marker)]}
    return arch


def plans_with(arch: dict) -> dict:
    return {"plans_name": "Evil", "dataset_name": "Dataset999_Evil", "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "foreground_intensity_properties_per_channel": {},
            "configurations": {"3d_fullres": {"architecture": arch, "spacing": [1.0, 1.0, 1.0],
                                              "patch_size": [64, 64, 64], "normalization_schemes":
                                              ["ZScoreNormalization"], "use_mask_for_norm": [False]}}}


def nnssl_file(path: Path, arch: dict) -> Path:
    plan = {"architecture_plans": {"arch_class_name": "ResidualEncoderUNet", "arch_kwargs": arch["arch_kwargs"],
                                   "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"]},
            "pretrain_plan": {"transpose_forward": [0, 1, 2], "configurations": {"onemmiso": {
                "spacing": [1.0, 1.0, 1.0], "patch_size": [64, 64, 64],
                "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False]}}},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": [64, 64, 64],
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv"], "key_to_lpe": None}
    torch.save({"network_weights": {"encoder.stem.convs.0.conv.weight": torch.zeros(32, 1, 3, 3, 3)},
                "nnssl_adaptation_plan": plan}, path)
    return path


def model_folder(path: Path, arch: dict) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"encoder.stem.convs.0.conv.weight": torch.zeros(32, 1, 3, 3, 3)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "library_name": "subfore", "model": {"name": "resenc", "nnunet_architecture": arch}, "in_channels": 1,
        "roi": [64, 64, 64], "preset": {"modality": "ct"}}))
    return path


def nnunet_checkpoint(path: Path, arch: dict) -> Path:
    torch.save({"network_weights": {"encoder.stem.convs.0.conv.weight": torch.zeros(32, 1, 3, 3, 3)},
                "init_args": {"plans": plans_with(arch), "configuration": "3d_fullres", "fold": 0,
                              "dataset_json": {"channel_names": {"0": "CT"}}},
                "trainer_name": "nnUNetTrainer"}, path)
    return path


def finetuned_checkpoint(path: Path, arch: dict, data: Path) -> Path:
    """A 'subfore finetune' checkpoint whose stored config names the payload as its network."""
    config = {"run_dir": str(path.parent / "run"), "data": {"train": str(data)},
              "model": {"name": "resenc", "nnunet_architecture": arch, "out_channels": 2}}
    torch.save({"hyper_parameters": {"kind": "subfore-finetune", "config": config}, "state_dict": {}}, path)
    return path


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([SUBFORE, *map(str, args)], capture_output=True, text=True, timeout=600)


def refused(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The single error line of a refusal (exit 1, no traceback), which must contain each of ``expected``."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def setting(tmp_path, phantom_dir) -> dict:
    """The marker, the payload, and configs a user would run the commands with (phantom data)."""
    marker = tmp_path / "MARKER"
    data = phantom_dir / "dataset.json"
    base = {"data": {"train": str(data), "roi": [32, 32, 32], "num_workers": 0, "samples_per_volume": 1,
                     "cache_dir": str(tmp_path / "cache")},
            "train": {"max_steps": 1, "batch_size": 2, "progress_bar": False}}
    pretrain = {**base, "run_dir": str(tmp_path / "pre"), "model": {"name": "basicunet", "feature_size": 4}}
    finetune = {**base, "run_dir": str(tmp_path / "ft"), "model": {"name": "basicunet", "feature_size": 4,
                                                                   "out_channels": 2}}
    for name, tree in (("pretrain", pretrain), ("finetune", finetune)):
        (tmp_path / f"{name}.yaml").write_text(json.dumps(tree))
    return {"marker": marker, "arch": payload(marker), "data": data, "tmp": tmp_path,
            "pretrain": tmp_path / "pretrain.yaml", "finetune": tmp_path / "finetune.yaml"}


def weights_commands(s: dict, weights: Path) -> list[tuple]:
    """Every command that reads a weights file a user names."""
    t = s["tmp"]
    return [
        ("probe", "--encoder", weights, "--data", s["data"], "--out", t / "probe.json"),
        ("finetune", "--config", s["finetune"], "--pretrained", weights),
        ("pretrain", "--config", s["pretrain"], "--init-from", weights),
        ("export", "nnunet", weights, "--out", t / "pw.pth"),
        ("export", "nnssl", weights, "--out", t / "nnssl.pth"),
        ("export", "hub", weights, "--out", t / "hub"),
    ]


def refuse_all(s: dict, commands: list[tuple], *expected: str) -> None:
    with ThreadPoolExecutor(2) as pool:  # independent processes: two at a time on the 2 cores
        procs = list(pool.map(lambda c: run(*c), commands))
    for command, proc in zip(commands, procs):
        try:
            refused(proc, *expected)
        except AssertionError as exc:
            raise AssertionError(f"subfore {' '.join(map(str, command))}: {exc}") from None
    assert not s["marker"].exists(), "the payload ran"
    for leftover in ("pre", "ft", "probe.json", "pw.pth", "nnssl.pth", "hub"):
        assert not (s["tmp"] / leftover).exists(), leftover


NONLIN = "'subprocess.Popen' is not a torch.nn activation"


def test_an_nnssl_checkpoint_naming_code_is_refused_by_every_command(setting):
    evil = nnssl_file(setting["tmp"] / "evil.pth", setting["arch"])
    refuse_all(setting, weights_commands(setting, evil), f"{evil}: nnssl_adaptation_plan.architecture_plans.arch_kwargs.nonlin = ", NONLIN)


def test_a_model_folder_naming_code_is_refused_by_every_command(setting):
    folder = model_folder(setting["tmp"] / "evil_hub", setting["arch"])
    refuse_all(setting, weights_commands(setting, folder),
               f"{folder / 'config.json'}: model.nnunet_architecture.arch_kwargs.nonlin = ", NONLIN)


def test_an_nnunet_training_checkpoint_naming_code_is_refused_by_every_command(setting):
    evil = nnunet_checkpoint(setting["tmp"] / "checkpoint_final.pth", setting["arch"])
    refuse_all(setting, weights_commands(setting, evil),
               f"{evil}: init_args.plans.configurations.3d_fullres.architecture.arch_kwargs.nonlin = ", NONLIN)


def test_a_plans_file_naming_code_is_refused_by_every_command(setting):
    s, t = setting, setting["tmp"]
    plans = t / "EvilPlans.json"
    plans.write_text(json.dumps(plans_with(s["arch"])))
    resenc = {"name": "resenc", "nnunet_plans": str(plans)}
    pre, ft = (json.loads(s[k].read_text()) for k in ("pretrain", "finetune"))
    pre["model"], ft["model"] = resenc, {**resenc, "out_channels": 2}
    (t / "pre_plans.yaml").write_text(json.dumps(pre))
    (t / "ft_plans.yaml").write_text(json.dumps(ft))
    commands = [
        ("pretrain", "--config", t / "pre_plans.yaml"),
        ("finetune", "--config", t / "ft_plans.yaml"),
        ("preprocess", "--config", t / "pre_plans.yaml"),
        ("fingerprint", s["data"], "--config", t / "pre_plans.yaml", "--out", t / "probe.json"),
        ("export", "nnunet", t / "absent_run", "--plans", plans, "--out", t / "pw.pth"),
    ]
    refuse_all(s, commands, f"{plans}: configurations.3d_fullres.architecture.arch_kwargs.nonlin = ", NONLIN)
    # The same entry inline in a config (model.nnunet_architecture) is refused as the config's own key.
    pre["model"] = {"name": "resenc", "nnunet_architecture": s["arch"]}
    (t / "pre_inline.yaml").write_text(json.dumps(pre))
    refused(run("pretrain", "--config", t / "pre_inline.yaml"),
            f"{t / 'pre_inline.yaml'}: 'model': model.nnunet_architecture.arch_kwargs.nonlin",
            NONLIN)
    assert not s["marker"].exists()


def test_a_finetuned_checkpoint_naming_code_is_refused_by_evaluate_and_predict(setting):
    s, t = setting, setting["tmp"]
    ckpt = finetuned_checkpoint(t / "best.ckpt", s["arch"], s["data"])
    commands = [("evaluate", "--checkpoint", ckpt, "--data", s["data"], "--out", t / "probe.json"),
                ("predict", "--checkpoint", ckpt, s["data"].parent / "imagesTr", "--out", t / "hub")]
    refuse_all(s, commands, f"{ckpt}: hyper_parameters.config.model.nnunet_architecture.arch_kwargs.nonlin = ",
               NONLIN)


@pytest.mark.parametrize("change, message", [
    ({"network_class_name": "evil.ResidualEncoderUNet"}, "network_class_name = 'evil.ResidualEncoderUNet' is not a "
                                                         "network subfore builds"),
    ({"network_class_name": "os.system"}, "network_class_name = 'os.system' is not a network subfore builds"),
    ({"arch_kwargs.conv_op": "torch.nn.modules.linear.Linear"}, "arch_kwargs.conv_op = "
                                                                "'torch.nn.modules.linear.Linear' is not a torch.nn "
                                                                "convolution"),
    ({"arch_kwargs.norm_op": "evil.nn.InstanceNorm3d"}, "'evil.nn.InstanceNorm3d' is not a torch.nn normalisation"),
    ({"arch_kwargs.conv_op": "torch.nn.modules.activation.Conv3d"}, "is not a torch.nn convolution"),
    ({"arch_kwargs.block": "dynamic_network_architectures.building_blocks.residual.BottleneckD"},
     "arch_kwargs.block: a keyword subfore sets itself"),
    ({"arch_kwargs.stem_channels": "subprocess.Popen"}, "arch_kwargs.stem_channels = 'subprocess.Popen': a string"),
    ({"_kw_requires_import": ["conv_op", "block"]}, "_kw_requires_import names 'block'; subfore resolves only"),
    ({"arch_kwargs.nonlin_kwargs": {"fn": torch.nn.ReLU}}, "arch_kwargs.nonlin_kwargs is a dict; keyword arguments"),
])
def test_the_allow_list_refuses_every_other_name_and_value(change, message):
    arch = copy.deepcopy(RESENC_L)
    for key, value in change.items():
        node, leaf = (arch["arch_kwargs"], key.split(".", 1)[1]) if key.startswith("arch_kwargs.") else (arch, key)
        node[leaf] = value
    with pytest.raises(SubforeError) as err:
        architecture.check(arch, "f.json", "architecture.")
    assert str(err.value).startswith("f.json: architecture.") and message in str(err.value), str(err.value)


def test_both_spellings_of_an_allowed_op_pass_and_compare_equal():
    arch = copy.deepcopy(RESENC_L)
    other = copy.deepcopy(RESENC_L)
    other["arch_kwargs"]["nonlin"] = "torch.nn.modules.activation.LeakyReLU"
    other["arch_kwargs"]["conv_op"] = "torch.nn.Conv3d"
    assert architecture.check(other, "f") == {**other, "_kw_requires_import": other["_kw_requires_import"]}
    assert architecture.first_difference(architecture.check(arch, "a"), architecture.check(other, "b")) is None
    other["arch_kwargs"]["nonlin"] = "torch.nn.ReLU"
    assert architecture.first_difference(arch, other).startswith("arch_kwargs.nonlin: 'torch.nn.modules.activation"
                                                                  ".ReLU' in the file")


def test_entries_without_a_class_name_and_other_configurations_of_a_plans_file_are_checked(setting):
    from subfore.models.artifact import parse_meta
    from subfore.models.nnunet.network import plans_extract

    s, t = setting, setting["tmp"]
    no_class = {"arch_kwargs": s["arch"]["arch_kwargs"], "_kw_requires_import": ["nonlin"]}
    meta = {"model": {"name": "resenc", "nnunet_architecture": no_class}, "roi": [64, 64, 64],
            "preset": {"modality": "ct"}}
    with pytest.raises(SubforeError, match=r"^m\.json: model\.nnunet_architecture\.network_class_name = None"):
        parse_meta(meta, "m.json")
    plans = plans_with(copy.deepcopy(RESENC_L))
    plans["configurations"]["2d"] = {"architecture": s["arch"], "spacing": [1.0, 1.0], "patch_size": [64, 64]}
    (t / "p.json").write_text(json.dumps(plans))
    with pytest.raises(SubforeError, match=r"p\.json: configurations\.2d\.architecture\.arch_kwargs\.nonlin = "):
        plans_extract(t / "p.json", "3d_fullres")
    assert not s["marker"].exists()
