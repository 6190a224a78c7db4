"""Teacher-guided masking: composition with a stub teacher, schedules, HPM's objective, EMA and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from subfore.masking import compose_mask, ema_momentum, foreground_grid, hard_share, make_generator
from subfore.masking.teacher import ranking_loss, spearman
from test_masking import BRIGHT, bright_volume, gen
from subfore.config import load_config
from test_pretrain import base_config, run_cfg


def stub_scores(b: int, n: int = 64) -> torch.Tensor:
    """Distinct known scores: cell i of sample s scores (i * 37 + s * 11) mod n."""
    i = torch.arange(n)
    return torch.stack([((i * 37 + s * 11) % n).float() for s in range(b)]).view(b, 4, 4, 4)


@pytest.mark.parametrize("r_t", [0.0, 0.25, 0.5, 1 / 3, 1.0])
def test_top_candidates_always_masked_and_total_exact(r_t):
    scores = stub_scores(3)
    cand = torch.ones(3, 4, 4, 4, dtype=torch.bool)
    k = round(0.6 * 64)
    h = math.ceil(r_t * k - 1e-9)
    for seed in range(10):
        mask, hard = compose_mask(scores, cand, 0.6, r_t, gen(seed))
        assert mask.flatten(1).sum(1).tolist() == [k] * 3
        assert hard.flatten(1).sum(1).tolist() == [h] * 3
        top = scores.flatten(1).topk(h, dim=1).indices
        assert mask.flatten(1).gather(1, top).all()  # the ⌈r_t·k⌉ hardest are always in
    # The random part really is random: two seeds differ once r_t < 1.
    if r_t < 1:
        assert not torch.equal(compose_mask(scores, cand, 0.6, r_t, gen(0))[0], compose_mask(scores, cand, 0.6, r_t, gen(1))[0])


@pytest.mark.parametrize("gate", [None, "foreground"])
@pytest.mark.parametrize("strategy", ["anatomask", "hpm"])
def test_teacher_generator_always_masks_the_scorers_top_cells(strategy, gate):
    x = bright_volume(BRIGHT, batch=2)
    g = make_generator(strategy, ratio=0.6, gate=gate, threshold=0.1)
    seen = []
    g.scorer = lambda x, cand, generator: seen.append(cand.clone()) or stub_scores(2)
    g.step, g.total_steps = 50, 100  # r_t = 0.25
    fg = foreground_grid(x, 16, 0.1)
    cand = fg if gate else torch.ones_like(fg)
    # k = round(0.6 · 10 foreground) = 6 gated, round(0.6 · 64) = 38 not; ⌈0.25 · 6⌉ = 2, ⌈0.25 · 38⌉ = 10 hard cells:
    # the best-scoring candidates. Random masking would keep all of them in 20 samples by chance with probability
    # (6/10 · 5/9)^20 ≈ 3e-10 gated, (∏_{i<10} (38 − i)/(64 − i))^20 ≈ 1e-50 not.
    k, h = (6, 2) if gate else (38, 10)
    top = stub_scores(2).masked_fill(~cand, float("-inf")).flatten(1).topk(h, dim=1).indices
    masks = []
    for seed in range(10):
        mask = g(x, gen(seed))
        assert mask.flatten(1).sum(1).tolist() == [k, k]
        assert mask.flatten(1).gather(1, top).all()  # every seed, every sample: the scorer's top h are in
        assert not (mask & ~cand).any()  # gated: never background
        masks.append(mask)
    assert any(not torch.equal(masks[0], m) for m in masks[1:])  # the other k − h cells are drawn at random
    assert len(seen) == 10 and all(torch.equal(c, cand) for c in seen)  # the scorer was asked about the candidates
    # The hard cells' foreground share: all of them gated; ungated, 1 of the 20 (sample 0's top 10 hold one bright
    # cell, sample 1's none).
    assert float(g.last_stats["teacher_fg_share"]) == pytest.approx(1.0 if gate else 1 / 20)


def test_hard_share_schedule_endpoints():
    assert hard_share(0, 100) == 0.0
    assert hard_share(50, 100) == pytest.approx(0.25)
    assert hard_share(100, 100) == pytest.approx(0.5)
    assert hard_share(0, 100, order="hard-to-easy") == pytest.approx(0.5)
    assert hard_share(100, 100, order="hard-to-easy") == 0.0
    g = make_generator("hpm")
    g.total_steps = 10
    assert [round(g.r_t, 3) for g.step in (0, 5, 10)] == [0.0, 0.25, 0.5]


def test_ema_momentum_follows_anatomask_schedule():
    # AnatoMask: 0.999 at step 0, raised linearly to 0.9999 over the first quarter of training, then held.
    from subfore.config import MaskingConfig
    assert MaskingConfig().ema_ramp == "linear"
    assert ema_momentum(5, 100) == pytest.approx(0.999 + 0.0009 * 5 / 25)
    assert ema_momentum(0, 100) == pytest.approx(0.999)
    assert ema_momentum(25, 100) == pytest.approx(0.9999)
    assert ema_momentum(60, 100) == pytest.approx(0.9999)
    assert ema_momentum(100, 100) == pytest.approx(0.9999)
    mid = (0.999 + 0.9999) / 2
    assert ema_momentum(12.5, 100, ramp="linear") == pytest.approx(mid)
    assert ema_momentum(12.5, 100, ramp="cosine") == pytest.approx(mid)  # cosine midpoint is the mean too
    # cosine rises slower at first: the teacher's update 1 − m a fifth of the way up is 11 % larger
    assert (1 - ema_momentum(5, 100, ramp="cosine")) / (1 - ema_momentum(5, 100)) == pytest.approx(1.115, abs=2e-3)
    assert ema_momentum(50, 100, 0.9, 0.99, "linear", ramp_fraction=1.0) == pytest.approx(0.945)


def test_ranking_loss_rewards_correct_order():
    true = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False]])
    good = ranking_loss(true * 10, true, mask, 512, gen())
    bad = ranking_loss(-true * 10, true, mask, 512, gen())
    flat = ranking_loss(torch.zeros_like(true), true, mask, 512, gen())
    assert good < 1e-3 and bad > 5 and flat == pytest.approx(math.log(2), rel=1e-4)
    # Hand-computed: one pair (cells 0, 1), prediction difference 0 → BCE = log 2.
    two = torch.tensor([[True, True, False, False]])
    assert ranking_loss(torch.zeros(1, 4), true, two, 64, gen()) == pytest.approx(math.log(2), rel=1e-4)


def test_spearman_known_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert float(spearman(a, a ** 3)) == pytest.approx(1.0)
    assert float(spearman(a, -a)) == pytest.approx(-1.0)
    assert float(spearman(a, torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0]))) == pytest.approx(0.8)


@pytest.mark.parametrize("strategy,gate", [("anatomask", None), ("anatomask", "foreground"), ("hpm", None),
                                           ("hpm", "foreground")])
def test_teacher_strategies_train_and_log(phantom_dir, tmp_path, strategy, gate):
    tree = base_config(phantom_dir, tmp_path, masking={"strategy": strategy, "gate": gate},
                       train={"max_steps": 3})
    run_cfg(tree)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["r_t"] for r in lines] == pytest.approx([0.0, 0.5 / 3, 1.0 / 3])
    for r in lines[1:]:  # at step 0 r_t = 0: no hard cells
        if gate and r["fallbacks"] == 0:  # an all-air crop falls back to all cells (and is counted)
            assert r["masked_fraction"] <= r["foreground_fraction"] + 1e-6
            assert r["teacher_fg_share"] == 1.0  # the gate: every hard cell is foreground
        if strategy == "hpm":
            assert math.isfinite(r["predictor_loss"]) and r["predictor_loss"] > 0
    # The exported encoder carries no teacher weights.
    assert not any(k.startswith("teacher.") for k in torch.load(tmp_path / "run" / "encoder.pt", weights_only=True))


def test_teacher_is_the_closed_form_ema_of_the_student(phantom_dir, tmp_path, monkeypatch):
    from subfore.pretrain import MaskedImageModel

    steps, m0, m1 = 4, 0.5, 0.9
    tree = base_config(phantom_dir, tmp_path, masking={"strategy": "anatomask", "ema_momentum": m0,
                                                       "ema_momentum_end": m1, "ema_ramp": "linear",
                                                       "ema_ramp_fraction": 0.5},
                       train={"max_steps": steps, "ckpt_every": steps})
    students, original = [], MaskedImageModel.after_step

    def record(self):  # the student right after each optimiser step, before the teacher follows it
        students.append({k: v.detach().clone() for k, v in self.net.state_dict().items()})
        original(self)

    start = {}
    monkeypatch.setattr(MaskedImageModel, "after_step", record)
    monkeypatch.setattr(MaskedImageModel, "on_train_start",
                        lambda self: start.update({k: v.detach().clone() for k, v in self.net.state_dict().items()}))
    run_cfg(tree)
    assert len(students) == steps
    # Momentum by hand: linear 0.5 → 0.9 over the first 2 of 4 steps, then held: 0.5, 0.7, 0.9, 0.9.
    momenta = [0.5, 0.7, 0.9, 0.9]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, p in MaskedImageModel(load_config(None, [], base=tree)).net.named_parameters():
        t = start[name].double()
        for m, s in zip(momenta, students):
            t = m * t + (1 - m) * s[name].double()
        assert torch.allclose(ckpt["teacher." + name].double(), t, atol=1e-6), name
    assert not torch.allclose(ckpt["teacher.conv_0.conv_0.conv.weight"], start["conv_0.conv_0.conv.weight"])


@pytest.mark.parametrize("strategy", ["anatomask", "hpm"])
def test_real_teacher_scores_choose_the_hard_cells(phantom_dir, tmp_path, monkeypatch, strategy):
    import subfore.masking.teacher as teacher_mod
    from subfore.pretrain import MaskedImageModel

    tree = base_config(phantom_dir, tmp_path, masking={"strategy": strategy, "fill": "zero", "rT": 0.5},
                       data={"roi": [64, 64, 64]})
    module = MaskedImageModel(load_config(None, [], base=tree))
    if strategy == "anatomask":  # a teacher that outputs 0: its error in a cell is that cell's mean |x|
        for p in module.teacher.parameters():
            p.data.zero_()
    else:  # a teacher that is not the student, so scores from the wrong network cannot pass
        with torch.no_grad():
            for p in module.teacher.parameters():
                p.add_(torch.randn(p.shape, generator=gen()) * 0.5)
    seen, original = {}, teacher_mod.compose_mask
    monkeypatch.setattr(teacher_mod, "compose_mask",
                        lambda scores, cand, *a, **k: seen.update(scores=scores) or seen.setdefault(
                            "out", original(scores, cand, *a, **k)))
    # Every 16³ cell a different brightness, so every score is distinct.
    cells = (torch.randperm(64, generator=gen()).float() / 64).view(4, 4, 4)
    x = cells.repeat_interleave(16, 0).repeat_interleave(16, 1).repeat_interleave(16, 2).expand(2, 1, 64, 64, 64)
    module.masker.step, module.masker.total_steps = 10, 10  # r_t = 0.5
    module.masker(x, generator=gen())
    scores, (mask, hard) = seen["scores"], seen["out"]
    if strategy == "anatomask":
        expected = torch.nn.functional.avg_pool3d(x, 16, 16)[:, 0]
        scored = torch.isfinite(scores)
        assert scored.flatten(1).sum(1).tolist() == [38, 38]  # the teacher's own random ρ mask: round(0.6·64)
        assert torch.allclose(scores[scored], expected[scored])
    else:
        expected = module.per_subvolume(module.teacher(x)[:, 1:])
        assert torch.allclose(scores, expected)
        assert not torch.allclose(scores, module.per_subvolume(module.net(x)[:, 1:]), atol=1e-3)
    k = 38
    assert mask.flatten(1).sum(1).tolist() == [k, k] and hard.flatten(1).sum(1).tolist() == [19, 19]
    for b in range(2):  # the hard cells are the teacher's 19 highest scores
        s = scores[b].flatten()
        assert set(torch.nonzero(hard[b].flatten()).flatten().tolist()) == set(s.topk(19).indices.tolist())


def test_resume_restores_the_teacher_exactly(phantom_dir, tmp_path, monkeypatch):
    from subfore.pretrain import MaskedImageModel

    tree = base_config(phantom_dir, tmp_path, masking={"strategy": "anatomask"}, train={"max_steps": 3})
    run_cfg(tree)
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    seen = {}

    def capture(self):
        seen.update({f"teacher.{k}": v.detach().clone() for k, v in self.teacher.state_dict().items()})

    monkeypatch.setattr(MaskedImageModel, "on_train_start", capture)
    run_cfg(tree, ["train.max_steps=4"], resume="last")
    assert seen.keys() == {k for k in saved if k.startswith("teacher.")}
    assert all(torch.equal(seen[k], saved[k]) for k in seen)
    assert any(not torch.equal(saved[k], saved["net." + k[len("teacher."):]]) for k in seen)
