"""Bad inputs to the training commands, through the console script: one line naming the file or option that is
wrong and what is wrong with it, exit 1, and nothing left behind (no run folder, no crop store, no data read, no
second TensorBoard log).

Every case is one ``subfore`` process; they run at the same time, once per module (``cases``), and each test checks
one of them. None trains: each fails before training, or on its first volume.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
import yaml
from test_runs import subfore, write_config

from subfore.config import FinetuneConfig, load_config
from subfore.errors import ConfigError
from subfore.finetune.module import SegmentationModel
from subfore.pretrain.module import MaskedImageModel


def config(base: Path, name: str, kind: str = "pretrain", **sections) -> Path:
    """A tiny config whose data (phantoms generated on first read), crop store and run folder are its own: any of
    them present after a run means the run read data, built the store or wrote its folder."""
    data = {"train": str(base / f"gen_{name}" / "dataset.json"), "val": None, "cache_dir": str(base / f"cache_{name}"),
            "phantoms": {"dir": str(base / f"gen_{name}"), "n": 2}, **sections.pop("data", {})}
    return write_config(base / f"{name}.yaml", base, kind, data=data, **sections)


def module(cfg: Path, kind: str, *overrides: str):
    if kind == "pretrain":
        return MaskedImageModel(load_config(cfg, list(overrides)))
    return SegmentationModel(load_config(cfg, list(overrides), FinetuneConfig))


def lightning_checkpoint(path: Path, net) -> Path:
    """A training checkpoint of the module ``net`` with the entries Lightning writes to RUN_DIR/checkpoints/last.ckpt
    (its loops at their start, no optimiser state yet): Lightning resumes from it."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loops = {name: getattr(trainer, name).state_dict() for name in ("fit_loop", "validate_loop", "test_loop",
                                                                     "predict_loop")}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__,
                "state_dict": net.state_dict(), "loops": loops, "callbacks": {}, "optimizer_states": [],
                "lr_schedulers": [], "hparams_name": None, "hyper_parameters": dict(net.hparams),
                "subfore": {"skipped_steps": 0, "bad_in_a_row": 0}}, path)
    return path


