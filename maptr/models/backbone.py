"""Image backbone: a torchvision ResNet (18/34/50) without its classifier, returning the stages the neck uses.

Weights are never downloaded. ``pretrained`` may name a local file holding either a torchvision-format
ResNet state_dict (``conv1.weight``, ``layer1.0...``; the ``fc.*`` classifier is ignored) or an earlier
project checkpoint (``{"model": state_dict}`` whose backbone keys start with ``backbone.``). As the
guide's LoadCheckpoint with ``allow_miss`` / ``ignore_extra``, missing and unexpected keys are tolerated,
logged and returned, never silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from maptr.config import ModelConfig, ParamsError
from maptr.weights_only import load_weights_only

log = logging.getLogger(__name__)

_RESNETS = {
    "resnet18": (torchvision.models.resnet18, 64),  # (constructor, channels of layer1 output)
    "resnet34": (torchvision.models.resnet34, 64),
    "resnet50": (torchvision.models.resnet50, 256),
}
_STAGE_STRIDES = (4, 8, 16, 32)  # output strides of layer1..layer4


@dataclass
class WeightLoadReport:
    """What a weight file did to the backbone; keys are the backbone's own names (no ``backbone.``)."""

    path: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # backbone keys the file did not provide
    unexpected: list[str] = field(default_factory=list)  # file keys the backbone does not have
    mismatched: list[str] = field(default_factory=list)  # same key, different shape: not loaded


class Backbone(nn.Module):
    """ResNet trunk; ``forward`` returns the feature maps of the requested stages.

    The ResNet's modules are attributes of this module under their torchvision names, so a torchvision
    state_dict loads as is and the project checkpoint's keys are ``backbone.<torchvision name>``.
    """

    def __init__(self, name: str, out_strides: list[int]) -> None:
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"backbone {name!r} is not one of {sorted(_RESNETS)}")
        if not out_strides or any(s not in _STAGE_STRIDES for s in out_strides):
            raise ValueError(f"out_strides must be a non-empty subset of {_STAGE_STRIDES}, got {out_strides}")
        constructor, base_channels = _RESNETS[name]
        resnet = constructor(weights=None)  # random init; local weights come from load_backbone_weights
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        # Keep only the stages up to the deepest one requested: unused stages would carry
        # parameters that never get a gradient. Stages keep their torchvision names (layer1..).
        self.num_stages = _STAGE_STRIDES.index(max(out_strides)) + 1
        for i in range(self.num_stages):
            self.add_module(f"layer{i + 1}", getattr(resnet, f"layer{i + 1}"))
        self.out_strides = sorted(out_strides)
        self.out_channels = [base_channels * 2 ** _STAGE_STRIDES.index(s) for s in self.out_strides]
        # channels-last weights and activations: oneDNN's convolutions are ~30% faster forward on CPU
        self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> list[Tensor]:
        """
        Args:
            images: (N, 3, H, W) normalized images (N = batch * cameras).
        Returns:
            one (N, C_s, H / s, W / s) map per stride s of ``out_strides``, shallowest first.
        """
        images = images.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (N, 64, H/4, W/4)
        features = []
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)  # (N, C_s, H/s, W/s), s = 4 * 2**i
            if _STAGE_STRIDES[i] in self.out_strides:
                features.append(x)
        return features


def load_backbone_weights(backbone: Backbone, path: str | Path) -> WeightLoadReport:
    """Load a local torchvision ResNet state_dict or project checkpoint into ``backbone``.

    Raises FileNotFoundError naming the file when it does not exist. Returns the load report and logs
    a summary; partial loads are allowed (the guide's allow_miss / ignore_extra).
    """
    path = Path(path)
    blob = load_weights_only(
        path,
        missing=FileNotFoundError(f"backbone weights {path} not found (model.pretrained in params.yaml)"),
        unreadable=lambda why: ParamsError(
            f"{path}: model.pretrained is not a weights file that loads with weights_only=True ({why}); "
            "give a torchvision ResNet state_dict or a maptr checkpoint (arbitrary pickles are never run)"
        ),
    )
    if isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        # A project checkpoint: keep the backbone's entries, keyed by torchvision names.
        state = {k[len("backbone.") :]: v for k, v in blob["model"].items() if k.startswith("backbone.")}
    elif isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        state = dict(blob["state_dict"])
    elif isinstance(blob, dict):
        state = dict(blob)
    else:
        raise ParamsError(f"{path}: model.pretrained: expected a state_dict or a checkpoint dict, got {type(blob).__name__}")

    report = WeightLoadReport(path=str(path))
    own = backbone.state_dict()
    to_load = {}
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != tensor.shape:
            report.mismatched.append(key)
        else:
            to_load[key] = tensor
            report.loaded.append(key)
    report.missing = sorted(k for k in own if k not in state)
    backbone.load_state_dict(to_load, strict=False)
    log.info(
        "backbone weights %s: %d loaded, %d missing, %d unexpected, %d shape-mismatched",
        path,
        len(report.loaded),
        len(report.missing),
        len(report.unexpected),
        len(report.mismatched),
    )
    for kind in ("missing", "unexpected", "mismatched"):
        keys = getattr(report, kind)
        if keys:
            log.warning("backbone weights %s: %s keys: %s", path, kind, ", ".join(keys[:20]))
    return report


def build_backbone(cfg: ModelConfig) -> Backbone:
    # The neck fuses every stage from the output stride to the deepest stage kept (see fpn.py).
    if not cfg.feature_stride <= cfg.backbone_max_stride <= 32:
        raise ValueError(
            f"backbone_max_stride {cfg.backbone_max_stride} must be in [feature_stride {cfg.feature_stride}, 32]"
        )
    out_strides = [s for s in _STAGE_STRIDES if cfg.feature_stride <= s <= cfg.backbone_max_stride]
    backbone = Backbone(name=cfg.backbone, out_strides=out_strides)
    if cfg.pretrained:
        load_backbone_weights(backbone, cfg.pretrained)
    return backbone
