"""Finetune, evaluate and predict on phantoms (and the real CT where present)."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REAL_CT, REAL_SEG, needs_real_ct
from subfore.config import load_config
from subfore.errors import DataError, SubforeError
from subfore.evaluate import case_metrics, evaluate, predict
from subfore.finetune import FinetuneConfig, finetune

BTCV_FROM_TOTALSEG = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}


def ft_config(phantom_dir, tmp_path, **sections) -> dict:
    cfg = {
        "run_dir": str(tmp_path / "ft"),
        "data": {"train": str(phantom_dir / "dataset.json"), "val": str(phantom_dir / "dataset.json"),
                 "roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0], "samples_per_volume": 2,
                 "cache_dir": str(tmp_path / "cache"), "num_workers": 0},
        "model": {"name": "basicunet", "feature_size": 4, "out_channels": 14},
        "optim": {},
        "train": {"max_steps": 2, "batch_size": 2, "val_every": 2, "ckpt_every": 2, "log_every": 1,
                  "progress_bar": False},
    }
    for k, v in sections.items():
        cfg[k].update(v)
    return cfg


@pytest.fixture(scope="module")
def trained(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    best = finetune(load_config(None, [], FinetuneConfig, base=ft_config(phantom_dir, tmp)))
    return best


def test_finetune_writes_best_checkpoint_and_val_dice(trained):
    assert trained.name == "best.ckpt" and trained.exists()
    rows = [json.loads(x) for x in (trained.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_dice" in r] == [2] and [r["val_cases"] for r in rows if "val_cases" in r] == [1]


@pytest.fixture(scope="module")
def liver(phantom_dir, tmp_path_factory):
    """A network that really segments the phantoms' liver (id 6 → 1): whole bodies at 6 mm, 60 steps; selected on
    the 3rd training phantom (a holdout)."""
    tmp = tmp_path_factory.mktemp("liver")
    tree = ft_config(phantom_dir, tmp, data={"val": None, "holdout": 1, "label_map": {6: 1}, "samples_per_volume": 1,
                                             "spacing": [6.0, 6.0, 6.0], "roi": [64, 48, 32]},
                     model={"out_channels": 2, "feature_size": 8},
                     optim={"lr": 1e-2, "warmup_steps": 0}, train={"max_steps": 60, "val_every": 30, "ckpt_every": 60})
    return finetune(load_config(None, [], FinetuneConfig, base=tree))


def test_segmentation_dice_on_held_out_phantom_stays_above_a_floor(liver, phantom_dir, tmp_path):
    rows = [json.loads(x) for x in (liver.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_cases"] for r in rows if "val_cases" in r] == [1, 1]  # the holdout: 1 case
    result = evaluate(liver, phantom_dir / "dataset.json", tmp_path / "m.json", split="validation",
                      label_map={6: 1})
    # Calling every voxel liver scores ≈ 0.11 (the liver is 5.6 % of a phantom), calling none 0; this run: 0.84.
    assert result["mean"]["dice"]["class_1"] > 0.75, result["mean"]


def test_label_grid_scores_equal_an_independent_count_on_the_written_prediction(liver, phantom_dir, tmp_path):
    meta = json.loads((phantom_dir / "dataset.json").read_text())["validation"][0]
    image, label = phantom_dir / meta["image"], phantom_dir / meta["label"]
    [written] = predict(liver, [image], tmp_path / "pred")
    p = np.asarray(nib.load(written).dataobj) == 1
    y = np.asarray(nib.load(label).dataobj) == 6
    expected = 2 * (p & y).sum() / (p.sum() + y.sum())  # on the label's own grid, by hand
    own = evaluate(liver, phantom_dir / "dataset.json", tmp_path / "own.json", label_map={6: 1})
    coarse = evaluate(liver, phantom_dir / "dataset.json", tmp_path / "coarse.json", label_map={6: 1}, grid="resampled")
    assert own["mean"]["dice"]["class_1"] == pytest.approx(expected, abs=1e-6)
    assert own["cases"][0]["spacing_mm"] == [2.0, 2.0, 3.0] and own["grid"] == "label"
    assert coarse["cases"][0]["spacing_mm"] == [6.0, 6.0, 6.0]
    assert coarse["mean"]["dice"]["class_1"] != pytest.approx(expected, abs=1e-4)  # the switch changes the grid


def test_finetune_from_pretrained_encoder_loads_and_then_trains(phantom_dir, tmp_path):
    from test_pretrain import base_config, run_cfg

    pre = base_config(phantom_dir, tmp_path, data={"roi": [64, 64, 64]}, model={"name": "swinunetr", "feature_size": 12},
                      train={"max_steps": 1, "batch_size": 1})
    encoder = run_cfg(pre)
    enc = torch.load(encoder, weights_only=True)
    tree = ft_config(phantom_dir, tmp_path, data={"roi": [64, 64, 64], "samples_per_volume": 1, "val": None},
                     model={"name": "swinunetr", "feature_size": 12}, train={"batch_size": 1})
    last = finetune(load_config(None, [], FinetuneConfig, base=tree), pretrained=encoder)
    report = (tmp_path / "ft" / "pretrained_load.txt").read_text()
    assert "0 unexpected" in report and "missing (left at init): out.conv.conv.bias, out.conv.conv.weight" in report
    tuned = torch.load(last, weights_only=False)["state_dict"]
    key = "swinViT.layers1.0.blocks.0.attn.qkv.weight"
    from monai.networks.nets import SwinUNETR

    fresh = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_v2=True).state_dict()[key]
    # Started from the pretrained weights (close to them after 2 small steps), far from a random init, and moved.
    assert not torch.equal(tuned["net." + key], enc[key])
    assert (tuned["net." + key] - enc[key]).abs().max() < (fresh - enc[key]).abs().max() / 4


def test_pretrained_layouts_and_channel_adaptation(tmp_path):
    from monai.networks.nets import SwinUNETR

    from subfore.weights import load_pretrained

    src = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=True).state_dict()
    lightning_style = {"state_dict": {"module.net." + k.replace("swinViT.", "swin_vit."): v for k, v in src.items()}}
    torch.save(lightning_style, tmp_path / "a.ckpt")
    net = SwinUNETR(in_channels=4, out_channels=3, feature_size=12, use_v2=True)
    report = load_pretrained(net, tmp_path / "a.ckpt", "swinunetr", "repeat")
    assert report.encoder_loaded == report.encoder_total
    assert any("swinViT.patch_embed.proj.weight" in a for a in report.adapted)
    w = src["swinViT.patch_embed.proj.weight"]
    assert torch.allclose(net.swinViT.patch_embed.proj.weight, w.repeat(1, 4, 1, 1, 1) / 4)
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "b.pt")
    with pytest.raises(SubforeError, match="no encoder key matched"):
        load_pretrained(net, tmp_path / "b.pt", "swinunetr")


def _released_swinvit(net) -> dict:
    """The layout of MONAI's released self-supervised SwinUNETR weights, written from a v1 network's encoder."""
    return {"state_dict": {"module." + k[len("swinViT."):].replace(".linear1.", ".fc1.").replace(".linear2.", ".fc2."): v
                           for k, v in net.state_dict().items() if k.startswith("swinViT.")}}


def test_released_swinunetr_ssl_weights_load_whole_into_v1_and_v2(tmp_path):
    from monai.networks.nets import SwinUNETR

    from subfore.weights import load_pretrained

    torch.manual_seed(0)
    released = _released_swinvit(SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=False))
    assert "module.layers1.0.blocks.0.mlp.fc1.weight" in released["state_dict"]
    torch.save(released, tmp_path / "model_swinvit.pt")
    reference = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_v2=False)
    reference.load_from(released)  # MONAI's own reader of this layout
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_v2=False)
    report = load_pretrained(net, tmp_path / "model_swinvit.pt", "swinunetr")
    encoder = [k for k in net.state_dict() if k.startswith("swinViT.")]
    assert report.encoder_loaded == report.encoder_total == len(encoder) == len(released["state_dict"])
    assert report.unexpected == [] and report.renamed == len(encoder)
    assert all(torch.equal(net.state_dict()[k], reference.state_dict()[k]) for k in encoder)
    v2 = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_v2=True)
    report = load_pretrained(v2, tmp_path / "model_swinvit.pt", "swinunetr")
    assert report.expected_missing and all(".layers1c." in k or ".layers2c." in k or ".layers3c." in k
                                           or ".layers4c." in k for k in report.expected_missing)
    assert report.encoder_loaded == report.encoder_total == len(encoder)
    assert "expected missing, not in a v1 SwinUNETR pretraining" in str(report)


def test_research_contributions_sslhead_checkpoint_loads_its_encoder(tmp_path):
    from monai.networks.nets import SwinUNETR

    from subfore.weights import load_pretrained

    src = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, use_v2=True).state_dict()
    ssl = {f"module.{k}": v for k, v in src.items() if k.startswith("swinViT.")}
    ssl.update({"module.rotation_head.weight": torch.zeros(4, 384), "module.contrastive_head.weight": torch.zeros(512, 384),
                "module.conv.0.weight": torch.zeros(192, 384, 3, 3, 3)})
    torch.save({"epoch": 10, "state_dict": ssl}, tmp_path / "ssl.pt")
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_v2=True)
    report = load_pretrained(net, tmp_path / "ssl.pt", "swinunetr")
    assert report.encoder_loaded == report.encoder_total == sum(k.startswith("swinViT.") for k in src)
    assert sorted(report.unexpected) == ["contrastive_head.weight", "conv.0.weight", "rotation_head.weight"]
    assert "unexpected, no such tensor in this network (skipped): rotation_head.weight" in str(report)


def test_partial_loads_are_refused_and_output_heads_never_load(tmp_path):
    from monai.networks.nets import BasicUNet

    from subfore.weights import load_pretrained

    make = lambda out: BasicUNet(spatial_dims=3, in_channels=1, out_channels=out, features=(4, 4, 8, 16, 32, 4))  # noqa: E731
    hpm = make(2).state_dict()  # an HPM pretraining: reconstruction + predicted loss = 2 output channels
    torch.save({"state_dict": {f"net.{k}": v + 1 for k, v in hpm.items()}}, tmp_path / "hpm.ckpt")
    net = make(2)  # a 2-class finetune: the same head shape
    head_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("final_conv.")}
    report = load_pretrained(net, tmp_path / "hpm.ckpt", "basicunet")
    assert sorted(report.head) == sorted(head_before) and all(torch.equal(net.state_dict()[k], v) for k, v in head_before.items())
    assert torch.equal(net.state_dict()["conv_0.conv_0.conv.weight"], hpm["conv_0.conv_0.conv.weight"] + 1)
    assert "skipped, the pretraining's output head (never loaded): final_conv.weight, final_conv.bias" in str(report)
    # One encoder tensor of many: refused in one line, unless the user lowers the share.
    torch.save({"conv_0.conv_0.conv.weight": hpm["conv_0.conv_0.conv.weight"]}, tmp_path / "one.pt")
    total = sum(k.startswith(("conv_0.", "down_1.", "down_2.", "down_3.", "down_4.")) for k in net.state_dict())
    with pytest.raises(SubforeError) as err:
        load_pretrained(make(3), tmp_path / "one.pt", "basicunet")
    assert str(err.value).startswith(f"{tmp_path / 'one.pt'}: only 1 of the {total} encoder tensors of this basicunet "
                                     f"loaded ({1 / total:.0%} < finetune.min_encoder_loaded 0.9")
    assert "\n" not in str(err.value)
    assert load_pretrained(make(3), tmp_path / "one.pt", "basicunet", min_encoder=0.0).encoder_loaded == 1


def test_class_balanced_crops_visit_a_small_organ_as_often_as_the_big_one(tmp_path):
    from helpers import write_nifti
    from monai.utils import set_determinism

    from subfore.finetune import train_transforms

    img = np.full((64, 64, 64), 40.0, dtype=np.float32)  # soft tissue HU, so the foreground crop keeps it all
    seg = np.zeros((64, 64, 64), dtype=np.uint8)
    seg[:40, :40, :40] = 1  # a big "liver": 24 % of the volume
    seg[56:60, 56:60, 56:60] = 2  # a small organ: 64 voxels
    item = {"image": str(write_nifti(tmp_path / "i.nii.gz", img, (1.0, 1.0, 1.0))),
            "label": str(write_nifti(tmp_path / "l.nii.gz", seg, (1.0, 1.0, 1.0)))}

    def share_with_small_organ(crop: str) -> float:
        cfg = FinetuneConfig.model_validate({
            "data": {"train": "unused", "roi": [16, 16, 16], "spacing": [1.0, 1.0, 1.0], "samples_per_volume": 300,
                     "crop": crop},
            "model": {"name": "basicunet", "out_channels": 3}, "train": {"batch_size": 300}})
        set_determinism(0)
        crops = train_transforms(cfg, cfg.data.preset_obj())(item)
        set_determinism(None)
        assert len(crops) == 300 and all(c["label"].shape == (1, 16, 16, 16) for c in crops)
        return sum(bool((c["label"] == 2).any()) for c in crops) / len(crops)

    # posneg centres half the crops on foreground, which is almost all liver: the small organ is rarely seen.
    # classes draws centres evenly over the 3 classes: about 1/3 of crops hold it (binomial, 300 draws).
    assert share_with_small_organ("classes") > 0.2
    assert share_with_small_organ("posneg") < 0.05


def test_dice_and_nsd_hand_computed():
    y = torch.zeros(1, 1, 20, 20, 20, dtype=torch.long)
    y[0, 0, 2:12, 2:12, 2:12] = 1  # 1000 voxels
    y[0, 0, 14:18, 14:18, 14:18] = 2
    perfect = case_metrics(y, y, 4, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert perfect["dice"][:2] == [1.0, 1.0] and perfect["nsd"][:2] == [1.0, 1.0]
    assert np.isnan(perfect["dice"][2]) and np.isnan(perfect["nsd"][2])  # class 3 absent: excluded
    p = torch.zeros_like(y)
    p[0, 0, 2:12, 2:12, 7:17] = 1  # half overlaps: |A∩B| = 500
    p[0, 0, 0:2, 0:2, 0:2] = 2  # disjoint from the true class 2
    m = case_metrics(p, y, 4, (1.0, 1.0, 1.0), tolerance_mm=1.0)
    assert m["dice"][0] == pytest.approx(2 * 500 / 2000) and m["dice"][1] == 0.0
    assert m["nsd"][1] == 0.0 and 0.0 < m["nsd"][0] < 1.0


def test_hd95_penalises_a_missed_and_a_spurious_class_with_the_image_diagonal():
    y = torch.zeros(1, 1, 20, 30, 40, dtype=torch.long)
    y[0, 0, 2:8, 2:8, 2:8] = 1  # found perfectly
    y[0, 0, 10:14, 10:14, 10:14] = 2  # missed
    p = y.clone()
    p[y == 2] = 0
    p[0, 0, 15:18, 20:25, 30:35] = 3  # predicted, absent from the ground truth
    spacing = (1.0, 2.0, 0.5)
    diagonal = (20.0 ** 2 + 60.0 ** 2 + 20.0 ** 2) ** 0.5
    m = case_metrics(p, y, 5, spacing, hd95=True)
    assert m["hd95"][0] == 0.0 and m["hd95"][1] == pytest.approx(diagonal) and m["hd95"][2] == pytest.approx(diagonal)
    assert np.isnan(m["hd95"][3])  # class 4: in neither, excluded
    assert np.isnan(m["dice"][2])  # Dice keeps the absent-class rule


def test_predict_on_anisotropic_lps_phantom_returns_the_input_grid(liver, tmp_path):
    from subfore.phantoms import PhantomSpec, write_phantoms

    write_phantoms(tmp_path / "lps", n=1, seed=5, spec=PhantomSpec(spacing=(2.0, 2.5, 4.0), orientation="LPS"))
    src = tmp_path / "lps" / "imagesTr" / "phantom_000.nii.gz"
    [out] = predict(liver, [src], tmp_path / "pred")
    a, b = nib.load(src), nib.load(out)
    assert b.shape == a.shape and np.allclose(b.affine, a.affine)
    assert nib.aff2axcodes(b.affine) == ("L", "P", "S")
    # Voxel for voxel on the input's grid, the predicted liver overlaps the phantom's own liver label (id 6).
    p = np.asarray(b.dataobj) == 1
    y = np.asarray(nib.load(tmp_path / "lps" / "labelsTr" / "phantom_000.nii.gz").dataobj) == 6
    assert 2 * (p & y).sum() / (p.sum() + y.sum()) > 0.6
    assert (tmp_path / "pred" / "phantom_000_overlay.png").exists()


def test_evaluate_writes_json_table_and_chart(trained, phantom_dir, tmp_path):
    out = tmp_path / "metrics.json"
    result = evaluate(trained, phantom_dir / "dataset.json", out, split="validation")
    saved = json.loads(out.read_text())
    assert saved["classes"][0] == "spleen" and len(saved["classes"]) == 13
    assert "excluded" in saved["absent_class_rule"]
    assert saved["mean"]["dice"]["esophagus"] is None  # no phantom has an esophagus
    assert len(result["cases"]) == 1 and set(result["cases"][0]) >= {"case", "dice", "nsd"}
    assert "| method | spleen" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_bad_inputs_name_the_cause(trained, phantom_dir, tmp_path):
    from helpers import write_nifti

    # Label ids the model cannot output.
    write_nifti(tmp_path / "img.nii.gz", np.zeros((20, 20, 20), np.int16))
    write_nifti(tmp_path / "lab.nii.gz", np.full((20, 20, 20), 40, np.uint8))
    (tmp_path / "ds.json").write_text(json.dumps({"validation": [{"image": "img.nii.gz", "label": "lab.nii.gz"}],
                                                   "training": []}))
    with pytest.raises(DataError, match="lab.nii.gz: label ids \\[40\\]"):
        evaluate(trained, tmp_path / "ds.json", tmp_path / "m.json")
    with pytest.raises(DataError, match="no image found for split 'training'"):
        finetune(load_config(None, [], FinetuneConfig, base=ft_config(phantom_dir, tmp_path, data={"train": str(tmp_path / "ds.json")})))
    # An encoder.pt or a pretraining checkpoint is not a segmentation checkpoint.
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(SubforeError, match="not a 'subfore finetune' checkpoint"):
        predict(tmp_path / "x.ckpt", [tmp_path / "img.nii.gz"], tmp_path / "p")
    proc = subprocess.run([sys.executable, "-m", "subfore", "predict", str(tmp_path / "img.nii.gz"), "--checkpoint",
                           str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1


@needs_real_ct
def test_real_ct_predict_and_evaluate_with_btcv_map(trained, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"validation": [{"image": str(REAL_CT), "label": str(REAL_SEG)}]}))
    result = evaluate(trained, tmp_path / "ds.json", tmp_path / "m.json", label_map=BTCV_FROM_TOTALSEG)
    assert result["mean"]["dice"]["esophagus"] is None  # absent from this scan
    assert result["mean"]["dice"]["liver"] is not None
    # The same through the command line.
    proc = subprocess.run([sys.executable, "-m", "subfore", "evaluate", "--checkpoint", str(trained), "--data",
                           str(tmp_path / "ds.json"), "--out", str(tmp_path / "cli.json"), "--label-map",
                           json.dumps(BTCV_FROM_TOTALSEG), "--method", "phantom-trained"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "cli.json").read_text())["mean"] == result["mean"]
    # Two checkpoints → one methods × classes table.
    proc = subprocess.run([sys.executable, "-m", "subfore", "evaluate", "--checkpoint", str(trained), "--checkpoint",
                           str(trained), "--method", "a", "--method", "b", "--data", str(tmp_path / "ds.json"),
                           "--out", str(tmp_path / "two.json"), "--label-map", json.dumps(BTCV_FROM_TOTALSEG)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = (tmp_path / "two.md").read_text()
    assert "| a |" in table and "| b |" in table and (tmp_path / "two.0.json").exists()
    [out] = predict(trained, [REAL_CT], tmp_path / "pred")
    assert nib.load(out).shape == nib.load(REAL_CT).shape
    assert np.allclose(nib.load(out).affine, nib.load(REAL_CT).affine)


@pytest.mark.parametrize("convention,ids", [("msd", {"ED": 1, "NET": 2, "ET": 3}), ("brats", {"NCR": 1, "ED": 2, "ET": 4})])
def test_brats_regions_follow_each_convention(convention, ids):
    from subfore.data.brats import BratsRegionsd, from_regions

    lab = torch.zeros(1, 4, 1, 1)
    core = ids.get("NET", ids.get("NCR"))
    lab[0, :, 0, 0] = torch.tensor([ids["ED"], core, ids["ET"], 0])  # voxels: edema, core, enhancing, background
    regions = BratsRegionsd("label", convention)({"label": lab})["label"][:, :, 0, 0]
    # TC = core + enhancing, WT = every tumour label, ET = enhancing: by construction, voxel by voxel.
    assert regions.tolist() == [[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0]]
    assert from_regions(regions.bool()[:, :, None, None], convention)[0, :, 0, 0].tolist() == lab[0, :, 0, 0].tolist()


def test_brats_convention_comes_from_dataset_json_names(tmp_path):
    from subfore.data.brats import resolve_convention

    msd = {"labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    brats = {"labels": {"background": 0, "NCR": 1, "peritumoral edema": 2, "GD-enhancing tumor": 4}}  # nnU-Net v2 style
    for name, meta in (("msd", msd), ("brats", brats)):
        (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    assert resolve_convention(None, [str(tmp_path / "msd.json")]) == "msd"
    assert resolve_convention("brats", [str(tmp_path / "brats.json")]) == "brats"
    with pytest.raises(DataError, match="msd.json: labels follow the 'msd' convention but data.brats_labels is 'brats'"):
        resolve_convention("brats", [str(tmp_path / "msd.json")])
    (tmp_path / "none.json").write_text(json.dumps({"training": []}))
    assert resolve_convention("brats", [str(tmp_path / "none.json")]) == "brats"
    with pytest.raises(DataError, match="none.json: names no BraTS labels; set data.brats_labels"):
        resolve_convention(None, [str(tmp_path / "none.json")])
    (tmp_path / "abbr.json").write_text(json.dumps({"labels": {"0": "background", "1": "NCR/NET", "2": "ED", "4": "ET"}}))
    assert resolve_convention(None, [str(tmp_path / "abbr.json")]) == "brats"


def test_label_ids_outside_the_brats_convention_are_refused():
    from subfore.data.brats import BratsRegionsd

    lab = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 4, 1, 1)  # BraTS 2023: ET = 3, not 4
    with pytest.raises(DataError, match=r"label ids \[3\] are not in the 'brats' BraTS convention \(\[1, 2, 4\]\)"):
        BratsRegionsd("label", "brats")({"label": lab})


@pytest.mark.parametrize("convention", ["msd", "brats"])
def test_brats_regions_on_four_channel_mri_from_ct_pretraining(phantom_dir, tmp_path, convention):
    from helpers import write_nifti
    from test_pretrain import base_config, run_cfg

    core, edema, enhancing = {"msd": (2, 1, 3), "brats": (1, 2, 4)}[convention]
    rng = np.random.default_rng(0)
    entries = []
    for i in range(2):
        img = rng.normal(100, 20, size=(32, 32, 32, 4)).astype(np.float32)
        lab = np.zeros((32, 32, 32), np.uint8)
        lab[8:20, 8:20, 8:20], lab[10:16, 10:16, 10:16], lab[12:14, 12:14, 12:14] = edema, core, enhancing
        img[lab > 0] += 80
        write_nifti(tmp_path / f"mr{i}.nii.gz", img, spacing=(1.0, 1.0, 1.0))
        write_nifti(tmp_path / f"mr{i}_seg.nii.gz", lab, spacing=(1.0, 1.0, 1.0))
        entries.append({"image": f"mr{i}.nii.gz", "label": f"mr{i}_seg.nii.gz"})
    names = {"msd": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
             "brats": {"0": "background", "1": "necrotic tumor core", "2": "peritumoral edema", "4": "enhancing tumor"}}
    (tmp_path / "brats.json").write_text(json.dumps({"labels": names[convention], "training": entries,
                                                     "validation": entries[:1]}))
    encoder = run_cfg(base_config(phantom_dir, tmp_path, train={"max_steps": 1, "batch_size": 1}))  # 1-channel CT
    tree = ft_config(phantom_dir, tmp_path, data={"train": str(tmp_path / "brats.json"), "val": str(tmp_path / "brats.json"),
                                                  "preset": "mri", "channels": 4, "regions": "brats", "spacing": [1.0, 1.0, 1.0],
                                                  "samples_per_volume": 1},
                     model={"out_channels": 3}, train={"batch_size": 1})
    cfg = load_config(None, [], FinetuneConfig, base=tree)
    assert cfg.class_names() == ["TC", "WT", "ET"]
    best = finetune(cfg, pretrained=encoder)
    assert torch.load(best, weights_only=False)["hyper_parameters"]["config"]["data"]["brats_labels"] == convention
    assert "conv_0.conv_0.conv.weight (32, 1) → (32, 4) (repeat)".replace("32", "4") in \
        (tmp_path / "ft" / "pretrained_load.txt").read_text()
    result = evaluate(best, tmp_path / "brats.json", tmp_path / "m.json")
    assert result["classes"] == ["TC", "WT", "ET"] and set(result["mean"]["dice"]) == {"TC", "WT", "ET"}
    # A perfect prediction scores 1 on all three regions: each is present and built from this convention's ids.
    from subfore.data.brats import to_regions

    regions = to_regions(torch.as_tensor(lab[None]).long(), convention)
    assert regions.flatten(1).sum(1).tolist() == [6 ** 3, 12 ** 3, 2 ** 3]  # TC, WT, ET by construction
