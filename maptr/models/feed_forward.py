"""The transformer feed-forward block: Linear -> ReLU -> Dropout -> Linear -> Dropout, residual, LayerNorm."""

from __future__ import annotations

from torch import Tensor, nn

from maptr.models.tensor_ops import Add


class FeedForward(nn.Module):
    """Position-wise FFN with its residual connection and post-norm (BEVFormer / MapTR layer order)."""

    def __init__(self, embed_dims: int, ffn_dims: int, dropout: float) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.linear1 = nn.Linear(embed_dims, ffn_dims)
        self.linear2 = nn.Linear(ffn_dims, embed_dims)
        self.activation = nn.ReLU(inplace=True)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.residual_add = Add()
        self.norm = nn.LayerNorm(embed_dims)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier for both layers (as the attention projections), zero biases: the block starts
        # as a small perturbation of the identity path.
        for linear in (self.linear1, self.linear2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., C) -> (..., C)."""
        hidden = self.dropout1(self.activation(self.linear1(x)))  # (..., F)
        return self.norm(self.residual_add(x, self.dropout2(self.linear2(hidden))))
