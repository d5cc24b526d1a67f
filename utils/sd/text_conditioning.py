"""Text conditioning for the UNet: CLIP text-encoder hidden states with clip skip, and embedding perturbation.

Pure functions on tensors. Caption dropout is not here: the data layer replaces a dropped caption by "" before
tokenizing, so the UNet sees the empty-caption embedding (what classifier-free guidance samples against).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass
class Conditioning:
    """What the text encoders give the UNet for a batch of captions."""
    hidden: Tensor                 # [B, L, d]: encoder_hidden_states (cross-attention)
    pooled: Tensor | None = None   # [B, p]: SDXL's pooled, projected embedding (added conditioning); None for SD1/2

    def __len__(self) -> int:
        return self.hidden.shape[0]


def tokenize_all(tokenizers, captions: list[str]) -> list[Tensor]:
    """Token ids for each text encoder's own tokenizer (SDXL's two pad differently)."""
    return [tokenize(tokenizer, captions) for tokenizer in tokenizers]


def one_encoder(text_encoders, input_ids: list[Tensor], *, clip_skip: int = 0) -> Conditioning:
    """SD1/SD2: one CLIP encoder's hidden states (clip skip as encode_prompts counts it)."""
    return Conditioning(encode_prompts(text_encoders[0], input_ids[0], clip_skip=clip_skip))


def penultimate_concat_pooled(text_encoders, input_ids: list[Tensor], *, clip_skip: int = 0) -> Conditioning:
    """SDXL: each encoder's penultimate hidden states (no final layer norm), concatenated along the width (768 +
    1280 = 2048 for SDXL), and the last encoder's pooled, projected output (CLIPTextModelWithProjection's
    text_embeds), as StableDiffusionXLPipeline builds them. clip_skip 0/1 is that layer; N >= 2 goes N - 1 layers
    further back, as the pipeline's own clip_skip does."""
    layer = max(clip_skip, 1) + 1
    hidden = []
    for text_encoder, ids in zip(text_encoders, input_ids):
        out = text_encoder(ids, output_hidden_states=True)
        if layer > len(out.hidden_states) - 1:
            raise ValueError(f"clip_skip {clip_skip} is more than the text encoder's {len(out.hidden_states) - 1} "
                             f"layers allow")
        hidden.append(out.hidden_states[-layer])
    return Conditioning(torch.cat(hidden, dim=-1), out.text_embeds)


# How each model family builds the UNet's text conditioning (ModelFamily.conditioning, utils/sd/families.py): the
# loop, validation and sampling look the function up here rather than branching on the family.
CONDITIONING = {"hidden_states_clip_skip": one_encoder, "sdxl_penultimate_concat_pooled": penultimate_concat_pooled}


def conditioning_for(family) -> Callable[..., Conditioning]:
    """(text_encoders, input ids per encoder, *, clip_skip) -> Conditioning, for this family."""
    return CONDITIONING[family.conditioning]


def added_conditioning(cond: Conditioning, time_ids: Tensor | None) -> dict | None:
    """The UNet's added_cond_kwargs: SDXL's pooled embedding and size/crop time ids; None where the family's
    conditioning has no pooled part (SD1/SD2's UNet takes none)."""
    if cond.pooled is None:
        return None
    if time_ids is None:
        raise ValueError("this model's UNet needs size and crop time ids with each batch (SDXL)")
    return {"text_embeds": cond.pooled, "time_ids": time_ids.to(cond.pooled.device, cond.pooled.dtype)}


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
    """Conditioning per caption string for frozen text encoders: each distinct caption is encoded once.

    Exact (a frozen encoder in eval mode is deterministic), so it is on by default. Tag shuffling and weighted
    tags make many distinct captions: the least recently used entries go once max_bytes is reached."""

    def __init__(self, max_bytes: int = 2**30):
        from collections import OrderedDict
        self.entries: OrderedDict[str, tuple[Tensor, Tensor | None]] = OrderedDict()
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0

    def lookup(self, captions: list[str], encode: Callable[[list[str]], Conditioning]) -> Conditioning:
        """The conditioning of the captions; encode(list of captions) runs for the missing ones only."""
        missing = list(dict.fromkeys(c for c in captions if c not in self.entries))
        self.hits += len(captions) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                cond = encode(missing)
                for i, caption in enumerate(missing):
                    # clones: not views pinning the whole batch
                    entry = (cond.hidden[i].clone(), None if cond.pooled is None else cond.pooled[i].clone())
                    self.entries[caption] = entry
                    self.bytes += sum(x.numel() * x.element_size() for x in entry if x is not None)
        for caption in captions:
            self.entries.move_to_end(caption)
        while self.bytes > self.max_bytes and len(self.entries) > len(captions):
            _, old = self.entries.popitem(last=False)
            self.bytes -= sum(x.numel() * x.element_size() for x in old if x is not None)
        rows = [self.entries[c] for c in captions]
        pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
        return Conditioning(torch.stack([r[0] for r in rows]), pooled)
