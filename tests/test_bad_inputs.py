"""Bad files and bad paths as a user meets them through the console script: exit 1, one line naming the file that is
bad and what is wrong with it, no traceback, nothing half-written; and the per-case progress lines of long commands.

The commands run as subprocesses of the installed ``subfore`` script, two at a time (the CPU has two cores).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from subfore.config import FinetuneConfig, load_config
from subfore.finetune import finetune
from subfore.pretrain import pretrain

SUBFORE = str(Path(sys.executable).with_name("subfore"))
NOISE = ("GPU available", "TPU available", "HPU available", "LOCAL_RANK", "`Trainer.fit` stopped")


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([SUBFORE, *map(str, args)], capture_output=True, text=True, timeout=600)


def together(*commands: tuple) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda c: run(*c), commands))


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (its progress lines aside), checked to be the only one."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(NOISE)
             and not ln.startswith(("evaluate ", "predict ", "predict:", "probe (", "fingerprint "))]
    assert len(lines) == 1, lines
    return lines[0]


def progress_lines(proc: subprocess.CompletedProcess, what: str) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith(what + " ")]


# --- the bad files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(phantom_dir, tmp_path_factory) -> Path:
    """Good phantom files plus one broken copy of each kind, and datalists that name them."""
    tmp = tmp_path_factory.mktemp("bad")
    good_image = phantom_dir / "imagesTr" / "phantom_000.nii.gz"
    good_label = phantom_dir / "labelsTr" / "phantom_000.nii.gz"
    ref = nib.load(good_label)
    labels = np.asarray(ref.dataobj)
    raw = good_label.read_bytes()
    (tmp / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp / "text.nii.gz").write_text("this is not an image\n")
    half = labels.astype(np.float32)
    half[labels == 6] = 0.5  # the liver at half a label id
    nib.save(nib.Nifti1Image(half, ref.affine), tmp / "half.nii.gz")
    nib.save(nib.Nifti1Image(labels[:, :, 5], ref.affine), tmp / "flat.nii.gz")
    # An all-background label on an image of air: MONAI's pos/neg crops have nowhere to draw from.
    nib.save(nib.Nifti1Image(np.full(labels.shape, -1000, np.int16), ref.affine), tmp / "air.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(labels.shape, np.uint8), ref.affine), tmp / "empty.nii.gz")
    names = json.loads((phantom_dir / "dataset.json").read_text())["labels"]

    def datalist(name: str, pairs: list[tuple[Path, Path]]) -> None:
        cases = [{"image": str(i), "label": str(lab)} for i, lab in pairs]
        (tmp / name).write_text(json.dumps({"labels": names, "training": cases, "validation": cases}))

    second = phantom_dir / "imagesTr" / "phantom_001.nii.gz"
    datalist("good.json", [(good_image, good_label)])
    for kind in ("truncated", "text", "half", "flat"):
        # A good case first: a check made only when the bad case's turn comes would run the good one's inference.
        datalist(f"{kind}.json", [(good_image, good_label), (second, tmp / f"{kind}.nii.gz")])
    datalist("air.json", [(tmp / "air.nii.gz", tmp / "empty.nii.gz")])
    for kind in ("truncated", "text", "half", "flat"):
        (tmp / f"pred_{kind}").mkdir()
        shutil.copy(tmp / f"{kind}.nii.gz", tmp / f"pred_{kind}" / "phantom_000.nii.gz")
    (tmp / "weights.pt").write_text("not weights at all\n")
    (tmp / "a_file").write_text("")
    return tmp


@pytest.fixture(scope="module")
def checkpoint(phantom_dir, files) -> Path:
    """A 2-step BasicUNet finetuning's best.ckpt (14 classes) and a 2-step pretraining's encoder.pt."""
    tree = {"run_dir": str(files / "ft"),
            "data": {"train": str(phantom_dir / "dataset.json"), "val": str(files / "good.json"),
                     "roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0], "samples_per_volume": 2, "num_workers": 0},
            "model": {"name": "basicunet", "feature_size": 4, "out_channels": 14},
            "train": {"max_steps": 2, "batch_size": 2, "val_every": 2, "ckpt_every": 2, "log_every": 1,
                      "progress_bar": False}}
    best = finetune(load_config(None, [], FinetuneConfig, base=tree))
    pre = {"run_dir": str(files / "pre"), "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32],
                                                   "spacing": [3.0, 3.0, 3.0], "num_workers": 0},
           "model": {"name": "basicunet", "feature_size": 4},
           "train": {"max_steps": 1, "batch_size": 2, "ckpt_every": 1, "log_every": 1, "progress_bar": False}}
    pretrain(load_config(None, [], base=pre))
    return best


def test_label_and_prediction_files_are_named_as_themselves(files, phantom_dir):
    """evaluate --predictions: the broken file is named, prediction or ground truth, with what is wrong with it."""
    labels = phantom_dir / "labelsTr"
    cases = [
        (("--predictions", files / "pred_truncated", "--data", files / "good.json"),
         f"{files / 'pred_truncated' / 'phantom_000.nii.gz'}: cannot be read as a label map (EOFError: "),
        (("--predictions", files / "pred_text", "--data", files / "good.json"),
         f"{files / 'pred_text' / 'phantom_000.nii.gz'}: cannot be read as a label map (ImageFileError: "),
        (("--predictions", files / "pred_half", "--data", files / "good.json"),
         f"{files / 'pred_half' / 'phantom_000.nii.gz'}: holds values (0.5) that are not label ids (integers ≥ 0)"),
        (("--predictions", files / "pred_flat", "--data", files / "good.json"),
         f"{files / 'pred_flat' / 'phantom_000.nii.gz'}: expected a 3D label map, got a 2D image of shape "),
        (("--predictions", labels, "--data", files / "truncated.json"),
         f"{files / 'truncated.nii.gz'}: cannot be read as a label map (EOFError: "),
        (("--predictions", labels, "--data", files / "text.json"),
         f"{files / 'text.nii.gz'}: cannot be read as a label map (ImageFileError: "),
    ]
    procs = together(*[("evaluate", *args, "--split", "validation", "--out", files / f"m{i}" / "m.json")
                       for i, (args, _) in enumerate(cases)])
    for i, (proc, (_, expected)) in enumerate(zip(procs, cases)):
        assert error_line(proc).startswith(f"error: {expected}"), (expected, proc.stderr[-800:])
        assert not (files / f"m{i}").exists()


def test_labels_are_checked_before_any_inference(files, checkpoint):
    """evaluate --checkpoint and probe read every label first: the good first case is never run."""
    encoder = files / "pre" / "encoder.pt"
    procs = together(
        ("evaluate", "--checkpoint", checkpoint, "--data", files / "truncated.json", "--out", files / "e1.json"),
        ("evaluate", "--checkpoint", checkpoint, "--data", files / "half.json", "--out", files / "e2.json"),
        ("evaluate", "--checkpoint", checkpoint, "--data", files / "flat.json", "--out", files / "e3.json"),
        ("probe", "--encoder", encoder, "--data", files / "half.json", "--steps", 2, "--out", files / "p.json"),
    )
    expected = [f"{files / 'truncated.nii.gz'}: cannot be read as a label map (EOFError: ",
                f"{files / 'half.nii.gz'}: holds values (0.5) that are not label ids",
                f"{files / 'flat.nii.gz'}: expected a 3D label map, got a 2D image",
                f"{files / 'half.nii.gz'}: holds values (0.5) that are not label ids"]
    for proc, text in zip(procs, expected):
        assert error_line(proc).startswith(f"error: {text}"), (text, proc.stderr[-800:])
        assert not progress_lines(proc, "evaluate") and not progress_lines(proc, "probe"), proc.stderr[-800:]
    assert not any((files / n).exists() for n in ("e1.json", "e2.json", "e3.json", "p.json"))


def test_training_labels_are_named(files, tmp_path):
    """finetune names a corrupt or non-integer label (not its image) and an all-background case it cannot crop."""
    config = tmp_path / "ft.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "data": {"train": "TRAIN", "roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0], "num_workers": 0, "samples_per_volume": 2,
                 "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "basicunet", "feature_size": 4, "out_channels": 14},
        "train": {"max_steps": 1, "batch_size": 2, "progress_bar": False}}))
    procs = together(*[("finetune", "--config", config, "--set", f"data.train={files / f'{kind}.json'}",
                        "--set", f"run_dir={tmp_path / kind}") for kind in ("truncated", "half", "air")])
    expected = [f"{files / 'truncated.nii.gz'}: cannot be read as a label map (EOFError: ",
                f"{files / 'half.nii.gz'}: holds values (0.5) that are not label ids (integers ≥ 0)",
                f"{files / 'empty.nii.gz'}: is all background and its image has no voxel above 0 after "
                f"normalisation, so no training crop can be drawn from this case"]
    for proc, text in zip(procs, expected):
        assert error_line(proc).startswith(f"error: {text}"), (text, proc.stderr[-800:])
    image = json.loads((files / "good.json").read_text())["training"][0]["image"]
    proc = run("analyze", image, "--labels", files / "truncated.nii.gz", "--out", tmp_path / "analysis")
    assert error_line(proc).startswith(f"error: {files / 'truncated.nii.gz'}: cannot be read as a label map")
    assert not (tmp_path / "analysis").exists()


def test_output_paths_and_options_are_checked_before_any_work(files, checkpoint, phantom_dir):
    """An --out that cannot be written, a --roi the network cannot take, and a text file given as weights."""
    image = phantom_dir / "imagesTr" / "phantom_000.nii.gz"
    under_file = files / "a_file" / "m.json"
    procs = together(
        ("evaluate", "--checkpoint", checkpoint, "--data", files / "good.json", "--out", under_file),
        ("evaluate", "--checkpoint", checkpoint, "--data", files / "good.json", "--out", files / "r.json",
         "--roi", "30,30,30"),
        ("probe", "--encoder", files / "pre" / "encoder.pt", "--data", files / "good.json", "--out", files),
        ("fingerprint", phantom_dir / "dataset.json", "--config", "configs/pretrain/demo_cpu.yaml",
         "--out", files / "a_file"),
        ("show-mask", image, "--out", files),
        ("predict", "--checkpoint", checkpoint, image, "--out", files / "a_file"),
        ("finetune", "--config", "configs/finetune/demo_cpu.yaml", "--pretrained", files / "weights.pt",
         "--set", f"run_dir={files / 'ft_weights'}"),
        ("evaluate", "--checkpoint", checkpoint, "--data", files / "good.json", "--out", files / "r.json",
         "--precision", "fp8"),
        ("evaluate", "--checkpoint", checkpoint, "--checkpoint", files / "pre" / "encoder.pt",
         "--data", files / "good.json", "--out", files / "r.json"),
    )
    expected = [f"--out {under_file}: {files / 'a_file'} is a file, not a folder, so nothing can be written under it",
                "--roi [30, 30, 30]: basicunet needs every side to be a multiple of 16",
                f"--out {files}: is a folder; name the file to write in it",
                f"--out {files / 'a_file'}: exists and is not a folder",
                f"--out {files}: is a folder; name the file to write in it",
                f"--out {files / 'a_file'}: exists and is not a folder",
                f"{files / 'weights.pt'}: not a weights file (neither a PyTorch zip archive nor a pickle",
                "--precision must be one of auto, 32, bf16, fp16, got 'fp8'",
                f"{files / 'pre' / 'encoder.pt'}: not a 'subfore finetune' checkpoint"]
    assert len(procs) == len(expected)
    for proc, text in zip(procs, expected):
        assert error_line(proc).startswith(f"error: {text}"), (text, proc.stderr[-800:])
        assert not progress_lines(proc, "evaluate") and not progress_lines(proc, "probe (pretrained) train")
    assert not (files / "r.json").exists() and not (files / "r.0.json").exists() and not (files / "ft_weights").exists()


def test_predict_writes_the_good_inputs_and_names_the_bad(files, checkpoint, phantom_dir, tmp_path):
    """A folder with one unreadable file: the others are segmented, the bad one named, exit 1; a run where every
    input fails leaves no --out behind. Each finished case prints one line with its time; --quiet prints none."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(phantom_dir / "imagesTr" / "phantom_000.nii.gz", inputs / "a.nii.gz")
    shutil.copy(files / "truncated.nii.gz", inputs / "b.nii.gz")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(files / "truncated.nii.gz", lone / "c.nii.gz")
    mixed, none, quiet = together(
        ("predict", "--checkpoint", checkpoint, inputs, "--out", tmp_path / "pred"),
        ("predict", "--checkpoint", checkpoint, lone, "--out", tmp_path / "nothing"),
        ("predict", "--checkpoint", checkpoint, inputs, "--out", tmp_path / "pred_quiet", "--quiet"))
    line = error_line(mixed)
    assert line.startswith(f"error: 1 of 2 inputs failed ({inputs / 'b.nii.gz'}: cannot be read as an image (EOFError")
    assert line.endswith(f"the other 1 label file(s) are in {tmp_path / 'pred'}")
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["a_overlay.png", "a_seg.nii.gz"]
    written = nib.load(tmp_path / "pred" / "a_seg.nii.gz")
    np.testing.assert_allclose(written.affine, nib.load(inputs / "a.nii.gz").affine, atol=1e-5)
    first, second = progress_lines(mixed, "predict")
    assert re.fullmatch(r"predict 1/2 a: \d+\.\d s", first), first
    assert second.startswith(f"predict 2/2 b: skipped ({inputs / 'b.nii.gz'}: cannot be read as an image"), second
    assert error_line(none).endswith("nothing was written") and not (tmp_path / "nothing").exists()
    assert error_line(quiet).startswith("error: 1 of 2 inputs failed") and not progress_lines(quiet, "predict")
    assert "skipped" not in quiet.stderr


@pytest.mark.parametrize("code, why", [(13, "is not writable by this user"), (30, "is on a read-only file system"),
                                       (28, "is on a full disk"), (36, "takes no new file (File name too long)")])
def test_an_unwritable_output_folder_is_named_with_its_reason(tmp_path, monkeypatch, code, why):
    """The output check tries to make a file; the reason it could not is the one the OS gave, in words."""
    import errno
    import os
    import tempfile

    from subfore.errors import SubforeError
    from subfore.io import check_output

    assert (errno.EACCES, errno.EROFS, errno.ENOSPC, errno.ENAMETOOLONG) == (13, 30, 28, 36)

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(SubforeError) as err:
        check_output(tmp_path / "out" / "m.json")
    assert str(err.value) == f"--out {tmp_path / 'out' / 'm.json'}: the folder {tmp_path} {why}"
