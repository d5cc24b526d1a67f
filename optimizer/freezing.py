"""Text-encoder freezing (optimizer.json's text_encoder_freezing, and text_encoder_2_freezing for SDXL's second).

Frozen parameters get requires_grad_(False), so backward computes no gradient for them and they are not
handed to the optimizer (EveryDream2 only left them out of the optimizer: D17). Semantics follow EveryDream2:
  - unfreeze_last_n_layers null: every encoder layer trains; N: only the last N train (0: none).
  - freeze_embeddings null: frozen exactly when some layers are frozen; true/false force it.
  - freeze_final_layer_norm null/false: the final layer norm trains.
  - legacy freeze_front_n_layers N: the same as unfreeze_last_n_layers = layers - N.
  - freeze_all true: every parameter is frozen (the encoder gets no optimizer).
Parameters outside embeddings / encoder layers / final layer norm (none in SD's CLIPTextModel; SDXL's second
encoder, CLIPTextModelWithProjection, has its text_projection there) train unless freeze_all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from optimizer.schema import FreezeSettings
from utils.core.config_schema import ConfigError


@dataclass(frozen=True)
class FreezePlan:
    total_layers: int
    trained_layers: int  # the last `trained_layers` encoder layers train
    freeze_embeddings: bool
    freeze_final_layer_norm: bool

    @property
    def freezes_anything(self) -> bool:
        return self.trained_layers < self.total_layers or self.freeze_embeddings or self.freeze_final_layer_norm


@dataclass
class TextEncoderLayout:
    embeddings: torch.nn.Module
    layers: torch.nn.ModuleList
    final_layer_norm: torch.nn.Module


def text_encoder_layout(text_encoder: torch.nn.Module) -> TextEncoderLayout | None:
    """The CLIP text encoder's parts, or None for a model of another shape.
    transformers 5.x CLIPTextModel holds them directly; 4.x nests them under `.text_model`."""
    core = getattr(text_encoder, "text_model", text_encoder)
    try:
        return TextEncoderLayout(core.embeddings, core.encoder.layers, core.final_layer_norm)
    except AttributeError:
        return None


def freeze_plan(freezing: FreezeSettings, total_layers: int, warn: Callable[[str], None],
                section: str = "text_encoder_freezing") -> FreezePlan:
    """What to freeze for a text encoder with `total_layers` encoder layers (pure); `section` names it in
    messages."""
    if freezing.freeze_all:
        return FreezePlan(total_layers, trained_layers=0, freeze_embeddings=True, freeze_final_layer_norm=True)
    trained = freezing.unfreeze_last_n_layers
    if trained is None and freezing.freeze_front_n_layers is not None:
        front = freezing.freeze_front_n_layers
        trained = -front if front < 0 else max(0, total_layers - front)
    if trained is not None and trained > total_layers:
        warn(f"{section}: unfreeze_last_n_layers {trained} but the text encoder has {total_layers} "
             f"layers; all of them train")
    trained = total_layers if trained is None else min(trained, total_layers)
    freeze_embeddings = freezing.freeze_embeddings
    if freeze_embeddings is None:
        freeze_embeddings = trained < total_layers
    return FreezePlan(total_layers=total_layers, trained_layers=trained, freeze_embeddings=freeze_embeddings,
                      freeze_final_layer_norm=bool(freezing.freeze_final_layer_norm))


def frozen_modules(layout: TextEncoderLayout, plan: FreezePlan) -> list[torch.nn.Module]:
    modules: list[torch.nn.Module] = list(layout.layers[:plan.total_layers - plan.trained_layers])
    if plan.freeze_embeddings:
        modules.append(layout.embeddings)
    if plan.freeze_final_layer_norm:
        modules.append(layout.final_layer_norm)
    return modules


def apply_text_encoder_freezing(text_encoder: torch.nn.Module, freezing: FreezeSettings,
                                warn: Callable[[str], None], section: str = "text_encoder_freezing"
                                ) -> tuple[list[torch.nn.Parameter], FreezePlan | None]:
    """Set requires_grad on every text-encoder parameter; returns (trainable parameters, the plan applied).
    `section` names the freezing section in messages."""
    if freezing.freeze_all:   # any shape: nothing trains
        text_encoder.requires_grad_(False)
        return [], None
    text_encoder.requires_grad_(True)
    layout = text_encoder_layout(text_encoder)
    if layout is None:
        if freezing != FreezeSettings():  # any freezing asked for
            raise ConfigError(f"{section} needs a CLIP text encoder (embeddings, encoder.layers, "
                              f"final_layer_norm); {type(text_encoder).__name__} has another shape")
        return list(text_encoder.parameters()), None
    plan = freeze_plan(freezing, len(layout.layers), warn, section)
    for module in frozen_modules(layout, plan):
        module.requires_grad_(False)
    return [p for p in text_encoder.parameters() if p.requires_grad], plan
