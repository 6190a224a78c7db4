"""Weights that travel, safely: no code runs from a file a user names, safetensors beside every encoder, and a model
folder that loads into MONAI's classes with nothing but safetensors and json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from subfore.data.presets import Preset
from subfore.models.artifact import EncoderMeta, write_encoder

BIN = Path(sys.executable).parent
SUBFORE = str(BIN / "subfore")


class Payload:
    """Unpickling this writes a marker file: the code a malicious checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)


def refused(proc: subprocess.CompletedProcess, path: Path, safetensors: bool = True) -> str:
    """The one error line; it offers safetensors exactly where the option takes a .safetensors file."""
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    line = lines[0]
    assert str(path) in line and "posix.system" in line and "weights_only" in line, line
    assert ("safetensors" in line) == safetensors, line
    return line


def configs(phantom_dir: Path, tmp: Path) -> tuple[Path, Path]:
    data = {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0],
            "samples_per_volume": 1, "cache_dir": str(tmp / "cache"), "num_workers": 0}
    train = {"max_steps": 1, "batch_size": 1, "ckpt_every": 1, "log_every": 1, "progress_bar": False}
    pre, ft = tmp / "pre.yaml", tmp / "ft.yaml"
    pre.write_text(json.dumps({"run_dir": str(tmp / "pre"), "data": data, "train": train,
                               "model": {"name": "basicunet", "feature_size": 4}}))
    ft.write_text(json.dumps({"run_dir": str(tmp / "ft"), "data": {**data, "label_map": {1: 1, 6: 2}}, "train": train,
                              "model": {"name": "basicunet", "feature_size": 4, "out_channels": 3}}))
    return pre, ft


def payload_run(folder: Path, name: str, payload) -> Path:
    """RUN_DIR with a well-formed encoder.json and a poisoned encoder.pt."""
    folder.mkdir(parents=True)
    meta = EncoderMeta(model={"name": name, "feature_size": 4}, roi=(32, 32, 32), preset=Preset())
    (folder / "encoder.json").write_text(json.dumps(meta.dump()))
    torch.save(payload, folder / "encoder.pt")
    return folder


def test_no_command_runs_code_from_a_weights_file(phantom_dir, tmp_path):
    marker = tmp_path / "MARKER"
    # Tensors where a loader expects them, and the payload beside them.
    state = {"state_dict": {"net.conv_0.conv_0.conv.weight": torch.zeros(4, 1, 3, 3, 3)}, "hyper_parameters": {
        "kind": "subfore-finetune"}, "x": Payload(marker)}
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    nnssl_bad = tmp_path / "nnssl_bad.pth"
    torch.save({"network_weights": {"encoder.stem.convs.0.conv.weight": torch.zeros(2)},
                "nnssl_adaptation_plan": {"x": Payload(marker)}}, nnssl_bad)
    pre, ft = configs(phantom_dir, tmp_path)
    image = str(phantom_dir / "imagesTr" / "phantom_000.nii.gz")
    data = str(phantom_dir / "dataset.json")
    basic = payload_run(tmp_path / "run_basic", "basicunet", {"conv_0.x": torch.zeros(1), "p": Payload(marker)})
    resl = payload_run(tmp_path / "run_resl", "resenc_l", {"encoder.x": torch.zeros(1), "p": Payload(marker)})
    cases = [
        (bad, ["finetune", "--config", ft, "--pretrained", bad]),
        (nnssl_bad, ["finetune", "--config", ft, "--pretrained", nnssl_bad]),
        (bad, ["finetune", "--config", ft, "--resume-from", bad]),
        (bad, ["pretrain", "--config", pre, "--init-from", bad]),
        (bad, ["pretrain", "--config", pre, "--resume-from", bad]),
        (bad, ["evaluate", "--checkpoint", bad, "--data", data]),
        (bad, ["predict", "--checkpoint", bad, image, "--out", tmp_path / "pred"]),
        (bad, ["probe", "--encoder", bad, "--data", data]),
        (basic / "encoder.pt", ["probe", "--encoder", basic, "--data", data]),
        (basic / "encoder.pt", ["export", "hub", basic, "--out", tmp_path / "hub"]),
        (resl / "encoder.pt", ["export", "nnunet", resl, "--out", tmp_path / "x.pth"]),
        (resl / "encoder.pt", ["export", "nnssl", resl, "--out", tmp_path / "y.pth"]),
    ]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # each is mostly interpreter start-up: two at a time on 2 cores
        procs = list(pool.map(lambda case: run(SUBFORE, *case[1]), cases))
    for (path, args), proc in zip(cases, procs):
        # A checkpoint to resume, evaluate or predict from is a torch file; weights to start from may be safetensors.
        refused(proc, path, safetensors=not ({"--resume-from", "evaluate", "predict"} & {str(a) for a in args}))
    assert not marker.exists()
    # Nothing half-written: no run folders, exports or predictions.
    for name in ("pre", "ft", "hub", "x.pth", "y.pth", "pred"):
        assert not (tmp_path / name).exists(), name
    # The marker would have appeared: the payload is live (the test can fail).
    torch.load(bad, weights_only=False)
    assert marker.exists()


