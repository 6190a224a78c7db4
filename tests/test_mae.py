"""MAE on UNETR's ViT (model.encoding: visible): padding never changes a sample, masked inputs get no gradient."""

from __future__ import annotations

import torch
from monai.networks.nets import UNETR

from subfore.masking import expand_grid
from subfore.models.mae import MaskedAutoencoder, encode_visible, run_blocks


def tiny_mae() -> MaskedAutoencoder:
    torch.manual_seed(0)
    vit = UNETR(1, 1, (64, 64, 64), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4).vit
    return MaskedAutoencoder(vit, 1, (4, 4, 4), width=32, depth=2, heads=4, predict_loss=True).double().eval()


def masks() -> torch.Tensor:
    # 48 and 10 of 64 patches masked: sample 0 is padded from 16 visible tokens to sample 1's 54.
    m = torch.zeros(2, 64, dtype=torch.bool)
    m[0, :48], m[1, :10] = True, True
    return m[:, torch.randperm(64, generator=torch.Generator().manual_seed(1))].view(2, 4, 4, 4)


def test_padded_sample_equals_the_sample_alone():
    mae, m = tiny_mae(), masks()
    x = torch.randn(2, 1, 64, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    pred, loss = mae(x, m)
    alone, alone_loss = mae(x[:1], m[:1])
    assert torch.allclose(pred[:1], alone, atol=1e-12, rtol=0)
    assert torch.allclose(loss[:1], alone_loss, atol=1e-12, rtol=0)


def test_padded_positions_do_not_reach_visible_ones():
    mae = tiny_mae()
    tokens = torch.randn(1, 10, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    valid = torch.arange(10)[None] < 6
    garbage = tokens.clone()
    garbage[:, 6:] = 1e3 * torch.randn(1, 4, 48, dtype=torch.float64)
    a = run_blocks(mae.vit.blocks, tokens, valid)
    b = run_blocks(mae.vit.blocks, garbage, valid)
    assert torch.equal(a[:, :6], b[:, :6])


def test_no_gradient_reaches_a_masked_patch_in_the_encoder():
    mae, m = tiny_mae(), masks()
    x = torch.randn(2, 1, 64, 64, 64, dtype=torch.float64, requires_grad=True)
    encoded, _, valid = encode_visible(mae.vit, x, ~m.flatten(1))
    encoded[valid].sum().backward()
    voxels = expand_grid(m, 16)
    assert x.grad[voxels].abs().max() == 0
    assert x.grad[~voxels].abs().max() > 0
