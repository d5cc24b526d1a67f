"""Refuse models of an architecture the trainer cannot train, by their configs or key names, before any weight loads.

The trainer trains the families of utils/sd/families.py (SD1.x, SD2.x, SDXL base) as text-to-image models: the
family's pipeline class, its text encoders, a 4-channel UNet with the family's added conditioning (none, or SDXL's
"text_time"). diffusers loads any UNet config into the same UNet2DConditionModel class without complaint, so without
these checks an SDXL refiner or an inpainting model would load and fail at the first step with a shape or TypeError.
"""
from __future__ import annotations

from pathlib import Path

from utils.core.config_schema import ConfigError, read_json
from utils.sd.families import FAMILIES, families_with_encoders_of, supported_titles

SUPPORTED = f"this trainer supports {supported_titles()}"
SUPPORTED_PIPELINES = tuple(dict.fromkeys(f.pipeline_class for f in FAMILIES.values()))
# Where single files in Stability's SGM layout (SDXL base and refiner) keep their text encoders; SD1/SD2 files in
# the LDM layout use cond_stage_model.
SGM_PREFIX = "conditioner.embedders."


def _read_config(path: Path) -> dict:
    return read_json(path, "model config") if path.is_file() else {}


def _text_encoder_subfolders(folder: Path, index: dict) -> set[str]:
    return {p.name for p in folder.glob("text_encoder*") if p.is_dir()} | {k for k in index
                                                                            if k.startswith("text_encoder")}


def check_diffusers_folder(folder: Path) -> None:
    """ConfigError unless `folder` holds a text-to-image model of a supported family. Reads only model_index.json
    and unet/config.json (and looks for text_encoder*/), so it runs before any weight is read."""
    folder = Path(folder)
    index = _read_config(folder / "model_index.json")
    unet = _read_config(folder / "unet" / "config.json")
    pipeline = index.get("_class_name")
    if pipeline is not None and pipeline not in SUPPORTED_PIPELINES:
        raise ConfigError(f"{folder} is a {pipeline} model; {SUPPORTED} text-to-image models "
                          f"({', '.join(SUPPORTED_PIPELINES)})")
    encoders = _text_encoder_subfolders(folder, index)
    # The families this folder can be: its pipeline class and text-encoder subfolders (when it names them) agree.
    candidates = [f for f in FAMILIES.values()
                  if pipeline in (None, f.pipeline_class)
                  and (not encoders or encoders == {e.subfolder for e in f.text_encoders})]
    if not candidates:
        raise ConfigError(f"{folder}: its text encoders ({', '.join(sorted(encoders))}) do not match its pipeline "
                          f"{pipeline or '(no model_index.json)'}; {SUPPORTED}")
    unet_class = unet.get("_class_name", "UNet2DConditionModel")
    if unet_class != "UNet2DConditionModel":
        raise ConfigError(f"{folder}: its UNet is a {unet_class}; {SUPPORTED} (UNet2DConditionModel)")
    added = unet.get("addition_embed_type")
    if added not in {f.addition_embed_type for f in candidates}:
        wanted = " or ".join(dict.fromkeys(repr(f.addition_embed_type) if f.addition_embed_type else "none"
                                           for f in candidates))
        raise ConfigError(f"{folder}: its UNet takes added conditioning (addition_embed_type {added!r}) where a "
                          f"{'/'.join(f.title for f in candidates)} model takes {wanted}; {SUPPORTED}")
    if unet.get("in_channels", 4) != 4:
        raise ConfigError(f"{folder}: its UNet takes {unet['in_channels']} input channels (an inpainting or depth "
                          f"model?); {SUPPORTED} text-to-image models (4 channels)")


def check_single_file_keys(keys, source) -> None:
    """ConfigError for a single file in the SGM layout that is no supported family (an SDXL refiner: OpenCLIP-G
    alone as embedder 0), from the key names only: a safetensors file's are read from its header, before its
    tensors."""
    keys = list(keys)
    if not any(k.startswith(SGM_PREFIX) for k in keys):
        return
    if not families_with_encoders_of(keys):
        raise ConfigError(f"{source} is an SDXL refiner or another model in the SGM layout ({SGM_PREFIX}* keys "
                          f"that no supported family has); {SUPPORTED}")
