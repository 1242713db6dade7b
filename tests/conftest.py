"""Shared, expensive fixtures: one tiny synthetic nuScenes world and its packed form per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from maptr.data.packing import pack_nuscenes
from maptr.data.synthetic import generate_world

PC_RANGE = [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]
CLASSES = ["divider", "ped_crossing", "boundary"]
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def model_config(preset: str = "tiny", **changes):
    """A preset's ModelConfig from the repository's params.yaml (the config classes have no defaults),
    with fields changed (``num_pts_per_vec=5``; not re-validated)."""
    import dataclasses

    from maptr.config import load_model_config, load_params

    params = load_params(REPO_PARAMS)
    params["model"]["preset"] = preset
    return dataclasses.replace(load_model_config(params), **changes)


def train_config(**changes):
    """The repository's ``float`` section as a TrainConfig, with fields changed (``epochs=1``)."""
    import dataclasses

    from maptr.config import TrainConfig, load_params, load_section

    changes = {"val_every_epochs": 1, **changes}  # the tests check every epoch's metrics
    return dataclasses.replace(load_section(load_params(REPO_PARAMS), "float", TrainConfig), **changes)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """2 train + 1 val scenes x 4 key frames, 480x270 cameras (the default image size)."""
    root = tmp_path_factory.mktemp("world") / "nuscenes"
    generate_world(
        root, seed=0, version="v1.0-trainval", train_scenes=2, val_scenes=1, samples_per_scene=4,
        image_width=480, image_height=270, jpeg_quality=90, workers=1, check_variety=False, progress=False,
    )  # fmt: skip
    return root


@pytest.fixture(scope="session")
def packed_world(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "packed"
    pack_nuscenes(dataroot=str(tiny_world), version="v1.0-trainval", out=str(out), pc_range=PC_RANGE)
    return out


MICRO_PRESET = {
    # the tiny architecture shrunk further so that a training step takes milliseconds in tests
    "backbone": "resnet18", "feature_stride": 8, "backbone_max_stride": 8, "embed_dims": 32, "num_heads": 2,
    "ffn_dims": 64, "image_size": [96, 32], "bev_h": 10, "bev_w": 5, "num_points_in_pillar": 2,
    "encoder_layers": 1, "encoder_sca_points": 2, "encoder_tsa_points": 2, "decoder_layers": 2,
    "decoder_points": 2, "num_vec_one2one": 12, "num_vec_one2many": 24, "k_one2many": 2, "num_pts_per_vec": 20,
    "dropout": 0.1, "bev_seg": True, "pv_seg": True, "max_num": 12,
    "post_center_range": [-20.0, -35.0, 20.0, 35.0],
}  # fmt: skip


def write_micro_params(tmp_path: Path, **sections) -> Path:
    """A params.yaml for tests: the repo's, with the micro preset selected and section keys overridden
    (``float={"epochs": 1}``)."""
    import yaml

    from maptr.yaml12 import parse_yaml  # YAML 1.2, as DVC writes params (PyYAML reads 1e-06 as a string)

    data = parse_yaml((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    data["model"]["presets"]["micro"] = dict(MICRO_PRESET)
    data["model"]["preset"] = "micro"
    data["float"]["val_every_epochs"] = 1  # the tests check every epoch's metrics
    for name, values in sections.items():
        data[name].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


REPO = Path(__file__).resolve().parents[1]


def float_train_cmd(params: Path, out: Path, packed: Path, nproc: int = 1, resume: bool = False) -> list[str]:
    """pipeline/float_train.py (under torchrun when nproc > 1) with every output inside ``out``."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    cmd = [*(launcher or [sys.executable]), str(REPO / "pipeline" / "float_train.py"), "--params", str(params),
           "--packed", str(packed), "--best", str(out / "best.pt"), "--last", str(out / "last.pt"),
           "--metrics", str(out / "float.json"), "--curve", str(out / "curve.json"),
           "--reports", str(out / "reports")]  # fmt: skip
    return cmd + (["--resume"] if resume else [])


def float_train_env(out: Path) -> dict[str, str]:
    """A private MLflow store per run and one thread per process."""
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
            "MLFLOW_EXPERIMENT_NAME": "test"}  # fmt: skip


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core machine a busy second core
    makes every op wait for it (10x slower and more)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro_cfg(tmp_path_factory):
    """The micro preset's ModelConfig."""
    from maptr.config import load_model_config, load_params

    return load_model_config(load_params(write_micro_params(tmp_path_factory.mktemp("params"))))


def run_entrypoint_here(script: str, *args: str) -> int:
    """``python pipeline/<script> <args>`` in this process (no interpreter start-up): the script runs as
    ``__main__``, through its own entry code; returns its exit code. Its stderr goes to pytest's capture."""
    import runpy

    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(str(REPO / "pipeline" / script), run_name="__main__")
        return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite store whose tables exist: creating them takes seconds, a copy a fraction of one."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()  # creates the tables
    return db


@pytest.fixture
def mlflow_store(mlflow_template, tmp_path, monkeypatch) -> str:
    """A private MLflow store for this test (MLFLOW_TRACKING_URI and the experiment name set); its URI."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "test")
    return uri
