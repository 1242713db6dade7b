"""The training loop shared by float-train and QAT: AdamW, warmup + cosine, clipping, DDP, exact resume.

Resume is exact: the "last" checkpoint (written every ``ckpt_every_steps`` optimizer steps and at the end
of every epoch) holds the model, optimizer, scheduler, epoch, position inside the epoch and the torch RNG.
The data order comes from a per-epoch seeded sampler and every sample's augmentation from its own seeded
generator, so a resumed run sees the same batches and ends with the same metrics as an uninterrupted one.

The best epoch's checkpoint is kept in memory and inside every resume checkpoint, and written to its final
path only when the run ends: a killed run leaves no best file that looks finished, and a resumed run
writes it even when DVC deleted it before the rerun and no later epoch beats it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from maptr.config import TrainConfig
from maptr.data.dataset import PackedMapDataset, collate
from maptr.distributed import DistContext, barrier, mean_across_ranks
from maptr.training.checkpoint import CheckpointError, load_checkpoint, nonfinite_tensors, save_checkpoint
from maptr.training.device import autocast, autocast_dtype, float_outputs
from maptr.training.schedule import build_scheduler
from maptr.training.tracking import StageRun


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the run stops before the optimizer step, so no checkpoint holds NaNs."""


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seeded shuffle per epoch, one shard per rank) that can skip the first samples
    of its epoch, to continue an interrupted epoch exactly where it stopped."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


@dataclass
class TrainState:
    epoch: int = 0  # epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # running training loss of the epoch in progress (survives a resume)
    best: float = -1.0
    history: list[dict[str, float]] = field(default_factory=list)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the backbone at ``backbone_lr_mult`` x lr (the guide's ``lr_mult=0.1``)."""
    backbone, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (backbone if name.startswith("backbone.") else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult})
    # fused: one kernel for all parameters (4x faster than the per-tensor loop on this CPU)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            out[k] = [t.to(device, non_blocking=True) for t in v]
        else:
            out[k] = v
    return out


