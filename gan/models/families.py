"""The network families (`@register_model`) and `build_models`, the one entry point from a ModelConfig to (G, D)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from gan.config import LOSSES, ConfigError, ModelConfig

Builder = Callable[..., tuple[nn.Module, nn.Module]]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: registers `build(model, *, loss_kind, data_shape, num_classes) -> (G, D)` as `name`."""
    def add(build: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model family {name!r} is already registered")
        MODELS[name] = build
        return build
    return add


def build_models(model: ModelConfig, *, loss_kind: str, data_shape: tuple[int, ...],
                 num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(G, D) of `model.family` for samples of `data_shape` ((2,) or (C, H, W)) and `num_classes` classes; for the
    autoencoder families (ae, vae), (decoder, encoder)."""
    if model.family not in MODELS:
        raise ConfigError(f"model.family must be one of {', '.join(sorted(MODELS))}, got {model.family!r}")
    if loss_kind not in LOSSES:
        raise ConfigError(f"loss.kind must be one of {', '.join(LOSSES)}, got {loss_kind!r}")
    labelled = (("model.conditional", model.conditional), ("model.semi_supervised", model.semi_supervised))
    for key, on in labelled:
        if on and num_classes < 2:
            raise ConfigError(f"{key} needs a dataset with >= 2 classes, got num_classes={num_classes}")
    return MODELS[model.family](model, loss_kind=loss_kind, data_shape=tuple(data_shape),
                                num_classes=num_classes)
