"""A training stage (float-train, qat) around the :class:`~maptr.training.trainer.Trainer`.

Both stages read their params section and the model preset, check MLflow before any work, join torchrun's
process group, seed torch, train on the packed train split while validating on val after every epoch,
fingerprint the run for ``--resume``, and end with the best epoch's metrics and the per-epoch curve. They
differ only in the model they start from and the reports they add; that part stays in their scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from maptr.atomic import write_text_atomic
from maptr.config import TrainConfig, load_model_config, load_params, load_section
from maptr.data.dataset import DatasetOptions, PackedMapDataset
from maptr.distributed import DistContext, cleanup, init_distributed
from maptr.evaluation.inference import evaluate_model, torch_predictor
from maptr.evaluation.postprocess import MapTRPostProcess
from maptr.training.lineage import log_dataset, log_val_metrics
from maptr.training.tracking import StageRun, check_tracking
from maptr.training.trainer import Trainer, TrainState


def run_fingerprint(*parts: Any) -> str:
    """Identity of a run: its params and the bytes of what it reads (resume only continues the same run).

    Each part is bytes or anything JSON can write; the hash covers the parts one after the other.
    """
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def best_epoch_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """The val metrics (``mAP``, ``AP_*``) of the epoch with the highest mAP, with its number and the count.

    The training loss and step of that epoch stay in the curve: they are not val metrics.
    """
    validated = [h for h in history if "mAP" in h]  # float.val_every_epochs may skip epochs
    if not validated:
        raise ValueError("no validated epoch in the history: the last epoch is always validated")
    best = max(validated, key=lambda h: h["mAP"])
    metrics = {k: best[k] for k in best if k.startswith(("mAP", "AP_"))}
    metrics.update(best_epoch=best["epoch"], epochs=len(history))
    return metrics


class Validation:
    """The Trainer's ``validate(model) -> metrics``: chamfer mAP on the val split, sharded over ranks.

    Keeps the predictions of the best epoch seen by this process (``best_predictions``, on rank 0), so that
    reports on the best model need no second pass over val.
    """

    def __init__(self, val_set: PackedMapDataset, post: MapTRPostProcess, batch_size: int, ctx: DistContext) -> None:
        self.val_set, self.post, self.batch_size, self.ctx = val_set, post, batch_size, ctx
        self.best_map = float("-inf")
        self.best_predictions: list[dict] | None = None

    def __call__(self, model: nn.Module) -> dict[str, float]:
        predictor = torch_predictor(model, self.ctx.device)
        metrics, preds = evaluate_model(
            predictor, self.val_set, self.post, batch_size=self.batch_size, num_workers=0, ctx=self.ctx
        )
        if metrics["mAP"] > self.best_map:
            self.best_map, self.best_predictions = metrics["mAP"], preds
        return metrics


class TrainingStage:
    """One run of a training stage: its config, the model preset, the torchrun context and the files of
    its command line (:func:`maptr.cli.add_training_arguments`).

    Args:
        name: the stage in dvc.yaml and MLflow (``float-train``, ``qat``).
        section: its params.yaml section, also the stage name in its checkpoints (``float``, ``qat``).
        config_cls: the section's config class.
        args: the parsed command line.
    """

    def __init__(self, name: str, section: str, config_cls: type[TrainConfig], args: argparse.Namespace) -> None:
        self.name, self.section, self.args = name, section, args
        params = load_params(args.params)
        self.cfg = load_section(params, section, config_cls)
        self.model_cfg = load_model_config(params)
        check_tracking()  # before any work: a server in trouble is an error now, not after training
        self.ctx = init_distributed()
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        torch.manual_seed(self.cfg.seed)

    def datasets(self) -> tuple[PackedMapDataset, PackedMapDataset]:
        """(train split, augmented when the section says so; val split, never augmented)."""
        cfg, packed = self.cfg, self.args.packed

        def options(augment: bool) -> DatasetOptions:
            return DatasetOptions.from_model(self.model_cfg, augment, cfg.seed, cfg.cache_mb)

        return PackedMapDataset(packed, "train", options(cfg.augment)), PackedMapDataset(packed, "val", options(False))

    def validation(self, val_set: PackedMapDataset, post: MapTRPostProcess) -> Validation:
        return Validation(val_set, post, self.cfg.val_batch_size, self.ctx)

    @contextlib.contextmanager
    def tracked(self, **extra_params: Any) -> Iterator[StageRun]:
        """The stage's MLflow run (rank 0 only), with its params and the packed data it trains on."""
        params = {self.section: asdict(self.cfg), "model": asdict(self.model_cfg), **extra_params}
        with StageRun(self.name, params, enabled=self.ctx.is_main, params_file=self.args.params,
                      system_metrics=True) as run:  # fmt: skip
            log_dataset(run, self.args.packed, "training")
            yield run

    def train(
        self,
        run: StageRun,
        *,
        model: nn.Module,
        criterion: nn.Module,
        train_set: torch.utils.data.Dataset,
        validate: Callable[[nn.Module], dict[str, float]],
        fingerprint: str,
        extra_state: Callable[[], dict[str, Any]] | None = None,
    ) -> TrainState:
        """Fit ``model``, continuing an interrupted run of the same fingerprint when ``--resume`` is given."""
        args = self.args
        trainer = Trainer(
            model=model, criterion=criterion, train_set=train_set, validate=validate, cfg=self.cfg, ctx=self.ctx,
            tracker=run, stage=self.section, preset=self.model_cfg.preset, best_path=args.best,
            last_path=args.last, fingerprint=fingerprint, extra_state=extra_state,
        )  # fmt: skip
        if args.resume:
            message = trainer.resume()
            if self.ctx.is_main:
                print(message)
        return trainer.fit()

    def write_metrics(self, run: StageRun, history: list[dict[str, float]], source: str | None = None) -> dict:
        """metrics/<stage>.json (the best epoch) and the per-epoch curve, both also to MLflow with the best
        checkpoint; ``source`` is the file the stage started from (its sha256 tags the run). Rank 0 only."""
        args = self.args
        metrics = best_epoch_metrics(history)
        write_text_atomic(args.metrics, json.dumps(metrics, indent=2))
        write_text_atomic(args.curve, json.dumps(history, indent=2))
        log_val_metrics(run, metrics, model=args.best, source=source)
        run.log_metrics({"best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"]})
        for path in (args.metrics, args.curve):
            run.log_artifact(path)
        run.log_artifact(args.best, artifact_path="checkpoints")
        return metrics

    def close(self) -> None:
        """Leave torchrun's process group."""
        cleanup(self.ctx)
