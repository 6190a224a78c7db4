"""A micro study end to end: 2 arms × 1 seed, a handful of steps, the CNN at 32³; and its resume."""

from __future__ import annotations

import json

import pytest

from subfore.config import load_config
from subfore.errors import ConfigError
from subfore.study import StudyConfig, check_protocol, expand_arms, parse_arm, study


def micro(phantom_dir, tmp_path, **study_keys) -> dict:
    """3 'training' phantoms: 2 finetune, the 3rd selects (holdout); the 'validation' phantom is the test case."""
    ds = str(phantom_dir / "dataset.json")
    return {
        "study": {"study_dir": str(tmp_path / "study"), "arms": ["scratch", "foreground"], "seeds": [0],
                  "pretrain_data": [ds], "finetune_train": {"data": ds, "split": "training"},
                  "finetune_val": {"holdout": 1}, "select": "best",
                  "probe": {"data": ds, "test_split": "validation", "label_map": {1: 1, 6: 2}, "steps": 20},
                  "test": [{"name": "phantoms", "data": ds, "split": "validation"},
                           {"name": "absent", "data": str(tmp_path / "nope.json"), "optional": True}],
                  **study_keys},
        "pretrain": {"data": {"roi": [32, 32, 32], "spacing": [4.0, 4.0, 4.0], "cache_dir": str(tmp_path / "cache"),
                              "num_workers": 0},
                     "model": {"name": "basicunet", "feature_size": 4},
                     "train": {"max_steps": 2, "batch_size": 2, "log_every": 1, "ckpt_every": 2, "progress_bar": False}},
        "finetune": {"data": {"roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0], "samples_per_volume": 2,
                              "cache_dir": str(tmp_path / "cache"), "num_workers": 0},
                     "model": {"name": "basicunet", "feature_size": 4, "out_channels": 14},
                     "train": {"max_steps": 2, "batch_size": 2, "val_every": 2, "ckpt_every": 2, "log_every": 1,
                               "progress_bar": False}},
    }


def test_micro_study_writes_outputs_and_resume_skips_finished_arms(phantom_dir, tmp_path, monkeypatch):
    import subfore.study.run as mod

    tree = micro(phantom_dir, tmp_path)
    test_image = json.loads((phantom_dir / "dataset.json").read_text())["validation"][0]["image"]
    tree["study"]["pretrain_data"].append(str(phantom_dir / test_image))  # the test case, pretrained on too
    cfg = load_config(None, [], StudyConfig, base=tree)
    # Scoring runs on the device the finetuning trained on (train.accelerator), not always the CPU.
    class AsTrained(str):
        """The device device_for chose for train.accelerator (a real one, marked)."""

    devices, real_evaluate = [], mod.evaluate
    monkeypatch.setattr(mod, "device_for", lambda accelerator: AsTrained(f"cpu{'' if accelerator == 'auto' else '?'}"))
    monkeypatch.setattr(mod, "evaluate",
                        lambda *a, device, **k: devices.append(device) or real_evaluate(*a, device=device, **k))
    out = study(cfg)
    assert [(type(d), d) for d in devices] == [(AsTrained, "cpu")] * 2
    results = json.loads((out / "results.json").read_text())
    assert results["arms"] == ["scratch", "foreground"]
    # Trained on 2, selected on the held-out 3rd, scored on the 'validation' phantom; its pretraining is reported.
    protocol = results["protocol"]
    assert protocol["finetune_train"]["cases"] == 2 and protocol["finetune_val"]["cases"] == 1
    assert protocol["test"] == {"phantoms": 1, "absent": None}
    assert protocol["pretrain_overlap"] == {"phantoms": ["phantom_003"]}
    assert "warning: test 'phantoms' cases were also pretraining data: phantom_003" in (out / "results.md").read_text()
    assert all(r["checkpoint"] == "best.ckpt" for r in results["runs"])
    # The probe read-out: scratch probes its random init, the pretrained arm its encoder; both in results.md.
    assert all(set(r["probe"]["dice"]) == {"class_1", "class_2"} for r in results["runs"])
    assert results["runs"][0]["probe"] != results["runs"][1]["probe"]  # the pretrained encoder, not a random init
    assert "## Linear probe" in (out / "results.md").read_text()
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("scratch", 0), ("foreground", 0)]
    run = results["runs"][1]
    assert set(run["tests"]) == {"phantoms"}  # the optional, absent test set is skipped
    assert set(run["tests"]["phantoms"]["dice"]) >= {"spleen", "liver"}
    assert [p[0] for p in run["pretrain_loss"]] == [1, 2] and run["finetune_val_dice"]
    assert results["runs"][0]["pretrain_loss"] == []  # scratch does not pretrain
    md = (out / "results.md").read_text()
    assert "| arm | spleen" in md and "| scratch |" in md and "| foreground |" in md and "±" in md
    for png in ("dice.png", "curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # Resume: finished arms are not run again.
    def fail(*a, **k):
        raise AssertionError("a finished arm ran again")

    monkeypatch.setattr(mod, "run_one", fail)
    study(cfg)
    # A run that finished before the probe was configured gets its probe without training again.
    marker = out / "scratch" / "seed0" / "result.json"
    probe = json.loads(marker.read_text()).pop("probe")
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "probe"}))
    study(cfg)
    assert json.loads(marker.read_text())["probe"] == probe
    (out / "foreground" / "seed0" / "result.json").unlink()
    calls = []
    monkeypatch.setattr(mod, "run_one", lambda cfg, arm, over, seed, *a, **k: calls.append(arm) or results["runs"][1])
    study(cfg)
    assert calls == ["foreground"]


