"""nnU-Net v2: ResEnc backbones from nnU-Net's own plans, its preprocessing, and export to its loader.

Plans come from nnU-Net's own fingerprint extractor and ResEnc-M planner, run on coarse phantoms (the planner's
widths set to 4…16 features so that CPU steps take a fraction of a second; the layout is the planner's).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from subfore.config import load_config
from subfore.errors import ConfigError, SubforeError
from subfore.phantoms import PhantomSpec, write_nnunet_raw, write_phantoms

from conftest import REAL_CT, REAL_SEG, needs_real_ct

BIN = Path(sys.executable).parent
SUBFORE = str(BIN / "subfore")
STRATEGIES = [
    ("random", {}), ("block", {}), ("foreground", {}), ("foreground", {"threshold": "otsu"}),
    ("anatomask", {}), ("hpm", {}), ("anatomask", {"gate": "foreground"}),
]
PLAN = """
import sys
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM)
for name, spacing in (("TinyResEncM", None), ("TinyResEncMCoarse", [8.0, 8.0, 8.0])):
    p = nnUNetPlannerResEncM(501, plans_name=name, overwrite_target_spacing=spacing)
    p.UNet_base_num_features, p.UNet_max_features_3d = 4, 16
    p.plan_experiment()
"""


def run(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def nn(tmp_path_factory) -> dict:
    """An nnU-Net raw dataset of 2 phantoms at 4 mm, fingerprinted and planned by nnU-Net (2 plans)."""
    root = tmp_path_factory.mktemp("nnunet")
    src = root / "phantoms"
    write_phantoms(src, n=2, seed=0, spec=PhantomSpec(spacing=(4.0, 4.0, 4.0)))
    raw = write_nnunet_raw(src, root / "raw" / "Dataset501_Phantoms")
    env = dict(os.environ, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "results"))
    ok(run(BIN / "nnUNetv2_extract_fingerprint", "-d", "501", "-np", "1", env=env))
    ok(run(sys.executable, "-c", PLAN, env=env))
    pre = root / "pre" / "Dataset501_Phantoms"
    return {"root": root, "raw": raw, "plans": pre / "TinyResEncM.json", "coarse": pre / "TinyResEncMCoarse.json",
            "image": raw / "imagesTr" / "phantom_000_0000.nii.gz"}


def pretrain_tree(nn: dict, run_dir: Path, **masking) -> dict:
    return {
        "run_dir": str(run_dir), "seed": 0,
        "data": {"train": str(nn["raw"]), "preset": "nnunet", "roi": [32, 32, 32], "num_workers": 0,
                 "cache_dir": str(nn["root"] / "cache")},
        "model": {"name": "resenc", "nnunet_plans": str(nn["plans"])},
        "masking": {"strategy": "anatomask", **masking},
        "optim": {"warmup_steps": 1},
        "train": {"max_steps": 2, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress_bar": False},
    }


def plans_arch(path: Path) -> dict:
    return json.loads(path.read_text())["configurations"]["3d_fullres"]["architecture"]


def nnunet_net(path: Path, channels: int):
    """The network nnUNetv2_train builds for these plans (nnU-Net's own builder, deep supervision on)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    a = plans_arch(path)
    return get_network_from_plans(a["network_class_name"], a["arch_kwargs"], a["_kw_requires_import"], channels, 14,
                                  deep_supervision=True)


# --- install --------------------------------------------------------------------------------------------
def test_the_nnunet_extra_leaves_monai_and_subfore_importable():
    code = """
import importlib.util, sys
import monai, monai.networks.nets, subfore, subfore.cli
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM)
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
if importlib.util.find_spec("torchvision") is not None:
    import torchvision  # present: it must at least import next to this torch
print("torchvision" in sys.modules, importlib.util.find_spec("timm") is None)
"""
    out = ok(run(sys.executable, "-c", code)).stdout.split()
    # The extra installs no torchvision (nor timm, which would pull it in).
    assert out == ["False", "True"]


# --- preprocessing ----------------------------------------------------------------------------------------
def test_nnunet_preset_matches_nnunet_preprocessing_and_its_hu_threshold(nn):
    from monai.transforms import Compose
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from subfore.data.presets import Preset
    from subfore.data.transforms import preprocess
    from subfore.pretrain import MaskedImageModel

    cfg = load_config(None, [], base=pretrain_tree(nn, nn["root"] / "unused"))
    assert cfg.masking.threshold == "-132.5 HU"  # the preset's default, written into the config
    preset = cfg.data.preset_obj()
    ours = Compose(preprocess(preset))({"image": str(nn["image"])})["image"]
    pm = PlansManager(str(nn["plans"]))
    theirs, _, _ = DefaultPreprocessor(verbose=False).run_case([str(nn["image"])], None, pm,
                                                               pm.get_configuration("3d_fullres"),
                                                               str(nn["raw"] / "dataset.json"))
    # Same axis order (SimpleITK's z, y, x), same spacing, same CTNormalization: the same array.
    assert tuple(ours.shape) == theirs.shape
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-4)
    # The foreground is decided on the papers' window of the same resampled HU, whatever nnU-Net's normalisation:
    # "-132.5 HU" is λ 0.1 there, and the reference is exactly the ct preset's input at the plans' spacing.
    model = MaskedImageModel(cfg)
    assert model.threshold == pytest.approx(0.1)
    both = Compose(preprocess(preset, reference=True))({"image": str(nn["image"])})
    assert torch.equal(torch.as_tensor(both["image"]), torch.as_tensor(ours))
    ct = Compose(preprocess(Preset(spacing=preset.spacing)))({"image": str(nn["image"])})["image"]
    assert torch.equal(torch.as_tensor(both["reference"]), torch.as_tensor(ct).permute(0, *(a + 1 for a in preset.axes)))


