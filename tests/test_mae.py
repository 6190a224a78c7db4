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


def test_each_token_lands_on_its_own_patch_both_ways():
    """Patch embedding, the mask grid and the decoder's voxel layout share one raster order (z, y, x)."""
    mae = tiny_mae()
    x = torch.zeros(1, 1, 64, 64, 64, dtype=torch.float64)
    x[:, :, 16:32, 0:16, 48:64] = 1.0  # patch (z, y, x) = (1, 0, 3): raster index 1·16 + 0·4 + 3 = 19
    changed = (mae.vit.patch_embedding(x) - mae.vit.patch_embedding(torch.zeros_like(x))).abs().sum(-1)[0]
    assert torch.nonzero(changed).flatten().tolist() == [19]
    m = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    m[0, 1, 0, 3] = True  # the mask grid's cell (1, 0, 3) drops that very token
    _, index, valid = encode_visible(mae.vit, x, ~m.flatten(1))
    assert 19 not in index[valid].tolist() and len(index[valid]) == 63
    # The decoder's linear output for token n becomes the voxels of patch n.
    mae.decoder.pred = torch.nn.Identity()
    mae.decoder.norm = torch.nn.Identity()
    mae.decoder.blocks = torch.nn.ModuleList()
    mae.decoder.loss_head = None
    mae.decoder.embed = torch.nn.Linear(48, 16**3).double()
    mae.decoder.mask_token.data = torch.zeros(1, 1, 16**3, dtype=torch.float64)
    mae.decoder.position.data = torch.arange(64, dtype=torch.float64)[None, :, None].expand(1, 64, 16**3).clone()
    torch.nn.init.zeros_(mae.decoder.embed.weight), torch.nn.init.zeros_(mae.decoder.embed.bias)
    voxels, _ = mae(x, m)
    blocks = voxels.view(4, 16, 4, 16, 4, 16).permute(0, 2, 4, 1, 3, 5).reshape(64, -1)
    assert torch.equal(blocks, torch.arange(64, dtype=torch.float64)[:, None].expand(64, 16**3))


def test_norm_pix_target_is_maes_per_patch_formula():
    from subfore.masking.ops import patch_normalise

    x = torch.rand(2, 2, 32, 32, 16, generator=torch.Generator().manual_seed(4))  # fp32, as the target is computed
    normed, mean, std = patch_normalise(x, 16)
    # MAE: target = (p - p.mean(-1)) / (p.var(-1) + 1e-6) ** .5 over each patch's voxels and channels, unbiased var.
    p = x.view(2, 2, 2, 16, 2, 16, 1, 16).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 2, 2, 1, -1)
    want = (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True, unbiased=True) + 1e-6) ** 0.5
    got = normed.view(2, 2, 2, 16, 2, 16, 1, 16).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 2, 2, 1, -1)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert torch.allclose(normed * std + mean, x, atol=1e-6, rtol=0)
    assert not torch.allclose(got, (p - p.mean(-1, keepdim=True)) / p.std(-1, keepdim=True, unbiased=False), atol=1e-6)
