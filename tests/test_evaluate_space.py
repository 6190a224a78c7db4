"""evaluate compares a prediction and its ground truth in physical space: label files from any tool
(``--predictions``) and a checkpoint's predictions, on the label's own grid whatever its orientation or spacing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REAL_CT, REAL_SEG, needs_real_ct
from subfore.errors import DataError
from subfore.evaluate import evaluate, evaluate_predictions

SUBFORE = shutil.which("subfore", path=str(Path(sys.executable).parent))
NAMES = {"0": "background", "1": "spleen", "2": "liver", "3": "kidney"}
SPACING = (1.5, 1.5, 2.0)
ORIGIN = (-20.0, 10.0, 5.0)


def boxes() -> np.ndarray:
    """24³ labels: three boxes (classes 1–3), none symmetric, so a flip or a transpose moves every one."""
    a = np.zeros((24, 24, 24), np.uint8)
    a[3:11, 2:10, 4:12] = 1  # x starts odd: a 2× coarser copy misses x=3 and gains x=11
    a[12:20, 2:8, 10:20] = 2
    a[5:9, 14:22, 14:21] = 3
    return a


def grid(spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def flipped(array: np.ndarray, affine: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The same segmentation in physical space, stored with ``axis`` reversed."""
    flip = np.eye(4)
    flip[axis, axis], flip[axis, 3] = -1.0, array.shape[axis] - 1
    return np.flip(array, axis).copy(), affine @ flip


def transposed(array: np.ndarray, affine: np.ndarray, order=(2, 0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """The same segmentation in physical space, stored with its axes permuted."""
    perm = np.eye(4)
    perm[:3, :3] = np.eye(3)[:, list(order)]
    return np.transpose(array, order).copy(), affine @ perm


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def datalist(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray]], names=NAMES, name="ds.json") -> Path:
    """A decathlon dataset.json with one validation entry per case (image = label as int16, on the label's grid)."""
    entries = []
    for case, (array, affine) in cases.items():
        save(root / "imagesTr" / f"{case}_0000.nii.gz", array.astype(np.int16), affine)
        save(root / "labelsTr" / f"{case}.nii.gz", array, affine)
        entries.append({"image": f"imagesTr/{case}_0000.nii.gz", "label": f"labelsTr/{case}.nii.gz"})
    (root / name).write_text(json.dumps({**({"labels": names} if names else {}), "training": [],
                                         "validation": entries}))
    return root / name


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SUBFORE, "evaluate", *map(str, args)], capture_output=True, text=True)


def per_class(result: dict, metric: str = "dice") -> dict:
    return {c["case"]: c[metric] for c in result["cases"]}


# --------------------------------------------------------------------------------------- --predictions


