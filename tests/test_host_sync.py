"""The training step reads nothing from the device except once per logged step; a skipped step moves nothing.

Reads are counted on CPU by patching the Tensor methods that hand a value to Python (item, tolist, cpu, numpy,
bool, float, int): on a GPU each one waits for the device. They are counted from the first training batch to the
end of training; checkpoint saves and encoder exports (which copy every weight to the host) and the data loader
(host tensors) are left out.
"""

from __future__ import annotations

import json
import traceback

import pytest
import torch
from torch.utils.data.dataloader import _BaseDataLoaderIter

from subfore.config import load_config
from subfore.errors import SubforeError
from subfore.pretrain import MaskedImageModel, pretrain

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def config(phantom_dir, tmp_path, strategy: str, **train) -> dict:
    return {
        "run_dir": str(tmp_path / "run"), "seed": 0,
        "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "num_workers": 0,
                 "cache_dir": str(phantom_dir.parent / "cache_runs")},
        "model": {"name": "basicunet", "feature_size": 4},
        "masking": {"strategy": strategy, "ratio": 0.6, "subvolume_size": 16},
        "optim": {"warmup_steps": 1},
        "train": {"batch_size": 2, "progress_bar": False, "snapshot_every": 0, **train},
    }


class ReadCounter:
    """Counts device reads while ``on`` (and not paused); keeps where each came from, for the failure message."""

    def __init__(self, monkeypatch) -> None:
        self.on, self.paused, self.where = False, 0, []
        for name in READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def read(tensor, *args, **kwargs):
            if self.on and not self.paused:
                caller = traceback.extract_stack(limit=2)[0]
                # MONAI's DiceLoss lists its reduction axes from torch.arange on the host: no device involved.
                if not caller.filename.replace("\\", "/").endswith("monai/losses/dice.py"):
                    self.where.append(f"{name} at {caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}")
            return original(tensor, *args, **kwargs)

        return read

    def pause(self, fn):
        def paused(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1

        return paused


def count_reads(monkeypatch, run) -> list[str]:
    """Call ``run`` (a training); the device reads of its training steps."""
    import lightning.pytorch as pl

    from subfore.engine import RunModule
    from subfore.engine.run import RunControl

    counter = ReadCounter(monkeypatch)
    start, end = RunModule.on_train_batch_start, RunControl.on_train_end

    def on_train_batch_start(self, batch, batch_idx):
        counter.on = True
        return start(self, batch, batch_idx)

    def on_train_end(self, trainer, module):
        counter.on = False
        return end(self, trainer, module)

    monkeypatch.setattr(RunModule, "on_train_batch_start", on_train_batch_start)
    monkeypatch.setattr(RunControl, "on_train_end", on_train_end)
    monkeypatch.setattr(pl.Trainer, "save_checkpoint", counter.pause(pl.Trainer.save_checkpoint))
    monkeypatch.setattr(MaskedImageModel, "export_encoder", counter.pause(MaskedImageModel.export_encoder))
    # Loading with num_workers 0 reads host tensors in this process; with workers it happens elsewhere.
    monkeypatch.setattr(_BaseDataLoaderIter, "__next__", counter.pause(_BaseDataLoaderIter.__next__))
    run()
    return counter.where


@pytest.mark.parametrize("strategy", ["foreground", "anatomask"])
def test_one_device_read_per_logged_step(phantom_dir, tmp_path, monkeypatch, strategy):
    # 5 steps, log_every 4: steps 1, 4 and 5 (the last) are logged, steps 2 and 3 read nothing.
    tree = config(phantom_dir, tmp_path, strategy, max_steps=5, log_every=4, ckpt_every=5)
    reads = count_reads(monkeypatch, lambda: pretrain(load_config(None, [], base=tree)))
    assert len(reads) == 3, reads
    assert all(r.startswith("tolist at module.py") for r in reads), reads
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 4, 5]


