"""Learned positional encoding of the BEV grid: one embedding per row and one per column, concatenated."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LearnedPositionalEncoding(nn.Module):
    """``pos[i, j] = concat(col_embed[j], row_embed[i])`` for BEV row i (along y) and column j (along x).

    Each half has ``embed_dims // 2`` channels, so the code of a cell is its column code followed by its
    row code (BEVFormer's LearnedPositionalEncoding with num_feats = embed_dims / 2).
    """

    def __init__(self, embed_dims: int, num_rows: int, num_cols: int) -> None:
        super().__init__()
        if embed_dims % 2:
            raise ValueError(f"embed_dims must be even to split into row and column halves, got {embed_dims}")
        self.num_rows = num_rows
        self.num_cols = num_cols
        self.row_embed = nn.Embedding(num_rows, embed_dims // 2)
        self.col_embed = nn.Embedding(num_cols, embed_dims // 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Uniform in [0, 1) as the reference implementation: distinct, bounded codes per row/column.
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> Tensor:
        """Returns (H*W, C): the code of every BEV cell, row-major (cell index = i * W + j)."""
        rows = self.row_embed.weight  # (H, C/2)
        cols = self.col_embed.weight  # (W, C/2)
        rows = rows[:, None, :].expand(-1, self.num_cols, -1)  # (H, W, C/2)
        cols = cols[None, :, :].expand(self.num_rows, -1, -1)  # (H, W, C/2)
        return torch.cat([cols, rows], dim=-1).flatten(0, 1)  # (H*W, C)