def _check(config: dict, tmp_path):
    import subprocess

    import yaml

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(["subfore", "study", "--config", str(path), "--check"], capture_output=True, text=True)


def _refusal(config: dict) -> str:
    """check_protocol's refusal of ``config`` in this process (the CLI's one-line path is checked once above)."""
    with pytest.raises(ConfigError) as err:
        check_protocol(load_config(None, [], StudyConfig, base=config))
    return f"error: {err.value}"


def test_check_refuses_a_test_case_that_trains_or_selects(phantom_dir, tmp_path):
    meta = json.loads((phantom_dir / "dataset.json").read_text())
    image = lambda split, i: str(phantom_dir / meta[split][i]["image"])  # noqa: E731
    label = lambda split, i: str(phantom_dir / meta[split][i]["label"])  # noqa: E731
    ok = _check(micro(phantom_dir, tmp_path), tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "finetune training: 2 cases" in ok.stdout and "the last 1 training cases (holdout)" in ok.stdout
    assert "test 'phantoms': 1 cases" in ok.stdout and ok.stdout.strip().endswith("protocol ok")
    # The holdout case (the 3rd 'training' phantom) named as a test image: it selects the checkpoint.
    tree = micro(phantom_dir, tmp_path)
    tree["study"]["test"] = [{"name": "leak", "image": image("training", 2), "label": label("training", 2)}]
    bad = _check(tree, tmp_path)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"error: study.test 'leak': case phantom_002 ({image('training', 2)}) is also a finetuning validation case "
        f"(1 shared); test cases must never train or select the checkpoint"]
    # A training case, as a test image.
    tree["study"]["test"] = [{"name": "leak", "image": image("training", 0), "label": label("training", 0)}]
    assert "is also a finetuning training case" in _refusal(tree)
    # ... also when another finetuning datalist does not exist yet (its split of roles is then unknown).
    tree["study"]["finetune_train"]["data"] = [str(phantom_dir / "dataset.json"), "/nowhere/more.json"]
    for i in (0, 2):
        tree["study"]["test"] = [{"name": "leak", "image": image("training", i), "label": label("training", i)}]
        assert "error: study.test 'leak': case phantom_00" in _refusal(tree)
    # A test set must say what it scores.
    tree = micro(phantom_dir, tmp_path)
    tree["study"]["test"] = [{"name": "empty"}]
    assert "test 'empty': give either data (a labelled datalist) or image with label" in _refusal(tree)
    # The paper configs' old mistake, with placeholder paths: the scored split is the validation split.
    tree = micro(phantom_dir, tmp_path)
    tree["study"].update(finetune_train={"data": "/nowhere/BTCV/dataset.json"},
                         finetune_val={"data": "/nowhere/BTCV/dataset.json", "split": "validation"},
                         test=[{"name": "btcv", "data": "/nowhere/BTCV/dataset.json", "split": "validation"}])
    assert _refusal(tree) == (
        "error: study.test 'btcv': datalist and split /nowhere/BTCV/dataset.json:validation are also the "
        "finetuning validation data; test cases must never train or select the checkpoint")
    # select: best without a validation set is refused; select: last without one is fine.
    tree = micro(phantom_dir, tmp_path)
    tree["study"]["finetune_val"] = None
    assert "select 'best' needs finetune_val" in _refusal(tree)
    tree["study"]["select"] = "last"
    check_protocol(load_config(None, [], StudyConfig, base=tree))  # accepted