def test_ground_truth_as_its_own_prediction_scores_one_through_the_command_line(tmp_path):
    gt = boxes()
    partial = gt.copy()
    partial[partial == 3] = 0  # kidney absent from this case: null, not 0 or 1
    ds = datalist(tmp_path, {"a": (gt, grid()), "b": (partial, grid())})
    save(tmp_path / "pred" / "a.nii.gz", gt, grid())  # nnU-Net's name
    save(tmp_path / "pred" / "b_seg.nii.gz", partial, grid())  # subfore predict's name
    (tmp_path / "pred" / "b_overlay.png").write_bytes(b"")  # beside it, as predict writes: ignored
    proc = cli("--predictions", tmp_path / "pred", "--data", ds, "--out", tmp_path / "m.json", "--hd95")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["classes"] == ["spleen", "liver", "kidney"] and result["method"] == "pred"
    assert result["checkpoint"] is None and result["grid"] == "label"
    assert per_class(result) == {"a": {"spleen": 1.0, "liver": 1.0, "kidney": 1.0},
                                 "b": {"spleen": 1.0, "liver": 1.0, "kidney": None}}
    assert per_class(result, "nsd") == per_class(result)
    assert per_class(result, "hd95") == {"a": {"spleen": 0.0, "liver": 0.0, "kidney": 0.0},
                                         "b": {"spleen": 0.0, "liver": 0.0, "kidney": None}}
    assert result["mean"]["mean_dice"] == 1.0 and result["mean"]["mean_hd95"] == 0.0
    assert [c["spacing_mm"] for c in result["cases"]] == [list(SPACING)] * 2
    assert [c["resampled"] for c in result["cases"]] == [False, False]
    assert "| pred | 100.00 | 100.00 | 100.00 |" in (tmp_path / "m.md").read_text()
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_a_flipped_or_transposed_copy_scores_one_as_prediction_and_as_ground_truth(tmp_path):
    gt, affine = boxes(), grid()
    # Stored index for index against the ground truth, these copies score far below 1 (the bug this guards).
    assert (flipped(gt, affine)[0] == gt).mean() < 0.9 and (transposed(gt, affine)[0] == gt).mean() < 0.9
    ds = datalist(tmp_path, {"x": (gt, affine), "y": (gt, affine), "z": (gt, affine)})
    save(tmp_path / "pred" / "x_seg.nii.gz", *flipped(gt, affine, 0))
    save(tmp_path / "pred" / "y_seg.nii.gz", *flipped(gt, affine, 2))
    save(tmp_path / "pred" / "z_seg.nii.gz", *transposed(gt, affine))
    result = evaluate_predictions(tmp_path / "pred", ds, tmp_path / "m.json")
    ones = {"spleen": 1.0, "liver": 1.0, "kidney": 1.0}
    assert per_class(result) == {"x": ones, "y": ones, "z": ones}
    assert per_class(result, "nsd") == {"x": ones, "y": ones, "z": ones}
    assert [c["resampled"] for c in result["cases"]] == [True, True, True]
    # The other way round: the ground truth stored flipped (its own spacing kept), the prediction as written.
    other = tmp_path / "flipped_gt"
    ds = datalist(other, {"x": flipped(gt, affine, 1)})
    save(other / "pred" / "x.nii.gz", gt, affine)
    save(other / "flip" / "x_seg.nii.gz", *flipped(gt, affine, 0))  # flipped along another axis than the label
    proc = cli("--predictions", other / "pred", "--predictions", other / "flip", "--method", "copy", "--method",
               "flip", "--data", ds, "--out", other / "m.json")
    assert proc.returncode == 0, proc.stderr
    assert "resampled onto their label's grid" in proc.stdout
    for i, name in enumerate(("copy", "flip")):  # several folders: m.0.json, m.1.json and one table
        result = json.loads((other / f"m.{i}.json").read_text())
        assert per_class(result) == {"x": ones} and per_class(result, "nsd") == {"x": ones}
        assert result["method"] == name
    table = (other / "m.md").read_text()
    assert "| copy | **100.00** | **100.00** | **100.00** |" in table and "| flip | **100.00** |" in table


def test_an_nrrd_prediction_in_lps_matches_a_nifti_label_on_the_same_voxels(tmp_path):
    from helpers import write_nrrd

    gt = boxes()
    # NRRD's LPS axes with identity directions are RAS's diag(−1, −1, 1): the same voxels as this NIfTI's grid.
    ras = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    ds = datalist(tmp_path, {"n": (gt, ras)})
    (tmp_path / "pred").mkdir()
    write_nrrd(tmp_path / "pred" / "n.nrrd", gt, SPACING)
    result = evaluate_predictions(tmp_path / "pred", ds, tmp_path / "m.json")
    assert per_class(result)["n"] == {"spleen": 1.0, "liver": 1.0, "kidney": 1.0}
    assert result["cases"][0]["resampled"] is False and result["cases"][0]["prediction"].endswith("n.nrrd")