def test_zscore_normalisation_equals_nnunets_own():
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization
    from scipy.ndimage import binary_fill_holes

    from subfore.data.presets import ChannelNorm
    from subfore.data.transforms import NnunetNormalized

    g = np.random.default_rng(0)
    x = np.zeros((1, 12, 14, 16), np.float32)
    x[0, 2:10, 3:11, 4:14] = g.normal(300, 40, (8, 8, 10))
    x[0, 5, 6, 7] = 0.0  # a hole inside the nonzero region is normalised too
    for use_mask in (False, True):
        ours = NnunetNormalized("image", [ChannelNorm(scheme="ZScoreNormalization", use_mask=use_mask)])(
            {"image": torch.from_numpy(x)})["image"].numpy()
        seg = np.where(binary_fill_holes(x[0] != 0), 0, -1)[None] if use_mask else None
        norm = ZScoreNormalization(use_mask_for_norm=use_mask, intensityproperties={})
        theirs = norm.run(x[0].copy(), None if seg is None else seg[0])
        if use_mask:
            theirs[seg[0] < 0] = 0  # nnU-Net zeroes the outside afterwards (leaves_pixels_outside_mask_at_zero)
        np.testing.assert_allclose(ours[0], theirs, atol=1e-5)


def test_hu_thresholds_mean_the_papers_window_whatever_the_plans_clip_and_need_hu():
    from subfore.data.presets import ChannelNorm, Preset

    # nnU-Net clips this CT at −20 HU (its labelled voxels' 0.5 percentile): λ still means −132.5 HU of the
    # papers' −175…250 window, decided on the reference beside the network's input.
    ct = ChannelNorm(scheme="CTNormalization", mean=100.0, std=50.0, lower=-20.0, upper=250.0)
    preset = Preset(modality="nnunet", norms=(ct,), axes=(2, 1, 0))
    assert preset.foreground_threshold(None, -132.5)[0] == pytest.approx(0.1)
    assert preset.foreground_threshold(None, 50.0)[0] == pytest.approx((50 + 175) / 425)
    with pytest.raises(ValueError, match="b_min"):
        preset.foreground_threshold(None, -175.0)
    mr = Preset(modality="nnunet", norms=(ChannelNorm(scheme="ZScoreNormalization"),))
    with pytest.raises(ConfigError, match="ZScoreNormalization"):
        mr.foreground_threshold(None, -132.5)
    assert mr.foreground_threshold(-0.5)[0] == -0.5  # z-scores are unbounded: no window check