def test_study_runs_the_check_before_anything_else(phantom_dir, tmp_path):
    tree = micro(phantom_dir, tmp_path)
    tree["study"]["test"] = [{"name": "leak", "data": str(phantom_dir / "dataset.json"), "split": "training"}]
    with pytest.raises(ConfigError, match="is also a finetuning training case"):
        study(load_config(None, [], StudyConfig, base=tree))
    assert not (tmp_path / "study").exists()


def test_arm_names_and_sweeps(phantom_dir, tmp_path):
    assert parse_arm("scratch") is None
    assert parse_arm("foreground+otsu") == {"masking.strategy": "foreground", "masking.threshold": "otsu"}
    assert parse_arm("anatomask+gate") == {"masking.strategy": "anatomask", "masking.gate": "foreground"}
    assert parse_arm("foreground+visible") == {"masking.strategy": "foreground", "model.encoding": "visible"}
    assert parse_arm("mae") == {"masking.strategy": "random", "masking.ratio": 0.75, "model.encoding": "visible",
                                "masking.loss": "mse", "masking.norm_pix_loss": True}
    assert parse_arm("subfore") == parse_arm("foreground")
    cfg = load_config(None, [], StudyConfig, base=micro(phantom_dir, tmp_path, sweep={"masking.ratio": [0.4, 0.8]}))
    assert [a for a, _ in expand_arms(cfg)] == ["scratch", "foreground[masking.ratio=0.4]", "foreground[masking.ratio=0.8]"]
    with pytest.raises(ConfigError, match="unknown strategy 'checker'"):
        load_config(None, ["study.arms=[checker]"], StudyConfig, base=micro(phantom_dir, tmp_path))
    with pytest.raises(ConfigError, match="unknown modifier"):
        load_config(None, ["study.arms=[random+fast]"], StudyConfig, base=micro(phantom_dir, tmp_path))


@pytest.mark.parametrize("name", ["cpu_small", "unetr_cpu", "paper_btcv", "paper_unetr", "paper_flare22", "paper_amos22",
                                  "paper_mmwhs", "paper_brats"])
def test_shipped_study_configs_build_valid_arm_configs(name):
    from pathlib import Path

    from subfore.config import PretrainConfig
    from subfore.finetune import FinetuneConfig

    root = Path(__file__).parents[1] / "configs"
    cfg = load_config(root / "study" / f"{name}.yaml", [], StudyConfig)
    assert cfg.study.seeds == [0, 1, 2] and "scratch" in cfg.study.arms
    strategies = set()
    for arm, over in expand_arms(cfg):
        if over:
            tree = {**cfg.pretrain, "data": {**cfg.pretrain["data"], "train": "x"}}
            pc = load_config(None, [f"{k}={v}" for k, v in over.items()], PretrainConfig, base=tree)
            assert pc.masking.strategy == over["masking.strategy"]
            strategies.add(pc.masking.strategy)
            if arm == "mae":
                assert (pc.model.encoding, pc.masking.ratio, pc.masking.loss, pc.masking.norm_pix_loss) == (
                    "visible", 0.75, "mse", True)
            if arm == "simmim":
                assert (pc.model.encoding, pc.masking.ratio, pc.masking.loss, pc.masking.fill) == (
                    "dense", 0.6, "l1", "token")
    assert "foreground" in strategies  # SubFore is in every study
    if name in ("unetr_cpu", "paper_unetr"):
        assert {"mae", "simmim"} <= set(cfg.study.arms)
    ft = load_config(None, [], FinetuneConfig, base={**cfg.finetune, "data": {**cfg.finetune["data"], "train": "x"}})
    assert ft.model.out_channels >= 3


