"""Teacher-guided masking: composition with a stub teacher, schedules, HPM's objective, EMA and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from subfore.masking import compose_mask, ema_momentum, foreground_grid, hard_share, make_generator
from subfore.masking.teacher import ranking_loss, spearman
from test_masking import BRIGHT, bright_volume, gen
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


def test_gated_teacher_mask_never_touches_background():
    x = bright_volume(BRIGHT, batch=2)
    g = make_generator("anatomask", ratio=0.6, gate="foreground", threshold=0.1)
    g.scorer = lambda x, cand, generator: stub_scores(2)
    g.step, g.total_steps = 50, 100  # r_t = 0.25
    fg = foreground_grid(x, 16, 0.1)
    for seed in range(10):
        mask = g(x, gen(seed))
        assert mask.flatten(1).sum(1).tolist() == [6, 6]  # round(0.6 · 10 foreground)
        assert not (mask & ~fg).any()
    # The hard share was picked among foreground candidates only: the 2 (= ⌈0.25·6⌉) best-scoring fg cells.
    s = stub_scores(2).masked_fill(~fg, float("-inf")).flatten(1)
    top = s.topk(2, dim=1).indices
    assert mask.flatten(1).gather(1, top).all()
    assert float(g.last_stats["teacher_fg_share"]) == 1.0


def test_hard_share_schedule_endpoints():
    assert hard_share(0, 100) == 0.0
    assert hard_share(50, 100) == pytest.approx(0.25)
    assert hard_share(100, 100) == pytest.approx(0.5)
    assert hard_share(0, 100, order="hard-to-easy") == pytest.approx(0.5)
    assert hard_share(100, 100, order="hard-to-easy") == 0.0
    g = make_generator("hpm")
    g.total_steps = 10
    assert [round(g.r_t, 3) for g.step in (0, 5, 10)] == [0.0, 0.25, 0.5]


def test_ema_momentum_ramps():
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(100, 100) == pytest.approx(0.9999)
    assert ema_momentum(50, 100, ramp="linear") == pytest.approx((0.996 + 0.9999) / 2)
    assert ema_momentum(50, 100) == pytest.approx((0.996 + 0.9999) / 2)  # cosine midpoint is the mean too
    assert ema_momentum(25, 100) < ema_momentum(25, 100, ramp="linear")


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
    for r in lines:
        assert 0.0 <= r["teacher_fg_share"] <= 1.0
        if gate and r["fallbacks"] == 0:  # an all-air crop falls back to all cells (and is counted)
            assert r["masked_fraction"] <= r["foreground_fraction"] + 1e-6
        if strategy == "hpm":
            assert math.isfinite(r["predictor_loss"]) and -1 <= r["spearman"] <= 1
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    teacher = {k[len("teacher."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("teacher.")}
    student = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    assert teacher.keys() == student.keys()
    # The teacher moved towards the student but is not the student.
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    # The exported encoder carries no teacher weights.
    assert not any(k.startswith("teacher.") for k in torch.load(tmp_path / "run" / "encoder.pt", weights_only=True))


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
