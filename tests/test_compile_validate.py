"""Compile and validate stages: the saved deployed model, compile.json's documented keys, the agreement figures."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import run_entrypoint_here, write_micro_params

from maptr.config import load_model_config, load_params
from maptr.deploy.compile_report import COMPILE_KEYS, op_table
from maptr.deploy.onnx_export import example_inputs, export_onnx
from maptr.deploy.ort_compile import optimize_and_save, outputs_match
from maptr.deploy.ort_runner import SAVED, OrtPredictor, create_session, scores_to_logits
from maptr.evaluation.agreement import output_agreement
from maptr.models.maptr import build_maptr
from maptr.quant.calibration import calibrate
from maptr.quant.quantizer import QuantConfig, quantize_model
from maptr.training.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Micro params, a calibrated micro model saved as a QAT checkpoint, and both exports."""
    out = tmp_path_factory.mktemp("deploy")
    compile_params = {"threads": 1, "thread_sweep": [2, 1], "warmup": 1, "runs": 4, "profile_runs": 1}
    params = write_micro_params(out, compile=compile_params, validate={"batch_size": 2, "top_k": 5})
    cfg = load_model_config(load_params(params))
    torch.manual_seed(0)
    quant_cfg = QuantConfig(int16_ops=("head.cls_branches.1.0",), observer="minmax")
    model = quantize_model(build_maptr(cfg), quant_cfg)
    inputs = example_inputs(model)
    calibrate(model, [{"img": inputs[0], "lidar2img": inputs[1]}])
    save_checkpoint(out / "qat.pt", {"model": model.state_dict(), "stage": "qat", "preset": "micro",
                                     "quant": quant_cfg.to_dict()})  # fmt: skip
    export_onnx(model, out / "qdq.onnx", inputs)
    torch.manual_seed(0)
    export_onnx(build_maptr(cfg), out / "float.onnx", inputs)
    return {"dir": out, "params": params, "cfg": cfg, "inputs": inputs}