class Trainer:
    """Fits ``model`` with ``criterion`` on ``train_set``, validating with ``validate(model) -> metrics``
    after every ``cfg.val_every_epochs``-th epoch and the last; keeps the best checkpoint by val mAP (among
    the validated epochs) and a resumable last checkpoint.

    Args:
        stage: name in logs and checkpoints (``float``, ``qat``).
        preset: model preset name, stored in checkpoints.
        best_path / last_path: checkpoint files (last_path must survive DVC re-running the stage).
        fingerprint: identifies the run (params + data); a last checkpoint with another one is not resumed.
        extra_state: callable returning extra tensors to store with every checkpoint (e.g. quant scales).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        criterion: nn.Module,
        train_set: PackedMapDataset,
        validate: Callable[[nn.Module], dict[str, float]],
        cfg: TrainConfig,
        ctx: DistContext,
        tracker: StageRun,
        stage: str,
        preset: str,
        best_path: str | Path,
        last_path: str | Path,
        fingerprint: str = "",
        extra_state: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.cfg, self.ctx, self.tracker, self.stage, self.preset = cfg, ctx, tracker, stage, preset
        self.criterion, self.train_set, self.validate = criterion, train_set, validate
        self.best_path, self.last_path = Path(best_path), Path(last_path)
        self.extra_state = extra_state or (lambda: {})
        self.fingerprint = fingerprint
        model = model.to(ctx.device)
        if ctx.distributed and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        # bf16 autocast of the forward (float.bf16: true | false | auto, maptr.training.device)
        self.autocast_dtype = autocast_dtype(ctx.device, cfg.bf16)
        self.precision = "bf16" if self.autocast_dtype is not None else "fp32"
        self.ddp = DistributedDataParallel(model, find_unused_parameters=False) if ctx.distributed else None
        self.sampler = ResumableSampler(train_set, ctx.world_size, ctx.rank, cfg.seed)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{stage}: {len(train_set)} training samples give no batch of size {cfg.batch_size}")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(
            self.optimizer,
            total_steps=self.total_steps,
            warmup_steps=cfg.warmup_steps,
            warmup_ratio=cfg.warmup_ratio,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        self.state = TrainState()
        self.best_payload: dict[str, Any] | None = None  # the best epoch's checkpoint (main rank only)

    # ----------------------------------------------------------------------------------------------
    def resume(self) -> str:
        """Continue from ``last_path`` when it holds an unfinished run with the same fingerprint.

        Returns a one-line description of what happened (resumed, or why it started afresh).
        """
        if not self.last_path.is_file():
            return "no resume checkpoint: starting afresh"
        ckpt = load_checkpoint(self.last_path)
        if ckpt.get("stage") != self.stage or ckpt.get("fingerprint") != self.fingerprint:
            return f"{self.last_path} is from another run (params or data changed): starting afresh"
        if ckpt["train_state"]["epoch"] >= self.cfg.epochs:
            return f"{self.last_path} is a finished run: starting afresh (deterministic, same result)"
        if ckpt["train_state"]["history"] and not isinstance(ckpt.get("best_checkpoint"), dict):
            return f"{self.last_path} holds no best weights (an older format): starting afresh"
        self.best_payload = ckpt.get("best_checkpoint")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        self.state = TrainState(**ckpt["train_state"])
        return f"resumed from {self.last_path} at epoch {self.state.epoch + 1}, step {self.state.global_step}"

    def _payload(self, with_optimizer: bool, metrics: dict[str, float] | None = None) -> dict[str, Any]:
        """A checkpoint of the current state, its tensors copied (it may be kept while training goes on).

        Raises TrainingDiverged when a parameter or buffer is NaN / inf (a BatchNorm running variance can
        overflow while the loss is still finite): such a model is never saved, so what is on disk stays good.
        """
        # tensors copied to the CPU (the best epoch's copy is kept for the whole run and must not hold GPU
        # memory); the fake-quant modules' extra states are plain containers
        model = {k: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                 for k, v in self.model.state_dict().items()}  # fmt: skip
        bad = nonfinite_tensors(model)
        if bad:
            raise TrainingDiverged(
                f"{self.stage}: {', '.join(bad[:3])} hold NaN / inf at epoch {self.state.epoch} step "
                f"{self.state.global_step} (the loss was still finite); nothing was saved. Lower {self.stage}.lr "
                f"or check the data. {self._resume_note()}"
            )
        state: dict[str, Any] = {
            "model": model,
            "stage": self.stage,
            "preset": self.preset,
            "fingerprint": self.fingerprint,
            "train_state": asdict(self.state),
            "metrics": metrics or {},
            **self.extra_state(),
        }
        if with_optimizer:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
            state["rng"] = torch.get_rng_state()
        return state

    def _save_resume_checkpoint(self) -> None:
        """The resume checkpoint, carrying the best epoch's checkpoint so that a resumed run can write it."""
        if self.ctx.is_main:
            state = self._payload(with_optimizer=True)
            save_checkpoint(self.last_path, {**state, "best_checkpoint": self.best_payload})

    def _keep_best(self, metrics: dict[str, float]) -> None:
        """Remember this epoch as the best one (written to ``best_path`` when the run ends)."""
        if self.ctx.is_main:
            self.best_payload = self._payload(with_optimizer=False, metrics=metrics)

    def _write_best(self) -> None:
        if self.ctx.is_main and self.best_payload is not None:
            save_checkpoint(self.best_path, self.best_payload)

    def _resume_note(self) -> str:
        """What the resume checkpoint is worth after a divergence: only a file whose every tensor is finite
        is called good."""
        if not self.last_path.is_file():
            return f"No resume checkpoint was written yet ({self.last_path})."
        try:
            ckpt = load_checkpoint(self.last_path)
        except CheckpointError as exc:
            return f"The resume checkpoint is not usable either: {exc}."
        bad = nonfinite_tensors(ckpt["model"])
        if bad:
            return (f"{self.last_path} holds NaN / inf too ({', '.join(bad[:3])}): it is not a good checkpoint; "
                    "delete it and start afresh.")  # fmt: skip
        step = ckpt.get("train_state", {}).get("global_step")
        return f"The last good checkpoint is {self.last_path} (step {step}, every tensor finite)."

    # ----------------------------------------------------------------------------------------------
    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.sampler.start = self.state.step_in_epoch * self.cfg.batch_size
        self.train_set.set_epoch(epoch)
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=collate,
            drop_last=True,
            persistent_workers=False,
            pin_memory=self.ctx.device.type == "cuda",  # page-locked batches: the non_blocking copies overlap
            # worker seeds from a per-epoch generator, never from the global RNG that dropout uses
            generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch),
        )

    def _step(self, batch: dict[str, Any]) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        net = self.ddp or self.model
        batch = _to_device(batch, ctx.device)
        with autocast(ctx.device, self.autocast_dtype):
            outputs = net(batch["img"], batch["lidar2img"])
        losses = self.criterion(float_outputs(outputs), batch)  # losses and matching in float32
        total = self.criterion.total_loss(losses)
        if not torch.isfinite(total):
            parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise TrainingDiverged(
                f"{self.stage}: loss is {total.item()} at epoch {self.state.epoch} step {self.state.global_step} "
                f"({parts}); lower {self.stage}.lr or check the data. {self._resume_note()}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        else:
            grad_norm = torch.zeros(())
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": total.item(), "grad_norm": float(grad_norm), **{k: v.item() for k, v in losses.items()}}

    def fit(self) -> TrainState:
        cfg, ctx = self.cfg, self.ctx
        self.tracker.set_tags({"precision": self.precision})  # what float.bf16 resolved to on this device
        if ctx.is_main:
            tqdm.write(f"{self.stage}: forward in {self.precision} (bf16: {cfg.bf16}) on {ctx.device}")
        for epoch in range(self.state.epoch, cfg.epochs):
            self.state.epoch = epoch
            self.model.train()
            loader = self._loader(epoch)
            bar = tqdm(
                total=self.steps_per_epoch,
                initial=self.state.step_in_epoch,
                desc=f"{self.stage} epoch {epoch + 1}/{cfg.epochs}",
                unit="step",
                disable=not ctx.is_main,
            )
            start = time.perf_counter()
            for batch in loader:
                logs = self._step(batch)
                self.state.step_in_epoch += 1
                self.state.global_step += 1
                self.state.epoch_loss_sum += logs["loss"]
                lr = self.optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{lr:.2e}")
                bar.update(1)
                if self.state.global_step % cfg.log_every_steps == 0:
                    logs = mean_across_ranks(logs, ctx)
                    self.tracker.log_metrics({f"train/{k}": v for k, v in logs.items()} | {"lr": lr},
                                             step=self.state.global_step)  # fmt: skip
                if cfg.ckpt_every_steps and self.state.global_step % cfg.ckpt_every_steps == 0:
                    self._save_resume_checkpoint()
            bar.close()
            seconds = time.perf_counter() - start
            # The last epoch is always validated: it is the one the schedule was made for.
            validate_now = (epoch + 1) % cfg.val_every_epochs == 0 or epoch + 1 == cfg.epochs
            self.model.eval()
            metrics = self.validate(self.model) if validate_now else {}
            mean_loss = self.state.epoch_loss_sum / max(self.state.step_in_epoch, 1)
            train_loss = mean_across_ranks({"loss": mean_loss}, ctx)["loss"]
            # No wall-clock figure in the history: it goes into every checkpoint and the DVC-tracked curve,
            # and must not change their bytes between two runs of the same inputs (MLflow gets the time).
            record = {"epoch": epoch + 1, "step": self.state.global_step, "train_loss": train_loss, **metrics}
            self.state.history.append(record)
            # per-epoch history: step = epoch, under a prefix apart from the final val metrics (mAP, AP_...)
            self.tracker.log_metrics({f"epoch/{k}": v for k, v in metrics.items()}
                                     | {"epoch/train_loss": train_loss, "epoch/seconds": seconds},
                                     step=epoch + 1)  # fmt: skip
            if ctx.is_main:
                val = f"val mAP {metrics['mAP']:.4f}" if metrics else f"no val (every {cfg.val_every_epochs} epochs)"
                tqdm.write(f"{self.stage} epoch {epoch + 1}: {val}, loss {train_loss:.3f}, {seconds:.0f} s")
            if metrics and (metrics["mAP"] > self.state.best or math.isnan(self.state.best)):
                self.state.best = metrics["mAP"]
                self._keep_best(metrics)
            self.state.epoch, self.state.step_in_epoch, self.state.epoch_loss_sum = epoch + 1, 0, 0.0
            self._save_resume_checkpoint()
            barrier(ctx)
        self._write_best()
        return self.state
