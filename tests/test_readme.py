"""Every ``subfore …`` line of README.md runs as written, in README order, through the installed console script.

Each line gets tiny-size ``--set`` overrides (or options) appended from ``TINY`` so that the whole README runs in
a minute or two on 2 CPU cores, in a temporary copy of ``configs/``. The two set-up commands at the top are run
by CI (``.ci/run`` is command 2 verbatim); only command 1's trailing ``subfore pretrain …`` (the demo every later
line builds on) runs here. A README ``subfore`` line this file has no overrides for fails the test: add it to
``TINY`` and ``CHECKS``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SUBFORE = shutil.which("subfore", path=str(Path(sys.executable).parent))

# Tiny sizes. Pretraining and finetuning share the backbone (BasicUNet, 4 features), so --pretrained loads.
PHANTOMS = ["data.phantoms.n=4", "data.phantoms.spacing=[3,3,4]"]
PRETRAIN = ["model.name=basicunet", "model.feature_size=4", "data.roi=[32,32,32]", "train.batch_size=2",
            "data.samples_per_volume=1", "data.num_workers=0", "train.val_every=2", "train.ckpt_every=2",
            "train.snapshot_every=2", "train.progress_bar=false", *PHANTOMS]
FINETUNE = ["model.name=basicunet", "model.feature_size=4", "data.roi=[32,32,32]", "data.spacing=[3,3,3]",
            "data.samples_per_volume=2", "train.batch_size=2", "data.num_workers=0", "train.max_steps=2",
            "train.val_every=2", "train.ckpt_every=2", "train.progress_bar=false", "finetune.sw_overlap=0",
            *PHANTOMS]
_STUDY_PHANTOMS = ", ".join(f"{{dir: data/study/{d}, n: {n}, seed: {s}, spacing: [3, 3, 4]}}"
                            for d, n, s in (("pretrain", 2, 10), ("finetune", 2, 20), ("test", 1, 30)))
STUDY = [f"study.phantoms=[{_STUDY_PHANTOMS}]", "study.pretrain_data_optional=[]",
         *(f"pretrain.{k}" for k in ("model.feature_size=4", "data.roi=[32,32,32]", "data.samples_per_volume=2",
                                     "data.num_workers=0", "train.max_steps=2", "train.batch_size=2",
                                     "train.ckpt_every=2", "train.log_every=1")),
         *(f"finetune.{k}" for k in ("model.feature_size=4", "data.roi=[32,32,32]", "data.samples_per_volume=2",
                                     "data.num_workers=0", "train.max_steps=2", "train.batch_size=2",
                                     "train.val_every=2", "train.ckpt_every=2", "finetune.sw_overlap=0"))]


# UNETR lines: a tiny ViT (and MAE decoder) at the same 32³.
UNETR = ["model.feature_size=4", "model.hidden_size=48", "model.mlp_dim=96", "model.num_heads=4",
         "decoder.width=48", "decoder.depth=1", "decoder.heads=4"]
# The tiny study phantoms hold 1 labelled finetuning case, so the UNETR study runs at 1.
STUDY_UNETR = STUDY + [f"pretrain.{o}" for o in UNETR] + [f"finetune.{o}" for o in UNETR if o.startswith("model.")] + [
    "study.label_fractions=[1]"]


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


# What is appended to each kind of README line. The resume line continues the 2-step demo to step 4.
TINY = {
    "phantoms": [],
    "show-mask": [],
    "analyze": [],
    "pretrain": _sets(PRETRAIN + ["train.max_steps=2"]),
    "pretrain --resume": _sets(PRETRAIN + ["train.max_steps=4"]),
    "finetune": _sets(FINETUNE),
    "evaluate": [],
    "predict": [],
    "study": _sets(STUDY),
    "study --check": [],
    "study --reproduce": [],
    "study unetr": _sets(STUDY_UNETR),
    "pretrain unetr": _sets([o for o in PRETRAIN if not o.startswith("model.")] + UNETR + ["train.max_steps=2"]),
    "probe": ["--steps", "20", "--device", "cpu"],
    "fingerprint": ["--crops", "4"],
    "preprocess": _sets(PRETRAIN),
    # configs/pretrain/resenc_cpu.yaml keeps its own (small, inline) nnU-Net network
    "pretrain resenc": _sets([o for o in PRETRAIN if not o.startswith("model.")] + ["train.max_steps=2"]),
    "export": [],
}


# ---------------------------------------------------------------------------------------------- README parsing


def _fenced_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    assert current is None, "README.md has an unclosed ``` fence"
    return blocks


def setup_commands(text: str) -> list[str]:
    """The command lines (not comments) of the README's first fenced block: the two set-up commands."""
    first = _fenced_blocks(text)[0]
    return [ln for ln in first if ln.strip() and not ln.lstrip().startswith("#")]


