"""LDM single files on disk: reading .safetensors/.ckpt (torch.load with weights_only=True), reading a diffusers
component's weights, writing tensors atomically, and pruning (EveryDream1's prune_ckpt).
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Literal

import torch

from utils.core.config_schema import ConfigError, read_json
from utils.core.file_writes import write_atomic
from utils.sd.families import FAMILIES, UNET_PREFIX, VAE_PREFIX, family_from_keys
from utils.sd.ldm_keys import SCHEDULE_BUFFERS
from utils.sd.ldm_markers import MARKER_KEYS
from utils.sd.model_arch import check_single_file_keys

log = logging.getLogger(__name__)

# What pruning keeps: UNet, VAE and every family's text encoders (SD1/SD2 cond_stage_model.*, SDXL conditioner.*).
MODEL_PREFIXES = (UNET_PREFIX, VAE_PREFIX,
                  *dict.fromkeys(e.single_file_prefix for f in FAMILIES.values() for e in f.text_encoders))

Fmt = Literal["safetensors", "ckpt"]


def _load_ckpt(path: Path) -> dict:
    """torch.load with weights_only=True: a checkpoint that needs code execution is refused, never run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only used to improve the message
            names = []
        what = f" (it references {', '.join(names[:5])})" if names else ""
        raise ConfigError(
            f"{path}: this .ckpt needs pickle code execution to load{what}; it is refused because a checkpoint "
            f"can run arbitrary code that way. Use a .safetensors version of the model, or re-save it as "
            f".safetensors with a tool you trust.") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ConfigError(f"{path}: cannot read as a PyTorch checkpoint: {e}") from None


def read_single_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an LDM `.safetensors` or `.ckpt`; a `.ckpt`'s `state_dict` wrapper is unwrapped.

    Metadata is the safetensors header's `__metadata__`, or for a .ckpt the wrapper's `global_step`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"single-file checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                check_single_file_keys(f.keys(), path)  # an SDXL file is refused before gigabytes are read
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path}: cannot read as .safetensors: {e}") from None
        return tensors, meta
    if suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise ConfigError(f"{path}: expected a .safetensors or .ckpt file")
    obj, meta = _load_ckpt(path), {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        if isinstance(obj.get("global_step"), int):
            meta["global_step"] = str(obj["global_step"])
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a dict of tensors (optionally under 'state_dict'), "
                          f"got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"{path}: contains no tensors")
    return tensors, meta


def save_tensors(sd: dict[str, torch.Tensor], out_path: Path, fmt: Fmt, metadata: dict[str, str]) -> Path:
    if fmt == "safetensors":
        from safetensors.torch import save_file
        # safetensors refuses shared storage and non-contiguous views; every tensor gets its own buffer.
        sd = {k: v.contiguous() for k, v in sd.items()}
        return write_atomic(out_path, lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt", **metadata}))
    if fmt == "ckpt":
        # The original releases wrap the weights in "state_dict"; every loader accepts that form.
        return write_atomic(out_path, lambda tmp: torch.save({"state_dict": sd}, tmp))
    raise ConfigError(f"unknown format {fmt!r}: expected 'safetensors' or 'ckpt'")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers/transformers component's weights as saved by save_pretrained (safetensors, sharded, or .bin)."""
    from safetensors.torch import load_file
    for stem in ("diffusion_pytorch_model", "model", "pytorch_model"):
        for variant in ("", ".fp16"):
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return load_file(str(single))
            for ext in ("safetensors", "bin"):
                index = folder / f"{stem}{variant}.{ext}.index.json"
                if index.is_file():
                    shards = sorted(set(read_json(index, "weight index")["weight_map"].values()))
                    out: dict[str, torch.Tensor] = {}
                    for shard in shards:
                        out.update(load_file(str(folder / shard)) if ext == "safetensors"
                                   else _load_ckpt(folder / shard))
                    return out
            binary = folder / f"{stem}{variant}.bin"
            if binary.is_file():
                return _load_ckpt(binary)
    raise ConfigError(f"{folder}: no model weights found (expected diffusion_pytorch_model.safetensors, "
                      f"model.safetensors or a .bin file)")



def cast_weights(sd: dict[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    """Floating weights to fp16 or fp32. Schedule buffers stay fp32 (web UIs sample with alphas_cumprod, and fp16
    rounding of it changes images), the empty markers too (as ComfyUI writes them); integer buffers (position_ids)
    keep their dtype."""
    dtype = torch.float16 if half else torch.float32
    keep = (*SCHEDULE_BUFFERS, *MARKER_KEYS)
    return {k: v.to(dtype) if v.is_floating_point() and k not in keep else v for k, v in sd.items()}



# Pruning (EveryDream1's prune_ckpt): drop EMA and optimizer state, keep the model weights, halve.

def prune_state_dict(sd: dict[str, torch.Tensor], *, half: bool = True, use_ema: bool = False
                     ) -> dict[str, torch.Tensor]:
    """Keep the UNet, VAE, text encoder, schedule buffers and markers; drop `model_ema.*` and everything else.

    use_ema: take the UNet weights from the EMA copy, which LDM stores flattened
    (`model.diffusion_model.a.b.weight` -> `model_ema.diffusion_modelabweight`).
    """
    out = {k: v for k, v in sd.items() if k.startswith(MODEL_PREFIXES) or k in SCHEDULE_BUFFERS or k in MARKER_KEYS}
    if use_ema:
        flat = {k: "model_ema." + "".join(k.split(".")[1:]) for k in out if k.startswith(UNET_PREFIX)}
        absent = [k for k, e in flat.items() if e not in sd]
        if absent:
            raise ConfigError(f"use_ema: the file has no EMA weights ({len(absent)} of {len(flat)} UNet tensors "
                              f"lack a model_ema.* copy, e.g. {flat[absent[0]]})")
        out.update({k: sd[e] for k, e in flat.items()})
    return cast_weights(out, half)


def prune_single_file(in_path: Path, out_path: Path, *, half: bool = True, use_ema: bool = False,
                      fmt: Fmt | None = None) -> Path:
    """Write a pruned copy of an SD1/SD2/SDXL single file (format from out_path's suffix unless fmt is given)."""
    in_path, out_path = Path(in_path), Path(out_path)
    sd, meta = read_single_file(in_path)
    family_from_keys(sd, in_path)
    fmt = fmt or ("ckpt" if out_path.suffix.lower() == ".ckpt" else "safetensors")
    if out_path.suffix.lower() != (".ckpt" if fmt == "ckpt" else ".safetensors"):
        raise ConfigError(f"{out_path}: a {fmt} checkpoint must be named *.{fmt}")
    if out_path.resolve() == in_path.resolve():
        raise ConfigError(f"{out_path}: choose an output path other than the input")
    pruned = prune_state_dict(sd, half=half, use_ema=use_ema)
    keep = {k: v for k, v in meta.items() if k.startswith("modelspec.")}
    save_tensors(pruned, out_path, fmt, keep)
    log.info("pruned %s: kept %d of %d tensors", in_path, len(pruned), len(sd))
    return out_path