@needs_real_ct
def test_real_ct_planned_by_nnunet_pretrains_with_the_default_threshold(tmp_path):
    """A real abdominal CT, fingerprinted and planned by nnU-Net (ResEnc-M): nnU-Net clips it above −132.5 HU, yet
    the default masking.threshold works and its foreground grid is the ct preset's on the same crop."""
    from subfore.data.presets import Preset
    from subfore.data.store import StoreCrops, padded_origin, read_crop, records_for, store_for
    from subfore.data.transforms import preprocess
    from subfore.masking import foreground_grid
    from monai.transforms import Compose

    raw = tmp_path / "raw" / "Dataset502_RealCT"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "imagesTr" / "ct_0000.nii.gz").symlink_to(REAL_CT)
    seg = nib.load(REAL_SEG)
    # Liver, spleen and kidneys (TotalSegmentator ids 5, 1, 2, 3), as in the case that used to be refused.
    organs = np.isin(np.asarray(seg.dataobj), [1, 2, 3, 5]).astype(np.uint8)
    nib.save(nib.Nifti1Image(organs, seg.affine), raw / "labelsTr" / "ct.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "numTraining": 1,
                                                  "labels": {"background": 0, "organs": 1}, "file_ending": ".nii.gz"}))
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "results"))
    ok(run(BIN / "nnUNetv2_extract_fingerprint", "-d", "502", "-np", "1", env=env))
    ok(run(sys.executable, "-c", PLAN.replace("501", "502"), env=env))
    plans = tmp_path / "pre" / "Dataset502_RealCT" / "TinyResEncM.json"
    props = json.loads(plans.read_text())["foreground_intensity_properties_per_channel"]["0"]
    assert props["percentile_00_5"] > -132.5  # what used to refuse the default
    tree = {"run_dir": str(tmp_path / "run"), "data": {"train": str(raw), "preset": "nnunet", "num_workers": 0,
                                                      "cache_dir": str(tmp_path / "cache")},
            "model": {"name": "resenc", "nnunet_plans": str(plans)}}
    strides = total_strides_of(plans)
    tree["data"]["roi"] = [max(32, np.lcm(f, 16)) for f in strides]
    tree["train"] = {"max_steps": 2, "batch_size": 1, "ckpt_every": 2, "log_every": 1, "progress_bar": False}
    cfg_path = tmp_path / "pre.yaml"
    cfg_path.write_text(json.dumps(tree))
    ok(run(SUBFORE, "pretrain", "--config", cfg_path))
    cfg = load_config(cfg_path)
    assert cfg.masking.threshold == "-132.5 HU"
    preset = cfg.data.preset_obj()
    [record] = records_for(store_for(cfg), [{"image": str(raw / "imagesTr" / "ct_0000.nii.gz")}], skip_bad=False)
    crops = StoreCrops(store_for(cfg), [record], cfg.data.roi)
    ct = Compose(preprocess(Preset(spacing=preset.spacing)))({"image": str(REAL_CT)})["image"]
    ct = torch.as_tensor(ct).permute(0, *(a + 1 for a in preset.axes)).half().float()  # the store's fp16, its axes
    shape, roi = ct.shape[1:], cfg.data.roi
    centre = [o + max(s, r) // 2 - r // 2 for o, s, r in zip(padded_origin(shape, roi), shape, roi)]
    grids = []
    for start in (centre, [0, 0, 0]):  # inside the body, and a corner with air
        ours = foreground_grid(crops.sample(0, start)["reference"][None], 16, 0.1)
        assert torch.equal(ours, foreground_grid(torch.from_numpy(read_crop(ct.numpy(), start, roi))[None], 16, 0.1))
        grids.append(ours)
    assert 0 < int(sum(g.sum() for g in grids)) < sum(g.numel() for g in grids)  # both kinds of subvolume


def total_strides_of(plans: Path) -> tuple[int, ...]:
    from subfore.models.nnunet.network import total_strides

    return total_strides(plans_arch(plans))


# --- backbones and masking --------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,extra", STRATEGIES, ids=[f"{s}{'-' + '-'.join(map(str, e.values())) if e else ''}"
                                                           for s, e in STRATEGIES])