@pytest.mark.parametrize("path", sorted(str(p.name) for p in (__import__("pathlib").Path(__file__).parents[1] / "configs" / "finetune").glob("*.yaml")))
def test_shipped_finetune_configs_validate(path):
    from pathlib import Path

    from subfore.finetune import FinetuneConfig

    cfg = load_config(Path(__file__).parents[1] / "configs" / "finetune" / path, [], FinetuneConfig)
    assert len(cfg.class_names()) == cfg.model.out_channels


def test_label_fractions_pretrain_once_finetune_per_count_and_pair_by_seed(phantom_dir, tmp_path):
    tree = micro(phantom_dir, tmp_path, label_fractions=[1, 0.99], seeds=[0, 1])
    tree["study"].pop("probe")
    cfg = load_config(None, [], StudyConfig, base=tree)
    out = study(cfg)
    results = json.loads((out / "results.json").read_text())
    # 2 training cases after the holdout: a count of 1, and a share 0.99 → 2.
    assert results["protocol"]["finetune_train"]["labels"] == [1, 2]
    assert sorted((r["arm"], r["seed"], r["labels"]) for r in results["runs"]) == [
        (a, s, n) for a in ("foreground", "scratch") for s in (0, 1) for n in (1, 2)]
    import yaml

    by = {(r["arm"], r["seed"], r["labels"]): r for r in results["runs"]}
    for seed in (0, 1):
        steps = [json.loads(x)["step"] for x in (out / "foreground" / f"seed{seed}" / "pretrain" / "metrics.jsonl")
                 .read_text().splitlines() if "loss" in json.loads(x)]
        assert steps == [1, 2]
        # Pretrained once: the second label count reuses the finished pretraining without touching it.
        first, second = by["foreground", seed, 1], by["foreground", seed, 2]
        assert first["pretrain_s"] > 0 and second["pretrain_s"] == 0
        assert second["pretrain_loss"] == first["pretrain_loss"] and [p[0] for p in first["pretrain_loss"]] == [1, 2]
        assert not list((out / "foreground" / f"seed{seed}").glob("labels*/pretrain"))
        for n in (1, 2):
            run = out / "foreground" / f"seed{seed}" / f"labels{n}"
            assert yaml.safe_load((run / "finetune" / "config.yaml").read_text())["data"]["limit_train"] == n
    # The paired table: each arm − scratch per seed, from the runs' own mean Dice.
    dice = {(r["arm"], r["seed"], r["labels"]): r["tests"]["phantoms"]["mean_dice"] for r in results["runs"]}
    diffs = [100 * (dice["foreground", s, 1] - dice["scratch", s, 1]) for s in (0, 1)]
    md = (out / "labels.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| foreground |") and "(" in line)
    assert row.split(" | ")[1].endswith("(" + ", ".join(f"{d:+.1f}" for d in diffs) + ")")
    assert (out / "labels.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match="3 labelled cases asked for, finetune_train has 2"):
        study(load_config(None, ["study.label_fractions=[3]"], StudyConfig, base=tree))


def test_results_record_code_and_data_and_a_run_reproduces_number_by_number(phantom_dir, tmp_path, monkeypatch):
    import hashlib
    import os
    import subprocess

    tree = micro(phantom_dir, tmp_path, arms=["foreground"])
    tree["study"]["probe"]["steps"] = 5
    out = study(load_config(None, [], StudyConfig, base=tree))
    results = json.loads((out / "results.json").read_text())
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True).stdout  # noqa: E731
    code = results["runs"][0]["code"]
    assert code == results["code"] and code["commit"] == git("rev-parse", "HEAD").strip()
    assert code["dirty"] == bool(git("status", "--porcelain", "-uno", "--", "src/subfore", "configs", "pyproject.toml",
                                     "constraints.txt").strip())
    # Where each run computed: the platform a rerun must share for its numbers to be bit-identical.
    import platform
    from importlib.metadata import version

    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    assert results["runs"][0]["platform"] == {
        "cpu": next(ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "device": "cpu", "gpu": None, "cuda": None, "cudnn": None, "python": platform.python_version(),
        "torch": torch.__version__, "numpy": version("numpy"), "monai": version("monai"),
        "lightning": version("lightning")}
    assert StudyConfig.model_validate(results["config"]).model_dump() == load_config(
        None, [], StudyConfig, base=tree).model_dump()
    image = phantom_dir / json.loads((phantom_dir / "dataset.json").read_text())["validation"][0]["image"]
    rel = lambda p: os.path.relpath(p.resolve(), Path.cwd().resolve())  # noqa: E731 - as the study ran, from here
    assert results["data"]["test phantoms"][rel(image)] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert set(results["data"]["finetune_train"]) == {  # 2 cases trained, each image and label
        rel(phantom_dir / f"{kind}Tr" / f"phantom_00{i}.nii.gz") for kind in ("images", "labels") for i in (0, 1)}
    assert not any("labelsTr" in k for k in results["data"]["pretrain"])  # pretraining reads images only
    cmd = ["subfore", "study", "--reproduce", str(out / "results.json"), "--arm", "foreground", "--seed", "0"]
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "again")], capture_output=True, text=True, cwd=os.getcwd())
    assert ok.returncode == 0, ok.stdout + ok.stderr
    total = len([line for line in ok.stdout.splitlines() if line.startswith("match ")])
    assert total > 20 and f"{total} of {total} numbers match" in ok.stdout
    # The report opens with the platform (after the training's own output), and judges nothing by the seed spread.
    report = ok.stdout[ok.stdout.index("\nplatform: ") + 1:].splitlines()
    assert report[0].startswith("platform: the same as recorded (") and report[1].startswith("code: recorded ")
    assert "seed spread" not in ok.stdout
    assert "data: the same files, each with its recorded sha256" in ok.stdout
    # One recorded number changed: the comparison names it. The rerun is the one above (its result.json stands in for
    # run_one; training it again would give the same numbers).
    import subfore.study.run as run_mod
    from subfore.study import reproduce

    rerun = json.loads((tmp_path / "again" / "foreground" / "seed0" / "result.json").read_text())
    monkeypatch.setattr(run_mod, "run_one", lambda *a, **k: rerun)
    results["runs"][0]["tests"]["phantoms"]["dice"]["liver"] += 0.01
    (tmp_path / "edited.json").write_text(json.dumps(results))
    bad = reproduce(tmp_path / "edited.json", "foreground", 0, out=tmp_path / "third")
    assert (bad["matched"], bad["total"]) == (total - 1, total)
    assert [ln.split(":")[0] for ln in bad["lines"] if ln.startswith("DIFFERS")] == ["DIFFERS phantoms dice liver"]
    from typer.testing import CliRunner

    from subfore.cli import app

    cli = CliRunner().invoke(app, ["study", "--reproduce", str(tmp_path / "edited.json"), "--arm", "foreground",
                                   "--seed", "0", "--out", str(tmp_path / "fourth")])
    assert cli.exit_code == 1 and "DIFFERS phantoms dice liver" in cli.output  # a differing number fails the command


