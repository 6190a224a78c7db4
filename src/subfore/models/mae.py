"""MAE on MONAI's ViT (UNETR's encoder): the encoder sees the visible patches only, a light transformer decoder
sees every position (encoded visible tokens, a learned mask token elsewhere) and predicts each patch's voxels.

The encoder is UNETR's own ``vit`` module, so its state (``vit.*``) loads into ``monai.networks.nets.UNETR`` as it
is. Samples with different numbers of visible patches share a batch padded to the longest, with a key-padding
attention mask: a padded sample's outputs equal the sample run alone.

    >>> mae = MaskedAutoencoder(UNETR(1, 1, (96, 96, 96)).vit, channels=1, grid=(6, 6, 6))
    >>> pred, loss_pred = mae(x, mask)    # x (B, 1, 96, 96, 96), mask (B, 6, 6, 6) True = masked
"""

from __future__ import annotations

import torch
from einops import rearrange
from monai.networks.blocks import TransformerBlock
from monai.networks.nets.vit import ViT
from torch import nn

#: MONAI's UNETR fixes its ViT's patches at 16³ voxels
PATCH = 16


def freeze_unused(module: nn.Module) -> nn.Module:
    """Freeze the cross-attention norms MONAI's TransformerBlock builds even without cross-attention: they never
    receive a gradient, which DDP (without its slower unused-parameter search) refuses at the next step."""
    for block in module.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)
    return module


