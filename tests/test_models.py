"""MapTRv2 model: output contract, gradients, camera geometry, weight loading and ONNX export.

The r50 preset is checked on the meta device (shapes only): a real r50 eval forward takes 10-18 s and
~4.5 GB on this 2-core CPU, too much for the suite. The tiny preset runs for real.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import model_config

from maptr.config import ModelConfig, load_model_config, load_params
from maptr.data.vectors import equivalent_orders, resample_polyline
from maptr.models.backbone import Backbone, build_backbone, load_backbone_weights
from maptr.models.camera_projection import bev_cell_centers, pillar_points, project_to_cameras
from maptr.models.fpn import FPN
from maptr.models.maptr import MapTR, MapTRInference, build_maptr
from maptr.models.position_encoding import LearnedPositionalEncoding
from maptr.models.spatial_cross_attention import SpatialCrossAttention
from maptr.training.criterion import build_criterion

REPO = Path(__file__).resolve().parents[1]


def _preset(name: str) -> ModelConfig:
    params = load_params(REPO / "params.yaml")
    params["model"]["preset"] = name
    return load_model_config(params)


@pytest.fixture(scope="module")
def tiny_cfg() -> ModelConfig:
    return _preset("tiny")


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg: ModelConfig) -> MapTR:
    torch.manual_seed(0)
    return build_maptr(tiny_cfg)


def _camera_rig(image_size: tuple[int, int], batch: int = 1) -> torch.Tensor:
    """lidar2img of six pinhole cameras around the car, yaw 0, 60, ..., 300 degrees (0 = forward)."""
    width, height = image_size
    focal = 0.8 * width
    intrinsics = torch.tensor([[focal, 0, width / 2, 0], [0, focal, height / 2, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    mats = []
    for k in range(6):
        yaw = torch.tensor(k * torch.pi / 3)
        # Camera axes in the LiDAR frame: right, down, forward (the forward axis rotated by yaw).
        forward = torch.stack([torch.sin(yaw), torch.cos(yaw), torch.tensor(0.0)])
        right = torch.stack([torch.cos(yaw), -torch.sin(yaw), torch.tensor(0.0)])
        down = torch.tensor([0.0, 0.0, -1.0])
        lidar2cam = torch.eye(4)
        lidar2cam[:3, :3] = torch.stack([right, down, forward])
        mats.append(intrinsics @ lidar2cam)
    return torch.stack(mats)[None].repeat(batch, 1, 1, 1)  # (B, 6, 4, 4)


def _inputs(cfg: ModelConfig, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width, height = cfg.image_size
    img = torch.randn(batch, 6, 3, height, width, generator=gen)
    return img, _camera_rig((width, height), batch)


# --------------------------------------------------------------------------------------------------
# Output contract
# --------------------------------------------------------------------------------------------------
def test_tiny_train_outputs_have_contract_shapes(tiny_cfg: ModelConfig, tiny_model: MapTR):
    img, lidar2img = _inputs(tiny_cfg, batch=2)
    tiny_model.train()
    out = tiny_model(img, lidar2img)
    q1, q2, p, k = tiny_cfg.num_vec_one2one, tiny_cfg.num_vec_one2many, tiny_cfg.num_pts_per_vec, 3
    assert set(out) == {"pred_logits", "pred_pts", "aux_outputs", "one2many", "bev_seg", "pv_seg"}
    assert out["pred_logits"].shape == (2, q1, k)
    assert out["pred_pts"].shape == (2, q1, p, 2)
    assert len(out["aux_outputs"]) == tiny_cfg.decoder_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, q1, k) and aux["pred_pts"].shape == (2, q1, p, 2)
    o2m = out["one2many"]
    assert o2m["pred_logits"].shape == (2, q2, k) and o2m["pred_pts"].shape == (2, q2, p, 2)
    assert len(o2m["aux_outputs"]) == tiny_cfg.decoder_layers - 1
    assert out["bev_seg"].shape == (2, 1, tiny_cfg.bev_h, tiny_cfg.bev_w)
    w, h = (s // tiny_cfg.feature_stride for s in tiny_cfg.image_size)
    assert out["pv_seg"].shape == (2, 6, 1, h, w)
    assert ((out["pred_pts"] >= 0) & (out["pred_pts"] <= 1)).all()


def test_tiny_eval_outputs_only_one2one(tiny_cfg: ModelConfig, tiny_model: MapTR):
    img, lidar2img = _inputs(tiny_cfg)
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(img, lidar2img)
    assert set(out) == {"pred_logits", "pred_pts", "aux_outputs"}
    assert out["pred_logits"].shape == (1, tiny_cfg.num_vec_one2one, 3)
    assert out["pred_pts"].shape == (1, tiny_cfg.num_vec_one2one, tiny_cfg.num_pts_per_vec, 2)
    assert torch.isfinite(out["pred_pts"]).all() and torch.isfinite(out["pred_logits"]).all()


def test_nano_trains_without_one2many_and_its_losses_cover_every_output():
    """The default preset: no one2many group, 10 points per vector, a one-stage (layer2) backbone."""
    cfg = _preset("nano")
    torch.manual_seed(0)
    model = build_maptr(cfg).train()
    assert not hasattr(model.backbone, "layer3") and model.backbone.out_strides == [8]
    img, lidar2img = _inputs(cfg, batch=1)
    out = model(img, lidar2img)
    assert set(out) == {"pred_logits", "pred_pts", "aux_outputs", "bev_seg", "pv_seg"}
    assert out["pred_pts"].shape == (1, cfg.num_vec_one2one, 10, 2)
    line = torch.tensor([[-5.0, -20.0], [-5.0, 20.0]])
    p = torch.as_tensor(resample_polyline(line.numpy(), cfg.num_pts_per_vec))
    orders = torch.full((1, 2 * (cfg.num_pts_per_vec - 1), cfg.num_pts_per_vec, 2), -10000.0)
    orders[0, 0], orders[0, 1] = p, p.flip(0)
    valid = torch.zeros(1, orders.shape[1], dtype=torch.bool)
    valid[0, :2] = True
    batch = {
        "gt_labels": [torch.tensor([0])],
        "gt_orders": [orders],
        "gt_orders_valid": [valid],
        "bev_seg": torch.zeros(1, 1, cfg.bev_h, cfg.bev_w),
        "pv_seg": torch.zeros(1, 6, 1, cfg.image_size[1] // 8, cfg.image_size[0] // 8),
    }
    criterion = build_criterion(cfg)
    losses = criterion(out, batch)
    assert not any(k.startswith("o2m_") for k in losses)
    criterion.total_loss(losses).backward()
    unused = [n for n, t in model.named_parameters() if t.grad is None]
    assert unused == []  # DDP without find_unused_parameters needs every parameter in the graph


def test_r50_shapes_on_meta_device():
    cfg = _preset("r50")
    with torch.device("meta"):
        model = build_maptr(cfg)
        img = torch.empty(1, 6, 3, cfg.image_size[1], cfg.image_size[0])
        lidar2img = torch.empty(1, 6, 4, 4)
        model.eval()
        out = model(img, lidar2img)
        assert set(out) == {"pred_logits", "pred_pts", "aux_outputs"}
        assert out["pred_pts"].shape == (1, 50, 20, 2) and len(out["aux_outputs"]) == 5
        model.train()
        out = model(img, lidar2img)
        assert out["one2many"]["pred_pts"].shape == (1, 300, 20, 2)
        assert out["bev_seg"].shape == (1, 1, 200, 100)
        assert out["pv_seg"].shape == (1, 6, 1, 15, 25)  # 800x480 at stride 32
    assert 30e6 < sum(p.numel() for p in model.parameters()) < 60e6


def test_wrong_image_size_is_refused(tiny_cfg: ModelConfig, tiny_model: MapTR):
    img, lidar2img = _inputs(tiny_cfg)
    with pytest.raises(ValueError, match="expected img"):
        tiny_model(img[..., :-32], lidar2img)


def test_one2one_predictions_do_not_see_one2many_queries(tiny_cfg: ModelConfig, tiny_model: MapTR):
    # The groups are separated in the instance self-attention: adding the one2many queries must
    # leave the one2one outputs unchanged (eval mode: no dropout).
    tiny_model.eval()
    bev = torch.randn(1, tiny_cfg.bev_h * tiny_cfg.bev_w, tiny_cfg.embed_dims)
    with torch.no_grad():
        alone = tiny_model.head(bev, with_one2many=False)
        together = tiny_model.head(bev, with_one2many=True)
    assert "one2many" in together and "one2many" not in alone
    torch.testing.assert_close(together["pred_pts"], alone["pred_pts"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together["pred_logits"], alone["pred_logits"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------
def _fake_batch(cfg: ModelConfig, batch: int) -> dict:
    rng = np.random.default_rng(0)
    labels, pts, orders, valid = [], [], [], []
    for _ in range(batch):
        n = 4
        lab, pt, od, va = [], [], [], []
        for i in range(n):
            start = rng.uniform([-12, -25], [12, 25])
            line = np.stack([start, start + rng.uniform(-5, 5, size=2)])
            closed = i == 3
            if closed:  # a small square ring
                line = start + np.array([[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]], dtype=np.float64)
            p = resample_polyline(line, cfg.num_pts_per_vec)
            o, v = equivalent_orders(p, closed)
            lab.append(i % 3)
            pt.append(p)
            od.append(o)
            va.append(v)
        labels.append(torch.tensor(lab))
        pts.append(torch.from_numpy(np.stack(pt)))
        orders.append(torch.from_numpy(np.stack(od)))
        valid.append(torch.from_numpy(np.stack(va)))
    width, height = cfg.image_size
    return {
        "gt_labels": labels,
        "gt_pts": pts,
        "gt_orders": orders,
        "gt_orders_valid": valid,
        "bev_seg": (torch.rand(batch, 1, cfg.bev_h, cfg.bev_w) > 0.8).float(),
        "pv_seg": (torch.rand(batch, 6, 1, height // 8, width // 8) > 0.8).float(),
    }


def test_every_parameter_gets_gradient(tiny_cfg: ModelConfig):
    from maptr.training.criterion import build_criterion

    torch.manual_seed(1)
    model = build_maptr(tiny_cfg).train()
    criterion = build_criterion(tiny_cfg)
    img, lidar2img = _inputs(tiny_cfg, batch=1)
    batch = _fake_batch(tiny_cfg, 1)
    criterion.total_loss(criterion(model(img, lidar2img), batch)).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # At the exact init the BEV positional codes only reach the loss through the deformable
    # attentions' offset / weight projections, whose weights start at zero, so their first gradient
    # is exactly zero. After one update every parameter must get a non-zero gradient.
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    model.zero_grad(set_to_none=True)
    criterion.total_loss(criterion(model(img, lidar2img), batch)).backward()
    zero = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not zero, f"parameters with an all-zero gradient after one step: {zero}"


def test_refinement_detaches_reference_points_between_layers(tiny_cfg: ModelConfig, tiny_model: MapTR):
    # The last layer's points must not back-propagate into the previous layer's regression branch.
    tiny_model.train()
    tiny_model.zero_grad(set_to_none=True)
    bev = torch.randn(1, tiny_cfg.bev_h * tiny_cfg.bev_w, tiny_cfg.embed_dims)
    tiny_model.head(bev, with_one2many=False)["pred_pts"].sum().backward()
    head = tiny_model.head
    assert all(p.grad is None for p in head.reg_branches[0].parameters())
    assert all(p.grad is not None for p in head.reg_branches[-1].parameters())
    tiny_model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------------------
# Camera geometry and the spatial cross-attention's visibility mask
# --------------------------------------------------------------------------------------------------
def test_projection_of_a_known_point_gives_the_expected_pixel():
    lidar2img = _camera_rig((352, 128))  # camera 0 looks along +y, f = 281.6, centre (176, 64)
    points = torch.tensor([[[2.0, 10.0, -0.5], [2.0, -10.0, -0.5]]])  # (A=1, Lq=2, 3)
    ref, visible = project_to_cameras(points, lidar2img, (352, 128))
    u = 281.6 * 2.0 / 10.0 + 176.0
    v = 281.6 * 0.5 / 10.0 + 64.0  # z below the camera -> further down the image
    torch.testing.assert_close(ref[0, 0, 0, 0], torch.tensor([u / 352, v / 128]))
    assert visible[0, 0, 0] == 1.0
    assert visible[0, 0, 1] == 0.0  # behind the front camera
    assert visible[0, 3, 1] == 1.0  # seen by the rear camera (yaw 180)


def test_pillar_points_and_cell_centers_follow_the_bev_convention():
    pc_range = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
    pts = pillar_points(bev_h=4, bev_w=2, num_points_in_pillar=4, pc_range=pc_range)  # (4, 8, 3)
    assert pts.shape == (4, 8, 3)
    # Cell (row 0, col 1): behind the car (y = -22.5), right half (x = 7.5); heights -1.5 .. 1.5.
    torch.testing.assert_close(pts[:, 1, :2], torch.tensor([[7.5, -22.5]] * 4))
    torch.testing.assert_close(pts[:, 0, 2], torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    torch.testing.assert_close(bev_cell_centers(4, 2)[1], torch.tensor([0.75, 0.125]))


def test_cell_behind_all_cameras_gets_no_camera_features():
    torch.manual_seed(0)
    embed, feature_shape = 16, (4, 11)
    image_size = (352, 128)
    lidar2img = _camera_rig(image_size)
    lidar2img[:, 1:] = lidar2img[:, :1]  # all six cameras look forward
    bev_h, bev_w = 10, 5
    points = pillar_points(bev_h, bev_w, 4, [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0])
    ref, visible = project_to_cameras(points, lidar2img, image_size)
    sca = SpatialCrossAttention(embed_dims=embed, num_heads=2, num_points=8, num_anchors=4)
    torch.nn.init.normal_(sca.attention.output_proj.bias)  # a non-zero bias must be masked too
    query = torch.randn(1, bev_h * bev_w, embed)
    features = torch.randn(6, feature_shape[0] * feature_shape[1], embed)
    out = sca(query, features, feature_shape, ref, visible)  # (1, H*W, C)
    behind = torch.arange(bev_h * bev_w) < (bev_h // 2) * bev_w  # rows with y < 0
    assert visible[0, :, behind].sum() == 0
    assert torch.count_nonzero(out[0, behind]) == 0
    seen = visible[0, 0] > 0
    assert seen.sum() > 0 and (out[0, seen].abs().sum(-1) > 0).all()
    # Six identical cameras: the average over them equals one camera's output.
    single = sca(query, features[:1], feature_shape, ref[:, :1], visible[:, :1])
    repeated = sca(query, features[:1].repeat(6, 1, 1), feature_shape, ref, visible)
    torch.testing.assert_close(repeated, single, rtol=1e-5, atol=1e-5)


def test_visible_pairs_path_equals_dense_path():
    """Training samples only the (query, camera) pairs that see each other; export uses the dense,
    masked path. Same values and gradients, also for samples that leave a camera's rows."""
    torch.manual_seed(0)
    embed, feature_shape, image_size = 16, (4, 11), (352, 128)
    lidar2img = _camera_rig(image_size, batch=2).double()
    lidar2img[1] = lidar2img[1].roll(1, dims=0)  # the second sample's cameras in another order
    points = pillar_points(10, 5, 4, [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]).double()
    ref, visible = project_to_cameras(points, lidar2img, image_size)
    assert 0 < visible.mean() < 0.5  # some pairs on each side
    sca = SpatialCrossAttention(embed_dims=embed, num_heads=2, num_points=8, num_anchors=4).double()
    # Offsets of several cells: many samples leave their camera's map (above, below and sideways).
    torch.nn.init.normal_(sca.attention.sampling_offsets.weight, std=2.0)
    torch.nn.init.normal_(sca.attention.attention_weights.weight)
    torch.nn.init.normal_(sca.attention.output_proj.bias)
    query = torch.randn(2, 50, embed, dtype=torch.float64, requires_grad=True)
    features = torch.randn(12, feature_shape[0] * feature_shape[1], embed, dtype=torch.float64, requires_grad=True)
    results = []
    for gather_visible in (True, False):
        sca.gather_visible = gather_visible
        sca.zero_grad()
        query.grad = features.grad = None
        out = sca(query, features, feature_shape, ref, visible)  # (2, 50, C)
        (out * torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = [query.grad, features.grad] + [p.grad for p in sca.parameters()]
        results.append((out.detach(), [g.clone() for g in grads]))
    (sparse_out, sparse_grads), (dense_out, dense_grads) = results
    assert torch.count_nonzero(dense_out) > 0
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-10, atol=1e-12)
    for sparse_grad, dense_grad in zip(sparse_grads, dense_grads, strict=True):
        torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-10, atol=1e-12)