def test_reproduce_names_a_data_file_whose_contents_changed(phantom_dir, tmp_path):
    import os
    import shutil
    import subprocess

    import nibabel as nib

    data = shutil.copytree(phantom_dir, tmp_path / "phantoms")
    tree = micro(data, tmp_path, arms=["scratch"])
    tree["study"].pop("probe")
    out = study(load_config(None, [], StudyConfig, base=tree))
    image = data / json.loads((data / "dataset.json").read_text())["validation"][0]["image"]
    img = nib.load(image)
    nib.save(nib.Nifti1Image(img.get_fdata() + 1.0, img.affine), image)  # the test case, 1 HU brighter
    proc = subprocess.run(["subfore", "study", "--reproduce", str(out / "results.json"), "--arm", "scratch", "--seed",
                           "0", "--out", str(tmp_path / "again")], capture_output=True, text=True, cwd=os.getcwd())
    assert proc.returncode == 1
    assert "data differs: test phantoms: " in proc.stdout and f"{image.name} has other contents (sha256)" in proc.stdout
    bad = subprocess.run(["subfore", "study", "--reproduce", str(out / "scratch" / "seed0" / "result.json"),
                          "--arm", "scratch", "--seed", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "not a study's results.json" in bad.stderr and "Traceback" not in bad.stderr


def test_labels_table_pairs_each_arm_with_scratch_by_seed(tmp_path):
    from subfore.study import summarize

    def run(arm, seed, labels, dice):
        test = {"mean_dice": dice, "mean_nsd": 0.0, "dice": {}, "nsd": {}, "classes": []}
        return {"arm": arm, "seed": seed, "labels": labels, "tests": {"t": test}, "pretrain_loss": [],
                "finetune_val_dice": []}

    # Listed out of seed order; pairing by position or by sorted value would give other differences.
    results = [run("foreground", 1, 1, 0.10), run("scratch", 0, 1, 0.25), run("foreground", 0, 1, 0.30),
               run("scratch", 1, 1, 0.20), *(run(a, s, 4, 0.5) for a in ("scratch", "foreground") for s in (0, 1))]
    summarize(results, tmp_path)
    md = (tmp_path / "labels.md").read_text()
    assert "| foreground | -2.5 ± 10.6 (+5.0, -10.0) | +0.0 ± 0.0 (+0.0, +0.0) |" in md
    assert "| foreground | 20.0 ± 14.1 | **50.0 ± 0.0** |" in md


def _platform(**changes) -> dict:
    """A platform record (hand-written, not this machine's) with ``changes``."""
    return {"cpu": "AMD EPYC 9R14", "cpu_capability": "AVX512", "threads": 2, "device": "cpu", "gpu": None,
            "cuda": None, "cudnn": None, "python": "3.12.3", "torch": "2.13.0+cpu", "numpy": "2.3.5",
            "monai": "1.6.1", "lightning": "2.6.6", **changes}


def _run(seed: int, loss: float, liver: float, mean: float, platform: dict | None) -> dict:
    """A run's result with three numbers: a pretraining loss, the liver Dice and the mean Dice of test 't'."""
    test = {"dice": {"liver": liver}, "nsd": {}, "mean_dice": mean, "mean_nsd": None, "classes": ["liver"]}
    return {"arm": "foreground", "seed": seed, "tests": {"t": test}, "pretrain_loss": [[1, loss]],
            "finetune_val_dice": [], **({} if platform is None else {"platform": platform})}


def _reproduce_cli(tmp_path, monkeypatch, recorded: list[dict], rerun: dict, name: str):
    """``subfore study --reproduce`` of seed 0 of a results.json holding ``recorded``, ``rerun`` standing in for the
    training (in process)."""
    from typer.testing import CliRunner

    import subfore.study.run as run_mod
    from subfore.cli import app

    tree = micro(tmp_path, tmp_path, arms=["foreground"])  # validated, never trained: run_one is a stand-in
    results = {"arms": ["foreground"], "config": load_config(None, [], StudyConfig, base=tree).model_dump(mode="json"),
               "runs": recorded}
    (tmp_path / f"{name}.json").write_text(json.dumps(results))
    monkeypatch.setattr(run_mod, "run_one", lambda *a, **k: rerun)
    return CliRunner().invoke(app, ["study", "--reproduce", str(tmp_path / f"{name}.json"), "--arm", "foreground",
                                    "--seed", "0", "--out", str(tmp_path / name)])


def test_reproduce_on_another_platform_judges_each_number_against_the_seed_spread(tmp_path, monkeypatch):
    then = _platform()
    # Seeds 0..2 of the arm: spreads (max − min) 0.3 (loss), 0.05 (liver), 0.05 (mean Dice).
    seeds = [_run(0, 0.9, 0.50, 0.178, then), _run(1, 0.7, 0.45, 0.156, then), _run(2, 0.6, 0.48, 0.128, then)]
    now = _platform(cpu_capability="AVX2", threads=4)
    within = _run(0, 0.9, 0.47, 0.155, now)
    ok = _reproduce_cli(tmp_path, monkeypatch, seeds, within, "within")
    lines = ok.output.splitlines()
    assert ok.exit_code == 0, ok.output
    assert lines[0] == ("platform differs: cpu_capability recorded 'AVX512', now 'AVX2'; threads recorded 2, now 4: "
                        "numbers reproduce exactly only on the recording platform; each is judged against the arm's "
                        "seed spread (max − min over its seeds in results.json)")
    assert lines[-5:] == [
        "within  pretrain_loss step 1: recorded 0.9, rerun 0.9, difference +0, within the seed spread 0.3 "
        "(max − min of 3 seeds)",
        "within  t dice liver: recorded 0.5, rerun 0.47, difference -0.03, within the seed spread 0.05 "
        "(max − min of 3 seeds)",
        "within  t mean_dice: recorded 0.178, rerun 0.155, difference -0.023, within the seed spread 0.05 "
        "(max − min of 3 seeds)",
        "match   t mean_nsd: recorded absent, rerun absent",
        f"2 of 4 numbers match exactly; 4 of 4 agree within the seed spread, 0 do not (foreground, seed 0; rerun in "
        f"{tmp_path / 'within'})"]
    # The liver Dice 0.06 lower: more than the seeds differ by, so the command fails.
    outside = _reproduce_cli(tmp_path, monkeypatch, seeds, _run(0, 0.9, 0.44, 0.155, now), "outside")
    assert outside.exit_code == 1
    assert ("OUTSIDE t dice liver: recorded 0.5, rerun 0.44, difference -0.06, outside the seed spread 0.05 "
            "(max − min of 3 seeds)") in outside.output.splitlines()
    assert "3 of 4 agree within the seed spread, 1 do not" in outside.output
    # A record without a platform (written before runs recorded theirs) counts as another platform.
    old = [{k: v for k, v in r.items() if k != "platform"} for r in seeds]
    unknown = _reproduce_cli(tmp_path, monkeypatch, old, within, "unknown")
    assert unknown.exit_code == 0, unknown.output
    assert unknown.output.splitlines()[0] == (
        "platform unknown: the record has no platform (written before runs recorded theirs); now AMD EPYC 9R14, AVX2, "
        "4 threads, cpu; Python 3.12.3, torch 2.13.0+cpu, numpy 2.3.5, MONAI 1.6.1, Lightning 2.6.6: numbers "
        "reproduce exactly only on the recording platform; each is judged against the arm's seed spread (max − min "
        "over its seeds in results.json)")
    assert "within  t mean_dice: recorded 0.178, rerun 0.155, difference -0.023" in unknown.output
    # One seed: no spread to judge against, so only an exact match passes.
    alone = _reproduce_cli(tmp_path, monkeypatch, seeds[:1], within, "alone")
    assert alone.exit_code == 1
    assert ("DIFFERS t mean_dice: recorded 0.178, rerun 0.155, difference -0.023; no seed spread (fewer than 2 seeds "
            "record it): exact comparison only") in alone.output.splitlines()


def test_reproduce_on_the_same_platform_needs_every_number_exact(tmp_path, monkeypatch):
    then = _platform()
    seeds = [_run(0, 0.9, 0.50, 0.178, then), _run(1, 0.7, 0.45, 0.156, then), _run(2, 0.6, 0.48, 0.128, then)]
    # A difference well within the seed spread still fails: the same platform gives the same bits.
    same = _reproduce_cli(tmp_path, monkeypatch, seeds, _run(0, 0.9, 0.50, 0.177, then), "same")
    assert same.exit_code == 1
    lines = same.output.splitlines()
    assert lines[0] == ("platform: the same as recorded (AMD EPYC 9R14, AVX512, 2 threads, cpu; Python 3.12.3, "
                        "torch 2.13.0+cpu, numpy 2.3.5, MONAI 1.6.1, Lightning 2.6.6): every number must match exactly")
    assert "DIFFERS t mean_dice: recorded 0.178, rerun 0.177" in lines and "3 of 4 numbers match" in lines[-1]
    assert not any("seed spread" in line for line in lines[1:])
    exact = _reproduce_cli(tmp_path, monkeypatch, seeds, seeds[0], "exact")
    assert exact.exit_code == 0 and "4 of 4 numbers match" in exact.output
