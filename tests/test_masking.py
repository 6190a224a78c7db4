"""Mask generators, thresholds, apply_mask and masked_l1 against hand-built volumes."""

from __future__ import annotations

import math

import pytest
import torch

from subfore.masking import (
    EmptyMaskCounter,
    REGISTRY,
    Window,
    apply_mask,
    expand_grid,
    foreground_grid,
    make_generator,
    masked_l1,
    otsu_thresholds,
    subvolume_means,
)


def bright_volume(cells: list[tuple[int, int, int]], batch: int = 1, value: float = 0.5) -> torch.Tensor:
    """A 64³ volume (4×4×4 grid of 16³ subvolumes) that is 0 except the listed subvolumes."""
    x = torch.zeros(batch, 1, 64, 64, 64)
    for z, y, w in cells:
        x[:, :, z * 16 : (z + 1) * 16, y * 16 : (y + 1) * 16, w * 16 : (w + 1) * 16] = value
    return x


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


BRIGHT = [(0, 0, 0), (1, 2, 3), (2, 2, 2), (3, 1, 0), (3, 3, 3), (0, 3, 1), (1, 1, 1), (2, 0, 3), (3, 0, 2), (1, 3, 0)]


def test_subvolume_means_match_hand_computation():
    x = torch.zeros(1, 1, 32, 32, 32)
    x[0, 0, :16, :16, :16] = 1.0
    x[0, 0, :8, 16:, 16:] = 1.0  # half of one block
    m = subvolume_means(x, 16)
    assert m.shape == (1, 2, 2, 2)
    assert m[0, 0, 0, 0] == 1.0 and m[0, 0, 1, 1] == 0.5 and m.sum() == 1.5


def test_subvolume_means_rejects_indivisible_crop():
    with pytest.raises(ValueError, match="multiple of 16"):
        subvolume_means(torch.zeros(1, 1, 64, 64, 40), 16)


def test_foreground_grid_uses_mean_at_or_above_threshold():
    x = bright_volume([(0, 0, 0)], value=0.1) + bright_volume([(1, 1, 1)], value=0.0999)
    fg = foreground_grid(x, 16, 0.1)
    assert fg.dtype == torch.bool and fg.shape == (1, 4, 4, 4)
    assert fg.sum() == 1 and fg[0, 0, 0, 0]


@pytest.mark.parametrize("name", ["random", "block"])
def test_exact_count_over_all_subvolumes(name):
    x = torch.rand(3, 1, 64, 64, 64)
    for ratio in (0.0, 0.25, 0.6, 0.75, 1.0):
        mask = make_generator(name, ratio=ratio, size=16)(x, gen())
        assert mask.shape == (3, 4, 4, 4)
        assert mask.flatten(1).sum(1).tolist() == [round(ratio * 64)] * 3


def test_foreground_exact_count_and_never_background():
    x = bright_volume(BRIGHT, batch=4)
    g = make_generator("foreground", ratio=0.6, size=16, threshold=0.1)
    fg = foreground_grid(x, 16, 0.1)
    for seed in range(20):
        mask = g(x, gen(seed))
        assert mask.flatten(1).sum(1).tolist() == [6] * 4  # round(0.6 · 10)
        assert not (mask & ~fg).any()
    assert int(g.last_stats["fallbacks"]) == 0
    assert float(g.last_stats["foreground_fraction"]) == pytest.approx(10 / 64)


def test_foreground_counts_differ_per_sample():
    x = torch.cat([bright_volume(BRIGHT[:5]), bright_volume(BRIGHT)])
    mask = make_generator("foreground", ratio=0.5)(x, gen())
    assert mask.flatten(1).sum(1).tolist() == [2, 5]  # round(2.5) = 2 (half to even), round(5.0) = 5


