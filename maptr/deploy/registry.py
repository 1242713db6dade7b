"""ONNX models in MLflow: logged with a signature, the deployed and float models registered in the Model
Registry as ``maptr-<preset>-deployed`` / ``maptr-<preset>-float``, their versions tagged with the ladder;
the ladder itself (float -> calibration -> QAT -> deployed), found by the file digests of
maptr.training.lineage and written to the group's parent run.

A version is tagged ``onnx_sha256`` (the file's bytes) and ``source_sha256`` (the checkpoint it was
exported from, for the float model), so that validate, which scores the deployed file, finds both
versions again and tags them with every ladder row's metrics (``ladder.<row>.<key>``, e.g.
``ladder.qat.mAP``): the model page then lists the ladder next to each version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from maptr.training.lineage import file_sha256, headline, val_metrics

DEPLOYED, FLOAT = "deployed", "float"
# the ladder's rows: the stage whose run scores each model, and the row's name
LADDER = (("float-train", FLOAT), ("calibrate", "calibration"), ("qat", "qat"), ("validate", DEPLOYED))


def registered_name(preset: str, kind: str) -> str:
    return f"maptr-{preset or 'model'}-{kind}"


def onnx_signature(model: onnx.ModelProto):
    """The model's inputs and outputs as an MLflow signature (names, dtypes, static shapes)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def specs(values) -> Schema:
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
            out.append(TensorSpec(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type), shape, v.name))
        return Schema(out)

    initializers = {init.name for init in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    return ModelSignature(inputs=specs(inputs), outputs=specs(model.graph.output))


def log_onnx(path: str | Path, name: str, registered: str | None = None, source: str | Path | None = None,
             tags: dict[str, str] | None = None) -> Any:  # fmt: skip
    """Log ``path`` (flavour ``onnx``, with its signature) to the active run, and register it as a new
    version of ``registered`` when given; returns the ModelVersion (or ModelInfo), None without a run."""
    import mlflow
    import mlflow.onnx

    if mlflow.active_run() is None:  # tracking off (e.g. a StageRun disabled on a non-zero rank)
        return None
    model = onnx.load(str(path))
    requirements = ["onnx", "onnxruntime"]
    info = mlflow.onnx.log_model(model, name=name, signature=onnx_signature(model), pip_requirements=requirements,
                                 registered_model_name=registered)  # fmt: skip
    if registered is None:
        return info
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    version_tags = {"onnx_sha256": file_sha256(path), "run_name": mlflow.active_run().info.run_name, **(tags or {})}
    if source is not None and Path(source).is_file():
        version_tags["source_sha256"] = file_sha256(source)
    for key, value in version_tags.items():
        client.set_model_version_tag(registered, version, key, value)
    return client.get_model_version(registered, version)


def _versions(client, name: str, tag: str, sha: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name = '{name}' and tags.{tag} = '{sha}'"))
    except MlflowException:  # no such registered model yet
        return []


def tag_ladder_versions(client, rows: dict[str, Any], metrics: dict[str, dict[str, float]]) -> list:
    """Tag the deployed versions whose file the validate run scored and the float versions exported from
    the float run's checkpoint with ``ladder.<row>.<key>``; returns the versions tagged."""
    validate, float_run = rows.get(DEPLOYED), rows.get(FLOAT)
    if validate is None:
        return []
    preset = validate.data.tags.get("preset", "")
    targets = _versions(client, registered_name(preset, DEPLOYED), "onnx_sha256",
                        validate.data.tags.get("model_sha256", "-"))  # fmt: skip
    if float_run is not None:
        targets += _versions(client, registered_name(preset, FLOAT), "source_sha256",
                             float_run.data.tags.get("model_sha256", "-"))  # fmt: skip
    # mAP and AP per class; the per-threshold APs stay on the runs
    tags = {f"ladder.{row}.{k}": f"{v:.4f}" for row, values in metrics.items() for k, v in headline(values).items()}
    for version in targets:
        for key, value in tags.items():
            client.set_model_version_tag(version.name, version.version, key, value)
    return targets


# --------------------------------------------------------------------------------------------------
# The ladder: float -> calibration -> QAT -> deployed, found from the validate run
# --------------------------------------------------------------------------------------------------
def _producer(client, experiment_id: str, sha: str, group: str | None):
    """The FINISHED run that tagged ``sha`` as its model: this group's if any, else the latest."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.model_sha256 = '{sha}' and "
                              "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"])  # fmt: skip
    same_group = [r for r in runs if group and r.data.tags.get("maptr.group") == group]
    return (same_group or runs or [None])[0]


def ladder_runs(client, experiment_id: str, validate_run) -> dict[str, Any]:
    """``{"deployed": run, "qat": run, "calibration": run, "float": run}`` walking ``source_sha256`` back
    from a validate run; a row whose run is not found is left out."""
    rows = dict(LADDER)
    group = validate_run.data.tags.get("maptr.group")
    found, run = {}, validate_run
    while run is not None and run.data.tags.get("stage") in rows and rows[run.data.tags["stage"]] not in found:
        found[rows[run.data.tags["stage"]]] = run
        source = run.data.tags.get("source_sha256")
        run = _producer(client, experiment_id, source, group) if source else None
    return found


def ladder_metrics(rows: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The final val metrics of each ladder row, in pipeline order."""
    order = [row for _, row in LADDER]
    return {row: val_metrics(rows[row].data.metrics) for row in order if row in rows}


def publish_ladder(run) -> None:
    """From the validate ``run``: the ladder's metrics to the group's parent run (``ladder/<row>/<key>``,
    one row per group in the runs table) and as tags on the registered deployed and float ONNX versions."""
    if run.run_id is not None:
        run.call("ladder", lambda: _publish_ladder(run))


def _publish_ladder(run) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    rows = ladder_runs(client, run.experiment_id, client.get_run(run.run_id))
    metrics = ladder_metrics(rows)
    if run.parent_id is not None:
        flat = {f"ladder/{row}/{k}": v for row, values in metrics.items() for k, v in values.items()}
        client.log_batch(run.parent_id, metrics=_metric_entities(flat))
    tag_ladder_versions(client, rows, metrics)


def _metric_entities(values: dict[str, float]):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]
