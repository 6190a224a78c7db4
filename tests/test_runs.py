"""Runs as users start them: the console script, 2 processes (gloo), kill -9, SIGTERM/SIGUSR1, NaN on one rank.

Faults are injected by tests/faults/sitecustomize.py (on PYTHONPATH, read by every rank at start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REAL_CT, REAL_SEG, needs_real_ct

SUBFORE = str(Path(sys.executable).with_name("subfore"))
FAULTS = Path(__file__).parent / "faults"
TWO = {"accelerator": "cpu", "devices": 2, "batch_size": 1}


def write_config(path: Path, phantom_dir: Path, kind: str = "pretrain", **sections) -> Path:
    """A few-step BasicUNet config on the session phantoms; ``sections`` update its sections."""
    tree = {
        "run_dir": str(path.parent / f"run_{path.stem}"),
        "seed": 0,
        "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "num_workers": 0,
                 "cache_dir": str(phantom_dir.parent / "cache_runs")},
        "model": {"name": "basicunet", "feature_size": 4},
        "optim": {"warmup_steps": 1},
        "train": {"max_steps": 6, "batch_size": 2, "ckpt_every": 2, "log_every": 1, "val_every": 3,
                  "progress_bar": False},
    }
    if kind == "pretrain":
        # 8³ subvolumes: 64 per 32³ crop, so two ranks' masks never coincide by chance (with 16³, 8 cells and
        # 5 masked, two independent masks are equal 1 time in 56).
        tree["masking"] = {"strategy": "anatomask", "subvolume_size": 8}
    else:
        tree["data"].update(spacing=[3.0, 3.0, 3.0], samples_per_volume=1, val=str(phantom_dir / "dataset.json"),
                            val_split="training")
        tree["train"].update(batch_size=1)
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(tree))
    return path


def subfore(*args, fault: str | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if fault:
        env["PYTHONPATH"] = os.pathsep.join([str(FAULTS), env.get("PYTHONPATH", "")])
        env["SUBFORE_TEST_FAULT"] = fault
    cmd = [*(launcher or []), SUBFORE, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def together(*runs):
    """Independent runs (zero-argument callables) at the same time: each is mostly interpreter start-up and gloo
    set-up, which leave the second core idle. Faults fire at a step, not a time, so the results are unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(runs)) as pool:
        return [f.result() for f in [pool.submit(r) for r in runs]]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rows(run_dir) if "loss" in r]


def run_dir(cfg: Path) -> Path:
    return Path(yaml.safe_load(cfg.read_text())["run_dir"])


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def assert_same_losses(got, ref) -> None:
    """Same steps, each once, and the same loss at each (tolerance 1e-5)."""
    assert [s for s, _ in got] == [s for s, _ in ref]
    assert [v for _, v in got] == pytest.approx([v for _, v in ref], abs=1e-5, rel=0)


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "stopped:"))]


@pytest.fixture(scope="module")
def reference(phantom_dir, tmp_path_factory):
    """An uninterrupted 1-process pretraining (6 steps, num_workers 0): the losses every other run must match."""
    cfg = write_config(tmp_path_factory.mktemp("ref") / "ref.yaml", phantom_dir)
    ok(subfore("pretrain", "--config", cfg))
    return losses(run_dir(cfg))


@pytest.fixture(scope="module")
def reference_two(phantom_dir, tmp_path_factory):
    """An uninterrupted 2-process pretraining (Lightning's launcher, gloo)."""
    cfg = write_config(tmp_path_factory.mktemp("ref2") / "ref2.yaml", phantom_dir, train=TWO)
    proc = ok(subfore("pretrain", "--config", cfg))
    return run_dir(cfg), proc


def test_reference_run_logs_each_step_once(reference):
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_then_resume_gives_the_uninterrupted_losses(phantom_dir, tmp_path, reference, workers):
    cfg = write_config(tmp_path / "k.yaml", phantom_dir, data={"num_workers": workers})
    killed = subfore("pretrain", "--config", cfg, fault="kill9@6")
    assert killed.returncode == -signal.SIGKILL
    assert ckpt_step(run_dir(cfg) / "checkpoints" / "last.ckpt") == 4
    assert losses(run_dir(cfg)) == reference[:5]  # same seed, any num_workers: bit-identical
    ok(subfore("pretrain", "--resume", "--config", cfg))  # the bare flag, before the other options
    assert_same_losses(losses(run_dir(cfg)), reference)  # step 5, logged before the kill, is not repeated