def reshaped(path: Path, checkpoint, here) -> str:
    """The line of a checkpoint whose tensors have other shapes than this config's network (none missing)."""
    theirs, mine = checkpoint.state_dict(), here.state_dict()
    diff = [k for k in mine if theirs[k].shape != mine[k].shape]
    first = diff[0]
    return (f"error: {path}: its weights do not fit the network this config builds (tensors: {len(diff)} of another "
            f"shape; e.g. {first} is {list(theirs[first].shape)} in the checkpoint, {list(mine[first].shape)} here); "
            f"resume with the config of the run that wrote it (its config.yaml)")


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def cases(phantom_dir, tmp_path_factory):
    """({name: (the finished process, the line it must print, the config it ran, its run folder before: {path:
    bytes})}, the folder of every case's files)."""
    base = tmp_path_factory.mktemp("bad_runs")
    todo: dict[str, tuple[list, str, Path]] = {}

    # (a) --resume-from / --resume with a file that is not a training checkpoint of that command and network.
    pre, fin = config(base, "pre"), config(base, "fin", "finetune")
    listed = base / "list.pt"
    torch.save([1, 2, 3], listed)
    todo["list"] = (["pretrain", "--config", pre, "--resume-from", listed],
                    f"error: {listed}: not a training checkpoint (it holds a list), so a subfore pretrain run has "
                    f"nothing to resume from it", pre)
    pre_net = module(pre, "pretrain")
    encoder = base / "other" / "encoder.pt"
    encoder.parent.mkdir()
    torch.save({k: v for k, v in pre_net.net.state_dict().items()}, encoder)
    todo["encoder"] = (["pretrain", "--config", pre, "--resume-from", encoder],
                       f"error: {encoder}: a weights file (a bare state_dict), not a training checkpoint, so a subfore "
                       f"pretrain run has nothing to resume from it; to start from these weights, give --init-from "
                       f"{encoder}", pre)
    fin_ckpt = lightning_checkpoint(base / "fin_run" / "checkpoints" / "last.ckpt", module(fin, "finetune"))
    todo["finetune_to_pretrain"] = (["pretrain", "--config", pre, "--resume-from", fin_ckpt],
                                    f"error: {fin_ckpt}: a checkpoint of subfore finetune, not of subfore pretrain, "
                                    f"which resumes only its own runs; to start from its weights, give --init-from "
                                    f"{fin_ckpt}", pre)
    pre_ckpt = lightning_checkpoint(base / "pre_run" / "checkpoints" / "last.ckpt", pre_net)
    todo["pretrain_to_finetune"] = (["finetune", "--config", fin, "--resume-from", pre_ckpt],
                                    f"error: {pre_ckpt}: a checkpoint of subfore pretrain, not of subfore finetune, "
                                    f"which resumes only its own runs; to start from its weights, give --pretrained "
                                    f"{base / 'pre_run' / 'encoder.pt'}", fin)
    # --resume: RUN_DIR/checkpoints/last.ckpt of a wider network (pretraining) or of fewer classes (finetuning).
    for kind, cfg, over in (("pretrain", pre, "model.feature_size=8"), ("finetune", fin, "model.out_channels=3")):
        wide = config(base, f"{kind}_other_net", kind)
        last = Path(yaml.safe_load(wide.read_text())["run_dir"]) / "checkpoints" / "last.ckpt"
        theirs = module(cfg, kind, over)
        lightning_checkpoint(last, theirs)
        todo[f"{kind}_other_net"] = ([kind, "--config", wide, "--resume"], reshaped(last, theirs, module(cfg, kind)),
                                     wide)

    # (b) a bad --set key is the option's error, not the file's; an empty config file is refused.
    todo["set_key"] = (["pretrain", "--config", pre, "--set", "data.fooo=1"],
                       "error: --set data.fooo=1: unknown key 'data.fooo'", pre)
    empty = base / "empty.yaml"
    empty.write_text("# settings to come\n")
    todo["empty"] = (["pretrain", "--config", empty], f"error: {empty}: the config file is empty (no settings); give "
                     f"a config with its sections (see configs/)", empty)

    # (c) runs that fail on their first volume, after writing config.yaml and the TensorBoard log.
    broken = base / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 not a volume")  # a gzip header, then no deflate stream
    image = phantom_dir / "imagesTr" / "phantom_000.nii.gz"
    unread = f"error: {broken}: cannot be read as an image (error: Error -3 while decompressing data: invalid stored " \
             f"block lengths)"
    fresh = config(base, "fresh", run_dir=str(base / "runs_fresh" / "fresh"),
                   data={"train": [str(broken), str(image)], "phantoms": None, "cache_dir": None},
                   train={"batch_size": 1})
    todo["fresh_fails"] = (["pretrain", "--config", fresh], unread, fresh)
    labels = base / "broken_label.json"
    labels.write_text(json.dumps({"training": [{"image": str(image), "label": str(broken)}]}))
    fresh_fin = config(base, "fresh_fin", "finetune", run_dir=str(base / "runs_fresh_fin" / "fresh_fin"),
                       data={"train": str(labels), "phantoms": None, "cache_dir": None})
    todo["fresh_finetune_fails"] = (["finetune", "--config", fresh_fin],
                                    unread.replace("as an image", "as a label map"), fresh_fin)
    resumed = config(base, "resumed", data={"train": [str(broken), str(image)], "phantoms": None, "cache_dir": None},
                     train={"batch_size": 1})
    run = Path(yaml.safe_load(resumed.read_text())["run_dir"])
    lightning_checkpoint(run / "checkpoints" / "last.ckpt", module(resumed, "pretrain"))
    (run / "config.yaml").write_text(resumed.read_text())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"earlier run")
    todo["resumed_fails"] = (["pretrain", "--config", resumed, "--resume"], unread, resumed)

    # (d) a run_dir that is a file, or under a folder nobody may write to (/sys: root neither).
    a_file = base / "a_file"
    a_file.write_text("not a folder")
    todo["run_dir_file"] = (["pretrain", "--config", pre, "--set", f"run_dir={a_file}"],
                            f"error: run_dir {a_file}: exists and is not a folder", pre)
    todo["run_dir_unwritable"] = (["pretrain", "--config", pre, "--set", "run_dir=/sys/subfore_run"],
                                  "error: run_dir /sys/subfore_run: the folder /sys is not writable by this user", pre)

    before = {name: listing(Path(yaml.safe_load(cfg.read_text())["run_dir"])) for name, (_, _, cfg) in todo.items()
              if cfg != empty}
    with ThreadPoolExecutor(min(len(todo), 2 * (os.cpu_count() or 1))) as pool:
        procs = dict(zip(todo, pool.map(lambda args: subfore(*args), [args for args, _, _ in todo.values()])))
    return {name: (procs[name], line, cfg, before.get(name)) for name, (_, line, cfg) in todo.items()}, base