def test_every_masking_strategy_trains_resenc(nn, strategy, extra):
    from subfore.pretrain import MaskedImageModel

    tree = pretrain_tree(nn, nn["root"] / "unused", strategy=strategy, **extra)
    model = MaskedImageModel(load_config(None, [], base=tree))
    x = (torch.rand(2, 1, 32, 32, 32) * 2 - 1) * torch.linspace(0, 2, 32).view(1, 1, 1, 1, 32)
    out = model.reconstruct(x, torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["pred"].shape == x.shape and out["mask"].any()
    seg = model.net.decoder.seg_layers
    assert seg[-1].weight.shape[0] == 1 + (strategy == "hpm")  # one output per channel (+ HPM's loss channel)
    # Every trainable tensor got a gradient (DDP-safe); the unused low-resolution heads are frozen.
    assert all(p.grad is not None for p in model.net.parameters() if p.requires_grad)
    assert all(not p.requires_grad for layer in seg[:-1] for p in layer.parameters())


def test_resenc_l_is_nnssls_network_and_takes_the_teacher_strategies():
    from subfore.masking import foreground_grid
    from subfore.config import ModelConfig
    from subfore.models import build_backbone, resolve_backbone
    from subfore.pretrain import MaskedImageModel

    with pytest.raises(ConfigError, match=r"downsamples by \[32, 32, 32\].*e\.g\. \[64, 64, 64\]"):
        resolve_backbone(ModelConfig(name="resenc_l")).check_roi((32, 32, 32))
    net = build_backbone(ModelConfig(name="resenc_l"), 1, 1, (64, 64, 64))
    stages = net.encoder.stages
    assert type(net).__name__ == "ResidualEncoderUNet" and len(stages) == 6
    assert [len(s.blocks) for s in stages] == [1, 3, 4, 6, 6, 6] and net.encoder.output_channels == [32, 64, 128, 256,
                                                                                                     320, 320]
    assert [tuple(s) for s in net.encoder.strides] == [(1, 1, 1)] + [(2, 2, 2)] * 5
    tree = {"data": {"train": "unused", "roi": [64, 64, 64]}, "model": {"name": "resenc_l"},
            "masking": {"strategy": "hpm", "gate": "foreground"}, "train": {"batch_size": 1}}
    model = MaskedImageModel(load_config(None, [], base=tree))
    x = torch.zeros(1, 1, 64, 64, 64)
    x[..., 16:48, 16:48, 8:56] = 0.6
    with torch.no_grad():  # forward only: a backward of 100 M parameters at 64³ costs ~10 s on 2 cores
        out = model.reconstruct(x, torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["pred"].shape == x.shape
    assert not (out["mask"] & ~foreground_grid(x, 16, model.threshold)).any()  # the gate: foreground only


def test_roi_that_the_strides_do_not_divide_is_one_line(nn, tmp_path):
    tree = pretrain_tree(nn, tmp_path / "run")
    tree["data"]["roi"] = [20, 32, 32]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(json.dumps(tree))
    line = one_error_line(run(SUBFORE, "pretrain", "--config", cfg))
    assert "data.roi [20, 32, 32]" in line and "downsamples by [8, 16, 16]" in line and "e.g. [32, 32, 32]" in line


# --- pretrain → export → nnU-Net's loader ----------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(nn) -> Path:
    run_dir = nn["root"] / "run"
    cfg = nn["root"] / "pretrain.yaml"
    cfg.write_text(json.dumps(pretrain_tree(nn, run_dir, gate="foreground")))
    ok(run(SUBFORE, "pretrain", "--config", cfg))
    return run_dir


def test_export_loads_with_nnunets_loader_for_one_and_two_channels(nn, pretrained, tmp_path):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from subfore.nnunet import export_nnunet

    encoder = torch.load(pretrained / "encoder.pt", weights_only=True)
    assert json.loads((pretrained / "encoder.json").read_text())["nnunet"]["architecture"] == plans_arch(nn["plans"])
    one = tmp_path / "one.pth"
    report = ok(run(SUBFORE, "export", "nnunet", pretrained, "--out", one)).stdout
    assert "loaded back with nnunetv2.run.load_pretrained_weights" in report
    two = export_nnunet(pretrained, tmp_path / "two.pth", plans=nn["plans"], configuration="3d_fullres",
                        in_channels=2).path
    stem = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight",
            "decoder.encoder.stem.convs.0.conv.weight", "decoder.encoder.stem.convs.0.all_modules.0.weight")
    for path, channels in ((one, 1), (two, 2)):
        saved = torch.load(path, weights_only=True)  # plain tensors and JSON-like metadata only
        assert saved["subfore"]["pretraining"]["architecture"] == plans_arch(nn["plans"])
        plan = saved["subfore"]["pretraining"]["plan"]
        assert plan["plans_name"] == "TinyResEncM" and plan["plan"]["patch_size"] == json.loads(
            nn["plans"].read_text())["configurations"]["3d_fullres"]["patch_size"]
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in saved["network_weights"].values())
        net = nnunet_net(nn["plans"], channels)
        load_pretrained_weights(net, str(path))
        loaded = {k: v for k, v in net.state_dict().items() if ".seg_layers." not in k}
        assert set(loaded) == {k for k in encoder if ".seg_layers." not in k}
        for key, value in loaded.items():
            want = encoder[key]
            if key in stem and channels == 2:
                assert value.shape == (want.shape[0], 2, *want.shape[2:])
                want = want.repeat(1, 2, 1, 1, 1) / 2  # the 1-channel kernel over 2 channels, divided by 2
            assert torch.equal(value, want), key
        # Duplicated names carry identical values.
        assert torch.equal(loaded["encoder.stem.convs.0.conv.weight"],
                           loaded["decoder.encoder.stem.convs.0.all_modules.0.weight"])