@pytest.mark.parametrize("sig", ["sigterm", "sigusr1"])
def test_signal_saves_the_current_step_exits_75_and_resumes_exactly(phantom_dir, tmp_path, reference, sig):
    cfg = write_config(tmp_path / "s.yaml", phantom_dir)
    stopped = subfore("pretrain", "--config", cfg, fault=f"{sig}@3")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert len(error_lines(stopped)) == 1 and "at step 3" in error_lines(stopped)[0]
    last = run_dir(cfg) / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 3  # ckpt_every is 2: this checkpoint exists only because of the signal
    ok(subfore("pretrain", "--config", cfg, "--resume-from", last))
    assert_same_losses(losses(run_dir(cfg)), reference)


def test_signal_during_setup_stops_at_the_first_step_and_on_the_last_step_finishes(phantom_dir, tmp_path):
    early = write_config(tmp_path / "early.yaml", phantom_dir)
    late = write_config(tmp_path / "late.yaml", phantom_dir, train={"max_steps": 2})
    stopped, finished = together(lambda: subfore("pretrain", "--config", early, fault="sigterm@start"),
                                 lambda: subfore("pretrain", "--config", late, fault="sigusr1@2"))
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert ckpt_step(run_dir(early) / "checkpoints" / "last.ckpt") == 1
    ok(finished)  # the run is complete: nothing to resume
    assert ckpt_step(run_dir(late) / "checkpoints" / "last.ckpt") == 2


def test_a_fresh_start_never_mixes_with_an_existing_run(phantom_dir, tmp_path, reference):
    cfg = write_config(tmp_path / "x.yaml", phantom_dir, train={"max_steps": 2})
    ok(subfore("pretrain", "--resume-if-exists", "--config", cfg))  # nothing there yet: starts
    again = subfore("pretrain", "--config", cfg, "--set", "train.max_steps=4")
    assert again.returncode == 1
    assert error_lines(again) == [f"error: {run_dir(cfg) / 'checkpoints' / 'last.ckpt'}: this run_dir already "
                                  f"holds a run; continue it with --resume, or choose another run_dir"]
    ok(subfore("pretrain", "--config", cfg, "--set", "train.max_steps=6", "--resume-if-exists"))
    assert [s for s, _ in losses(run_dir(cfg))] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_start_after_a_crash_before_any_checkpoint_starts_a_clean_log(phantom_dir, tmp_path, reference):
    cfg = write_config(tmp_path / "c.yaml", phantom_dir, train={"ckpt_every": 4})
    assert subfore("pretrain", "--config", cfg, fault="kill9@3").returncode == -signal.SIGKILL
    ok(subfore("pretrain", "--resume-if-exists", "--config", cfg))  # no checkpoint yet: starts again
    assert_same_losses(losses(run_dir(cfg)), reference)  # steps 1-2 of the dead run are not kept


def test_resume_without_a_checkpoint_is_one_line(phantom_dir, tmp_path):
    cfg = write_config(tmp_path / "n.yaml", phantom_dir)
    proc = subfore("pretrain", "--config", cfg, "--resume")
    assert proc.returncode == 1
    assert error_lines(proc) == [f"error: {run_dir(cfg) / 'checkpoints' / 'last.ckpt'}: no checkpoint to resume from"]


def test_accumulation_counts_optimiser_steps(phantom_dir, tmp_path):
    cfg = write_config(tmp_path / "a.yaml", phantom_dir, data={"val": str(phantom_dir / "dataset.json")},
                       train={"max_steps": 4, "accumulate": 2, "val_every": 2, "batch_size": 1})
    ok(subfore("pretrain", "--config", cfg))
    r = rows(run_dir(cfg))
    assert [x["step"] for x in r if "loss" in x] == [1, 2, 3, 4]
    assert [x["step"] for x in r if "val_loss" in x] == [2, 4]  # not after every 2 micro-batches (= every step)
    assert ckpt_step(run_dir(cfg) / "checkpoints" / "last.ckpt") == 4
    assert json.loads((run_dir(cfg) / "encoder.json").read_text())["step"] == 4