def readme_lines(text: str) -> list[tuple[str, list[str]]]:
    """(line as written, argv after ``subfore`` with its comment stripped) for each README line to run, in order."""
    setup = setup_commands(text)
    assert len(setup) == 2, f"README.md should open with exactly two set-up commands, found {setup}"
    demo = setup[0].split(" && ")[-1]
    assert demo.startswith("subfore pretrain "), f"set-up command 1 should end with the demo pretraining: {setup[0]}"
    lines = [demo] + [ln.strip() for ln in text.splitlines() if ln.startswith("subfore ")]
    out = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "subfore" and len(argv) > 1, line
        out.append((line, argv[1:]))
    return out


def command_of(argv: list[str]) -> str:
    args = [a for a in argv if a != "--debug"]
    name = args[0]
    if name in ("pretrain", "finetune") and ("--resume" in args or "--resume-from" in args):
        return f"{name} --resume"
    if name == "study" and "--check" in args:
        return "study --check"
    if name == "study" and "--reproduce" in args:
        return "study --reproduce"
    if name in ("pretrain", "study") and any("unetr" in a for a in args):
        return f"{name} unetr"
    if name == "pretrain" and any("resenc" in a for a in args):
        return "pretrain resenc"
    return name


def parse(argv: list[str]) -> dict:
    """The command's parameters exactly as the CLI parses them (click underneath typer)."""
    import typer.main

    from subfore.cli import app

    group = typer.main.get_command(app)
    args = [a for a in argv if a != "--debug"]
    with group.make_context("subfore", list(args), resilient_parsing=True) as ctx:
        cmd = group.get_command(ctx, args[0])
        assert cmd is not None, f"no command {args[0]!r}"
        if hasattr(cmd, "get_command"):  # a group (subfore export hub …): its subcommand's parameters
            ctx = cmd.make_context(args[0], list(args[1:]), parent=ctx, resilient_parsing=True)
            args = args[1:]
            cmd = cmd.get_command(ctx, args[0])
            assert cmd is not None, f"no command {args[0]!r}"
        return cmd.make_context(args[0], list(args[1:]), parent=ctx).params


# ------------------------------------------------------------------------------------------ output checks


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


def _pretrain_cfg(cwd: Path, p: dict):
    from subfore.config import load_config

    init = [f"init_from={p['init_from']}"] if p.get("init_from") else []
    return load_config(cwd / p["config"], list(p["set_"] or []) + init)


def check_phantoms(cwd: Path, p: dict, before) -> None:
    import nibabel as nib

    out = cwd / p["out_dir"]
    meta = json.loads((out / "dataset.json").read_text())
    entries = meta["training"] + meta["validation"]
    assert len(entries) == p["n"]
    img = nib.load(out / entries[0]["image"])
    assert "".join(nib.aff2axcodes(img.affine)) == p["orientation"]
    if p["spacing"]:
        assert img.header.get_zooms() == pytest.approx([float(v) for v in p["spacing"].split(",")])
    assert (out / entries[0]["label"]).exists()


