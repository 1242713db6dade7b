"""Standard multi-head attention written with four ``nn.Linear`` projections.

``nn.MultiheadAttention`` keeps its input projection as a raw parameter and runs a fused functional
kernel; spelling it out keeps every matmul a plain ``nn.Linear`` that a quantizer can wrap, and exports
to ONNX as MatMul / Softmax nodes with no special handling.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from maptr.models.tensor_ops import MatMul


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over M heads (batch first)."""

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.head_dims = embed_dims // num_heads
        self.q_proj = nn.Linear(embed_dims, embed_dims)
        self.k_proj = nn.Linear(embed_dims, embed_dims)
        self.v_proj = nn.Linear(embed_dims, embed_dims)
        self.out_proj = nn.Linear(embed_dims, embed_dims)
        self.score_matmul = MatMul()  # q @ k^T
        self.value_matmul = MatMul()  # attention probabilities @ v
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier keeps the logits' variance independent of the width at the start; zero biases.
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """
        Args:
            query: (N, Lq, C); key: (N, Lk, C); value: (N, Lk, C).
            attn_mask: optional (Lq, Lk) additive float mask (0 = attend, a large negative = blocked),
                shared by the batch and the heads.
        Returns:
            (N, Lq, C).
        """
        n, num_query, _ = query.shape
        num_key = key.shape[1]
        heads, dims = self.num_heads, self.head_dims
        q = self.q_proj(query).view(n, num_query, heads, dims).transpose(1, 2)  # (N, M, Lq, D)
        k = self.k_proj(key).view(n, num_key, heads, dims).transpose(1, 2)  # (N, M, Lk, D)
        v = self.v_proj(value).view(n, num_key, heads, dims).transpose(1, 2)  # (N, M, Lk, D)
        logits = self.score_matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(dims))  # (N, M, Lq, Lk)
        if attn_mask is not None:
            logits = logits + attn_mask
        out = self.value_matmul(logits.softmax(-1), v)  # (N, M, Lq, D)
        out = out.transpose(1, 2).reshape(n, num_query, self.embed_dims)  # (N, Lq, C)
        return self.out_proj(out)