def test_foreground_without_foreground_falls_back_and_counts():
    x = torch.cat([bright_volume(BRIGHT), torch.zeros(2, 1, 64, 64, 64)])
    g = make_generator("foreground", ratio=0.6)
    mask = g(x, gen())
    assert mask.flatten(1).sum(1).tolist() == [6, 38, 38]  # round(0.6 · 64) = 38 in the fallback
    assert int(g.last_stats["fallbacks"]) == 2


def test_bernoulli_modes_mean_ratio():
    x = bright_volume(BRIGHT * 1, batch=1)
    fg = make_generator("foreground", ratio=0.6, exact=False)
    rnd = make_generator("random", ratio=0.6, exact=False)
    batch = x.expand(400, -1, -1, -1, -1)
    m_fg = fg(batch, gen(1))
    m_rnd = rnd(torch.rand(400, 1, 64, 64, 64), gen(2))
    assert not (m_fg & ~foreground_grid(batch, 16, 0.1)).any()
    counts = m_fg.flatten(1).sum(1).float()
    assert counts.std() > 0  # Bernoulli: the count varies per sample
    assert counts.mean() / 10 == pytest.approx(0.6, abs=0.03)
    assert m_rnd.float().mean() == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_same_seed_same_mask_and_different_seed_differs(name):
    x = bright_volume(BRIGHT, batch=2) + 0.01 * torch.rand(2, 1, 64, 64, 64)
    g = make_generator(name, ratio=0.6)
    assert torch.equal(g(x, gen(7)), g(x, gen(7)))
    assert not torch.equal(g(x, gen(7)), g(x, gen(8)))


def test_block_masks_are_contiguous_cuboids():
    # With a ratio that needs few cuboids, the masked cells form few connected components.
    x = torch.rand(1, 1, 128, 128, 128)
    mask = make_generator("block", ratio=0.3, size=16, min_side=2, max_side=4)(x, gen(3))[0]
    assert mask.sum() == round(0.3 * 512)
    # Cuboid masking leaves far fewer isolated masked cells than random masking does.
    def isolated(m):
        p = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1, 1, 1))
        neigh = torch.nn.functional.conv3d(p, torch.tensor([[[[0, 0, 0], [0, 1, 0], [0, 0, 0]],
                                                              [[0, 1, 0], [1, 0, 1], [0, 1, 0]],
                                                              [[0, 0, 0], [0, 1, 0], [0, 0, 0]]]]).float()[None])
        return int(((neigh[0, 0] == 0) & m).sum())
    rnd = make_generator("random", ratio=0.3)(x, gen(3))[0]
    assert isolated(mask) < isolated(rnd)


def test_threshold_in_hu_round_trip():
    w = Window(-175, 250, 0, 1)
    assert w.to_normalised(-132.5) == pytest.approx(0.1)
    assert w.to_hu(0.1) == pytest.approx(-132.5)
    for hu in (-175.0, -132.5, 0.0, 40.0, 250.0):
        assert w.to_hu(w.to_normalised(hu)) == pytest.approx(hu)
    x = bright_volume(BRIGHT, value=0.3)
    a = make_generator("foreground", threshold_hu=-132.5)
    b = make_generator("foreground", threshold=0.1)
    assert a.threshold == pytest.approx(0.1)
    assert torch.equal(a(x, gen()), b(x, gen()))


def test_threshold_at_or_below_b_min_is_rejected():
    with pytest.raises(ValueError, match="b_min"):
        make_generator("foreground", threshold=0.1, window=Window(-175, 250, 0.1, 1.0))
    with pytest.raises(ValueError, match="b_min"):
        make_generator("foreground", threshold_hu=-175.0)


def test_otsu_threshold_separates_two_populations():
    values = torch.cat([torch.full((50,), 0.05), torch.full((30,), 0.7)])[None]
    t = otsu_thresholds(values)
    assert 0.05 < float(t) <= 0.7
    # MRI-like volume in arbitrary units: otsu finds the bright subvolumes whatever the scale.
    x = bright_volume(BRIGHT, value=400.0) + 20.0
    fg = foreground_grid(x, 16, "otsu")
    assert fg.sum() == len(BRIGHT)
    mask = make_generator("foreground", threshold="otsu")(x, gen())
    assert mask.sum() == 6 and not (mask & ~fg).any()