def check_show_mask(cwd: Path, p: dict, before) -> None:
    _png(cwd / p["out"])
    if p["json_out"]:
        stats = json.loads((cwd / p["json_out"]).read_text())
        assert stats["subvolumes"] == (p["roi"] // p["size"]) ** 3
        assert stats["strategy"] == p["strategy"] and stats["ratio"] == pytest.approx(p["ratio"])
        if p["strategy"] == "foreground":
            assert 0 < stats["foreground"] <= stats["subvolumes"]
            assert stats["masked"] == round(p["ratio"] * stats["foreground"])


def check_analyze(cwd: Path, p: dict, before) -> None:
    result = json.loads((cwd / p["out"] / "analysis.json").read_text())
    ent = result["mean_entropy_bits"]
    assert ent["foreground"] > ent["background"] >= 0
    _png(cwd / p["out"] / "intensity.png")


def check_pretrain(cwd: Path, p: dict, before) -> None:
    cfg = _pretrain_cfg(cwd, p)
    run = cwd / cfg.run_dir
    # The README's own --set values (not overridden by TINY) reached the run's resolved config.
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.model_dump(mode="json")
    rows = _rows(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r][-1] == cfg.train.max_steps == 2
    assert any("val_loss" in r for r in rows)
    assert json.loads((run / "encoder.json").read_text())["step"] == 2
    assert (run / "encoder.pt").stat().st_size > 0 and (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "encoder.safetensors").stat().st_size > 0
    _png(run / "snapshots" / "step_000002.png")
    if cfg.init_from:
        report = (run / "init_load.txt").read_text()
        loaded, total = map(int, re.search(r"(\d+)/(\d+) of the encoder", report).groups())
        assert loaded == total > 0, report


def check_export(cwd: Path, p: dict, before) -> None:
    import torch

    out = cwd / p["out"]
    if (out / "config.json").exists():  # export hub
        config = json.loads((out / "config.json").read_text())
        assert config["library_name"] == "subfore" and config["network"]["class"].startswith("monai.networks.nets.")
        assert (out / "model.safetensors").stat().st_size > 0 and "## Load it" in (out / "README.md").read_text()
    else:  # export nnssl
        ckpt = torch.load(out, weights_only=True)
        assert {"network_weights", "nnssl_adaptation_plan", "citations"} <= set(ckpt)


def before_resume(cwd: Path, p: dict):
    return _rows(cwd / _pretrain_cfg(cwd, p).run_dir / "metrics.jsonl")


def check_pretrain_resume(cwd: Path, p: dict, before) -> None:
    run = cwd / _pretrain_cfg(cwd, p).run_dir
    rows = _rows(run / "metrics.jsonl")
    assert before, "nothing to resume: the README's resume line must follow a pretraining of the same run_dir"
    # Continued, not restarted: the earlier rows are kept and every new row comes after the checkpoint's step.
    assert rows[: len(before)] == before
    new = rows[len(before):]
    assert new and min(r["step"] for r in new) > max(r["step"] for r in before)
    assert [r["step"] for r in rows if "loss" in r][-1] == 4
    assert json.loads((run / "encoder.json").read_text())["step"] == 4


def check_finetune(cwd: Path, p: dict, before) -> None:
    from subfore.config import load_config
    from subfore.finetune import FinetuneConfig

    cfg = load_config(cwd / p["config"], list(p["set_"] or []), FinetuneConfig)
    run = cwd / cfg.run_dir
    assert (run / "checkpoints" / "best.ckpt").exists()
    assert any("val_dice" in r for r in _rows(run / "metrics.jsonl"))
    if p["pretrained"]:
        report = (run / "pretrained_load.txt").read_text()
        loaded, total = map(int, re.search(r"(\d+)/(\d+) of the encoder", report).groups())
        assert loaded == total > 0, report


def check_evaluate(cwd: Path, p: dict, before) -> None:
    out = cwd / p["out"]
    result = json.loads(out.read_text())
    assert {"checkpoint", "method", "split", "classes", "cases", "mean"} <= set(result)
    assert result["split"] == p["split"] and result["cases"]
    metrics = ["dice", "nsd"] + (["hd95"] if p["hd95"] else [])
    for k in metrics:
        assert set(result["mean"][k]) == set(result["classes"])
        assert f"mean_{k}" in result["mean"]
    assert 0.0 <= result["mean"]["mean_dice"] <= 1.0
    assert "| method |" in out.with_suffix(".md").read_text()
    _png(out.with_suffix(".png"))


def check_predict(cwd: Path, p: dict, before) -> None:
    import nibabel as nib
    import numpy as np

    images = []
    for inp in p["inputs"]:
        path = cwd / inp
        images += sorted(path.glob("*.nii.gz")) if path.is_dir() else [path]
    assert images
    out = cwd / p["out"]
    for image in images:
        name = image.name.removesuffix(".nii.gz")
        src, seg = nib.load(image), nib.load(out / f"{name}_seg.nii.gz")
        assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
        assert seg.get_data_dtype() == np.uint8
        _png(out / f"{name}_overlay.png")


def check_study(cwd: Path, p: dict, before) -> None:
    from subfore.config import load_config
    from subfore.study import StudyConfig, expand_arms

    cfg = load_config(cwd / p["config"], list(p["set_"] or []), StudyConfig)
    out = cwd / cfg.study.study_dir
    results = json.loads((out / "results.json").read_text())
    arms = [a for a, _ in expand_arms(cfg)]
    assert results["arms"] == arms
    assert sorted((r["arm"], r["seed"]) for r in results["runs"]) == sorted((a, s) for a in arms for s in cfg.study.seeds)
    for r in results["runs"]:
        assert r["tests"] and all("mean_dice" in t for t in r["tests"].values())
    assert "| arm |" in (out / "results.md").read_text()
    _png(out / "dice.png")
    _png(out / "curves.png")


def check_study_check(cwd: Path, p: dict, before) -> None:
    from subfore.config import load_config
    from subfore.study import StudyConfig

    cfg = load_config(cwd / p["config"], list(p["set_"] or []), StudyConfig)
    assert not (cwd / cfg.study.study_dir).exists()  # resolved, not run


def check_study_unetr(cwd: Path, p: dict, before) -> None:
    from subfore.config import load_config
    from subfore.study import StudyConfig

    check_study(cwd, p, before)
    cfg = load_config(cwd / p["config"], list(p["set_"] or []), StudyConfig)
    out = cwd / cfg.study.study_dir
    assert all(r["labels"] == 1 for r in json.loads((out / "results.json").read_text())["runs"])
    _png(out / "labels.png")
    encoding = {arm: yaml.safe_load((out / arm / "seed0" / "pretrain" / "config.yaml").read_text())["model"]["encoding"]
                for arm in ("mae", "simmim")}
    assert encoding == {"mae": "visible", "simmim": "dense"}


def check_study_reproduce(cwd: Path, p: dict, before) -> None:
    from subfore.study import compare

    recorded = json.loads((cwd / p["reproduce"]).read_text())
    run = next(r for r in recorded["runs"] if r["arm"] == p["arm"] and r["seed"] == p["seed"])
    rerun = json.loads((cwd / "runs" / "reproduce" / f"{p['arm']}_seed{p['seed']}" / p["arm"] / f"seed{p['seed']}"
                        / "result.json").read_text())
    rows = compare(run, rerun)
    assert len(rows) > 20 and all(ok for *_, ok in rows), [r for r in rows if not r[-1]]


def check_pretrain_unetr(cwd: Path, p: dict, before) -> None:
    from subfore.models.weights import read_state_dict

    check_pretrain(cwd, p, before)
    run = cwd / _pretrain_cfg(cwd, p).run_dir
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["encoding"] == "visible"
    keys = set(read_state_dict(run / "encoder.pt"))
    assert keys and all(k.startswith("vit.") for k in keys)  # the MAE decoder is not exported


def check_probe(cwd: Path, p: dict, before) -> None:
    out = cwd / p["out"]
    result = json.loads(out.read_text())
    assert {"pretrained", "baseline", "difference", "protocol"} <= set(result)
    assert result["protocol"]["steps"] == p["steps"]
    _png(out.with_suffix(".png"))


def check_fingerprint(cwd: Path, p: dict, before) -> None:
    fp = json.loads((cwd / p["out"] / "fingerprint.json").read_text())
    assert fp["crops"] == p["crops"] and len(fp["foreground_share"]["per_crop"]) == p["crops"]
    assert fp["foreground_share"]["mean"] == pytest.approx(sum(fp["foreground_share"]["per_crop"]) / p["crops"], abs=1e-5)
    _png(cwd / p["out"] / "foreground_share.png")


def check_preprocess(cwd: Path, p: dict, before) -> None:
    from subfore.data import load_datalists
    from subfore.data.store import StoreSpec, volume_id

    cfg = _pretrain_cfg(cwd, p)
    spec = StoreSpec.under(cwd / cfg.data.cache_dir, cfg.data.preset_obj(), cfg.data.store_dtype)
    manifest = json.loads((spec.root / "manifest.json").read_text())
    items = load_datalists(str(cwd / cfg.data.train), cfg.data.train_split)
    if cfg.data.val:
        items += load_datalists(str(cwd / cfg.data.val), cfg.data.val_split)
    assert sorted(v["store"] for v in manifest["volumes"]) == sorted({f"volumes/{volume_id(i)}.b2nd" for i in items})
    assert manifest["failed"] == [] and all((spec.root / v["store"]).stat().st_size == v["bytes"]
                                            for v in manifest["volumes"])


CHECKS = {
    "phantoms": check_phantoms,
    "show-mask": check_show_mask,
    "analyze": check_analyze,
    "pretrain": check_pretrain,
    "pretrain --resume": check_pretrain_resume,
    "finetune": check_finetune,
    "evaluate": check_evaluate,
    "predict": check_predict,
    "study": check_study,
    "study --check": check_study_check,
    "study --reproduce": check_study_reproduce,
    "study unetr": check_study_unetr,
    "pretrain unetr": check_pretrain_unetr,
    "probe": check_probe,
    "fingerprint": check_fingerprint,
    "preprocess": check_preprocess,
    "pretrain resenc": check_pretrain,
    "export": check_export,
}
BEFORE = {"pretrain --resume": before_resume}


# ------------------------------------------------------------------------------------------------- the tests


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_command_2_verbatim():
    text = README.read_text()
    install, tests = setup_commands(text)
    assert install.endswith("&& subfore pretrain --config configs/pretrain/demo_cpu.yaml")
    assert tests.endswith("&& python -m pytest -q")
    for cmd in (install, tests):
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
        assert "pip install -c constraints.txt torch==" in cmd and "pip install -c constraints.txt -e " in cmd
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert tests in ci, ".ci/run must run README set-up command 2 verbatim"
    torch_pin = re.search(r"torch==([\w.]+)", install).group(1)
    assert f"torch=={torch_pin}" in (ROOT / "constraints.txt").read_text().split()


def test_every_readme_subfore_line_runs(tmp_path):
    assert SUBFORE, f"no installed 'subfore' console script next to {sys.executable}"
    lines = readme_lines(README.read_text())
    assert len(lines) > 1, "README.md has no 'subfore …' lines besides set-up command 1"
    unmapped = [line for line, argv in lines if command_of(argv) not in TINY]
    assert not unmapped, f"README lines without tiny overrides in tests/test_readme.py (add them to TINY/CHECKS): {unmapped}"
    missing = set(TINY) - {command_of(argv) for _, argv in lines}
    assert not missing, f"README.md lost its example for: {sorted(missing)}"

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for line, argv in lines:
        kind = command_of(argv)
        run_argv = argv + TINY[kind]
        try:
            params = parse(run_argv)
        except Exception as exc:  # noqa: BLE001 (typer's vendored click raises its own UsageError)
            raise AssertionError(f"README line does not parse:\n  {line}\n{type(exc).__name__}: {exc}") from None
        before = BEFORE[kind](tmp_path, params) if kind in BEFORE else None
        t0 = time.perf_counter()
        proc = subprocess.run([SUBFORE, *run_argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
        print(f"{time.perf_counter() - t0:6.1f} s  {line}")  # pytest -s shows where the time goes
        assert proc.returncode == 0, (f"README line failed (exit {proc.returncode}):\n  {line}\nrun as:\n  "
                                      f"subfore {shlex.join(run_argv)}\n{proc.stderr[-3000:]}")
        CHECKS[kind](tmp_path, params, before)