def test_export_wrapper_and_quantizer_keep_the_visible_pairs_path(tiny_cfg: ModelConfig):
    from maptr.quant.quantizer import QuantConfig, quantize_model

    def modes(model: torch.nn.Module) -> set[bool]:
        return {m.gather_visible for m in model.modules() if isinstance(m, SpatialCrossAttention)}

    model = build_maptr(tiny_cfg)
    assert modes(model) == {True}  # training and float evaluation: visible pairs only
    MapTRInference(model)
    assert modes(model) == {True}  # the deployed graph samples the visible pairs too
    model = build_maptr(tiny_cfg)
    quantize_model(model, QuantConfig())
    assert modes(model) == {True}  # observers see the exported graph's tensors


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("strides", "channels"), [([32], [512]), ([16, 32], [256, 512]), ([8, 16], [128, 256])])
def test_fpn_fuses_to_the_finest_stride(strides: list[int], channels: list[int]):
    fpn = FPN(in_channels=channels, in_strides=strides, out_channels=32)
    feats = [torch.randn(2, c, 64 // s, 128 // s) for c, s in zip(channels, strides, strict=True)]
    assert fpn(feats).shape == (2, 32, 64 // strides[0], 128 // strides[0])
    with pytest.raises(ValueError, match="double"):
        FPN(in_channels=[1, 2], in_strides=[8, 32], out_channels=4)


def test_positional_encoding_is_column_code_then_row_code():
    enc = LearnedPositionalEncoding(embed_dims=8, num_rows=3, num_cols=2)
    pos = enc()  # (6, 8)
    assert pos.shape == (6, 8)
    torch.testing.assert_close(pos[2 * 2 + 1], torch.cat([enc.col_embed.weight[1], enc.row_embed.weight[2]]))


def test_backbone_truncation_and_strides(tiny_cfg: ModelConfig):
    backbone = build_backbone(tiny_cfg)
    assert backbone.out_strides[0] == tiny_cfg.feature_stride
    assert max(backbone.out_strides) == tiny_cfg.backbone_max_stride
    assert hasattr(backbone, "layer4") == (tiny_cfg.backbone_max_stride == 32)
    with pytest.raises(ValueError, match="backbone_max_stride"):
        build_backbone(model_config(feature_stride=16, backbone_max_stride=8))


def test_stride_4_features_fuse_layer1_into_the_neck_and_size_the_image_mask():
    """``feature_stride: 4`` (a measured lever, docs/training.md): the neck fuses layer1 and layer2 into a
    map at 1/4 of the image, which the PV mask follows."""
    cfg = model_config("nano", feature_stride=4)
    backbone = build_backbone(cfg)
    assert backbone.out_strides == [4, 8] and not hasattr(backbone, "layer3")
    torch.manual_seed(0)
    model = build_maptr(cfg).train()
    img, lidar2img = _inputs(cfg, batch=2)
    out = model(img, lidar2img)
    w, h = (s // 4 for s in cfg.image_size)
    assert out["pv_seg"].shape == (2, 6, 1, h, w)


# --------------------------------------------------------------------------------------------------
# Local weights
# --------------------------------------------------------------------------------------------------
def test_loads_torchvision_state_dict_and_reports_extras(tmp_path):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    backbone = Backbone("resnet18", out_strides=[8, 16])  # layer4 dropped
    report = load_backbone_weights(backbone, path)
    torch.testing.assert_close(backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    torch.testing.assert_close(backbone.bn1.running_var, source.bn1.running_var)
    assert "fc.weight" in report.unexpected and "layer4.0.conv1.weight" in report.unexpected
    assert report.missing == [] and report.mismatched == []


def test_loads_backbone_from_project_checkpoint(tmp_path, tiny_cfg: ModelConfig):
    torch.manual_seed(4)
    trained = build_maptr(tiny_cfg)
    path = tmp_path / "float-checkpoint.pt"
    torch.save({"model": trained.state_dict(), "epoch": 3}, path)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.pretrained = str(path)
    torch.manual_seed(5)
    backbone = build_backbone(cfg)
    torch.testing.assert_close(backbone.conv1.weight, trained.backbone.conv1.weight)
    report = load_backbone_weights(Backbone("resnet34", out_strides=[32]), path)
    assert report.mismatched == [] and "layer1.2.conv1.weight" in report.missing  # resnet34 has 3 blocks


def test_missing_weight_file_names_the_file(tiny_cfg: ModelConfig):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.pretrained = "no/such/resnet.pt"
    with pytest.raises(FileNotFoundError, match="no/such/resnet.pt"):
        build_backbone(cfg)


# --------------------------------------------------------------------------------------------------
# Export smoke test (TorchScript exporter, opset 17; ~1 s quiet, up to ~7 s on a loaded machine)
# --------------------------------------------------------------------------------------------------
def test_onnx_export_matches_onnxruntime(tmp_path, tiny_cfg: ModelConfig, tiny_model: MapTR):
    import onnxruntime as ort

    from maptr.deploy.onnx_export import export_onnx

    start = time.perf_counter()
    wrapper = MapTRInference(tiny_model).eval()
    img, lidar2img = _inputs(tiny_cfg, seed=7)
    path = tmp_path / "maptr_tiny.onnx"
    export_onnx(tiny_model, path, (img, lidar2img))  # the project's exporter (dynamo, opset 21)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, pts = session.run(None, {"img": img.numpy(), "lidar2img": lidar2img.numpy()})
    with torch.no_grad():
        ref_scores, ref_pts = wrapper(img, lidar2img)
    np.testing.assert_allclose(scores, ref_scores.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(pts, ref_pts.numpy(), atol=1e-4, rtol=0)
    assert scores.shape == (1, tiny_cfg.num_vec_one2one, 3)
    assert time.perf_counter() - start < 60


# --------------------------------------------------------------------------------------------------
# pipeline/count_ops.py
# --------------------------------------------------------------------------------------------------
def test_count_ops_groups_add_up(tmp_path, tiny_cfg: ModelConfig, tiny_model: MapTR):
    spec = importlib.util.spec_from_file_location("count_ops", REPO / "pipeline" / "count_ops.py")
    count_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(count_ops)
    result = count_ops.report("tiny", str(REPO / "params.yaml"))
    rows = {row["group"]: row for row in result["rows"]}
    assert result["total"]["params"] == sum(p.numel() for p in tiny_model.parameters())
    assert rows["backbone"]["params"] == sum(p.numel() for p in tiny_model.backbone.parameters())
    seg = rows["seg heads (train only)"]
    assert seg["eval_flops"] == 0 < seg["train_flops"]
    assert rows["decoder"]["train_flops"] > rows["decoder"]["eval_flops"] > 0  # one2many in training
    assert rows["encoder"]["eval_flops"] == rows["encoder"]["train_flops"] > 0
    # The stem conv alone: 6 cameras x (H/2 * W/2) outputs x 64 channels x 3*7*7 MACs x 2 FLOPs.
    width, height = tiny_cfg.image_size
    assert rows["backbone"]["eval_flops"] > 6 * (height // 2) * (width // 2) * 64 * 147 * 2
    assert result["total"]["eval_flops"] == sum(r["eval_flops"] for r in result["rows"])


def test_bf16_autocast_covers_the_image_side_only(tiny_cfg: ModelConfig, tiny_model: MapTR):
    """float.bf16 autocasts the forward, but only the backbone and neck run in bf16: the BEV encoder and
    the map head (camera projection, reference points, point refinement) see float32 features and
    give exactly what they give outside autocast on those features."""
    img, lidar2img = _inputs(tiny_cfg)
    model = tiny_model.eval()
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(img, lidar2img)
            features = model.neck(model.backbone(img.flatten(0, 1)))
        assert features.dtype == torch.bfloat16  # the convolutions do run in bf16
        expected = model.head(model.encoder(features.float(), lidar2img), with_one2many=False)
    assert out["pred_pts"].dtype == torch.float32 and out["pred_logits"].dtype == torch.float32
    assert torch.equal(out["pred_pts"], expected["pred_pts"])
    assert torch.equal(out["pred_logits"], expected["pred_logits"])
    assert all(aux["pred_pts"].dtype == torch.float32 for aux in out["aux_outputs"])