def test_a_coarser_prediction_is_resampled_and_scored_on_the_label_grid(tmp_path):
    gt = boxes()
    ds = datalist(tmp_path, {"c": (gt, grid())})
    # Every 2nd voxel at twice the spacing, its voxels covering the same field of view (origin half a fine voxel on).
    coarse = gt[::2, ::2, ::2]
    coarse_origin = np.asarray(ORIGIN) + np.asarray(SPACING) / 2
    save(tmp_path / "pred" / "c.nii.gz", coarse, grid(tuple(2 * s for s in SPACING), coarse_origin))
    result = evaluate_predictions(tmp_path / "pred", ds, tmp_path / "m.json")
    # By hand: fine voxel i lies in coarse voxel i // 2, so the prediction on the label's grid repeats each voxel.
    up = coarse.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    by_hand = {name: 2 * ((up == k) & (gt == k)).sum() / ((up == k).sum() + (gt == k).sum())
               for k, name in ((1, "spleen"), (2, "liver"), (3, "kidney"))}
    # Spleen, x 3…10 → 4…11 in the coarse copy (y and z start even): 7 of 8 slices overlap.
    assert by_hand["spleen"] == 7 / 8
    assert per_class(result)["c"] == pytest.approx(by_hand, abs=1e-6)
    assert result["cases"][0]["resampled"] and result["cases"][0]["spacing_mm"] == list(SPACING)