def test_mae_with_exact_count_masks_reads_once_per_logged_step(phantom_dir, tmp_path, monkeypatch):
    """MAE (UNETR, visible encoding), random masks of ratio 0.75: the visible-token count N − round(ρN) is known on
    the host, so the step reads nothing (a data-dependent count would be read once per step)."""
    tree = config(phantom_dir, tmp_path, "random", max_steps=5, log_every=4, ckpt_every=5)
    tree["model"] = {"name": "unetr", "feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4,
                     "encoding": "visible"}
    tree["decoder"] = {"width": 32, "depth": 1, "heads": 4}
    tree["masking"]["ratio"] = 0.75
    reads = count_reads(monkeypatch, lambda: pretrain(load_config(None, [], base=tree)))
    assert len(reads) == 3 and all(r.startswith("tolist at module.py") for r in reads), reads


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.75, 0.9])
def test_the_host_bound_of_visible_tokens_is_the_count_an_exact_random_mask_leaves(ratio):
    """visible_bound against the masks themselves: every sample leaves exactly that many patches visible."""
    from types import SimpleNamespace

    from subfore.masking.random import RandomMask

    masker = RandomMask(ratio=ratio)
    mask = masker.build(torch.zeros(6, 1, 96, 96, 64), (6, 6, 4), torch.Generator().manual_seed(0))
    patches = mask.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)  # 32³ subvolumes
    bound = MaskedImageModel.visible_bound(SimpleNamespace(masker=masker), patches, mask)
    assert bound == (144 - round(144 * ratio)) * 8
    assert (~patches).flatten(1).sum(1).tolist() == [bound] * 6
    assert MaskedImageModel.visible_bound(SimpleNamespace(masker=masker), patches, None) == 144 * 8


def test_finetuning_reads_once_per_logged_step(phantom_dir, tmp_path, monkeypatch):
    from subfore.finetune import FinetuneConfig, finetune

    # 4 steps, log_every 3: steps 1 and 3 are logged (finetuning does not log the last step as such).
    tree = {"run_dir": str(tmp_path / "ft"),
            "data": {"train": str(phantom_dir / "dataset.json"), "roi": [32, 32, 32], "spacing": [3.0, 3.0, 3.0],
                     "samples_per_volume": 2, "cache_dir": str(tmp_path / "cache"), "num_workers": 0},
            "model": {"name": "basicunet", "feature_size": 4, "out_channels": 14},
            "train": {"max_steps": 4, "batch_size": 2, "ckpt_every": 4, "log_every": 3, "progress_bar": False}}
    reads = count_reads(monkeypatch, lambda: finetune(load_config(None, [], FinetuneConfig, base=tree)))
    assert len(reads) == 2 and all(r.startswith("tolist at module.py") for r in reads), reads
    rows = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 3]


def snapshot(module: MaskedImageModel) -> dict:
    """Weights, EMA teacher and AdamW state of ``module``, cloned."""
    state = {f"net.{k}": v.detach().clone() for k, v in module.net.state_dict().items()}
    state.update({f"teacher.{k}": v.detach().clone() for k, v in module.teacher.state_dict().items()})
    opt = module.trainer.optimizers[0]
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        for k, v in opt.state.get(p, {}).items():
            state[f"opt.{i}.{k}"] = v.detach().clone()
    return state


def test_a_non_finite_step_moves_nothing_and_counts_across_resume(phantom_dir, tmp_path, monkeypatch):
    """NaN at step 2, which is not a logged step: weights, EMA teacher and AdamW (exp_avg, exp_avg_sq, step) after
    step 2 equal those after step 1 bit for bit; step 3 moves them again; the count survives a resume."""
    states = []
    note, ended = MaskedImageModel.note_loss, MaskedImageModel.step_ended

    def note_loss(self, loss, shown=None):
        note(self, loss * float("nan") if self.global_step + 1 == 2 else loss, shown)

    def step_ended(self):
        ended(self)
        states.append(snapshot(self))

    monkeypatch.setattr(MaskedImageModel, "note_loss", note_loss)
    monkeypatch.setattr(MaskedImageModel, "step_ended", step_ended)
    tree = config(phantom_dir, tmp_path, "anatomask", max_steps=3, log_every=3, ckpt_every=3)
    pretrain(load_config(None, [], base=tree))
    first, skipped, third = states
    assert first.keys() == skipped.keys() and any(k.endswith(".exp_avg") for k in first)
    assert int(skipped["opt.0.step"]) == 1
    for key in first:
        assert torch.equal(first[key], skipped[key]), key
    assert not torch.equal(third["net.conv_0.conv_0.conv.weight"], skipped["net.conv_0.conv_0.conv.weight"])
    assert not torch.equal(third["teacher.conv_0.conv_0.conv.weight"],
                           skipped["teacher.conv_0.conv_0.conv.weight"])
    assert int(third["opt.0.step"]) == 2
    run = tmp_path / "run"
    rows = lambda: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [(r["step"], r["skipped_steps"]) for r in rows()] == [(1, 0), (3, 1)]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["subfore"]["skipped_steps"] == 1
    pretrain(load_config(None, ["train.max_steps=4"], base=tree), resume="last")
    assert [(r["step"], r["skipped_steps"]) for r in rows()] == [(1, 0), (3, 1), (4, 1)]