# --- two processes ------------------------------------------------------------------------------------
def test_two_processes_finish_agree_and_draw_distinct_crops(reference_two):
    run, proc = reference_two
    r = rows(run)
    train = [x for x in r if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes, once per step
    for x in train:
        assert len(x["rank_crop_digest"]) == 2 and x["rank_crop_digest"][0] != x["rank_crop_digest"][1]
        assert len(x["rank_mask_digest"]) == 2 and x["rank_mask_digest"][0] != x["rank_mask_digest"][1]
        assert x["loss"] == pytest.approx(sum(x["rank_loss"]) / 2)
    digests = r[-1]["replica_digests"]
    assert set(digests) == {"net", "teacher"}
    assert len(digests["teacher"]) == 2 and digests["teacher"][0] == digests["teacher"][1]
    assert digests["net"][0] == digests["net"][1]
    assert (run / "encoder.pt").exists() and ckpt_step(run / "checkpoints" / "last.ckpt") == 6
    assert proc.stdout.count("done:") >= 1


def test_two_processes_same_losses_with_workers(phantom_dir, tmp_path, reference_two):
    cfg = write_config(tmp_path / "w.yaml", phantom_dir, train=TWO, data={"num_workers": 2})
    ok(subfore("pretrain", "--config", cfg))
    assert losses(run_dir(cfg)) == losses(reference_two[0])  # bit-identical
    other = write_config(tmp_path / "seed1.yaml", phantom_dir, train=TWO, seed=1)
    ok(subfore("pretrain", "--config", other, "--set", "train.max_steps=1"))
    first = [x for x in rows(run_dir(other)) if "loss" in x][0]
    ref_first = [x for x in rows(reference_two[0]) if "loss" in x][0]
    assert first["rank_crop_digest"][0] != ref_first["rank_crop_digest"][0]  # another seed, other crops


def test_two_processes_signal_on_rank0_stops_both_and_resume_continues(phantom_dir, tmp_path, reference_two):
    cfg = write_config(tmp_path / "p.yaml", phantom_dir, train=TWO)
    stopped = subfore("pretrain", "--config", cfg, fault="sigusr1@4:0")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert ckpt_step(run_dir(cfg) / "checkpoints" / "last.ckpt") == 4
    ok(subfore("pretrain", "--config", cfg, "--resume"))
    assert_same_losses(losses(run_dir(cfg)), losses(reference_two[0]))


def test_two_processes_signal_inside_fit_before_training_stops_at_step_one(phantom_dir, tmp_path):
    cfg = write_config(tmp_path / "f.yaml", phantom_dir, train={**TWO, "max_steps": 3})
    stopped = subfore("pretrain", "--config", cfg, fault="sigterm@fit:0")  # with Lightning's handler: exit 0, no checkpoint
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert ckpt_step(run_dir(cfg) / "checkpoints" / "last.ckpt") == 1


def test_nan_on_one_rank_skips_the_step_on_every_rank(phantom_dir, tmp_path):
    """After a NaN at step 2 on rank 1 only, the state equals the state after step 1: weights, teacher, AdamW."""
    one = write_config(tmp_path / "one.yaml", phantom_dir, train={**TWO, "max_steps": 1})
    nan = write_config(tmp_path / "nan.yaml", phantom_dir, train={**TWO, "max_steps": 2})
    proc = together(lambda: ok(subfore("pretrain", "--config", one)),
                    lambda: ok(subfore("pretrain", "--config", nan, fault="nan@2:1")))[1]
    assert "step skipped on every rank" in proc.stderr
    a = torch.load(run_dir(one) / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(run_dir(nan) / "checkpoints" / "last.ckpt", weights_only=False)
    assert b["global_step"] == 2 and b["subfore"]["skipped_steps"] == 1
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert [x["skipped_steps"] for x in rows(run_dir(nan)) if "loss" in x] == [0, 1]
    strict = [json.loads(ln, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
              for ln in (run_dir(nan) / "metrics.jsonl").read_text().splitlines()]
    step2 = next(x for x in strict if x["step"] == 2 and "loss" in x)
    assert step2["loss"] is None and step2["skipped"] is True and "skipped" not in strict[0]


def test_max_bad_steps_stops_every_rank_with_the_same_line(phantom_dir, tmp_path):
    cfg = write_config(tmp_path / "bad.yaml", phantom_dir, train={**TWO, "max_bad_steps": 2})
    proc = subfore("pretrain", "--config", cfg, fault="nan@*:1")
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].startswith("error: 2 non-finite losses in a row (train.max_bad_steps)")


def few_cases(phantom_dir: Path, path: Path, n: int) -> Path:
    """A dataset.json of the first ``n`` training phantoms (labelled), none for validation."""
    meta = json.loads((phantom_dir / "dataset.json").read_text())
    cases = [{k: str(phantom_dir / v) for k, v in e.items()} for e in meta["training"][:n]]
    path.write_text(json.dumps({"training": cases}))
    return path


def drawn_twice(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if "drawn more than once within a step" in ln]


def test_two_volumes_on_two_ranks_warn_once_train_and_resume_exactly(phantom_dir, tmp_path):
    few = few_cases(phantom_dir, tmp_path / "two.json", 2)
    train = {**TWO, "batch_size": 2, "max_steps": 4}
    full = write_config(tmp_path / "full.yaml", phantom_dir, data={"train": str(few)}, train=train)
    cut = write_config(tmp_path / "cut.yaml", phantom_dir, data={"train": str(few)}, train=train)
    proc, stopped = together(lambda: ok(subfore("pretrain", "--config", full)),
                             lambda: subfore("pretrain", "--config", cut, fault="sigterm@3"))
    assert drawn_twice(proc) == [f"{few}: 2 volume(s) for 4 per step (train.batch_size=2 crops with "
                                 f"data.samples_per_volume=1 is 2 volume(s) on each of 2 rank(s)): volumes are drawn "
                                 f"more than once within a step"]
    assert [s for s, _ in losses(run_dir(full))] == [1, 2, 3, 4]
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    resumed = ok(subfore("pretrain", "--config", cut, "--resume"))
    assert_same_losses(losses(run_dir(cut)), losses(run_dir(full)))
    for shown in (proc.stdout + proc.stderr, resumed.stdout + resumed.stderr):  # this project's lines only
        assert "litlogger" not in shown and "weights_only" not in shown


def test_validation_loss_does_not_depend_on_the_process_count(phantom_dir, tmp_path):
    # lr 1e-12: both runs validate the same weights; each case's mask is seeded by the case, not by its rank.
    still = {"lr": 1e-12, "warmup_steps": 0}
    data = {"val": str(phantom_dir / "dataset.json"), "val_split": "training"}
    one = write_config(tmp_path / "one.yaml", phantom_dir, optim=still, data=data,
                       train={"max_steps": 2, "val_every": 2})
    two = write_config(tmp_path / "two.yaml", phantom_dir, optim=still, data=data,
                       train={**TWO, "max_steps": 2, "val_every": 2})
    together(lambda: ok(subfore("pretrain", "--config", one)), lambda: ok(subfore("pretrain", "--config", two)))
    val = [[x["val_loss"] for x in rows(run_dir(c)) if "val_loss" in x] for c in (one, two)]
    assert len(val[0]) == 1 and val[1] == pytest.approx(val[0], rel=1e-6, abs=0)


def test_one_labelled_case_on_two_ranks_finetunes_and_resumes_exactly(phantom_dir, tmp_path):
    one = few_cases(phantom_dir, tmp_path / "one.json", 1)
    data = {"train": str(one), "val": None, "samples_per_volume": 1}
    train = {"accelerator": "cpu", "devices": 2, "batch_size": 2, "max_steps": 4}
    full = write_config(tmp_path / "full.yaml", phantom_dir, kind="finetune", data=data, train=train)
    cut = write_config(tmp_path / "cut.yaml", phantom_dir, kind="finetune", data=data, train=train)
    proc, stopped = together(lambda: ok(subfore("finetune", "--config", full)),
                             lambda: subfore("finetune", "--config", cut, fault="sigterm@3"))
    assert len(drawn_twice(proc)) == 1 and drawn_twice(proc)[0].startswith(f"{one}: 1 volume(s) for 4 per step")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    ok(subfore("finetune", "--config", cut, "--resume"))
    assert_same_losses(losses(run_dir(cut)), losses(run_dir(full)))


def test_old_resume_with_a_path_answers_with_resume_from(phantom_dir, tmp_path):
    cfg = write_config(tmp_path / "r.yaml", phantom_dir)
    proc = subfore("pretrain", "--config", cfg, "--resume", tmp_path / "last.ckpt")
    assert proc.returncode == 1 and error_lines(proc) == [
        f"error: --resume takes no value (it continues RUN_DIR/checkpoints/last.ckpt); to continue from "
        f"{tmp_path / 'last.ckpt'}, give --resume-from {tmp_path / 'last.ckpt'}"]
    assert "Traceback" not in proc.stderr


def test_two_process_finetune_scores_each_validation_case_once(phantom_dir, tmp_path):
    # lr 1e-12: both runs validate the same (initial) weights, so their Dice must agree whatever the ranks did.
    still = {"lr": 1e-12, "warmup_steps": 0}
    cfg = write_config(tmp_path / "ft.yaml", phantom_dir, kind="finetune", optim=still,
                       train={"accelerator": "cpu", "devices": 2, "max_steps": 2, "val_every": 2})
    one = write_config(tmp_path / "one.yaml", phantom_dir, kind="finetune", optim=still,
                       train={"max_steps": 2, "val_every": 2})
    proc, _ = together(lambda: ok(subfore("finetune", "--config", cfg)), lambda: ok(subfore("finetune", "--config", one)))
    r = rows(run_dir(cfg))
    val = [x for x in r if "val_dice" in x]
    assert [x["val_cases"] for x in val] == [3]  # 3 cases on 2 ranks: padding would count 4
    assert [x["val_dice"] for x in val] == [x["val_dice"] for x in rows(run_dir(one)) if "val_dice" in x]
    assert r[-1]["replica_digests"]["net"][0] == r[-1]["replica_digests"]["net"][1]
    assert (run_dir(cfg) / "checkpoints" / "best.ckpt").exists()
    assert "done:" in proc.stdout


def test_finetune_sigterm_then_resume_gives_the_uninterrupted_losses(phantom_dir, tmp_path):
    ref = write_config(tmp_path / "fref.yaml", phantom_dir, kind="finetune", train={"max_steps": 4})
    cut = write_config(tmp_path / "fcut.yaml", phantom_dir, kind="finetune", train={"max_steps": 4},
                       data={"num_workers": 2})
    _, stopped = together(lambda: ok(subfore("finetune", "--config", ref)),
                          lambda: subfore("finetune", "--config", cut, fault="sigterm@2"))
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert not [x for x in rows(run_dir(cut)) if "val_dice" in x]  # no validation on the way out
    ok(subfore("finetune", "--config", cut, "--resume"))
    assert_same_losses(losses(run_dir(cut)), losses(run_dir(ref)))
    assert [x["step"] for x in rows(run_dir(cut)) if "val_dice" in x] == [3]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_torchrun_generates_phantoms_once_and_trains_hpm(tmp_path):
    ph = tmp_path / "ph"
    cfg = write_config(tmp_path / "tr.yaml", tmp_path / "unused", masking={"strategy": "hpm"},
                       data={"train": str(ph / "dataset.json"), "cache_dir": str(tmp_path / "cache"),
                             "phantoms": {"dir": str(ph), "n": 3, "spacing": [3.0, 3.0, 4.0]}},
                       train={"batch_size": 1, "max_steps": 2})
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2"]
    proc = ok(subfore("pretrain", "--config", cfg, launcher=torchrun))
    assert proc.stderr.count("generating 3 phantoms") == 1
    digests = rows(run_dir(cfg))[-1]["replica_digests"]
    assert len(digests["net"]) == 2 and digests["net"][0] == digests["net"][1]


# --- the data stream, in one process ------------------------------------------------------------------
def test_draws_depend_on_seed_and_index_only(phantom_dir, tmp_path):
    from itertools import islice

    from subfore.data import load_datalists, make_dataset, make_preset, pretrain_transforms
    from subfore.engine import DrawDataset, StepSampler

    items = load_datalists(str(phantom_dir / "dataset.json"), "training")
    transform = lambda: pretrain_transforms(make_preset("ct", spacing=(3.0, 3.0, 3.0)), (32, 32, 32))  # noqa: E731
    draws = lambda seed: DrawDataset(make_dataset(items, transform(), tmp_path / "c", cache_key=("t",)), seed)  # noqa: E731
    crop = lambda ds, g: torch.as_tensor(ds[g][0]["image"])  # noqa: E731

    r0, r1 = list(islice(iter(StepSampler(2, 0, 2)), 6)), list(islice(iter(StepSampler(2, 1, 2)), 6))
    assert r0 == [0, 1, 4, 5, 8, 9] and r1 == [2, 3, 6, 7, 10, 11]  # ranks interleave, never overlap
    assert next(iter(StepSampler(2, 1, 2, start=lambda: 3))) == 14  # resumed at micro-batch 3
    a, b, other = draws(0), draws(0), draws(1)
    assert sorted(a.volume_of(g) for g in range(3)) == [0, 1, 2]  # each epoch visits every volume once
    later = crop(b, 7)  # read out of order from a fresh dataset: draw 5 is still draw 5
    assert torch.equal(crop(a, 5), crop(b, 5)) and torch.equal(crop(a, 7), later)
    assert not torch.equal(crop(a, 5), crop(other, 5))
    same_volume = [g for g in range(3, 6) if a.volume_of(g) == a.volume_of(0)][0]
    assert not torch.equal(crop(a, 0), crop(a, same_volume))  # the same volume in the next epoch: another crop


# MAE on a tiny UNETR: 64³ crops, so 64 patches of 16³ and two ranks' masks do not coincide by chance.
VISIBLE = {"model": {"name": "unetr", "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4,
                     "encoding": "visible"},
           "decoder": {"width": 48, "depth": 1, "heads": 4}, "data": {"roi": [64, 64, 64]},
           "masking": {"strategy": "anatomask", "subvolume_size": 16, "loss": "mse", "norm_pix_loss": True}}


def test_visible_encoding_on_two_processes_stops_and_resumes_exactly(phantom_dir, tmp_path):
    ref = write_config(tmp_path / "vref.yaml", phantom_dir, **VISIBLE, train={**TWO, "max_steps": 4})
    cfg = write_config(tmp_path / "vstop.yaml", phantom_dir, **VISIBLE, train={**TWO, "max_steps": 4})
    _, stopped = together(lambda: ok(subfore("pretrain", "--config", ref)),
                          lambda: subfore("pretrain", "--config", cfg, fault="sigterm@3:0"))
    train = [x for x in rows(run_dir(ref)) if "loss" in x]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    assert all(x["rank_mask_digest"][0] != x["rank_mask_digest"][1] for x in train)
    digests = rows(run_dir(ref))[-1]["replica_digests"]
    assert digests["net"][0] == digests["net"][1] and digests["teacher"][0] == digests["teacher"][1]
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert ckpt_step(run_dir(cfg) / "checkpoints" / "last.ckpt") == 3
    ok(subfore("pretrain", "--config", cfg, "--resume"))
    assert_same_losses(losses(run_dir(cfg)), losses(run_dir(ref)))


@needs_real_ct
def test_visible_encoding_on_the_real_ct_then_finetune_loads_every_vit_tensor(tmp_path):
    """The shipped SubFore defaults (foreground ρ 0.6, λ 0.1) with MAE's encoding, on the real abdominal CT."""
    vis = {**VISIBLE, "masking": {"strategy": "foreground", "subvolume_size": 16},
           "data": {"train": str(REAL_CT), "roi": [64, 64, 64], "spacing": [3.0, 3.0, 3.0], "cache_dir": None}}
    cfg = write_config(tmp_path / "ct.yaml", tmp_path, **vis, train={"max_steps": 2, "ckpt_every": 2})
    ok(subfore("pretrain", "--config", cfg))
    run = run_dir(cfg)
    assert [x["step"] for x in rows(run) if "loss" in x] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["encoding"] == "visible"
    ft = {"model": {**{k: v for k, v in VISIBLE["model"].items() if k != "encoding"}, "out_channels": 3},
          "data": {"train": str(tmp_path / "ft.json"), "roi": [64, 64, 64], "spacing": [3.0, 3.0, 3.0],
                   "cache_dir": None, "label_map": {1: 1, 5: 2}}, "train": {"max_steps": 1, "val_every": 10}}
    (tmp_path / "ft.json").write_text(json.dumps({"training": [{"image": str(REAL_CT), "label": str(REAL_SEG)}]}))
    fcfg = write_config(tmp_path / "ft.yaml", tmp_path, kind="finetune", **ft)
    cfg_tree = yaml.safe_load(fcfg.read_text())
    cfg_tree["data"].pop("val"), cfg_tree["data"].pop("val_split")
    fcfg.write_text(yaml.safe_dump(cfg_tree))
    proc = ok(subfore("finetune", "--config", fcfg, "--pretrained", run))
    report = (run_dir(fcfg) / "pretrained_load.txt").read_text()
    from subfore.models.weights import read_state_dict

    vit = [k for k in read_state_dict(run / "encoder.pt") if k.startswith("vit.")]
    assert len(vit) > 20 and f"({len(vit)}/{len(vit)} of the encoder)" in report, report
    assert "not part of an MAE pretraining" in report and "decoder" in proc.stdout + proc.stderr
