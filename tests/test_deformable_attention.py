"""Deformable attention: equals the per-point loop, has correct gradients, and keeps its conventions."""

from __future__ import annotations

import math

import pytest
import torch

from maptr.models.deformable_attention import MultiScaleDeformableAttention, deformable_sample
from maptr.models.deformable_attention_reference import deformable_sample_reference

SHAPES = [(3, 4), (2, 3)]  # two levels, (H, W)


def _random_inputs(seed: int, n: int = 2, num_query: int = 5, heads: int = 2, dims: int = 3, points: int = 3):
    gen = torch.Generator().manual_seed(seed)
    num_value = sum(h * w for h, w in SHAPES)
    value = torch.randn(n, num_value, heads, dims, generator=gen, dtype=torch.float64)
    # Locations reach past [0, 1] so the zero-padding border is exercised too.
    locations = torch.rand(n, num_query, heads, len(SHAPES), points, 2, generator=gen, dtype=torch.float64)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(n, num_query, heads, len(SHAPES), points, generator=gen, dtype=torch.float64)
    return value, locations, weights


def test_vectorized_equals_per_point_loop():
    value, locations, weights = _random_inputs(0)
    expected = deformable_sample_reference(value, SHAPES, locations, weights)
    actual = deformable_sample(value, SHAPES, locations, weights)
    assert actual.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_reference_matches_grid_sample_convention_at_pixel_centres():
    # A single level 2x3 map: the centre of pixel (row i, col j) is ((j + .5) / W, (i + .5) / H).
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)  # (N, H*W, M, D)
    rows, cols = torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij")
    xy = torch.stack([(cols.flatten() + 0.5) / 3, (rows.flatten() + 0.5) / 2], dim=-1).double()  # (6, 2)
    locations = xy.view(1, 6, 1, 1, 1, 2)
    weights = torch.ones(1, 6, 1, 1, 1, dtype=torch.float64)
    for fn in (deformable_sample, deformable_sample_reference):
        out = fn(value, [(2, 3)], locations, weights)  # (1, 6, 1)
        torch.testing.assert_close(out.flatten(), torch.arange(6, dtype=torch.float64))
    # Half a pixel outside the left border: halfway between pixel 0 and the zero padding.
    out = deformable_sample(
        value + 1.0, [(2, 3)], torch.tensor([0.0, 0.25]).double().view(1, 1, 1, 1, 1, 2), weights[:, :1]
    )
    assert out.item() == pytest.approx(0.5 * 1.0)


def test_gradcheck_value_locations_weights():
    value, locations, weights = _random_inputs(1, n=1, num_query=2, heads=2, dims=2, points=2)
    value.requires_grad_(True)
    locations.requires_grad_(True)
    weights.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: deformable_sample(v, SHAPES, loc, w), (value, locations, weights), eps=1e-6, atol=1e-6
    )


def test_init_spreads_heads_on_a_ring_with_uniform_weights():
    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=2, num_points=3)
    assert torch.count_nonzero(attn.sampling_offsets.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.weight) == 0
    assert torch.count_nonzero(attn.attention_weights.bias) == 0
    offsets = attn.sampling_offsets.bias.view(4, 2, 3, 2)  # (M, L, P, 2)
    # Head h points in direction 2*pi*h/M; point k sits k+1 cells out; the same on every level.
    for head in range(4):
        angle = math.atan2(offsets[head, 0, 0, 1].item(), offsets[head, 0, 0, 0].item())
        assert math.isclose(angle % (2 * math.pi), 2 * math.pi * head / 4, abs_tol=1e-6)
        torch.testing.assert_close(offsets[head, 0, 2], 3 * offsets[head, 0, 0])
        torch.testing.assert_close(offsets[head, 1], offsets[head, 0])
    assert attn.value_proj.bias.abs().sum() == 0 and attn.output_proj.bias.abs().sum() == 0


def test_embed_dims_must_divide_by_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dims=10, num_heads=4, num_levels=1, num_points=4)
    attn = MultiScaleDeformableAttention(embed_dims=8, num_heads=2, num_levels=1, num_points=3)
    with pytest.raises(ValueError, match="multiple of the 2 anchors"):
        attn(torch.zeros(1, 2, 8), torch.zeros(1, 2, 1, 2, 2), torch.zeros(1, 6, 8), [(2, 3)])


def _module_and_inputs(seed: int):
    torch.manual_seed(seed)
    attn = MultiScaleDeformableAttention(embed_dims=8, num_heads=2, num_levels=1, num_points=4).double()
    # Non-trivial offsets and weights, so the check does not rely on the init pattern.
    for linear in (attn.sampling_offsets, attn.attention_weights):
        torch.nn.init.normal_(linear.weight, std=0.5)
    query = torch.randn(2, 3, 8, dtype=torch.float64)
    value = torch.randn(2, 12, 8, dtype=torch.float64)
    return attn, query, value


def test_module_with_anchor_reference_points_matches_manual_sampling():
    attn, query, value = _module_and_inputs(2)
    ref = torch.rand(2, 3, 1, 2, 2, dtype=torch.float64)  # (B, Lq, L, A=2, 2)
    out = attn(query, ref, value, [(3, 4)])
    # By hand: offsets in cells / (W, H); points split over anchors as (P/A, A); softmax over L*P.
    offsets = attn.sampling_offsets(query).view(2, 3, 2, 1, 2, 2, 2) / torch.tensor([4.0, 3.0]).double()
    locations = (ref.view(2, 3, 1, 1, 1, 2, 2) + offsets).flatten(4, 5)  # (B, Lq, M, L, P, 2)
    weights = attn.attention_weights(query).view(2, 3, 2, 4).softmax(-1).view(2, 3, 2, 1, 4)
    sampled = deformable_sample_reference(attn.value_proj(value).view(2, 12, 2, 4), [(3, 4)], locations, weights)
    torch.testing.assert_close(out, attn.output_proj(sampled))


def test_value_groups_share_offsets_and_equal_repeated_queries():
    attn, query, _ = _module_and_inputs(3)
    groups = 3
    value = torch.randn(2 * groups, 12, 8, dtype=torch.float64)
    ref = torch.rand(2 * groups, 3, 1, 2, dtype=torch.float64)
    grouped = attn(query, ref, value, [(3, 4)], value_groups=groups)  # (B*G, Lq, C)
    repeated = attn(query.repeat_interleave(groups, dim=0), ref, value, [(3, 4)])
    torch.testing.assert_close(grouped, repeated)


def test_float32_module_shapes_and_zero_padding_far_outside():
    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=4, num_levels=2, num_points=2)
    value = torch.randn(1, sum(h * w for h, w in SHAPES), 16)
    out = attn(torch.randn(1, 7, 16), torch.rand(1, 7, 2, 2), value, SHAPES)
    assert out.shape == (1, 7, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Zero padding: sampling far outside every map reads zeros, leaving only the output bias.
    far = attn(torch.zeros(1, 1, 16), torch.full((1, 1, 2, 2), 50.0), value, SHAPES)
    torch.testing.assert_close(far, attn.output_proj(torch.zeros(1, 1, 16)))
