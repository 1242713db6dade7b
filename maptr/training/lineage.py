"""What the stages' MLflow runs share so that they compare and link: final val metrics under one set of
keys, the models they score by file digest, the packed dataset as an MLflow dataset input, the ladder.

* Final val metrics: every stage that scores a model logs ``mAP``, ``AP_<class>`` and the per-threshold
  ``AP_<class>_<threshold>`` with no step (the training stages' per-epoch history is ``epoch/...``).
* Lineage: the run that scores a model file tags it ``model_sha256`` and the file it was made from
  ``source_sha256`` (validate: deployed ONNX <- QAT checkpoint <- calibration checkpoint <- float
  checkpoint). maptr.deploy.registry walks that chain back from a validate run, so the ladder is found
  also when DVC restored some stages from its cache (no run in this group: the run that made those bytes).
* Dataset: ``data/packed`` as an MLflow dataset whose digest is DVC's hash of the folder (the ``md5`` of
  its ``dvc.lock`` entry, ``<md5>.dir``) and whose profile holds the sample counts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

VAL_PREFIXES = ("mAP", "AP_")
CHUNK = 1 << 20


def val_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The final val metrics of a metrics dict: ``mAP``, ``AP_<class>``, ``AP_<class>_<threshold>``."""
    return {k: float(v) for k, v in metrics.items() if k.startswith(VAL_PREFIXES)}


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """``mAP`` and ``AP_<class>`` only (no ``AP_<class>_<threshold>``)."""

    def per_threshold(key: str) -> bool:
        try:
            float(key.rsplit("_", 1)[-1])
            return True
        except ValueError:
            return False

    return {k: v for k, v in val_metrics(metrics).items() if not per_threshold(k)}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def log_val_metrics(run, metrics: dict[str, Any], model: str | Path | None = None,
                    source: str | Path | None = None) -> None:  # fmt: skip
    """Log a stage's final val metrics under the shared keys; tag the scored ``model`` file and the
    ``source`` it was made from by sha256 (the lineage the ladder follows)."""
    run.log_metrics(val_metrics(metrics))
    tags = {name: file_sha256(path) for name, path in (("model_sha256", model), ("source_sha256", source))
            if path is not None and Path(path).is_file()}  # fmt: skip
    if tags:
        run.set_tags(tags)


# --------------------------------------------------------------------------------------------------
# The packed dataset
# --------------------------------------------------------------------------------------------------
def dvc_dir_md5(folder: str | Path) -> str:
    """DVC 3's hash of a directory output (``md5: <hex>.dir`` in dvc.lock): md5 of the JSON list of
    ``{"md5": <file md5>, "relpath": <posix path>}`` sorted by path (dvc_data's Tree.as_bytes)."""
    folder = Path(folder)
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h = hashlib.md5()  # noqa: S324 (DVC's content hash, not security)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        entries.append({"md5": h.hexdigest(), "relpath": path.relative_to(folder).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"  # noqa: S324


def log_dataset(run, folder: str | Path, context: str):
    """Log the packed dataset ``folder`` as an input of ``run`` (context: training, validation, ...)."""
    if run.run_id is None or not Path(folder).is_dir():
        return None
    import mlflow

    from maptr.training.mlflow_dataset import PackedDataset

    dataset = PackedDataset(folder, dvc_dir_md5(folder))
    # the stage's run is this process's active run; through the run's queue, like every tracking call
    run.call(f"dataset ({folder})", lambda: mlflow.log_input(dataset, context=context))
    return dataset