def test_a_prediction_on_another_field_of_view_is_refused_in_one_line(tmp_path):
    gt = boxes()
    ds = datalist(tmp_path, {"s": (gt, grid())})
    shifted = save(tmp_path / "pred" / "s.nii.gz", gt, grid(origin=(ORIGIN[0] + 12.0, *ORIGIN[1:])))
    proc = cli("--predictions", tmp_path / "pred", "--data", ds, "--out", tmp_path / "m.json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert str(shifted) in line and str(tmp_path / "labelsTr" / "s.nii.gz") in line
    assert "origin differs by (12, 0, 0) mm" in line and "11.2 mm outside" in line  # 12 mm less half a voxel
    assert not (tmp_path / "m.json").exists()
    # A 2× coarser grid starting one fine voxel early: the label's last voxel centres lie half a coarse voxel past
    # its edge along every axis, (1.5, 1.5, 2) mm, √8.5 ≈ 2.9 mm away.
    early = np.asarray(ORIGIN) - np.asarray(SPACING)
    save(tmp_path / "short" / "s.nii.gz", gt[::2, ::2, ::2], grid(tuple(2 * s for s in SPACING), early))
    with pytest.raises(DataError, match=r"spacing \(3, 3, 4\) vs \(1.5, 1.5, 2\) mm, origin differs by "
                                        r"\(-1.5, -1.5, -2\) mm, shape \(12, 12, 12\) vs \(24, 24, 24\); label "
                                        r"voxels lie up to 2.9 mm outside"):
        evaluate_predictions(tmp_path / "short", ds, tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_missing_doubled_and_foreign_predictions_are_refused_in_one_line(tmp_path):
    gt = boxes()
    ds = datalist(tmp_path, {"m": (gt, grid())})
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"none: holds no prediction for case 'm'"):
        evaluate_predictions(tmp_path / "none", ds, tmp_path / "m.json")
    save(tmp_path / "two" / "m.nii.gz", gt, grid())
    save(tmp_path / "two" / "m_seg.nrrd.nii", gt, grid())  # not m's: its stem is m_seg.nrrd
    save(tmp_path / "two" / "m_seg.nii", gt, grid())
    with pytest.raises(DataError, match=r"two: holds 2 predictions for case 'm' \(m.nii.gz, m_seg.nii\)"):
        evaluate_predictions(tmp_path / "two", ds, tmp_path / "m.json")
    # TotalSegmentator's ids against a ground truth whose dataset.json names classes 0…3.
    save(tmp_path / "ts" / "m.nii.gz", np.where(gt == 2, 5, gt).astype(np.uint8), grid())
    with pytest.raises(DataError, match=r"label ids \[5\] are not among the dataset's classes 0…3.*"
                                        r"--prediction-label-map"):
        evaluate_predictions(tmp_path / "ts", ds, tmp_path / "m.json")
    result = evaluate_predictions(tmp_path / "ts", ds, tmp_path / "m.json", prediction_label_map={1: 1, 5: 2, 3: 3})
    assert per_class(result)["m"] == {"spleen": 1.0, "liver": 1.0, "kidney": 1.0}
    for args, expected in (((), "give --checkpoint (a finetuned network) or --predictions"),
                           (("--checkpoint", "x.ckpt", "--predictions", tmp_path / "ts"), "exclude each other"),
                           (("--predictions", tmp_path / "two"), "holds 2 predictions for case 'm'")):
        proc = cli("--data", ds, "--out", tmp_path / "cli.json", *args)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("error: ") and expected in proc.stderr


def test_classes_come_from_the_files_without_dataset_labels_and_through_the_label_map(tmp_path):
    gt = boxes()
    ds = datalist(tmp_path, {"n": (gt, grid())}, names=None)
    pred = gt.copy()
    pred[pred == 3] = 4  # a class the ground truth does not have: scored, its Dice null
    save(tmp_path / "pred" / "n.nii.gz", pred, grid())
    result = evaluate_predictions(tmp_path / "pred", ds, tmp_path / "m.json", hd95=True)
    assert result["classes"] == ["class_1", "class_2", "class_3", "class_4"]
    assert per_class(result)["n"] == {"class_1": 1.0, "class_2": 1.0, "class_3": 0.0, "class_4": None}
    diagonal = float(np.sqrt(sum((24 * s) ** 2 for s in SPACING)))
    assert per_class(result, "hd95")["n"]["class_4"] == pytest.approx(diagonal, abs=1e-5)  # predicted, not present
    # --label-map: the ground truth's ids (and with dataset.json names, the classes' names) follow it.
    ds = datalist(tmp_path / "named", {"n": (gt, grid())})
    save(tmp_path / "named" / "pred" / "n.nii.gz", (gt == 2).astype(np.uint8), grid())
    result = evaluate_predictions(tmp_path / "named" / "pred", ds, tmp_path / "m.json", label_map={2: 1})
    assert result["classes"] == ["liver"] and per_class(result)["n"] == {"liver": 1.0}


# ----------------------------------------------------------------------------------------- --checkpoint


@pytest.fixture(scope="module")
def checkpoint(phantom_dir, tmp_path_factory):
    """A finetuned checkpoint (2 steps, 14 BTCV classes, trained at 3 mm); the tests replace its network."""
    from subfore.config import load_config
    from subfore.finetune import FinetuneConfig, finetune
    from test_finetune import ft_config

    return finetune(load_config(None, [], FinetuneConfig, base=ft_config(phantom_dir, tmp_path_factory.mktemp("ft"))))


def coded(labels: np.ndarray) -> np.ndarray:
    """An image whose HU encode the label ids (50·k − 150: inside the CT window, so the normalisation keeps them)."""
    return (50 * labels.astype(np.int16) - 150).astype(np.int16)


@pytest.fixture
def reading_network(checkpoint, monkeypatch):
    """The checkpoint's network replaced by a reading of :func:`coded` images on the training grid, its labels moved
    ``voxels`` along the array's first axis: a prediction fixed in physical space, made by the checkpoint's own
    preprocessing and inverted by its own Invertd, whatever grid the label file is stored on."""
    import subfore.evaluate as ev
    from subfore.inference import load_finetuned

    preset = load_finetuned(checkpoint)[0].data.preset_obj()
    shift = {"voxels": 0}

    def predict_volume(net, image, *args, **kwargs):
        hu = (image - preset.b_min) / (preset.b_max - preset.b_min) * (preset.a_max - preset.a_min) + preset.a_min
        labels = ((hu + 150) / 50).round().long().clamp(0, 13)
        return torch.roll(labels, shift["voxels"], dims=2)

    monkeypatch.setattr(ev, "predict_volume", predict_volume)
    return shift


def test_checkpoint_scores_a_flipped_label_file_as_the_unflipped_one(checkpoint, reading_network, tmp_path):
    gt, affine = boxes(), grid(spacing=(3.0, 3.0, 3.0))  # the training spacing: the preprocessing moves no voxel
    # One image; its label stored as is, flipped along x, flipped along z, and transposed.
    cases = {"plain": (gt, affine), "flip_x": flipped(gt, affine, 0), "flip_z": flipped(gt, affine, 2),
             "perm": transposed(gt, affine)}
    entries = []
    for case, (array, aff) in cases.items():
        save(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", coded(gt), affine)
        save(tmp_path / "labelsTr" / f"{case}.nii.gz", array, aff)
        entries.append({"image": f"imagesTr/{case}_0000.nii.gz", "label": f"labelsTr/{case}.nii.gz"})
    (tmp_path / "ds.json").write_text(json.dumps({"validation": entries}))
    reading_network["voxels"] = 1  # one voxel (3 mm) along x: Dice (L − 1) / L for a box L voxels long in x
    result = evaluate(checkpoint, tmp_path / "ds.json", tmp_path / "m.json")
    dice, nsd = per_class(result), per_class(result, "nsd")
    expected = {"spleen": 7 / 8, "right_kidney": 7 / 8, "left_kidney": 3 / 4}
    assert {k: dice["plain"][k] for k in expected} == pytest.approx(expected, abs=1e-6)
    for case in ("flip_x", "flip_z", "perm"):
        assert dice[case] == dice["plain"] and nsd[case] == nsd["plain"], case
    assert [c["resampled"] for c in result["cases"]] == [False, True, True, True]


def test_predict_then_predictions_scores_as_the_checkpoint_does(checkpoint, phantom_dir, tmp_path):
    from subfore.evaluate import predict

    [val] = json.loads((phantom_dir / "dataset.json").read_text())["validation"]
    predict(checkpoint, [phantom_dir / val["image"]], tmp_path / "pred")  # CASE_seg.nii.gz on the image's grid
    direct = evaluate(checkpoint, phantom_dir / "dataset.json", tmp_path / "ck.json", hd95=True)
    files = evaluate_predictions(tmp_path / "pred", phantom_dir / "dataset.json", tmp_path / "files.json", hd95=True)
    assert files["classes"] == direct["classes"] and files["method"] == "pred"
    for metric in ("dice", "nsd", "hd95"):
        assert per_class(files, metric) == per_class(direct, metric), metric
    assert files["mean"] == direct["mean"]


def test_checkpoint_refuses_a_label_beyond_its_image(checkpoint, reading_network, tmp_path):
    gt, affine = boxes(), grid(spacing=(3.0, 3.0, 3.0))
    save(tmp_path / "img.nii.gz", coded(gt), affine)
    moved = affine.copy()
    moved[0, 3] += 12.0  # 4 voxels along x
    save(tmp_path / "lab.nii.gz", gt, moved)
    (tmp_path / "ds.json").write_text(json.dumps({"validation": [{"image": "img.nii.gz", "label": "lab.nii.gz"}]}))
    # The last label column lies 4 voxels past the image's, 3.5 past its edge: 10.5 mm.
    with pytest.raises(DataError, match=r"img.nii.gz: does not cover the field of view of .*lab.nii.gz \(origin "
                                        r"differs by \(-12, 0, 0\) mm; label voxels lie up to 10.5 mm outside"):
        evaluate(checkpoint, tmp_path / "ds.json", tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


# -------------------------------------------------------------------------------------------- the real CT


@needs_real_ct
def test_real_ct_segmentation_scores_one_against_itself_flipped_both_ways(checkpoint, reading_network, tmp_path):
    seg = nib.load(REAL_SEG)
    array, affine = np.asarray(seg.dataobj), seg.affine
    mapping = {1: 1, 5: 2, 2: 3}  # TotalSegmentator spleen, liver, right kidney
    for case in ("ct", "ct_flip"):
        (tmp_path / "img").mkdir(exist_ok=True)
        shutil.copy(REAL_CT, tmp_path / "img" / f"{case}.nii.gz")  # a link would resolve to one case name
    save(tmp_path / "flipped_seg.nii.gz", *flipped(array, affine, 0))
    save(tmp_path / "pred" / "ct_seg.nii.gz", array, affine)
    save(tmp_path / "pred" / "ct_flip_seg.nii.gz", *flipped(array, affine, 1))
    (tmp_path / "ds.json").write_text(json.dumps({"validation": [
        {"image": "img/ct.nii.gz", "label": str(REAL_SEG)},
        {"image": "img/ct_flip.nii.gz", "label": "flipped_seg.nii.gz"}]}))
    proc = cli("--predictions", tmp_path / "pred", "--data", tmp_path / "ds.json", "--out", tmp_path / "m.json",
               "--label-map", json.dumps(mapping), "--prediction-label-map", json.dumps(mapping))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    ones = {"class_1": 1.0, "class_2": 1.0, "class_3": 1.0}
    assert per_class(result) == {"ct": ones, "ct_flip": ones} and per_class(result, "nsd") == per_class(result)
    assert [c["resampled"] for c in result["cases"]] == [False, True]
    # The case on this scan's grid (122×101×30, 3 mm): a checkpoint scored against the label file and the
    # same file flipped along x; here the network reads the labels off a coded image, so both score exactly 1
    # (before the fix the flipped file scored 0.0/0.23/0.0 here; 0.753/0.0/0.0 with the real network).
    coded_ct = tmp_path / "coded.nii.gz"
    lut = np.zeros(256, np.uint8)
    lut[list(mapping)] = list(mapping.values())
    save(coded_ct, coded(lut[array]), affine)
    (tmp_path / "ck.json").write_text(json.dumps({"validation": [
        {"image": str(coded_ct), "label": str(REAL_SEG)},
        {"image": str(coded_ct), "label": str(tmp_path / "flipped_seg.nii.gz")}]}))
    result = evaluate(checkpoint, tmp_path / "ck.json", tmp_path / "ck_metrics.json", label_map=mapping)
    btcv = {"spleen": 1.0, "right_kidney": 1.0, "left_kidney": 1.0}
    assert [{k: c["dice"][k] for k in btcv} for c in result["cases"]] == [btcv, btcv]
    assert [c["resampled"] for c in result["cases"]] == [False, True]


def test_predict_refuses_two_inputs_of_one_case_name_before_any_inference(checkpoint, phantom_dir, tmp_path):
    import shutil

    image = phantom_dir / "imagesTr" / "phantom_000.nii.gz"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(image, tmp_path / folder / "ct.nii.gz")
    out = tmp_path / "pred"
    proc = subprocess.run([str(Path(sys.executable).parent / "subfore"), "predict", "--checkpoint", str(checkpoint),
                           str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)], capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert f"{tmp_path / 'b' / 'ct.nii.gz'}: has the case name 'ct' of {tmp_path / 'a' / 'ct.nii.gz'} too" in lines[0]
    assert not out.exists()  # refused before anything was written
    (tmp_path / "file").write_text("")
    proc = subprocess.run([str(Path(sys.executable).parent / "subfore"), "predict", "--checkpoint", str(checkpoint),
                           str(tmp_path / "a"), "--out", str(tmp_path / "file")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: --out {tmp_path / 'file'}: exists and is not a folder"


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_nsd_and_hd95_of_a_shifted_plate_are_the_shift_in_mm_along_that_axis(axis):
    """A one-voxel plate across ``axis`` and the same plate k voxels further along it: every surface voxel lies
    exactly k·spacing[axis] mm from the other's, so HD95 is that distance and NSD is 1 within the tolerance, else 0.
    With 0.78×0.78×2.5 mm, a spacing read in the wrong axis order moves both."""
    from subfore.evaluate import case_metrics

    spacing, k = (0.78, 0.78, 2.5), 2
    shape = [48, 44, 20]
    label = torch.zeros(1, 1, *shape, dtype=torch.uint8)
    pred = torch.zeros_like(label)
    index = [slice(6, s - 6) for s in shape]
    index[axis] = 5
    label[(0, 0, *index)] = 1
    index[axis] = 5 + k
    pred[(0, 0, *index)] = 1
    distance = k * spacing[axis]  # 1.56 mm across x or y, 5.0 mm across z
    for tolerance in (distance - 0.01, distance + 0.01):
        m = case_metrics(pred, label, 2, spacing, tolerance_mm=tolerance, hd95=True)
        assert m["hd95"][0] == pytest.approx(distance, abs=1e-5)
        assert m["nsd"][0] == (1.0 if tolerance >= distance else 0.0)
        assert m["dice"][0] == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_and_nsd_of_a_shifted_sphere_on_anisotropic_spacing(axis):
    """A 25 mm sphere at 0.78×0.78×2.5 mm and the same voxels moved k voxels along ``axis``: no surface point is
    farther than d = k·spacing[axis] from the other surface (the poles along the shift are exactly d apart, and the
    flat voxel caps facing the shift hold more than 5 % of the surface), so HD95 = d and NSD is 1 at tolerance d and
    below 1 just under it. Read with the spacing in the reverse axis order, the z shift measures far less."""
    from subfore.evaluate import case_metrics

    spacing, k, shape = (0.78, 0.78, 2.5), 2, (96, 96, 40)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    ball = sum(((g - n / 2) * s) ** 2 for g, n, s in zip(grid, shape, spacing)) <= 25.0 ** 2
    label = torch.from_numpy(ball.astype(np.uint8))[None, None]
    pred = torch.from_numpy(np.roll(ball, k, axis=axis).astype(np.uint8))[None, None]
    d = k * spacing[axis]  # 1.56 mm along x or y, 5.0 mm along z
    at = case_metrics(pred, label, 2, spacing, tolerance_mm=d, hd95=True)
    under = case_metrics(pred, label, 2, spacing, tolerance_mm=0.99 * d, hd95=True)
    assert at["hd95"][0] == pytest.approx(d, abs=1e-5) and at["nsd"][0] == 1.0
    assert under["nsd"][0] < 1.0
    if axis == 2:  # read as (2.5, 0.78, 0.78), the z shift would measure as an in-plane one
        moved = case_metrics(pred, label, 2, spacing[::-1], tolerance_mm=d, hd95=True)
        assert moved["hd95"][0] < d - 1.0


# --- labels back onto the input's grid -----------------------------------------------------------------------
_RAS = np.array([[0.78, 0, 0, -200], [0, 0.78, 0, -180], [0, 0, 2.5, -300], [0, 0, 0, 1.0]])
_LPS = np.array([[-0.8, 0, 0, 150], [0, -0.8, 0, 120], [0, 0, 3.0, -90], [0, 0, 0, 1.0]])
_PERMUTED = np.array([[0, 0, 2.0, 10], [0.9, 0, 0, -50], [0, -1.1, 0, 30], [0, 0, 0, 1.0]])
_C, _S = np.cos(0.2), np.sin(0.2)
_OBLIQUE = np.array([[_C, -_S, 0, 0], [_S, _C, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1.0]])


def _preprocessed(tmp_path, affine, shape, preset):
    from monai.transforms import Compose

    from subfore.data.dataset import load_item
    from subfore.data.transforms import preprocess

    path = save(tmp_path / "img.nii.gz", np.random.default_rng(0).normal(0, 100, shape).astype(np.float32), affine)
    pre = Compose(preprocess(preset, ["image"]))
    return pre, load_item(pre, {"image": str(path)})


@pytest.mark.parametrize("geometry", ["ras", "lps", "permuted", "oblique"])
@pytest.mark.parametrize("spacing, orientation, axes", [((1.5, 1.5, 1.5), "RAS", None),
                                                        ((0.78, 0.78, 2.5), "RAS", (1, 2, 0)),
                                                        ((1.3, 0.9, 1.7), "LPS", (2, 0, 1))])
def test_labels_go_back_to_the_input_grid_as_invertd_puts_them(tmp_path, geometry, spacing, orientation, axes):
    """Random labels on the preprocessed grid land on the input's own grid voxel for voxel where MONAI's Invertd puts
    them (spacing, orientation and nnU-Net's axis order undone), without its float64 grid over every input voxel."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from subfore.data.presets import Preset
    from subfore.inference import restore_labels

    affine, shape = {"ras": (_RAS, (61, 53, 17)), "lps": (_LPS, (40, 47, 13)), "permuted": (_PERMUTED, (19, 37, 29)),
                     "oblique": (_OBLIQUE, (30, 30, 10))}[geometry]
    preset = Preset(modality="ct", spacing=spacing, orientation=orientation, axes=axes)
    pre, d = _preprocessed(tmp_path, affine, shape, preset)
    image = d["image"]
    # One label map, or three region channels (BraTS: TC, WT, ET) as a sigmoid network's evaluate hands them over.
    channels = 3 if geometry == "lps" else 1
    pred = torch.randint(0, 14 if channels == 1 else 2, (channels, *image.shape[1:]),
                         generator=torch.Generator().manual_seed(1))
    pred = MetaTensor(pred, meta=image.meta)  # as sliding_window_inference returns it
    d["pred"] = MetaTensor(pred.float(), meta=image.meta, applied_operations=image.applied_operations)
    reference = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(d)["pred"]
    with warnings.catch_warnings():  # MONAI warns where a MetaTensor's own affine would be overwritten
        warnings.simplefilter("error")
        restored = restore_labels(pred, image, preset.axes)
    assert restored is not None and restored.dtype == torch.uint8
    assert tuple(restored.shape) == (channels, *shape)
    np.testing.assert_allclose(np.asarray(restored.affine), affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(reference).round().astype(np.uint8))


def test_labels_go_back_to_the_nearest_voxel_along_an_axis_by_hand(tmp_path):
    """3 mm input slices resampled to 2 mm: input slice k lies at preprocessed position 1.5 k; it takes the nearest
    slice (a tie, k odd, goes to the even one) and the last input slice, past the resampled edge, takes the edge."""
    from subfore.data.presets import Preset
    from subfore.inference import restore_labels

    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    _, d = _preprocessed(tmp_path, affine, (4, 4, 14), Preset(modality="ct", spacing=(1.0, 1.0, 2.0)))
    image = d["image"]
    n = image.shape[-1]
    assert n == 20  # 39 mm of slice centres at 2 mm: the last input slice (at 19.5) lies past the last one (19)
    pred = torch.arange(n).view(1, 1, 1, n).expand(1, 4, 4, n) + 1
    restored = np.asarray(restore_labels(pred, image)[0])
    expected = [p + 1 for p in (0, 2, 3, 4, 6, 8, 9, 10, 12, 14, 15, 16, 18, 19)]
    assert restored[2, 1].tolist() == expected


def test_labels_on_a_grid_rotated_against_the_input_are_left_to_invertd(tmp_path):
    """A preprocessed grid that is not axis-aligned with the input's has no one-index-per-axis map: None."""
    from subfore.data.presets import Preset
    from subfore.inference import restore_labels

    _, d = _preprocessed(tmp_path, np.diag([1.0, 1.0, 2.0, 1.0]), (8, 8, 6), Preset(modality="ct", spacing=(1, 1, 2)))
    image = d["image"]
    assert restore_labels(torch.zeros((1, *image.shape[1:]), dtype=torch.long), image) is not None
    image.affine = torch.as_tensor(_OBLIQUE)
    assert restore_labels(torch.zeros((1, *image.shape[1:]), dtype=torch.long), image) is None