def test_pretraining_writes_safetensors_beside_encoder_pt_and_readers_take_either(phantom_dir, tmp_path):
    from safetensors import safe_open

    from subfore.models.artifact import read_encoder, read_weights

    pre, ft = configs(phantom_dir, tmp_path)
    proc = run(SUBFORE, "pretrain", "--config", pre)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "pre"
    pt = torch.load(run_dir / "encoder.pt", weights_only=True)
    with safe_open(str(run_dir / "encoder.safetensors"), "pt") as fh:
        st = {k: fh.get_tensor(k) for k in fh.keys()}
        header = json.loads(fh.metadata()["subfore_encoder"])
    assert st.keys() == pt.keys() and all(torch.equal(st[k], pt[k]) for k in pt)
    meta = json.loads((run_dir / "encoder.json").read_text())
    assert header == meta and meta["data"] == {"volumes": 3, "sources": [str(phantom_dir / "dataset.json")]}
    assert meta["masking"]["strategy"] == "foreground" and meta["step"] == 1
    # The safetensors file alone (moved away from encoder.json) still says what it is.
    alone = tmp_path / "elsewhere" / "weights.safetensors"
    alone.parent.mkdir()
    (run_dir / "encoder.safetensors").rename(alone)
    m, state = read_encoder(alone)
    assert m.dump() == meta and all(torch.equal(state[k], pt[k]) for k in pt)
    assert read_weights(run_dir).path.name == "encoder.pt"  # RUN_DIR: whichever file is there
    # export.formats: safetensors only, and finetune takes the run folder.
    proc = run(SUBFORE, "pretrain", "--config", pre, "--set", f"run_dir={tmp_path / 'st'}",
               "--set", "export.formats=[safetensors]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "st" / "encoder.pt").exists() and (tmp_path / "st" / "encoder.safetensors").exists()
    proc = run(SUBFORE, "finetune", "--config", ft, "--pretrained", tmp_path / "st")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (tmp_path / "ft" / "pretrained_load.txt").read_text()
    assert "encoder.safetensors (safetensors)" in report and "(40/40 of the encoder)" in report, report


def _fake_run(run_dir: Path, model: dict, roi) -> dict:
    """A pretraining's artifact written through the library's own writer, for a network built by subfore."""
    from subfore.config import ModelConfig
    from subfore.models.registry import resolve_backbone

    cfg = ModelConfig.model_validate(model)
    backbone = resolve_backbone(cfg)
    torch.manual_seed(0)
    net = backbone.build(1, 1, roi)
    state = backbone.encoder_state(net)
    meta = EncoderMeta(model=cfg.model_dump(mode="json"), roi=tuple(roi), step=7, preset=Preset(),
                       masking={"strategy": "foreground", "ratio": 0.6}, data={"volumes": 5, "sources": ["x.json"]})
    write_encoder(run_dir, state, meta)
    return state


@pytest.mark.parametrize("model, roi, cls", [
    ({"name": "swinunetr", "feature_size": 12}, (64, 64, 64), "SwinUNETR"),
    ({"name": "unetr", "feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}, (32, 32, 32), "UNETR"),
    ({"name": "basicunet", "feature_size": 4}, (32, 32, 32), "BasicUNet"),
])
def test_model_folder_loads_into_monai_with_safetensors_and_json_only(tmp_path, model, roi, cls):
    from subfore.api import export_hub

    state = _fake_run(tmp_path / "run", model, roi)
    export_hub(tmp_path / "run", tmp_path / "hub")  # the console script's route: the README test runs it
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    # A user's script: MONAI's class, safetensors and json; nothing of subfore.
    script = f"""
import json, sys
from monai.networks.nets import {cls}
from safetensors.torch import load_file, save_file
n = json.load(open(sys.argv[1] + "/config.json"))["network"]
assert n["class"] == "monai.networks.nets.{cls}"
net = {cls}(**n["kwargs"], out_channels=5)
missing, unexpected = net.load_state_dict(load_file(sys.argv[1] + "/model.safetensors"), strict=False)
assert not unexpected, unexpected
save_file({{k: v.contiguous() for k, v in net.state_dict().items()}}, sys.argv[2])
print(json.dumps(missing))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hub"), str(tmp_path / "loaded.st")],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    from safetensors.torch import load_file

    loaded = load_file(str(tmp_path / "loaded.st"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert set(json.loads(proc.stdout)) == set(loaded) - set(state)  # only the output layer is left at init
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["model"]["name"] == model["name"] and config["roi"] == list(roi) and config["step"] == 7
    assert config["data"] == {"volumes": 5, "sources": ["x.json"]} and config["masking"]["strategy"] == "foreground"
    card = (tmp_path / "hub" / "README.md").read_text()
    assert f"from monai.networks.nets import {cls}" in card and "5 volumes from x.json" in card


def test_model_folder_is_taken_by_finetune_probe_and_init_from(phantom_dir, tmp_path):
    from subfore.config import PretrainConfig, load_config
    from subfore.models.artifact import read_encoder
    from subfore.pretrain.module import MaskedImageModel

    state = _fake_run(tmp_path / "run", {"name": "basicunet", "feature_size": 4}, (32, 32, 32))
    from subfore.api import export_hub

    hub = export_hub(tmp_path / "run", tmp_path / "hub")
    meta, read = read_encoder(hub)
    assert meta.name == "basicunet" and all(torch.equal(read[k], state[k]) for k in state)
    pre, ft = configs(phantom_dir, tmp_path)
    module = MaskedImageModel(load_config(pre, [], PretrainConfig))
    report = module.init_weights(hub)
    assert report.source == f"{hub / 'model.safetensors'} (subfore model folder)"
    assert all(torch.equal(module.net.state_dict()[k], v) for k, v in state.items())
    proc = run(SUBFORE, "finetune", "--config", ft, "--pretrained", hub)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(40/40 of the encoder)" in (tmp_path / "ft" / "pretrained_load.txt").read_text()
    # Two processes: every rank starts from the folder (the run's end checks the replicas are bit-equal).
    proc = run(SUBFORE, "pretrain", "--config", pre, "--init-from", hub, "--set", "train.accelerator=cpu",
               "--set", "train.devices=2", "--set", "train.batch_size=2", "--set", f"run_dir={tmp_path / 'two'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("40/40 of the encoder") == 1  # reported once, by rank 0
    assert "(40/40 of the encoder)" in (tmp_path / "two" / "init_load.txt").read_text()


def test_a_weights_file_of_another_backbone_is_refused_in_one_line(tmp_path):
    from subfore.errors import SubforeError
    from subfore.models.registry import build_backbone
    from subfore.config import ModelConfig
    from subfore.models.weights import load_pretrained

    _fake_run(tmp_path / "run", {"name": "basicunet", "feature_size": 4}, (32, 32, 32))
    net = build_backbone(ModelConfig(name="unetr", feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4), 1, 2,
                         (32, 32, 32))
    with pytest.raises(SubforeError, match=r"encoder.safetensors: a basicunet pretraining \(safetensors\), but this "
                                           r"network is a unetr"):
        load_pretrained(net, tmp_path / "run" / "encoder.safetensors", "unetr")