def test_export_without_nnunetv2_runs_the_same_checks(nn, pretrained, tmp_path, monkeypatch):
    from subfore.nnunet import export_nnunet

    reference = torch.load(ok_export(pretrained, tmp_path / "ref.pth"), weights_only=True)["network_weights"]
    for name in [m for m in sys.modules if m == "nnunetv2" or m.startswith("nnunetv2.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 → ImportError
    report = export_nnunet(pretrained, tmp_path / "alone.pth")
    assert "nnunetv2 not installed" in report.checked_with
    alone = torch.load(report.path, weights_only=True)["network_weights"]
    assert alone.keys() == reference.keys() and all(torch.equal(alone[k], reference[k]) for k in alone)


def ok_export(run_dir: Path, out: Path) -> Path:
    from subfore.nnunet import export_nnunet

    return export_nnunet(run_dir, out).path


def test_a_plan_with_another_stage_count_is_refused_in_one_line(nn, pretrained, tmp_path):
    assert len(plans_arch(nn["coarse"])["arch_kwargs"]["features_per_stage"]) != len(
        plans_arch(nn["plans"])["arch_kwargs"]["features_per_stage"])
    line = one_error_line(run(SUBFORE, "export", "nnunet", pretrained, "--out", tmp_path / "x.pth", "--plans",
                              nn["coarse"]))
    assert str(nn["coarse"]) in line and "first mismatch" in line and "in the plans" in line and "pretrained" in line
    assert not (tmp_path / "x.pth").exists()
    with pytest.raises(SubforeError, match="only a 1-channel stem"):
        from subfore.nnunet import match_weights

        w = {"encoder.stem.convs.0.conv.weight": torch.zeros(4, 2, 3, 3, 3)}
        match_weights(w, {"encoder.stem.convs.0.conv.weight": torch.zeros(4, 3, 3, 3, 3)},
                      ("encoder.stem.convs.0.conv",), 2, 3, "plans", "run")


# --- the MONAI route --------------------------------------------------------------------------------------
def test_finetune_evaluate_predict_take_resenc(nn, pretrained, tmp_path):
    from subfore.evaluate import evaluate, predict
    from subfore.finetune import FinetuneConfig, finetune

    tree = {
        "run_dir": str(tmp_path / "ft"),
        "data": {"train": str(nn["raw"]), "preset": "nnunet", "roi": [32, 32, 32], "samples_per_volume": 1,
                 "cache_dir": str(nn["root"] / "cache"), "num_workers": 0},
        "model": {"name": "resenc", "nnunet_plans": str(nn["plans"]), "out_channels": 14},
        "train": {"max_steps": 2, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "progress_bar": False},
    }
    best = finetune(load_config(None, [], FinetuneConfig, base=tree), pretrained=pretrained / "encoder.pt")
    first = (tmp_path / "ft" / "pretrained_load.txt").read_text().splitlines()[0]
    # Everything but the 4 seg_layers (weight and bias each) loads: encoder and decoder.
    assert re.search(r"\((\d+)/\1 of the encoder\), 8 missing, 0 unexpected, 0 shape-mismatched", first), first
    result = evaluate(best, str(nn["raw"]), tmp_path / "m.json", split="training")
    assert len(result["cases"]) == 2
    written = predict(best, [str(nn["image"])], tmp_path / "pred")
    src, seg = nib.load(nn["image"]), nib.load(written[0])
    # The nnU-Net axis order is undone: labels land on the input's own grid.
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine)


# --- nnssl checkpoints: nnU-Net main's PretrainedTrainer route, both ways ----------------------------------
NNSSL_KEYS = {"architecture_plans", "pretrain_plan", "pretrain_num_input_channels", "recommended_downstream_patchsize",
              "key_to_encoder", "key_to_stem", "keys_to_in_proj", "key_to_lpe"}
# nnssl's ConfigurationPlan fields (nnssl's Plan.from_dict refuses any other)
NNSSL_CONF = {"data_identifier", "preprocessor_name", "spacing_style", "normalization_schemes", "use_mask_for_norm",
              "resampling_fn_data", "resampling_fn_data_kwargs", "resampling_fn_mask", "resampling_fn_mask_kwargs",
              "spacing", "patch_size"}


@pytest.fixture(scope="module")
def nnssl_ckpt(nn, pretrained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nnssl") / "ckpt.pth"
    report = ok(run(SUBFORE, "export", "nnssl", pretrained, "--out", out)).stdout
    assert "loaded back with" in report and "nnUNetv2_preprocess_like_nnssl" in report
    return out


def test_nnssl_export_is_the_documented_format(nn, pretrained, nnssl_ckpt):
    ckpt = torch.load(nnssl_ckpt, weights_only=True)  # plain data: nnU-Net loads it this way
    plan = ckpt["nnssl_adaptation_plan"]
    assert NNSSL_KEYS <= set(plan)
    arch = plans_arch(nn["plans"])
    ap = plan["architecture_plans"]
    assert ap["arch_class_name"] == arch["network_class_name"] and ap["arch_kwargs"] == arch["arch_kwargs"]
    assert ap["arch_class_name"].endswith(".ResidualEncoderUNet")  # what PretrainedTrainer builds from the plans
    assert ap["arch_kwargs_requiring_import"] == [k for k in arch["_kw_requires_import"]
                                                 if arch["arch_kwargs"][k] is not None]
    (conf,) = plan["pretrain_plan"]["configurations"].values()
    assert set(conf) == NNSSL_CONF
    fullres = json.loads(nn["plans"].read_text())["configurations"]["3d_fullres"]
    # The nnunet preset works in nnU-Net's axis order: the plans' spacing, the crop as configured.
    assert conf["spacing"] == fullres["spacing"] and conf["patch_size"] == [32, 32, 32]
    assert conf["normalization_schemes"] == fullres["normalization_schemes"]
    assert plan["recommended_downstream_patchsize"] == fullres["patch_size"]
    assert plan["pretrain_num_input_channels"] == 1 and plan["key_to_lpe"] is None
    assert (plan["key_to_encoder"], plan["key_to_stem"]) == ("encoder.stages", "encoder.stem")
    assert plan["keys_to_in_proj"] == ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"]
    assert {c["name"].split(" ")[0] for c in ckpt["citations"]} == {"AnatoMask", "nnU-Net"}  # the fixture's masks
    encoder = torch.load(pretrained / "encoder.pt", weights_only=True)
    assert ckpt["network_weights"].keys() == encoder.keys()
    assert all(torch.equal(ckpt["network_weights"][k], encoder[k]) for k in encoder)
    # PretrainedTrainer's loading, as it does it: strict loads of the stem and the encoder stages.
    net = nnunet_net(nn["plans"], 1)
    for key in (plan["key_to_encoder"], plan["key_to_stem"]):
        part = {k[len(key) + 1:]: v for k, v in ckpt["network_weights"].items() if k.startswith(key + ".")}
        net.get_submodule(key).load_state_dict(part)
    assert all(torch.equal(v, encoder[k]) for k, v in net.state_dict().items() if k.startswith("encoder."))


def test_nnssl_export_loads_with_nnunet_mains_pretrained_trainer(nn, nnssl_ckpt, pretrained):
    pytest.importorskip("nnunetv2.training.nnUNetTrainer.pretraining.pretrainedTrainer",
                        reason="nnU-Net's nnssl route is on its main branch only (not in the PyPI 2.8.1 installed); "
                               "the format test above checks the file against its documentation instead")
    from subfore.models.nnunet.export import check_nnssl

    encoder = torch.load(pretrained / "encoder.pt", weights_only=True)
    assert check_nnssl(nnssl_ckpt, encoder) == "nnU-Net's PretrainedTrainer.load_pretrained_weights"


def test_nnssl_checkpoints_are_read_by_init_from_probe_and_finetune(nn, nnssl_ckpt, pretrained, tmp_path):
    from subfore.config import PretrainConfig
    from subfore.models.artifact import read_encoder
    from subfore.pretrain.module import MaskedImageModel

    # A checkpoint as nnssl itself writes it (no subfore metadata): the architecture comes from its plan.
    ckpt = torch.load(nnssl_ckpt, weights_only=True)
    plan = ckpt["nnssl_adaptation_plan"]
    (conf,) = plan["pretrain_plan"]["configurations"].values()
    with pytest.raises(SubforeError, match="CTNormalization of channel 0 needs its foreground intensity"):
        torch.save({"network_weights": ckpt["network_weights"], "nnssl_adaptation_plan": plan}, tmp_path / "ct.pth")
        read_encoder(tmp_path / "ct.pth")  # the probe needs the preprocessing, which this plan cannot give
    conf["normalization_schemes"] = ["ZScoreNormalization"]  # as nnssl writes it
    foreign = tmp_path / "foreign.pth"
    torch.save({"network_weights": ckpt["network_weights"], "nnssl_adaptation_plan": plan,
                "optimizer_state": {"state": {}, "param_groups": []}, "current_epoch": 3}, foreign)
    meta, state = read_encoder(foreign)
    arch = plans_arch(nn["plans"])
    inline = meta.model["nnunet_architecture"]
    assert meta.name == "resenc" and inline["network_class_name"] == arch["network_class_name"]
    assert inline["arch_kwargs"] == arch["arch_kwargs"]  # dropout_op None: nnssl lists it under no import
    assert meta.roi == (32, 32, 32) and meta.preset.modality == "nnunet" and meta.source == "nnssl checkpoint"
    # --init-from starts from exactly the file's tensors (teacher too), output layer where it fits.
    cfg = load_config(None, [], PretrainConfig, base=pretrain_tree(nn, tmp_path / "init"))
    module = MaskedImageModel(cfg)
    report = module.init_weights(foreign)
    assert report.encoder_loaded == report.encoder_total > 0
    for k, v in module.net.state_dict().items():
        if k in state:
            assert torch.equal(v, state[k]), k
    assert all(torch.equal(v, module.net.state_dict()[k]) for k, v in module.teacher.state_dict().items())
    # Through the console script: pretrain --init-from, probe --encoder.
    tree = pretrain_tree(nn, tmp_path / "cont")
    tree["train"]["max_steps"] = 1
    cfg_path = tmp_path / "cont.yaml"
    cfg_path.write_text(json.dumps(tree))
    ok(run(SUBFORE, "pretrain", "--config", cfg_path, "--init-from", foreign))
    first = (tmp_path / "cont" / "init_load.txt").read_text().splitlines()[0]
    assert f"{foreign} (nnssl checkpoint)" in first and re.search(r"\((\d+)/\1 of the encoder\)", first), first
    assert yaml_value(tmp_path / "cont" / "config.yaml", "init_from") == str(foreign)
    out = tmp_path / "probe.json"
    ok(run(SUBFORE, "probe", "--encoder", nnssl_ckpt, "--data", nn["raw"], "--split", "training", "--test-split",
           "training", "--steps", "3", "--out", out))
    assert json.loads(out.read_text())["encoder"] == str(nnssl_ckpt)


def yaml_value(path: Path, key: str):
    import yaml

    return yaml.safe_load(path.read_text())[key]


def test_an_nnssl_checkpoint_of_another_architecture_is_refused_with_the_first_difference(nn, pretrained, tmp_path):
    from subfore.models.nnunet.export import export_nnssl

    ckpt = torch.load(export_nnssl(pretrained, tmp_path / "ok.pth").path, weights_only=True)
    w = dict(ckpt["network_weights"])
    key = "encoder.stages.1.blocks.0.conv1.conv.weight"
    w[key] = torch.zeros(3, *w[key].shape[1:])
    torch.save({**ckpt, "network_weights": w}, tmp_path / "bad.pth")
    tree = pretrain_tree(nn, tmp_path / "bad")
    tree["init_from"] = str(tmp_path / "bad.pth")
    (tmp_path / "bad.yaml").write_text(json.dumps(tree))
    line = one_error_line(run(SUBFORE, "pretrain", "--config", tmp_path / "bad.yaml"))
    shape = list(ckpt["network_weights"][key].shape)
    assert f"first difference {key}: {[3, *shape[1:]]} in the file, {shape} here" in line, line
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_nnunet_weights_files_name_their_architecture_to_subfore(nn, pretrained, tmp_path):
    from subfore.models.artifact import read_encoder, read_weights

    encoder = torch.load(pretrained / "encoder.pt", weights_only=True)
    # subfore's own -pretrained_weights export carries the encoder.json of its target network.
    path = ok_export(pretrained, tmp_path / "pw.pth")
    meta, state = read_encoder(path)
    assert meta.name == "resenc" and meta.model["nnunet_architecture"] == plans_arch(nn["plans"])
    assert all(torch.equal(state[k], encoder[k]) for k in state)
    # An nnU-Net training checkpoint (checkpoint_final.pth) names its plans and configuration in init_args.
    plans = json.loads(nn["plans"].read_text())
    torch.save({"network_weights": encoder, "init_args": {
        "plans": plans, "configuration": "3d_fullres", "fold": 0,
        "dataset_json": {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}}},
        "trainer_name": "nnUNetTrainer", "current_epoch": 1000}, tmp_path / "checkpoint_final.pth")
    found = read_weights(tmp_path / "checkpoint_final.pth")
    fullres = plans["configurations"]["3d_fullres"]
    assert found.kind == "nnU-Net training checkpoint" and found.meta.roi == tuple(fullres["patch_size"])
    assert found.meta.model["nnunet_architecture"]["arch_kwargs"] == plans_arch(nn["plans"])["arch_kwargs"]
    assert list(found.meta.preset.array_spacing) == pytest.approx(fullres["spacing"])
    # A bare network_weights file names nothing: finetune takes it, the probe says why it cannot.
    torch.save({"network_weights": encoder}, tmp_path / "bare.pth")
    with pytest.raises(SubforeError, match=r"bare.pth: this nnU-Net weights file names no architecture"):
        read_encoder(tmp_path / "bare.pth")


def test_an_nnssl_plan_of_another_architecture_with_the_same_shapes_is_refused(nn, nnssl_ckpt, tmp_path):
    """Strides and nonlinearity change no tensor shape: the plan itself is compared, first difference named."""
    from subfore.config import PretrainConfig
    from subfore.pretrain.module import MaskedImageModel

    ckpt = torch.load(nnssl_ckpt, weights_only=True)
    module = MaskedImageModel(load_config(None, [], PretrainConfig, base=pretrain_tree(nn, tmp_path / "run")))
    mine = module.backbone.architecture["arch_kwargs"]
    last = [1, 1, 1] if list(mine["strides"][-1]) != [1, 1, 1] else [2, 2, 2]
    for key, value in (("nonlin", "torch.nn.ReLU"), ("strides", [list(s) for s in mine["strides"][:-1]] + [last])):
        plan = json.loads(json.dumps(ckpt["nnssl_adaptation_plan"]))
        plan["architecture_plans"]["arch_kwargs"][key] = value
        path = tmp_path / f"{key}.pth"
        torch.save({**ckpt, "nnssl_adaptation_plan": plan}, path)
        with pytest.raises(SubforeError, match=rf"{path} \(nnssl checkpoint\): its architecture differs .* first "
                                               rf"difference arch_kwargs\.{key}: "):
            module.init_weights(path)


def test_finetuning_takes_the_network_from_an_nnssl_file_and_its_checkpoint_stands_alone(nn, nnssl_ckpt, tmp_path):
    """model.name resenc with no plans: the network is the nnssl file's (PretrainedTrainer's way); the finetuned
    checkpoint carries it, and a plans-built run's checkpoint carries its plans, so predict works with no plans."""
    import shutil

    from subfore.evaluate import predict

    tree = {
        "run_dir": str(tmp_path / "ft"),
        "data": {"train": str(nn["raw"]), "preset": "ct", "spacing": [4.0, 4.0, 4.0], "roi": [32, 32, 32],
                 "samples_per_volume": 1, "cache_dir": None, "num_workers": 0, "label_map": {1: 1, 6: 2}},
        "model": {"name": "resenc", "out_channels": 3},
        "train": {"max_steps": 1, "batch_size": 2, "ckpt_every": 1, "log_every": 1, "progress_bar": False},
    }
    (tmp_path / "ft.yaml").write_text(json.dumps(tree))
    ok(run(SUBFORE, "finetune", "--config", tmp_path / "ft.yaml", "--pretrained", nnssl_ckpt))
    assert yaml_value(tmp_path / "ft" / "config.yaml", "model")["nnunet_architecture"]["arch_kwargs"] == \
        plans_arch(nn["plans"])["arch_kwargs"]
    assert re.search(r"\((\d+)/\1 of the encoder\)", (tmp_path / "ft" / "pretrained_load.txt").read_text())
    # A run built from a plans file that is then deleted: evaluate and predict still rebuild its network.
    plans = tmp_path / "plans" / "TinyResEncM.json"
    plans.parent.mkdir()
    shutil.copy(nn["plans"], plans)
    tree["run_dir"] = str(tmp_path / "ft_plans")
    tree["data"].update(preset="nnunet", spacing=None)
    tree["model"] = {"name": "resenc", "nnunet_plans": str(plans), "out_channels": 3}
    (tmp_path / "ft_plans.yaml").write_text(json.dumps(tree))
    ok(run(SUBFORE, "finetune", "--config", tmp_path / "ft_plans.yaml"))
    last = tmp_path / "ft_plans" / "checkpoints" / "last.ckpt"
    before = nib.load(predict(last, [str(nn["image"])], tmp_path / "before")[0]).get_fdata()
    shutil.rmtree(plans.parent)
    ok(run(SUBFORE, "predict", "--checkpoint", last, nn["image"], "--out", tmp_path / "after"))
    after = nib.load(next((tmp_path / "after").glob("*_seg.nii.gz")))
    assert np.array_equal(after.get_fdata(), before)
    assert np.allclose(after.affine, nib.load(nn["image"]).affine)


def resenc_l_nnssl(path: Path) -> dict:
    """A 1-channel nnssl ResEnc-L checkpoint laid out as nnssl writes it (the OpenMind models): preset by name."""
    from subfore.config import ModelConfig
    from subfore.models import build_backbone

    torch.manual_seed(1)
    state = {k: v for k, v in build_backbone(ModelConfig(name="resenc_l"), 1, 1, (64, 64, 64)).state_dict().items()
             if ".seg_layers." not in k}
    plan = {"architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": None,
                                   "arch_kwargs_requiring_import": None},
            "pretrain_plan": {"transpose_forward": [0, 1, 2], "configurations": {"onemmiso": {
                "spacing": [1.0, 1.0, 1.0], "patch_size": [160, 160, 160],
                "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False]}}},
            "pretrain_num_input_channels": 1, "recommended_downstream_patchsize": [160, 160, 160],
            "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
            "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"], "key_to_lpe": None}
    torch.save({"network_weights": state, "nnssl_adaptation_plan": plan}, path)
    return state


def test_a_one_channel_nnssl_resenc_l_finetunes_a_four_channel_network(tmp_path):
    from helpers import write_nifti

    from subfore.config import ModelConfig
    from subfore.models import build_backbone
    from subfore.models.nnunet.network import RESENC_L
    from subfore.models.weights import load_pretrained, repeat_stem

    source = resenc_l_nnssl(tmp_path / "openmind.pth")
    stem = [k for k in source if "encoder.stem." in k and source[k].ndim == 5 and source[k].shape[1] == 1]
    assert len(stem) == 4  # the stem's first convolution and its aliases (.all_modules.0, decoder.encoder.*)
    for mode in ("repeat", "reinit"):
        net = build_backbone(ModelConfig(name="resenc_l"), 4, 3, (64, 64, 64))
        init = {k: v.clone() for k, v in net.state_dict().items()}
        report = load_pretrained(net, tmp_path / "openmind.pth", "resenc_l", mode, architecture=RESENC_L)
        after = net.state_dict()
        assert sorted(a.split(" ")[0] for a in report.adapted) == sorted(stem)
        for key, value in source.items():
            if key in stem:
                expected = repeat_stem(value, 4) if mode == "repeat" else init[key]
                assert after[key].shape[1] == 4 and torch.equal(after[key], expected), key
            elif key.startswith("encoder."):
                assert torch.equal(after[key], value), key
    # Through the console script: a 4-channel MRI finetuning from the 1-channel file, exit 0.
    rng = np.random.default_rng(0)
    entries = []
    for i in range(2):
        lab = np.zeros((64, 64, 64), np.uint8)
        lab[16:40, 16:40, 16:40] = 1
        lab[24:32, 24:32, 24:32] = 2
        img = rng.normal(100, 20, size=(64, 64, 64, 4)).astype(np.float32) + 60 * (lab > 0)[..., None]
        write_nifti(tmp_path / f"mr{i}.nii.gz", img, spacing=(1.0, 1.0, 1.0))
        write_nifti(tmp_path / f"mr{i}_seg.nii.gz", lab, spacing=(1.0, 1.0, 1.0))
        entries.append({"image": f"mr{i}.nii.gz", "label": f"mr{i}_seg.nii.gz"})
    (tmp_path / "mr.json").write_text(json.dumps({"training": entries}))
    tree = {"run_dir": str(tmp_path / "ft"),
            "data": {"train": str(tmp_path / "mr.json"), "preset": "mri", "channels": 4, "spacing": [1.0, 1.0, 1.0],
                     "roi": [64, 64, 64], "samples_per_volume": 1, "cache_dir": None, "num_workers": 0},
            "model": {"name": "resenc_l", "out_channels": 3},
            "train": {"max_steps": 1, "batch_size": 1, "ckpt_every": 1, "log_every": 1, "progress_bar": False}}
    (tmp_path / "ft.yaml").write_text(json.dumps(tree))
    ok(run(SUBFORE, "finetune", "--config", tmp_path / "ft.yaml", "--pretrained", tmp_path / "openmind.pth"))
    text = (tmp_path / "ft" / "pretrained_load.txt").read_text()
    assert f"input channels adapted: {stem[0]} (32, 1) → (32, 4) (repeat)" in text or \
        "(32, 1) → (32, 4) (repeat)" in text, text
    assert re.search(r"\((\d+)/\1 of the encoder\)", text), text
