"""Text conditioning for the UNet: CLIP text-encoder hidden states with clip skip, and embedding perturbation.

Pure functions on tensors. Caption dropout is not here: the data layer replaces a dropped caption by "" before
tokenizing, so the UNet sees the empty-caption embedding (what classifier-free guidance samples against).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def final_layer_norm(text_encoder) -> torch.nn.Module:
    """The CLIP text model's final LayerNorm: `.final_layer_norm` on transformers 5.x, where CLIPTextModel
    holds the text transformer's parts directly; `.text_model.final_layer_norm` on 4.x. A DDP wrapper (several
    processes) is looked through."""
    text_encoder = getattr(text_encoder, "module", text_encoder)
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = getattr(getattr(text_encoder, "text_model", None), "final_layer_norm", None)
    if norm is None:
        raise TypeError(f"{type(text_encoder).__name__} has no final_layer_norm (nor text_model.final_layer_norm)")
    return norm


def tokenize(tokenizer, captions: list[str]) -> Tensor:
    """Captions -> token ids [B, model_max_length]: padded and truncated to the encoder's context, as trained."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(text_encoder, input_ids: Tensor, *, clip_skip: int = 0) -> Tensor:
    """Token ids [B, L] -> conditioning [B, L, d].

    clip_skip 0 or 1: the last hidden state, which CLIPTextModel already passes through its final layer norm.
    clip_skip N >= 2: hidden_states[-N] (N-1 layers before the last; 2 = the penultimate layer) passed through
    the final layer norm, as EveryDream2 and AUTOMATIC1111 do. SD2.x diffusers folders already drop the last
    layer in text_encoder/config.json (23 of 24), so clip_skip 2 there goes one layer further back.
    """
    if clip_skip < 0:
        raise ValueError(f"clip_skip must be >= 0, got {clip_skip}")
    if clip_skip <= 1:
        return text_encoder(input_ids).last_hidden_state
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden_states = out.hidden_states  # (embeddings, layer 1, ..., layer n)
    if clip_skip > len(hidden_states) - 1:  # hidden_states[-(n+1)] would be the bare token embeddings
        raise ValueError(f"clip_skip {clip_skip} is more than the text encoder's {len(hidden_states) - 1} layers")
    return final_layer_norm(text_encoder)(hidden_states[-clip_skip])


# How each model family builds the UNet's text conditioning (ModelFamily.conditioning, utils/sd/families.py): the
# loop, validation and sampling look the function up here rather than branching on the family.
CONDITIONING = {"hidden_states_clip_skip": encode_prompts}


def conditioning_for(family) -> Callable[..., Tensor]:
    """(text_encoder, input_ids, *, clip_skip) -> the UNet's encoder_hidden_states, for this family."""
    return CONDITIONING[family.conditioning]


def perturb_embeddings(embeddings: Tensor, generator: torch.Generator, *, gamma: float) -> Tensor:
    """Conditional embedding perturbation (arXiv 2405.20494): add Gaussian noise with std gamma / sqrt(d),
    d = the embedding width (last dim), to every token embedding. Identity (the same tensor) when gamma is 0.
    The noise is drawn on the generator's device, then moved; gradients flow to the embeddings unchanged."""
    if gamma < 0:
        raise ValueError(f"embedding perturbation gamma must be >= 0, got {gamma}")
    if gamma == 0:
        return embeddings
    noise = torch.randn(tuple(embeddings.shape), generator=generator, device=generator.device)
    std = gamma / math.sqrt(embeddings.shape[-1])
    return embeddings + (noise * std).to(device=embeddings.device, dtype=embeddings.dtype)


class PromptCache:
    """Conditioning per caption string for a frozen text encoder: each distinct caption is encoded once.

    Exact (a frozen encoder in eval mode is deterministic), so it is on by default. Tag shuffling and weighted
    tags make many distinct captions: the least recently used entries go once max_bytes is reached."""

    def __init__(self, max_bytes: int = 2**30):
        from collections import OrderedDict
        self.entries: OrderedDict[str, Tensor] = OrderedDict()
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0

    def lookup(self, captions: list[str], encode) -> Tensor:
        """[B, L, d] for the captions; encode(list of captions) -> [n, L, d] runs for the missing ones only."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.entries))
        self.hits += len(captions) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                for caption, hidden in zip(missing, encode(missing)):
                    self.entries[caption] = hidden = hidden.clone()  # not a view pinning the whole batch
                    self.bytes += hidden.numel() * hidden.element_size()
        for caption in captions:
            self.entries.move_to_end(caption)
        while self.bytes > self.max_bytes and len(self.entries) > len(captions):
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return torch.stack([self.entries[c] for c in captions])
