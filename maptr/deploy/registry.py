"""ONNX models in MLflow: logged with a signature, the deployed and float models registered in the Model
Registry as ``maptr-<preset>-deployed`` / ``maptr-<preset>-float``, their versions tagged with the ladder.

A version is tagged ``onnx_sha256`` (the file's bytes) and ``source_sha256`` (the checkpoint it was
exported from, for the float model), so that validate, which scores the deployed file, finds both
versions again and tags them with every ladder row's metrics (``ladder.<row>.<key>``, e.g.
``ladder.qat.mAP``): the model page then lists the ladder next to each version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from maptr.training.lineage import file_sha256, headline

DEPLOYED, FLOAT = "deployed", "float"


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
