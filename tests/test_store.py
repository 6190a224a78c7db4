"""The chunked crop store: equal to in-memory preprocessing, sharded, resumable after kill -9, named failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.transforms import CenterSpatialCrop, Compose, SpatialPad

from subfore.data.presets import ChannelNorm, Preset
from subfore.data.store import (
    StoreCrops,
    StoreSpec,
    build_volume,
    crop_starts,
    padded_origin,
    preprocess_store,
    records_for,
    volume_id,
)
from subfore.data.transforms import preprocess
from subfore.masking import foreground_grid

from conftest import REAL_CT, needs_real_ct


def _run(*args, **kw):
    return subprocess.run(["subfore", *map(str, args)], capture_output=True, text=True, **kw)


def _config(tmp: Path, train, **data) -> Path:
    cfg = {"run_dir": str(tmp / "run"),
           "data": {"train": str(train), "roi": [32, 32, 32], "spacing": [4.0, 4.0, 4.0],
                    "cache_dir": str(tmp / "cache"), "num_workers": 0, **data},
           "model": {"name": "basicunet", "feature_size": 8},
           "train": {"max_steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "progress_bar": False}}
    (tmp / "pre.yaml").write_text(yaml.safe_dump(cfg))
    return tmp / "pre.yaml"


def _manifest(cache: Path) -> dict:
    (found,) = cache.glob("store-*/manifest.json")
    return json.loads(found.read_text())


def _builds(cache: Path) -> list[dict]:
    (found,) = cache.glob("store-*/builds.log")
    return [json.loads(x) for x in found.read_text().splitlines()]


def _in_memory(preset: Preset, item: dict) -> torch.Tensor:
    return torch.as_tensor(Compose(preprocess(preset, ["image"]))({"image": item["image"]})["image"]).float()


ZSCORE = Preset(modality="nnunet", spacing=(4.0, 4.0, 4.0), norms=(ChannelNorm(scheme="ZScoreNormalization"),))


@pytest.mark.parametrize("preset,dtype", [(Preset(spacing=(4.0, 4.0, 4.0)), "float16"),
                                          (Preset(spacing=(4.0, 4.0, 4.0)), "float32"),
                                          (ZSCORE, "float16")], ids=["ct-fp16", "ct-fp32", "zscore-fp16"])
def test_stored_crops_equal_in_memory_crops(phantom_dir, tmp_path, preset, dtype):
    items = [{"image": str(p)} for p in sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))]
    spec = StoreSpec.under(tmp_path, preset, dtype, threshold=0.1)
    threads = torch.get_num_threads()
    assert preprocess_store(spec, items, progress=False)["built"] == len(items)
    assert torch.get_num_threads() == threads  # an in-process build leaves the caller's (the trainer's) threads
    crops = StoreCrops(spec, records_for(spec, items, skip_bad=False), (32, 32, 32), samples=6)
    stored, memory = [], []
    for i, item in enumerate(items):
        full = _in_memory(preset, item)
        padded = SpatialPad((32, 32, 32))(full)  # what pretrain_transforms crops from
        assert list(full.shape) == crops.records[i]["shape"]
        origin = padded_origin(full.shape[1:], (32, 32, 32))
        for sample, start in zip(crops.draw(i, seed=i), crop_starts(full.shape[1:], (32, 32, 32), None, 6,
                                                                    torch.Generator().manual_seed(i))):
            a = [int(s) - o for s, o in zip(start, origin)]  # padded-volume coordinates
            ref = padded[:, a[0]:a[0] + 32, a[1]:a[1] + 32, a[2]:a[2] + 32]
            stored.append(sample["image"])
            memory.append(ref)
        # The validation crop is what center_transforms gives: MONAI's CenterSpatialCrop of the padded volume.
        stored.append(crops[i]["image"])
        memory.append(torch.as_tensor(CenterSpatialCrop((32, 32, 32))(padded)).float())
    s, m = torch.stack(stored), torch.stack(memory)
    assert s.dtype == torch.float32 and s.shape == m.shape == (7 * len(items), 1, 32, 32, 32)
    if dtype == "float32":
        assert torch.equal(s, m)
        return
    if preset.modality == "ct":
        assert (s - m).abs().max() <= 1e-3  # fp16 on the 0-1 scale
    else:
        big = m.abs() > 1e-2  # relative error where it is defined
        assert ((s - m).abs()[big] / m.abs()[big]).max() <= 1e-3
        assert (s - m).abs()[~big].max() <= 1e-5
    # Foreground masks agree except where a subvolume mean lies within the storage error of λ.
    lam, err = (0.1, 1e-3) if preset.modality == "ct" else (0.0, 1e-3)
    fs, fm = foreground_grid(s, 16, lam), foreground_grid(m, 16, lam)
    means = torch.nn.functional.avg_pool3d(m, 16).squeeze(1)
    near = (means - lam).abs() <= err * max(1.0, abs(lam))
    flipped, flipped_near = int((fs != fm).sum()), int(((fs != fm) & near).sum())
    # Every subvolume whose class differs lies within the storage error of λ (counted: flipped of near).
    assert flipped == flipped_near <= int(near.sum()), (flipped, flipped_near, int(near.sum()), fs.numel())


def test_body_crops_stay_inside_the_box_or_cover_it():
    g = torch.Generator().manual_seed(0)
    # Volume 100 × 50 × 20, ROI 32³: padded to 100 × 50 × 32 (origin z −6). Box x 10…70 (≥ ROI), y 20…40 and
    # z 5…15 (smaller than the ROI: the crop must cover them).
    s = crop_starts((100, 50, 20), (32, 32, 32), [[10, 70], [20, 40], [5, 15]], 2000, g)
    assert s[:, 0].min() == 10 and s[:, 0].max() == 70 - 32
    assert s[:, 1].min() == 40 - 32 and s[:, 1].max() == 50 - 32  # would be 20, but the volume ends at 50
    assert (s[:, 2] == -6).all()  # the padded volume is exactly one ROI deep
    anywhere = crop_starts((100, 50, 20), (32, 32, 32), None, 2000, g)
    assert anywhere[:, 0].min() == 0 and anywhere[:, 0].max() == 100 - 32 and anywhere[:, 1].max() == 50 - 32


def test_two_shards_in_either_order_give_one_complete_manifest(phantom_dir, tmp_path):
    sources = sorted(str(p) for p in (phantom_dir / "imagesTr").glob("*.nii.gz"))
    for order in (("1/2", "0/2"), ("0/2", "1/2")):
        tmp = tmp_path / order[0].replace("/", "of")
        tmp.mkdir()
        cfg = _config(tmp, phantom_dir / "dataset.json", val=str(phantom_dir / "dataset.json"))
        first = _run("preprocess", "--config", cfg, "--shard", order[0])
        assert first.returncode == 0, first.stderr
        assert len(_manifest(tmp / "cache")["volumes"]) in (1, 2)  # this shard's share so far
        second = _run("preprocess", "--config", cfg, "--shard", order[1])
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip().endswith("manifest.json") and "holds 4 of the 4 volumes listed (0 failed)" in second.stdout
        m = _manifest(tmp / "cache")
        assert sorted(v["source"] for v in m["volumes"]) == sources and m["failed"] == []  # training + validation
        assert sorted(b["source"] for b in _builds(tmp / "cache")) == sources  # each built exactly once
        v = m["volumes"][0]
        assert v["dtype"] == "float16" and v["spacing"] == [4.0, 4.0, 4.0] and len(v["body_bbox"]) == 3
        assert (tmp / "cache" / next((tmp / "cache").glob("store-*")).name / v["store"]).stat().st_size == v["bytes"]
        assert m["key"]["window"] == [-175.0, 250.0, 0.0, 1.0] and m["key"]["dtype"] == "float16"
    bad = _run("preprocess", "--config", cfg, "--shard", "2/2")
    assert bad.returncode == 1 and bad.stderr.startswith("error: --shard 2/2: K must be 0")


def test_kill9_mid_preprocess_then_rerun_gives_a_complete_readable_store(tmp_path):
    from subfore.phantoms import PhantomSpec, write_phantoms

    write_phantoms(tmp_path / "ph", n=6, seed=1, spec=PhantomSpec(spacing=(2.0, 2.0, 3.0)))
    # 2 mm: each array takes long enough to write that the kill lands inside a write.
    cfg = _config(tmp_path, tmp_path / "ph" / "dataset.json", spacing=[2.0, 2.0, 2.0])
    proc = subprocess.Popen(["subfore", "preprocess", "--config", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    # Killed once a volume has finished (its record exists) and a later one is being written: each array's write
    # took 0.09-0.16 s here (measured), polled every 2 ms, and 3 volumes (6 arrays) follow the first record.
    partial = None
    deadline = time.monotonic() + 300
    while partial is None and time.monotonic() < deadline and proc.poll() is None:
        if next((tmp_path / "cache").glob("store-*/records/*.json"), None) is not None:
            partial = next((tmp_path / "cache").glob("store-*/volumes/.*.partial"), None)
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial is not None, "the run ended before a write after the first finished volume was seen"
    store = partial.parents[1]
    assert partial.exists()  # cut off mid-write: no record names it
    killed = partial.name[1:].split(".label.b2nd")[0].split(".b2nd")[0]
    assert not (store / "records" / f"{killed}.json").exists()
    # Also a write cut off after its array but before its record (planted from a volume finished before the kill):
    # an array, no record.
    finished = sorted((store / "records").glob("*.json"))
    assert finished, "no volume finished before the kill"
    rec = json.loads(finished[0].read_text())
    finished[0].unlink()
    (store / rec["store"]).write_bytes((store / rec["store"]).read_bytes()[:100])
    planted = rec["source"]
    again = _run("preprocess", "--config", cfg)
    assert again.returncode == 0, again.stderr
    m = json.loads((store / "manifest.json").read_text())
    assert len(m["volumes"]) == 4 and m["failed"] == []  # the 4 training cases of 6 phantoms
    assert not list((store / "volumes").glob(".*partial"))
    import blosc2

    for v in m["volumes"]:
        for key in ("store", "label"):
            arr = blosc2.open(str(store / v[key]), mode="r")
            assert list(arr.shape[1:]) == v["shape"][1:] and np.isfinite(arr[:]).all()
    # Volumes finished before the kill were not built again; the interrupted and the planted ones were.
    counts: dict = {}
    for b in _builds(tmp_path / "cache"):
        counts[b["source"]] = counts.get(b["source"], 0) + 1
    assert len(counts) == 4 and counts.pop(planted) == 2 and set(counts.values()) == {1}
    assert json.loads((store / "records" / f"{killed}.json").read_text())["bytes"] > 0


def test_a_changed_source_is_rebuilt_and_an_unchanged_one_is_not(phantom_dir, tmp_path):
    shutil.copytree(phantom_dir, tmp_path / "ph")
    cfg = _config(tmp_path, tmp_path / "ph" / "dataset.json")
    assert _run("preprocess", "--config", cfg).returncode == 0
    first = sorted((tmp_path / "ph" / "imagesTr").glob("*.nii.gz"))[0]
    st = first.stat()
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    out = _run("preprocess", "--config", cfg)
    assert out.returncode == 0 and "built 1, already there 2" in out.stdout, out.stdout + out.stderr
    assert [b["source"] for b in _builds(tmp_path / "cache")].count(str(first)) == 2


def test_a_non_image_file_stops_the_run_or_is_listed_with_skip_bad(phantom_dir, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    cfg = _config(tmp_path, folder)
    stop = _run("preprocess", "--config", cfg)
    assert stop.returncode == 1
    lines = stop.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'broken.nii.gz'}: "), stop.stderr
    skip = _run("preprocess", "--config", cfg, "--skip-bad")
    assert skip.returncode == 0, skip.stderr
    m = _manifest(tmp_path / "cache")
    assert [f["source"] for f in m["failed"]] == [str(folder / "broken.nii.gz")]
    assert m["failed"][0]["error"].startswith(str(folder / "broken.nii.gz")) and "\n" not in m["failed"][0]["error"]
    assert len(m["volumes"]) == 2
    # Fixed: the failure is retried and cleared, without --skip-bad.
    shutil.copy(sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))[2], folder / "broken.nii.gz")
    fixed = _run("preprocess", "--config", cfg)
    assert fixed.returncode == 0 and "built 1, already there 2" in fixed.stdout, fixed.stdout + fixed.stderr
    m = _manifest(tmp_path / "cache")
    assert m["failed"] == [] and len(m["volumes"]) == 3
    # Deleted instead of fixed: its failure is forgotten at the next build.
    (folder / "gone.nii.gz").write_bytes(b"not a NIfTI either")
    assert _run("preprocess", "--config", cfg, "--skip-bad").returncode == 0
    assert [f["source"] for f in _manifest(tmp_path / "cache")["failed"]] == [str(folder / "gone.nii.gz")]
    (folder / "gone.nii.gz").unlink()
    assert _run("preprocess", "--config", cfg).returncode == 0
    assert _manifest(tmp_path / "cache")["failed"] == []


def test_a_full_disk_is_named_with_the_free_space_it_found(tmp_path, monkeypatch):
    import errno as errno_

    from subfore.data.store import build

    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setattr(build.shutil, "disk_usage", lambda p: type("U", (), {"free": 3_000_000})())
    # blosc2 hides the errno: a plain RuntimeError, with less free space than the volume needs, is a full disk.
    full = build.write_error(root, RuntimeError("Error while creating the NDArray"), 8_000_000)
    assert str(full) == (f"{root}: cannot write the store: no space left (3.0 MB free on its filesystem, a volume "
                         f"needs up to 8.0 MB; RuntimeError: Error while creating the NDArray)")
    quota = build.write_error(root, OSError(errno_.EDQUOT, "Disk quota exceeded"), 8_000_000)
    assert str(quota) == (f"{root}: cannot write the store: disk quota exceeded (Disk quota exceeded; 3.0 MB free "
                          f"on its filesystem)")
    other = build.write_error(root, PermissionError(errno_.EACCES, "Permission denied"), 1_000_000)
    assert str(other) == f"{root}: cannot write the store (PermissionError: Permission denied)"


@needs_real_ct
def test_body_box_of_a_real_ct_leaves_out_the_table():
    from scipy import ndimage

    from subfore.data.store import body_bbox, body_level

    preset = Preset()
    image = Compose(preprocess(preset))({"image": str(REAL_CT)})["image"].numpy()
    level = body_level(preset)
    assert level == 0.0  # −500 HU lies below the ct window's floor: denser than −175 HU
    box = body_bbox(image, level)
    dense = (image > level).any(0)
    groups, _ = ndimage.label(dense)
    sizes = np.bincount(groups.ravel())
    sizes[0] = 0
    # Behind the patient (RAS axis 1, low y) lies dense matter in groups of its own, none of them the body: the
    # table. A box of every voxel above the level reaches the volume's edge there; the body's box stops short.
    behind = np.unique(groups[:, : box[1][0], :])
    assert box[1][0] > 0 and dense[:, : box[1][0], :].any()
    assert sizes.argmax() not in behind and sizes[behind].sum() > 1000
    assert sizes.max() > 0.5 * dense.sum()  # the body is one group holding most of the dense voxels


def test_a_volume_another_builder_holds_is_left_busy_then_built_once(phantom_dir, tmp_path):
    import fcntl

    items = [{"image": str(p)} for p in sorted((phantom_dir / "imagesTr").glob("*.nii.gz"))]
    spec = StoreSpec.under(tmp_path / "cache", Preset(spacing=(4.0, 4.0, 4.0)))
    held = items[1]
    lock = spec.root / "locks" / f"{volume_id(held)}.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another builder is writing this volume right now
        assert preprocess_store(spec, items, progress=False) == {"built": 3, "skipped": 0, "failed": 0, "busy": 1}
        assert spec.record(held) is None and [spec.record(i) is not None for i in items] == [True, False, True, True]
        others = sorted(i["image"] for i in items if i is not held)
        assert sorted(b["source"] for b in _builds(tmp_path / "cache")) == others
        # A second builder meanwhile finds the other three done and this one still busy.
        assert preprocess_store(spec, items, progress=False) == {"built": 0, "skipped": 3, "failed": 0, "busy": 1}
        fcntl.flock(fh, fcntl.LOCK_UN)
    assert preprocess_store(spec, items, progress=False) == {"built": 1, "skipped": 3, "failed": 0, "busy": 0}
    sources = sorted(i["image"] for i in items)
    assert sorted(b["source"] for b in _builds(tmp_path / "cache")) == sources  # each exactly once
    assert sorted(v["source"] for v in _manifest(tmp_path / "cache")["volumes"]) == sources


def test_two_process_pretraining_on_an_empty_store_builds_each_volume_once(phantom_dir, tmp_path):
    cfg = yaml.safe_load(_config(tmp_path, phantom_dir / "dataset.json").read_text())
    cfg["train"].update(accelerator="cpu", devices=2, batch_size=1, val_every=2)
    cfg["data"].update(val=str(phantom_dir / "dataset.json"), num_workers=2)  # 2 builders per rank, then loaders
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run("pretrain", "--config", tmp_path / "ddp.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    builds = _builds(tmp_path / "cache")
    volumes = [v["source"] for v in _manifest(tmp_path / "cache")["volumes"]]
    assert len(volumes) == 4 and sorted(b["source"] for b in builds) == sorted(volumes)  # each exactly once
    assert sorted(b["rank"] for b in builds) == [0, 0, 1, 1]  # 3 training + 1 validation volume, 2 per rank
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [2] and (tmp_path / "run" / "encoder.pt").exists()


def test_volume_ids_differ_for_equal_names_in_different_folders(tmp_path):
    a, b = {"image": str(tmp_path / "a" / "case.nii.gz")}, {"image": str(tmp_path / "b" / "case.nii.gz")}
    assert volume_id(a) != volume_id(b) and volume_id(a).startswith("case-")


def test_build_refuses_labels_that_do_not_fit_uint8(tmp_path):
    from helpers import write_nifti

    img = write_nifti(tmp_path / "img.nii.gz", np.zeros((20, 20, 20), np.int16))
    lab = write_nifti(tmp_path / "lab.nii.gz", np.full((20, 20, 20), 300, np.int16))
    spec = StoreSpec.under(tmp_path / "cache", Preset(), "float16")
    from subfore.errors import DataError

    with pytest.raises(DataError, match="lab.nii.gz: label values 300…300 do not fit uint8"):
        build_volume(spec, {"image": str(img), "label": str(lab)})