def one_line(cases, name: str):
    """The case's process: exit 1 and exactly its line on stderr; its run folder as it was (absent: still absent),
    its data never read (no phantoms generated), no crop store built."""
    (proc, line, cfg, before), base = cases[0][name], cases[1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == [line]
    tree = yaml.safe_load(cfg.read_text()) or {}
    if tree:
        run = Path(tree["run_dir"])
        assert (listing(run) if run.is_dir() else None) == (before or None)
        assert not (base / f"gen_{cfg.stem}").exists() and not (base / f"cache_{cfg.stem}").exists()


@pytest.mark.parametrize("name", ["list", "encoder", "finetune_to_pretrain", "pretrain_to_finetune",
                                  "pretrain_other_net", "finetune_other_net"])
def test_resume_from_a_file_that_is_not_a_checkpoint_of_this_run_is_one_line_before_any_work(cases, name):
    one_line(cases, name)


@pytest.mark.parametrize("name", ["set_key", "empty"])
def test_a_bad_set_key_names_the_option_and_an_empty_config_is_refused(cases, name):
    one_line(cases, name)


@pytest.mark.parametrize("name", ["run_dir_file", "run_dir_unwritable"])
def test_a_run_dir_that_cannot_hold_a_run_is_one_sentence_before_any_work(cases, name):
    if name == "run_dir_unwritable" and not Path("/sys").is_dir():
        pytest.skip("no /sys here (not Linux)")
    one_line(cases, name)


@pytest.mark.parametrize("name", ["fresh_fails", "fresh_finetune_fails", "resumed_fails"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_its_folder_as_it_was(cases, name):
    (proc, line, cfg, before), base = cases[0][name], cases[1]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [line]  # (and Lightning's banner)
    assert "Traceback" not in proc.stderr
    run = Path(yaml.safe_load(cfg.read_text())["run_dir"])
    if before:  # resumed: every earlier file as it was (checkpoint, log, metrics), no second TensorBoard log
        assert listing(run) == before
    else:  # fresh: no config.yaml, no tensorboard/, no run folder, nor the runs/ folder made for it
        assert not run.exists() and not run.parent.exists()


def test_errors_of_the_file_and_of_set_each_name_their_source(phantom_dir, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", phantom_dir, extra={"key": 1})
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["train.max_steps=2", "data.fooo=1", "data.roi=[8, 8, 8]", "data.roi=many"])
    assert str(err.value) == (f"--set data.roi=many: 'data.roi': Input should be a valid tuple (got 'many'); --set "
                              f"data.fooo=1: unknown key 'data.fooo'; {cfg}: unknown key 'extra'")


def test_a_failed_run_in_a_shared_folder_takes_back_only_its_own_files(tmp_path):
    """run_dir '.' beside other work: what the run wrote goes, what others wrote or changed meanwhile stays."""
    from subfore.engine.run import RunFolder

    (tmp_path / "mydata").mkdir()
    (tmp_path / "notes.txt").write_text("before")
    (tmp_path / "config.yaml").write_text("earlier run")
    with pytest.raises(ValueError), RunFolder(tmp_path):
        (tmp_path / "config.yaml").write_text("this run")
        (tmp_path / "tensorboard").mkdir()
        (tmp_path / "tensorboard" / "events").write_text("x")
        (tmp_path / "mydata" / "new.txt").write_text("someone else's")
        (tmp_path / "notes.txt").write_text("edited meanwhile")
        raise ValueError("the run failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "mydata", "notes.txt"]
    assert (tmp_path / "config.yaml").read_text() == "earlier run"
    assert (tmp_path / "notes.txt").read_text() == "edited meanwhile"
    assert (tmp_path / "mydata" / "new.txt").read_text() == "someone else's"