def test_unknown_strategy_and_bad_ratio():
    with pytest.raises(ValueError, match="registered"):
        make_generator("nope")
    with pytest.raises(ValueError, match="ratio"):
        make_generator("random", ratio=1.5)


def test_apply_mask_fills_only_masked_voxels():
    x = torch.rand(2, 1, 32, 32, 32)
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1, 0] = True
    vox = expand_grid(mask, 16)
    for fill in ("zero", "noise", "mean"):
        y = apply_mask(x, mask, fill, generator=gen())
        assert torch.equal(y[~vox.expand_as(x)], x[~vox.expand_as(x)])
    assert (apply_mask(x, mask, "zero")[vox.expand_as(x)] == 0).all()
    assert apply_mask(x, mask, "mean")[0, 0, 0, 20, 0] == pytest.approx(float(x[0].mean()))
    noise = apply_mask(x, mask, "noise", generator=gen())[vox.expand_as(x)]
    assert noise.std() == pytest.approx(1.0, abs=0.05)  # N(0, 1) as the paper
    token = apply_mask(x, mask, torch.tensor([0.25]))
    assert (token[vox.expand_as(x)] == 0.25).all()


def test_masked_l1_ignores_unmasked_voxels():
    target = torch.zeros(1, 1, 32, 32, 32)
    pred = torch.zeros_like(target)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 1, 1] = True
    pred[0, 0, 16:, 16:, 16:] = 2.0  # masked block: error 2 everywhere
    pred[0, 0, :16, :16, :16] = 100.0  # unmasked block: huge error that must not count
    pred[0, 0, 16:24, 16:, 16:] = 4.0  # half of the masked block has error 4
    assert float(masked_l1(pred, target, mask)) == pytest.approx(3.0)  # (2 + 4) / 2
    # Voxel masks are accepted too and give the same number.
    assert float(masked_l1(pred, target, expand_grid(mask, 16))) == pytest.approx(3.0)


def test_masked_l1_with_empty_mask_is_zero_and_counted():
    counter = EmptyMaskCounter()
    pred = torch.rand(1, 1, 32, 32, 32, requires_grad=True)
    loss = masked_l1(pred, torch.rand(1, 1, 32, 32, 32), torch.zeros(1, 2, 2, 2, dtype=torch.bool), counter)
    assert float(loss) == 0.0 and math.isfinite(float(loss))
    loss.backward()  # still differentiable
    assert counter.value == 1
    masked_l1(pred, torch.rand(1, 1, 32, 32, 32), torch.ones(1, 2, 2, 2, dtype=torch.bool), counter)
    assert counter.value == 1  # a non-empty mask is not counted


def test_masked_l1_counts_and_sums_in_fp32_under_bf16_autocast():
    # 257 masked voxels (not a bf16 number: it rounds to 256), errors 1 on 200 and 3 on 57 → 371 / 257.
    target = torch.zeros(1, 1, 16, 16, 16)
    mask = torch.zeros(1, 1, 16, 16, 16, dtype=torch.bool)
    mask.view(-1)[:257] = True
    pred = torch.zeros_like(target)
    pred.view(-1)[:200] = 1.0
    pred.view(-1)[200:257] = 3.0
    pred.view(-1)[300:] = 50.0  # unmasked
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = masked_l1(pred.bfloat16(), target, mask)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(371 / 257, rel=1e-6)  # bf16 counting gave 372 / 256


def test_generators_follow_the_input_device_and_dtype():
    x = bright_volume(BRIGHT).to(torch.float64)
    for name in REGISTRY:
        m = make_generator(name)(x, gen())
        assert m.device == x.device and m.dtype == torch.bool
