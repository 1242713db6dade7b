"""The training loop: deterministic, exactly resumable, stops on a non-finite loss; float-train end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import float_train_cmd, float_train_env, train_config, write_micro_params

from maptr.config import load_model_config, load_params
from maptr.data.dataset import DatasetOptions, PackedMapDataset
from maptr.distributed import DistContext
from maptr.evaluation.inference import evaluate_model, torch_predictor
from maptr.evaluation.postprocess import build_postprocess
from maptr.models.maptr import build_maptr
from maptr.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from maptr.training.criterion import build_criterion
from maptr.training.schedule import lr_factor
from maptr.training.tracking import StageRun
from maptr.training.trainer import Trainer, TrainingDiverged

REPO = Path(__file__).resolve().parents[1]


def make_trainer(packed: Path, tmp_path: Path, **overrides) -> Trainer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    params = load_params(write_micro_params(tmp_path))
    model_cfg = load_model_config(params)
    cfg = train_config(**{"epochs": 2, "batch_size": 2, "lr": 1e-3, "backbone_lr_mult": 0.1, "warmup_steps": 2,
                          "num_workers": 0, "augment": True, "cache_mb": 0, "ckpt_every_steps": 1,
                          "log_every_steps": 1, **overrides})  # fmt: skip
    torch.manual_seed(cfg.seed)
    train = PackedMapDataset(packed, "train", DatasetOptions.from_model(model_cfg, augment=True, seed=cfg.seed))
    val = PackedMapDataset(packed, "val", DatasetOptions.from_model(model_cfg))
    post = build_postprocess(model_cfg)

    def validate(m):
        return evaluate_model(torch_predictor(m, torch.device("cpu")), val, post, batch_size=2)[0]

    return Trainer(
        model=build_maptr(model_cfg), criterion=build_criterion(model_cfg), train_set=train, validate=validate,
        cfg=cfg, ctx=DistContext(), tracker=StageRun("test", {}, enabled=False), stage="float", preset="micro",
        best_path=tmp_path / "best.pt", last_path=tmp_path / "last.pt", fingerprint="test-run",
    )  # fmt: skip


def test_schedule_warmup_then_cosine_to_floor():
    kw = dict(total_steps=100, warmup_steps=10, warmup_ratio=1 / 3, min_lr_ratio=1e-3)
    assert lr_factor(0, **kw) == pytest.approx(1 / 3)
    assert lr_factor(5, **kw) == pytest.approx(1 / 3 + (2 / 3) * 0.5)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, **kw) == pytest.approx(0.5 * (1 + 1e-3), rel=1e-3)
    assert lr_factor(100, **kw) == pytest.approx(1e-3)


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_training_is_deterministic_and_resume_is_exact(packed_world, tmp_path, bf16):
    # bf16: the image side under CPU autocast (float.bf16: true; `auto` is that where the CPU has it)
    full = make_trainer(packed_world, tmp_path / "a", bf16=bf16)
    assert full.precision == ("bf16" if bf16 else "fp32")
    state_a = full.fit()
    params_a = {k: v.clone() for k, v in full.model.state_dict().items()}

    # Same seed again: the same metrics.
    state_b = make_trainer(packed_world, tmp_path / "b", bf16=bf16).fit()
    assert [h["mAP"] for h in state_a.history] == [h["mAP"] for h in state_b.history]
    assert [h["train_loss"] for h in state_a.history] == [h["train_loss"] for h in state_b.history]

    # Interrupted after 3 optimizer steps (inside epoch 2), then resumed from the last checkpoint.
    broken = make_trainer(packed_world, tmp_path / "c", bf16=bf16)
    real_step, calls = broken._step, []

    def dying_step(batch):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real_step(batch)

    broken._step = dying_step
    with pytest.raises(KeyboardInterrupt):
        broken.fit()
    resumed = make_trainer(packed_world, tmp_path / "c", bf16=bf16)
    assert "resumed" in resumed.resume()
    state_c = resumed.fit()
    assert [h["mAP"] for h in state_c.history] == [h["mAP"] for h in state_a.history]
    assert [h["train_loss"] for h in state_c.history] == [h["train_loss"] for h in state_a.history]
    for k, v in resumed.model.state_dict().items():
        assert torch.equal(v, params_a[k]), f"parameter {k} differs after resume"

    # A different run (other fingerprint) is not resumed from that checkpoint.
    other = make_trainer(packed_world, tmp_path / "c", bf16=bf16)
    other.fingerprint = "another-run"
    assert "another run" in other.resume()


def test_nan_loss_stops_before_the_optimizer_step(packed_world, tmp_path):
    trainer = make_trainer(packed_world, tmp_path)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.criterion.total_loss = lambda losses: torch.tensor(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 0 step 0.*lower float.lr"):
        trainer.fit()
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.named_parameters())  # no optimizer step
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()


def _fake_val(maps: list[float]):
    """A validate function scoring epoch i (1-based, counted by its calls) with maps[i - 1]."""
    calls = []

    def validate(model):
        calls.append(1)
        return {"mAP": maps[len(calls) - 1]}

    return validate


def test_resumed_run_writes_the_best_checkpoint_that_dvc_deleted(packed_world, tmp_path, one_thread):
    # Epoch 1 is the best; the run is killed inside epoch 2; `dvc repro` deletes the stage's outputs (the
    # best file) before rerunning; the resumed epoch 2 does not beat epoch 1, and still the best file appears.
    killed = make_trainer(packed_world, tmp_path)
    killed.validate = _fake_val([0.5, 0.3])
    real_step, calls = killed._step, []

    def dying_step(batch):
        if len(calls) == 5:  # 4 steps per epoch: inside epoch 2
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real_step(batch)

    killed._step = dying_step
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    (tmp_path / "best.pt").unlink(missing_ok=True)  # what `dvc repro` does to a stage's outputs before it runs
    resumed = make_trainer(packed_world, tmp_path)
    resumed.validate = _fake_val([0.3])
    assert "resumed" in resumed.resume()
    resumed.fit()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["metrics"] == {"mAP": 0.5} and best["train_state"]["epoch"] == 0
    assert [h["mAP"] for h in resumed.state.history] == [0.5, 0.3]


def test_val_every_epochs_validates_every_nth_and_the_last_epoch(packed_world, tmp_path, one_thread):
    # float.val_every_epochs: 2 over 3 epochs validates epochs 2 and 3 only; epoch 1 keeps its train loss,
    # the best epoch is chosen among the validated ones, and the curve plot takes the gap.
    from maptr.training.stage import best_epoch_metrics
    from maptr.viz import learning_curve

    trainer = make_trainer(packed_world, tmp_path, epochs=3, val_every_epochs=2)
    trainer.validate = _fake_val([0.4, 0.3])  # fails with IndexError if called a third time
    state = trainer.fit()
    assert [h["epoch"] for h in state.history] == [1, 2, 3]
    assert ["mAP" in h for h in state.history] == [False, True, True]
    assert all("train_loss" in h for h in state.history)
    assert load_checkpoint(tmp_path / "best.pt")["metrics"] == {"mAP": 0.4}
    assert best_epoch_metrics(state.history) == {"mAP": 0.4, "best_epoch": 2, "epochs": 3}
    learning_curve(state.history, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_divergence_message_calls_only_a_finite_checkpoint_good(packed_world, tmp_path):
    trainer = make_trainer(packed_world, tmp_path)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state["backbone.layer1.0.bn1.running_var"][0] = float("inf")  # as written by an earlier version
    save_checkpoint(tmp_path / "last.pt", {"model": state, "stage": "float", "train_state": {"global_step": 3}})
    trainer.criterion.total_loss = lambda losses: torch.tensor(float("nan"))
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "last good checkpoint" not in message
    assert "last.pt holds NaN / inf too (backbone.layer1.0.bn1.running_var)" in message


def test_a_model_whose_buffers_overflow_is_never_saved(packed_world, tmp_path):
    trainer = make_trainer(packed_world, tmp_path)  # a resume checkpoint after every step
    bn = trainer.model.get_submodule("backbone.layer1.0.bn2")

    def overflow(module, args, out) -> None:
        module.running_var.data.fill_(float("inf"))  # after the forward: this step's loss stays finite

    bn.register_forward_hook(overflow)
    with pytest.raises(TrainingDiverged, match=r"backbone.layer1.0.bn2.running_var hold NaN / inf .*loss was still"):
        trainer.fit()
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_tracking_server_lost_mid_training_does_not_stop_it(
    packed_world, tmp_path, monkeypatch, capsys, one_thread, mlflow_store
):
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setattr(StageRun, "RETRY_PAUSE_S", 0.0, raising=False)
    monkeypatch.setattr(
        StageRun, "QUIET_S", 1e9, raising=False
    )  # once failed, calls are only queued (and tried at the end)
    trainer = make_trainer(packed_world, tmp_path)  # logs after every step
    trainer.validate = _fake_val([0.5, 0.6])
    real, calls = mlflow.log_metrics, []

    def going_away(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed with "
                                  "exception HTTPConnectionPool: Connection refused")  # fmt: skip
        return real(*args, **kwargs)

    with StageRun("float-train", {}) as run:
        monkeypatch.setattr(mlflow, "log_metrics", going_away)
        trainer.tracker = run
        state = trainer.fit()
    assert [h["mAP"] for h in state.history] == [0.5, 0.6] and (tmp_path / "best.pt").is_file()
    err = capsys.readouterr().err
    assert err.count("failed (API request to http://mlflow:5000") == 1  # warned once, not at every step
    assert "the stage goes on" in err
    assert "not logged: 6 x train metrics (step 3, ..., step 8), 2 x epoch metrics (step 1, step 2)" in err


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"ckpt.pt: not a readable checkpoint \(truncated or corrupt"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_float_train_under_torchrun_two_ranks(packed_world, tmp_path):
    params = write_micro_params(tmp_path, float={"epochs": 1, "batch_size": 2, "num_workers": 0, "warmup_steps": 1})
    cmd = float_train_cmd(params, tmp_path, packed_world, nproc=2)
    res = subprocess.run(cmd, cwd=tmp_path, env=float_train_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "float.json").read_text())
    assert set(metrics) >= {"mAP", "AP_divider", "AP_ped_crossing", "AP_boundary"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("mAP", "AP_divider", "AP_ped_crossing", "AP_boundary"))
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert len(curve) == 1 and curve[0]["step"] == 2  # 8 train samples / 2 ranks / batch 2
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["preset"] == "micro" and ckpt["metrics"]["mAP"] == metrics["mAP"]
    assert (tmp_path / "reports" / "learning_curve.png").stat().st_size > 0
    assert (tmp_path / "mlflow.db").exists()