def test_max_bad_steps_stops_at_the_next_read_and_nothing_moved(phantom_dir, tmp_path, monkeypatch):
    """NaN at every step, max_bad_steps 2, log_every 3: reached at step 2, raised at step 3 (the next read);
    the weights are still the initial ones."""
    start = {}
    note = MaskedImageModel.note_loss
    monkeypatch.setattr(MaskedImageModel, "note_loss", lambda self, loss, shown=None: note(self, loss * float("nan")))
    on_start = MaskedImageModel.on_train_start
    monkeypatch.setattr(MaskedImageModel, "on_train_start", lambda self: (start.update(
        {k: v.detach().clone() for k, v in self.net.state_dict().items()}), on_start(self)))
    steps = []
    ended = MaskedImageModel.step_ended
    monkeypatch.setattr(MaskedImageModel, "step_ended", lambda self: (steps.append(self.global_step + 1),
                                                                      ended(self)))
    captured = {}
    read = MaskedImageModel._apply_counts

    def apply_counts(self, counts):
        captured["net"] = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        read(self, counts)

    monkeypatch.setattr(MaskedImageModel, "_apply_counts", apply_counts)
    tree = config(phantom_dir, tmp_path, "foreground", max_steps=6, log_every=3, ckpt_every=6, max_bad_steps=2)
    with pytest.raises(SubforeError, match=r"^2 non-finite losses in a row \(train.max_bad_steps\), reached at "
                                           r"step 2: lower optim.lr"):
        pretrain(load_config(None, [], base=tree))
    assert steps == [1, 2, 3]
    for k, v in start.items():
        assert torch.equal(captured["net"][k], v), k


def test_two_processes_stop_one_step_after_a_signal_between_logged_steps(phantom_dir, tmp_path):
    """Between logged steps ranks agree on a stop through the previous step's all-reduced flag: SIGUSR1 on rank 0
    as step 4 begins (log_every 10, no read at steps 2-5) saves and stops both ranks at step 5, not 4 (tests/
    test_runs.py covers the stop at a logged step, which stays at that step)."""
    from test_runs import TWO, ckpt_step, error_lines, run_dir, subfore, write_config

    cfg = write_config(tmp_path / "late.yaml", phantom_dir, train={**TWO, "log_every": 10})
    proc = subfore("pretrain", "--config", cfg, fault="sigusr1@4:0")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert ckpt_step(run_dir(cfg) / "checkpoints" / "last.ckpt") == 5
    lines = error_lines(proc)
    assert len(lines) == 2 and all("stopped by a signal at step 5" in ln for ln in lines), lines


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_gradscaler_skips_is_applied_nowhere(fused):
    """16-mixed: a step whose scaled gradients overflow is skipped by GradScaler; the optimiser reports it as not
    applied (fused: ``applied`` 0 on the device; not fused: ``step`` never runs), so the EMA teacher, whose lerp
    weight is (1 − m) × applied, does not move either."""
    from subfore.engine.module import SkippingAdamW

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = SkippingAdamW(net.parameters(), lr=0.1, fused=fused)
    scaler = torch.amp.GradScaler("cpu")
    calls = []
    opt.register_step_post_hook(lambda *a: calls.append(1))

    def step(x):
        opt.zero_grad()
        scaler.scale(net(x).sum()).backward()
        opt.skip = torch.zeros(())
        scaler.step(opt)
        scaler.update()

    step(torch.ones(3, 4))
    assert len(calls) == 1 and (opt.applied is None or float(opt.applied) == 1.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[net.weight].items()}
    step(torch.full((3, 4), float("inf")))
    if fused:
        assert len(calls) == 2 and float(opt.applied) == 0.0
    else:
        assert len(calls) == 1  # GradScaler did not call the optimiser: RunModule's post-hook sees no step taken
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in opt.state[net.weight].items():
        assert torch.equal(v, state[k]), k