def _run_stage(script: str, monkeypatch, tmp_path: Path, *args: str) -> None:
    """Runs a pipeline script's main() in this process (no interpreter start-up), MLflow in tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test")
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(REPO / "pipeline" / script), run_name="stage")["main"]()


def test_saved_deployed_model_is_optimized_and_reproduces_the_outputs(micro, tmp_path):
    compiled = optimize_and_save(micro["dir"] / "qdq.onnx", tmp_path / "deploy.onnx", "extended")
    deployed = compiled.path
    graph = onnx.load(str(deployed)).graph
    op_types = {node.op_type for node in graph.node}
    assert {"QLinearConv", "GridSample"} <= op_types and "Conv" not in op_types  # fused, saved to disk
    # A DequantizeLinear of a constant left to run per frame feeds only a float Gemm's weight or bias (an
    # int16-input linear): ORT would re-quantize a folded float weight there when loading the file.
    constants = {init.name for init in graph.initializer}
    readers = {name: node for node in graph.node for name in node.input}
    left = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert all(readers[n.output[0]].op_type == "Gemm" and list(readers[n.output[0]].input).index(n.output[0]) >= 1
               for n in left)  # fmt: skip
    counts = compiled.counts
    assert counts["quantize_float_output_biases"] > 0  # uint8 linears read by float operators get an int32 bias
    assert counts["space_to_depth_stem"] == 1  # the stem, on the 3 colour channels
    assert counts["flatten_conv_outputs_channels_last"] == 1  # the neck's output, flattened to the encoder's tokens
    # ORT's slow fused skip layer norms are split back; linears are no longer wrapped in reshape chains
    assert counts["split_skip_layer_norms"] > 0 and "SkipLayerNormalization" not in op_types
    assert counts["collapse_reshape_chains"] > 0
    assert counts["expand_short_run_broadcasts"] > 0  # deformable attention's reference points + offsets
    img, lidar2img = micro["inputs"]
    feeds = {"img": img.numpy(), "lidar2img": lidar2img.numpy()}
    # ORT's QGemm nodes moved to the kernels that add the bias after the GEMM: exact for the uint8 outputs,
    # float rounding for the float ones
    kernels = {(node.op_type, node.domain) for node in graph.node}
    assert ("QGemm", "com.microsoft") not in kernels and ("QLinearConv", "com.microsoft") in kernels
    assert counts["move_qgemm_to_faster_kernels"] > 0
    assert ("MatMulIntegerToFloat", "com.microsoft") in kernels  # the float-output ones
    check = outputs_match(micro["dir"] / "qdq.onnx", deployed, feeds)
    assert max(check.reproduces.values()) == 0.0  # the saved file is the compiled graph, at ORT's defaults too
    assert max(check.qgemm_rewrite_effect.values()) < 0.05  # bias after the scale: float rounding + code flips
    assert not list(tmp_path.glob("*.tmp-*"))


# The micro fixture's export and what the compile stage made of it before its rewrites became two lists of
# passes (commit 2c2c0ff; onnxruntime 1.32.0, onnx 1.23.2, torch 2.14.1): the same export must still compile
# to the same bytes. The export is compared without its nodes' metadata (the exporter records the source
# files' paths there; ORT drops it); another export (other library versions) has no recorded compilation.
RECORDED_QDQ_MD5 = "6e25553946dabd37b02d2f8622e41bbf"
RECORDED_DEPLOYED_MD5 = "d04264773eda9e16e75747ff68603412"


def test_compiled_micro_model_is_byte_identical_to_the_recorded_compilation(micro, tmp_path):
    import onnxruntime

    qdq = onnx.load(str(micro["dir"] / "qdq.onnx"))
    for node in qdq.graph.node:
        del node.metadata_props[:]
    if hashlib.md5(qdq.SerializeToString()).hexdigest() != RECORDED_QDQ_MD5 or onnxruntime.__version__ != "1.32.0":
        pytest.skip("not the recorded export / ONNX Runtime: no recorded compilation to compare with")
    deployed = optimize_and_save(micro["dir"] / "qdq.onnx", tmp_path / "deploy.onnx", "extended").path
    assert hashlib.md5(deployed.read_bytes()).hexdigest() == RECORDED_DEPLOYED_MD5


def test_compile_stage_writes_the_documented_report(micro, tmp_path, monkeypatch):
    d = micro["dir"]
    report, table = tmp_path / "compile.json", tmp_path / "compile.md"
    _run_stage("compile.py", monkeypatch, tmp_path, "--params", str(micro["params"]), "--qdq", str(d / "qdq.onnx"),
               "--float", str(d / "float.onnx"), "--out", str(tmp_path / "deploy.onnx"), "--report", str(report),
               "--table", str(table))  # fmt: skip
    doc = json.loads(report.read_text())
    for name in ("float", "deployed"):
        assert set(COMPILE_KEYS) <= set(doc[name])
        entry = doc[name]
        assert 0 < entry["latency_ms_p50"] <= entry["latency_ms_p90"]
        assert entry["ops"]["op_counts"] and sum(entry["ops"]["op_counts"].values()) > 20
    assert doc["speedup_p50"] == pytest.approx(doc["float"]["latency_ms_p50"] / doc["deployed"]["latency_ms_p50"])
    assert doc["float"]["ops"]["integer_kernels"] == 0 and doc["float"]["ops"]["qdq_nodes"] == 0
    assert doc["deployed"]["ops"]["integer_kernels"] > 10 and doc["deployed"]["ops"]["op_counts"]["QLinearConv"] > 5
    assert doc["deployed"]["size_mb"] < doc["float"]["size_mb"]  # int8 weights
    assert doc["threads"] == 1 and doc["runs"] == 4
    text = table.read_text()
    assert "latency p50" in text and "QLinearConv" in text and "Speed-up" in text
    create_session(tmp_path / "deploy.onnx", threads=1, level=SAVED)  # loads without re-optimizing
    assert doc["deployed_load_level"] == "all" and doc["passes"]["fold_constants"]["count"] > 0
    # one entry per pass, in the order they ran, each with the ORT version it was measured on
    assert [entry["step"] for entry in doc["passes"].values()] == list(range(1, 12))
    assert all(entry["measured_on_ort"] and entry["counts"] for entry in doc["passes"].values())
    assert "| 1 | `fold_constants` | before ORT |" in text
    sweep = doc["by_threads"]
    assert sorted(sweep) == ["1", "2"] and sweep["1"]["deployed_ms_p50"] == doc["deployed"]["latency_ms_p50"]
    assert sweep["2"]["deployed_over_float"] == pytest.approx(
        sweep["2"]["deployed_ms_p50"] / sweep["2"]["float_ms_p50"]
    )
    assert sweep["2"]["round_ratio_p25"] <= sweep["2"]["round_ratio_p50"] <= sweep["2"]["round_ratio_p75"]
    assert "| threads |" in text and "per-round ratio" in text and "paired by round" in text
    assert doc["deployed_over_float_paired"] == sweep["1"]["round_ratio_p50"]  # compile.threads is 1 here


def test_compile_removes_a_saved_model_that_does_not_reproduce_the_outputs(micro, tmp_path, monkeypatch):
    import maptr.deploy.ort_compile as ort_compile

    mismatch = ort_compile.SavedModelCheck({"scores": 0.01, "pts": 0.0}, {"scores": 0.0, "pts": 0.0})
    monkeypatch.setattr(ort_compile, "outputs_match", lambda *args, **kwargs: mismatch)
    d, out = micro["dir"], tmp_path / "deploy.onnx"
    with pytest.raises(RuntimeError, match="did not reproduce"):
        _run_stage("compile.py", monkeypatch, tmp_path, "--params", str(micro["params"]), "--qdq", str(d / "qdq.onnx"),
                   "--float", str(d / "float.onnx"), "--out", str(out), "--report", str(tmp_path / "compile.json"),
                   "--table", str(tmp_path / "compile.md"))  # fmt: skip
    assert not out.exists() and not (tmp_path / "compile.json").exists()


def test_output_agreement_on_a_hand_made_case():
    ref_scores = np.zeros((2, 4, 3))
    ref_scores[:, :, 0] = [0.9, 0.8, 0.1, 0.05]  # queries 0, 1 are the top-2, best class 0
    scores = ref_scores.copy()
    scores[0, 1] = [0.7, 0.75, 0.0]  # sample 0: query 1 switches to class 1 (diff 0.1 and 0.75)
    scores[1, 3, 2] = 0.5  # a low-ranked query changes: outside the top-2
    ref_pts = np.full((2, 4, 5, 2), 0.5)
    pts = ref_pts.copy()
    pts[1, 0, 2] = [0.6, 0.55]  # 0.1 * 30 m in x, 0.05 * 60 m in y: 3 m, 3 m -> 4.243 m
    got = output_agreement(scores, pts, ref_scores, ref_pts, PC_RANGE, top_k=2)
    assert got["scores_max_abs_diff"] == pytest.approx(0.75)
    assert got["scores_mean_abs_diff"] == pytest.approx((0.1 + 0.75 + 0.5) / 24)
    assert got["pts_max_abs_diff"] == pytest.approx(0.1)
    assert got["pts_max_abs_diff_m"] == pytest.approx(np.hypot(3.0, 3.0))
    assert got["pts_mean_abs_diff_m"] == pytest.approx(np.hypot(3.0, 3.0) / 40)
    assert got["topk_pts_mean_abs_diff_m"] == pytest.approx(np.hypot(3.0, 3.0) / 20)
    assert got["topk_class_agreement"] == pytest.approx(3 / 4)
    assert got["samples"] == 2 and got["top_k"] == 2
    with pytest.raises(ValueError, match="top_k"):
        output_agreement(scores, pts, ref_scores, ref_pts, PC_RANGE, top_k=5)


def test_compile_checks_the_deployed_model_under_a_temporary_name_before_it_appears(micro, tmp_path, monkeypatch):
    import maptr.deploy.ort_compile as ort_compile

    d, out, seen = micro["dir"], tmp_path / "deploy.onnx", []

    def checked(reference, deployed, *args, **kwargs):
        seen.append((Path(deployed).name, out.exists()))  # a kill now must not leave a deployable-looking file
        raise RuntimeError("stop after the check: the rest of compile is not under test")

    monkeypatch.setattr(ort_compile, "outputs_match", checked)
    with pytest.raises(RuntimeError, match="stop after the check"):
        _run_stage("compile.py", monkeypatch, tmp_path, "--params", str(micro["params"]), "--qdq", str(d / "qdq.onnx"),
                   "--float", str(d / "float.onnx"), "--out", str(out))  # fmt: skip
    assert seen == [(f"deploy.onnx.tmp-{os.getpid()}", False)] and not list(tmp_path.glob("deploy.onnx*"))


def _garbage(path: Path, source: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return path


def _truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("damage", [_garbage, _truncated])
@pytest.mark.parametrize("script", ["compile.py", "validate.py", "infer.py"])
def test_unreadable_onnx_is_one_line_error(micro, packed_world, tmp_path, monkeypatch, capsys, script, damage):
    d = micro["dir"]
    bad = damage(tmp_path / "model.onnx", d / "qdq.onnx")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    common = ["--params", str(micro["params"])]
    args = {
        "compile.py": ["--qdq", str(bad), "--float", str(d / "float.onnx"), "--out", str(tmp_path / "deploy.onnx"),
                       "--report", str(tmp_path / "compile.json"), "--table", str(tmp_path / "compile.md")],
        "validate.py": ["--deployed", str(bad), "--qat-checkpoint", str(d / "qat.pt"), "--packed", str(packed_world),
                        "--metrics", str(tmp_path / "deployed.json")],
        "infer.py": ["--onnx", str(bad), "--packed", str(packed_world), "--out", str(tmp_path / "infer")],
    }[script]  # fmt: skip
    assert run_entrypoint_here(script, *common, *args) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: not a readable ONNX model (truncated or corrupt" in err and "re-run the export" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "mlflow.db") == ["model.onnx"]


def test_disk_full_during_compile_is_one_line_and_keeps_the_deployed_model(micro, tmp_path, monkeypatch, capsys):
    d, out = micro["dir"], tmp_path / "deploy.onnx"
    out.write_bytes(b"the deployed model of the last good compile")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", disk_full)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = run_entrypoint_here("compile.py", "--params", str(micro["params"]), "--qdq", str(d / "qdq.onnx"), "--float",
                               str(d / "float.onnx"), "--out", str(out), "--report", str(tmp_path / "compile.json"),
                               "--table", str(tmp_path / "compile.md"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"error: {out}: cannot write (No space left on device); free disk space" in err
    assert out.read_bytes() == b"the deployed model of the last good compile" and not list(tmp_path.glob("*.tmp-*"))


def test_scores_to_logits_inverts_the_sigmoid_including_saturation():
    scores = np.array([0.0, 1e-6, 0.25, 0.5, 0.999, 1.0], dtype=np.float32)
    logits = scores_to_logits(scores)
    assert np.isneginf(logits[0]) and np.isposinf(logits[-1])
    assert torch.sigmoid(torch.from_numpy(logits)).numpy() == pytest.approx(scores, abs=1e-7)


def test_validate_stage_scores_the_deployed_model_and_its_agreement(micro, packed_world, tmp_path, monkeypatch):
    d = micro["dir"]
    deployed = optimize_and_save(d / "qdq.onnx", tmp_path / "deploy.onnx", "extended").path
    metrics = tmp_path / "deployed.json"
    _run_stage("validate.py", monkeypatch, tmp_path, "--params", str(micro["params"]), "--deployed", str(deployed),
               "--qat-checkpoint", str(d / "qat.pt"), "--packed", str(packed_world),
               "--metrics", str(metrics))  # fmt: skip
    doc = json.loads(metrics.read_text())
    assert {"mAP", "AP_divider", "AP_ped_crossing", "AP_boundary", "AP_divider_0.5"} <= set(doc)
    agreement = doc["agreement"]
    assert agreement["samples"] == 4 and agreement["top_k"] == 5  # the whole val split of the tiny world
    assert agreement["mAP_delta"] == pytest.approx(doc["mAP"] - agreement["qat_mAP"])
    assert abs(agreement["mAP_delta"]) <= 0.05 and agreement["topk_class_agreement"] >= 0.8
    assert agreement["scores_max_abs_diff"] < 0.05


def test_ort_predictor_matches_the_batch_one_graph_per_sample(micro):
    predictor = OrtPredictor.from_path(micro["dir"] / "qdq.onnx", threads=1, level="extended")
    img, lidar2img = micro["inputs"]
    logits, pts = predictor(torch.cat([img, img.flip(0)]), torch.cat([lidar2img, lidar2img]))
    cfg = micro["cfg"]
    assert logits.shape == (2, cfg.num_vec_one2one, cfg.num_classes) and pts.shape[:2] == (2, cfg.num_vec_one2one)
    assert torch.equal(logits[0], logits[1]) and predictor.last_scores.shape == (2, cfg.num_vec_one2one, 3)
    with pytest.raises(ValueError, match="lidar2img"):
        predictor(img, lidar2img[:, :3])


def test_op_table_classifies_kernels():
    from maptr.deploy.checker import KernelInfo

    kernels = [
        KernelInfo("a", "QLinearConv", ["x"], ["uint8"], 10),
        KernelInfo("b", "GridSample", ["x"], ["float"], 20),
        KernelInfo("c", "DequantizeLinear", ["x"], ["uint8"], 1),
        KernelInfo("d", "Reshape", ["x"], ["uint8"], 1),
        KernelInfo("e", "QLinearConv", ["x"], ["uint8"], 5),
    ]
    table = op_table(kernels).to_dict()
    assert table["op_counts"] == {"DequantizeLinear": 1, "GridSample": 1, "QLinearConv": 2, "Reshape": 1}
    assert (table["integer_kernels"], table["float_kernels"], table["qdq_nodes"], table["data_movement_nodes"]) == (
        2, 1, 1, 1)  # fmt: skip
    assert table["microseconds_by_op"]["QLinearConv (uint8)"] == 15


def test_latency_rounds_keep_one_session_alive_and_time_every_run(monkeypatch):
    """Idle ORT worker threads spin-wait: a second live session would steal the timed one's cores."""
    from maptr.deploy import compile_report

    alive: list[str] = []
    peak = []

    class FakeSession:
        def __init__(self, path: str) -> None:
            self.path = path
            alive.append(path)

        def __del__(self) -> None:
            alive.remove(self.path)

    def fake_run(session, img, lidar2img):
        peak.append(len(alive))

    opened = []

    def fake_session(path, threads, level):
        opened.append(str(path))
        return FakeSession(str(path))

    monkeypatch.setattr(compile_report, "create_session", fake_session)
    monkeypatch.setattr(compile_report, "run_frame", fake_run)
    models = {"float": ("f.onnx", "all"), "deployed": ("d.onnx", "disabled")}
    feeds = {"img": np.zeros(1), "lidar2img": np.zeros(1)}
    times = compile_report.alternating_latency(models, feeds, threads=2, warmup=2, runs=7, rounds=3)
    assert {name: len(ms) for name, ms in times.items()} == {"float": 7, "deployed": 7}
    assert max(peak) == 1 and not alive  # never two sessions at once, none left open
    assert len(peak) == 2 * (7 + 3 * 2)  # every timed run plus 2 warm-up runs per session and round
    assert opened == ["f.onnx", "d.onnx", "d.onnx", "f.onnx", "f.onnx", "d.onnx"]  # the order alternates
    assert compile_report.round_shares(7, 3) == [3, 2, 2] and compile_report.round_shares(2, 5) == [1, 1]
    with pytest.raises(ValueError, match="rounds"):
        compile_report.alternating_latency(models, feeds, threads=2, warmup=0, runs=3, rounds=0)


def test_latency_summary_gives_the_ratio_of_medians_and_its_spread_between_rounds():
    from maptr.deploy.compile_report import latency_summary

    times = {"float": np.array([10.0, 10.0, 20.0, 20.0]), "deployed": np.array([5.0, 5.0, 16.0, 16.0])}
    summary = latency_summary(times, rounds=2)  # rounds of [10, 10] vs [5, 5] and [20, 20] vs [16, 16]
    assert summary["float_ms_p50"] == 15.0 and summary["deployed_ms_p50"] == 10.5
    assert summary["deployed_over_float"] == pytest.approx(0.7)
    assert (summary["round_ratio_p25"], summary["round_ratio_p50"], summary["round_ratio_p75"]) == pytest.approx(
        (0.575, 0.65, 0.725))  # fmt: skip