def patch_grid(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A subvolume mask (B, nz, ny, nx) as a patch mask (B, nz·f, ny·f, nx·f): each subvolume is f³ patches."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2).repeat_interleave(factor, 3)


@torch.compiler.disable
def visible_layout(visible: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each sample's visible tokens go: visible (B, N) bool → (index (B, L) long: each row's position in N,
    valid (B, L) bool), L = ``length`` or max(1, most visible tokens of a sample).

    length: a bound the caller knows on the host (≥ every sample's visible count: an exact-count mask's N − k),
    so that nothing waits for the device; None: L is read from the data (one device read). Runs outside
    torch.compile and marks L dynamic: a compiled MAE then compiles one graph after this for every L (before: 9
    graphs, the ViT's traced again at the second L). Padding L to N instead would compile once but encode every
    patch, which MAE exists to avoid.
    """
    counts = visible.sum(1)
    length = max(int(counts.max()) if length is None else int(length), 1)
    # A stable sort of "masked?" puts every sample's visible positions first, in order; the rest are padding.
    index = torch.argsort((~visible).to(torch.uint8), dim=1, stable=True)[:, :length]
    valid = torch.arange(length, device=visible.device)[None] < counts[:, None]
    for t in (index, valid):
        torch._dynamo.maybe_mark_dynamic(t, 1)
    return index, valid


def gather_at(tokens: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, E) at ``index`` (B, L) → (B, L, E), zeros where not ``valid`` (:func:`visible_layout`)."""
    kept = tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    # Padded rows hold masked patches' embeddings after the gather; zeroed, no gradient reaches those inputs.
    return torch.where(valid[..., None], kept, 0.0)


def gather_visible(tokens: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The visible tokens of each sample, in their original order, padded to the longest sample.

    tokens: (B, N, E); visible: (B, N) bool. Returns (kept (B, L, E) with zeros at padded rows, index (B, L) long:
    each row's position in N, valid (B, L) bool), L = max(1, most visible tokens of a sample).
    """
    index, valid = visible_layout(visible)
    return gather_at(tokens, index, valid), index, valid


def key_padding(valid: torch.Tensor) -> torch.Tensor:
    """MONAI's ``attn_mask`` (B, L): attend to valid rows; a sample with none attends to its first (padded) row, so
    its softmax stays finite (its outputs are discarded)."""
    empty = ~valid.any(1, keepdim=True)
    first = torch.zeros_like(valid)
    first[:, 0] = True
    return valid | (empty & first)


def run_blocks(blocks: nn.ModuleList, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Transformer blocks over (B, L, E) tokens where only ``valid`` (B, L) rows are attended to."""
    attend = key_padding(valid)
    for block in blocks:
        tokens = block(tokens, attn_mask=attend)
    return tokens


def encode_visible(vit: ViT, x: torch.Tensor, visible: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MONAI's ViT on the visible patches only: patch + position embedding, drop masked tokens, blocks, norm.

    x (B, C, D, H, W), visible (B, N) bool over the ViT's patches in raster order (z, y, x) →
    (encoded (B, L, E), index (B, L), valid (B, L)) as :func:`gather_visible` lays them out.
    """
    index, valid = visible_layout(visible)
    return encode_at(vit, x, index, valid), index, valid


def encode_at(vit: ViT, x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`encode_visible` with the layout given: x (B, C, D, H, W), index/valid (B, L) → encoded (B, L, E)."""
    return vit.norm(run_blocks(vit.blocks, gather_at(vit.patch_embedding(x), index, valid), valid))


class MAEDecoder(nn.Module):
    """Encoded visible tokens + a learned mask token at masked positions + position embeddings → transformer
    blocks → each patch's voxels (and, for hard-patch mining, one predicted loss per patch)."""

    def __init__(self, hidden_size: int, n_patches: int, patch_voxels: int, width: int = 384, depth: int = 4,
                 heads: int = 12, predict_loss: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(torch.zeros(1, n_patches, width))
        self.blocks = nn.ModuleList(TransformerBlock(width, 4 * width, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch_voxels)
        self.loss_head = nn.Linear(width, 1) if predict_loss else None
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, encoded: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, E) encoded tokens at positions ``index`` (B, L), ``valid`` (B, L), visible (B, N) →
        (voxels per patch (B, N, patch_voxels), predicted loss (B, N) or None)."""
        b, n = visible.shape
        emb = self.embed(encoded) * valid[..., None]
        placed = emb.new_zeros(b, n, emb.shape[-1]).scatter(1, index[..., None].expand_as(emb), emb)
        tokens = torch.where(visible[..., None], placed, self.mask_token.to(emb.dtype)) + self.position
        tokens = self.norm(run_blocks(self.blocks, tokens, torch.ones_like(visible)))
        loss = self.loss_head(tokens)[..., 0] if self.loss_head is not None else None
        return self.pred(tokens), loss


class MaskedAutoencoder(nn.Module):
    """MAE for a (B, C, D, H, W) crop of ``grid`` × 16³ patches: the ViT encodes what a mask leaves visible.

    State keys: ``vit.*`` (UNETR's encoder, exported) and ``decoder.*`` (pretraining only).
    """

    def __init__(self, vit: ViT, channels: int, grid: tuple[int, int, int], width: int = 384, depth: int = 4,
                 heads: int = 12, predict_loss: bool = False) -> None:
        super().__init__()
        if hasattr(vit, "cls_token"):
            raise ValueError("visible encoding takes a ViT without a class token (UNETR's)")
        self.vit = vit
        self.channels, self.grid = channels, tuple(grid)
        n = self.grid[0] * self.grid[1] * self.grid[2]
        self.decoder = MAEDecoder(vit.norm.normalized_shape[0], n, channels * PATCH**3, width, depth, heads,
                                  predict_loss)
        freeze_unused(self)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, length: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, C, D, H, W), mask (B, nz, ny, nx) over patches, True = masked → (reconstruction (B, C, D, H, W),
        predicted loss per patch (B, nz, ny, nx) or None). length: the visible tokens' bound if known on the host
        (:func:`visible_layout`)."""
        visible = ~mask.flatten(1)
        # The layout first, here: under torch.compile everything after it is one graph, its L dynamic.
        index, valid = visible_layout(visible, length)
        encoded = encode_at(self.vit, x, index, valid)
        patches, loss = self.decoder(encoded, index, valid, visible)
        z, y, w = self.grid
        voxels = rearrange(patches, "b (z y x) (c p q r) -> b c (z p) (y q) (x r)", z=z, y=y, x=w, c=self.channels,
                           p=PATCH, q=PATCH, r=PATCH)
        return voxels, (None if loss is None else loss.view(-1, z, y, w))
