"""Refuse models of an architecture the trainer cannot train, by their configs or key names, before any weight loads.

The trainer trains Stable Diffusion 1.x and 2.x text-to-image models (StableDiffusionPipeline: one CLIP text
encoder, a 4-channel UNet without added conditioning). diffusers loads an SDXL UNet's config into the same
UNet2DConditionModel class without complaint, so without these checks an SDXL folder loaded as if it were SD1 and
failed at the first step with a TypeError about `added_cond_kwargs`.
"""
from __future__ import annotations

from pathlib import Path

from utils.core.config_schema import ConfigError, read_json
from utils.sd.families import supported_titles

SUPPORTED = f"this trainer supports {supported_titles()}"
SUPPORTED_PIPELINE = "StableDiffusionPipeline"
# Where single files in Stability's SGM layout (SDXL base and refiner) keep their text encoders; SD1/SD2 files in
# the LDM layout use cond_stage_model.
SGM_PREFIX = "conditioner.embedders."


def _read_config(path: Path) -> dict:
    return read_json(path, "model config") if path.is_file() else {}


def check_diffusers_folder(folder: Path) -> None:
    """ConfigError unless `folder` holds an SD1.x/SD2.x text-to-image model. Reads only model_index.json and
    unet/config.json (and looks for text_encoder_2/), so it runs before any weight is read."""
    folder = Path(folder)
    index = _read_config(folder / "model_index.json")
    unet = _read_config(folder / "unet" / "config.json")
    pipeline = index.get("_class_name")
    signs = [(str(pipeline), "XL" in str(pipeline or "")),
             ("text_encoder_2/", (folder / "text_encoder_2").is_dir() or "text_encoder_2" in index),
             ("unet addition_embed_type 'text_time'", unet.get("addition_embed_type") == "text_time")]
    sdxl_signs = [sign for sign, present in signs if present]
    if sdxl_signs:
        raise ConfigError(f"{folder} is an SDXL model ({', '.join(sdxl_signs)}); {SUPPORTED}")
    if pipeline is not None and pipeline != SUPPORTED_PIPELINE:
        raise ConfigError(f"{folder} is a {pipeline} model; {SUPPORTED} text-to-image models ({SUPPORTED_PIPELINE})")
    unet_class = unet.get("_class_name", "UNet2DConditionModel")
    if unet_class != "UNet2DConditionModel":
        raise ConfigError(f"{folder}: its UNet is a {unet_class}; {SUPPORTED} (UNet2DConditionModel)")
    if unet.get("addition_embed_type") is not None:
        raise ConfigError(f"{folder}: its UNet takes added conditioning (addition_embed_type "
                          f"{unet['addition_embed_type']!r}); {SUPPORTED}")
    if unet.get("in_channels", 4) != 4:
        raise ConfigError(f"{folder}: its UNet takes {unet['in_channels']} input channels (an inpainting or depth "
                          f"model?); {SUPPORTED} text-to-image models (4 channels)")


def check_single_file_keys(keys, source) -> None:
    """ConfigError for a single file whose key names give away another layout (only the names: a safetensors
    file's are read from its header, before its tensors)."""
    sgm = sorted({k.split(".")[2] for k in keys if k.startswith(SGM_PREFIX) and k.count(".") > 2})
    if "1" in sgm:  # SDXL base: CLIP-L as embedder 0, OpenCLIP-G as embedder 1
        raise ConfigError(f"{source} is an SDXL model (its text encoders are stored as {SGM_PREFIX}0/1.*); "
                          f"{SUPPORTED}")
    if sgm:
        raise ConfigError(f"{source} is an SDXL refiner or another model in the SGM layout ({SGM_PREFIX}0.* keys); "
                          f"{SUPPORTED} in the original LDM layout (cond_stage_model.*)")
