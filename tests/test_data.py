"""Datalists from each layout, readers for each format, caching, phantoms and the input checks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from helpers import write_dicom_series, write_nifti, write_nrrd
from subfore.data import load_datalist, make_dataset, make_preset, preprocess, pretrain_transforms
from subfore.errors import DataError
from subfore.phantoms import LABELS


def hu_volume(shape=(40, 32, 24), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-300, 300, size=shape).astype(np.int16)


def test_decathlon_json_resolves_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_nifti(tmp_path / "imgs" / "a.nii.gz", hu_volume())
    write_nifti(tmp_path / "imgs" / "a_seg.nii.gz", np.zeros((40, 32, 24), np.uint8))
    (tmp_path / "dataset.json").write_text(json.dumps({
        "training": [{"image": "imgs/a.nii.gz", "label": "imgs/a_seg.nii.gz"}],
        "validation": [{"image": "imgs/a.nii.gz"}],
        "test": ["imgs/a.nii.gz"],
    }))
    tr = load_datalist(tmp_path / "dataset.json")
    assert tr == [{"image": str(tmp_path / "imgs/a.nii.gz"), "label": str(tmp_path / "imgs/a_seg.nii.gz")}]
    assert load_datalist(tmp_path, "validation") == [{"image": str(tmp_path / "imgs/a.nii.gz")}]
    assert load_datalist(tmp_path / "dataset.json", "test")[0]["image"].endswith("a.nii.gz")


def test_decathlon_missing_file_and_missing_split_are_named(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    with pytest.raises(DataError, match="nope.nii.gz.*does not exist"):
        load_datalist(tmp_path / "dataset.json")
    with pytest.raises(DataError, match="no 'validation' list"):
        load_datalist(tmp_path / "dataset.json", "validation")


def test_nnunet_raw_folder(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("case_001", "case_002"):
        write_nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", hu_volume())
        write_nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", np.zeros((40, 32, 24), np.uint8))
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",
                                                       "labels": {"background": 0, "organ": 1}, "numTraining": 2}))
    items = load_datalist(tmp_path)
    assert [Path(i["image"]).name for i in items] == ["case_001_0000.nii.gz", "case_002_0000.nii.gz"]
    assert [Path(i["label"]).name for i in items] == ["case_001.nii.gz", "case_002.nii.gz"]


def test_plain_folder_glob_nrrd_and_dicom(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", hu_volume())
    write_nrrd(tmp_path / "b.nrrd", hu_volume(seed=1))
    write_dicom_series(tmp_path / "c_series", hu_volume(seed=2))
    (tmp_path / "notes.txt").write_text("not an image")
    items = load_datalist(tmp_path)
    assert [Path(i["image"]).name for i in items] == ["a.nii.gz", "b.nrrd", "c_series"]
    assert len(load_datalist(str(tmp_path / "*.nrrd"))) == 1
    # Each reader produces a RAS, 1.5 mm, 0…1 volume.
    load = Compose(preprocess(make_preset("ct")))
    for item in items:
        img = load(item)["image"]
        assert img.ndim == 4 and img.shape[0] == 1
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    dicom = load(items[2])["image"]
    assert dicom.shape[-1] == round(24 * 2.0 / 1.5)  # 24 slices at 2 mm resampled to 1.5 mm


def test_ct_preset_window_and_mri_percentiles(tmp_path):
    vol = np.full((32, 32, 32), -1000, np.int16)
    vol[8:24, 8:24, 8:24] = 250
    vol[12:20, 12:20, 12:20] = 40
    write_nifti(tmp_path / "ct.nii.gz", vol)
    img = Compose(preprocess(make_preset("ct")))({"image": str(tmp_path / "ct.nii.gz")})["image"]
    vals = np.unique(np.asarray(img, dtype=np.float64))
    # -1000 HU → 0 (clipped), 250 HU → 1, 40 HU → 215/425 (interpolation at edges adds values between).
    for expected in (0.0, 1.0, 215 / 425):
        assert np.isclose(vals, expected, atol=1e-5).any()
    mri = np.random.default_rng(0).gamma(2.0, 100.0, size=(32, 32, 32)).astype(np.float32)
    write_nifti(tmp_path / "mr.nii.gz", mri)
    img = Compose(preprocess(make_preset("mri")))({"image": str(tmp_path / "mr.nii.gz")})["image"]
    assert float(img.min()) == 0.0 and float(img.max()) == 1.0
    assert 0.001 < float((torch.as_tensor(img) == 1.0).float().mean()) < 0.02  # top 0.5 % clipped


def test_crops_smaller_than_roi_are_padded(tmp_path):
    write_nifti(tmp_path / "small.nii.gz", hu_volume((20, 20, 20)))
    t = pretrain_transforms(make_preset("ct"), (32, 32, 32), samples=2)
    crops = t({"image": str(tmp_path / "small.nii.gz")})
    assert len(crops) == 2 and all(c["image"].shape == (1, 32, 32, 32) for c in crops)


def test_cache_second_epoch_does_not_decode_and_key_follows_preset(tmp_path, monkeypatch):
    write_nifti(tmp_path / "a.nii.gz", hu_volume())
    items = [{"image": str(tmp_path / "a.nii.gz")}]
    cache = tmp_path / "cache"
    preset = make_preset("ct")
    roi = (16, 16, 16)
    ds = make_dataset(items, pretrain_transforms(preset, roi), cache, cache_key=(preset, roi))
    ds[0]
    files = list(cache.rglob("*.pt"))
    assert len(files) == 1
    import monai.transforms.io.dictionary as io_dict

    def boom(*a, **k):
        raise AssertionError("decoded the file again")

    monkeypatch.setattr(io_dict.LoadImaged, "__call__", boom)
    ds2 = make_dataset(items, pretrain_transforms(preset, roi), cache, cache_key=(preset, roi))
    assert ds2[0][0]["image"].shape == (1, 16, 16, 16)  # served from the cache
    monkeypatch.undo()
    other = make_preset("ct", spacing=(2.0, 2.0, 2.0))
    make_dataset(items, pretrain_transforms(other, roi), cache, cache_key=(other, roi))[0]
    assert len(list(cache.rglob("*.pt"))) == 2  # a new key for a new preset


@pytest.mark.parametrize(
    "case,match",
    [
        ("2d", "expected a 3D volume"),
        ("4d", "4D image with 3 channels"),
        ("nan", "NaN"),
        ("truncated", "img.nii.gz: cannot be read as an image \\(EOFError"),
        ("label_shape", "label shape"),
    ],
)
def test_bad_volumes_raise_named_data_errors(tmp_path, case, match):
    img = tmp_path / "img.nii.gz"
    item = {"image": str(img)}
    keys = ["image"]
    if case == "2d":
        write_nifti(img, np.zeros((20, 20), np.int16))
    elif case == "4d":
        write_nifti(img, np.zeros((20, 20, 20, 3), np.int16))
    elif case == "nan":
        a = np.zeros((20, 20, 20), np.float32)
        a[3, 3, 3] = np.nan
        write_nifti(img, a)
    elif case == "truncated":
        write_nifti(tmp_path / "full.nii.gz", hu_volume())
        data = (tmp_path / "full.nii.gz").read_bytes()
        img.write_bytes(data[: len(data) // 3])
    elif case == "label_shape":
        write_nifti(img, hu_volume((20, 20, 20)))
        write_nifti(tmp_path / "lab.nii.gz", np.zeros((20, 20, 18), np.uint8))
        item["label"] = str(tmp_path / "lab.nii.gz")
        keys = ["image", "label"]
    ds = make_dataset([item], Compose(preprocess(make_preset("ct"), keys)))
    with pytest.raises(DataError, match=match) as err:
        ds[0]
    assert ("lab.nii.gz" if case == "label_shape" else "img.nii.gz") in str(err.value)


def test_skip_bad_replaces_an_unreadable_item(tmp_path):
    write_nifti(tmp_path / "good.nii.gz", hu_volume())
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    items = [{"image": str(tmp_path / "bad.nii.gz")}, {"image": str(tmp_path / "good.nii.gz")}]
    ds = make_dataset(items, Compose(preprocess(make_preset("ct"))), skip_bad=True)
    assert ds[0]["image"].meta["filename_or_obj"].endswith("good.nii.gz")
    assert ds.bad == {0}


def test_phantoms_are_readable_with_btcv_labels(phantom_dir):
    meta = json.loads((phantom_dir / "dataset.json").read_text())
    assert len(meta["training"]) == 3 and len(meta["validation"]) == 1
    img = nib.load(phantom_dir / "imagesTr" / "phantom_000.nii.gz")
    lab = nib.load(phantom_dir / "labelsTr" / "phantom_000.nii.gz")
    hu, seg = np.asarray(img.dataobj), np.asarray(lab.dataobj)
    assert hu.shape == seg.shape and np.allclose(img.affine, lab.affine)
    assert np.allclose(img.header.get_zooms(), (2.0, 2.0, 3.0))
    assert set(np.unique(seg).tolist()) == {0, *LABELS.values()}
    assert hu.min() <= -1000 + 50  # air outside the body
    means = {name: hu[seg == i].mean() for name, i in LABELS.items()}
    assert 80 < means["liver"] < 140 and 140 < means["aorta"] < 240 and -10 < means["gallbladder"] < 40
    assert hu.max() > 500  # bone


def test_phantoms_vary_with_seed():
    from subfore.phantoms import PhantomSpec, make_phantom

    spec = PhantomSpec(spacing=(4.0, 4.0, 4.0))
    a, la, _ = make_phantom(0, spec)
    b, lb, _ = make_phantom(1, spec)
    a2, la2, _ = make_phantom(0, spec)
    assert np.array_equal(a, a2) and np.array_equal(la, la2)
    assert (la != lb).mean() > 0.01
