"""utils/sd/model_arch.py: models of other architectures are refused by their configs / key names, naming them."""
import json
from pathlib import Path

import pytest

from utils.core.config_schema import ConfigError
from utils.sd.model_arch import check_diffusers_folder, check_single_file_keys


def _folder(root: Path, index: dict | None, unet: dict, extra_dirs=()) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "config.json").write_text(json.dumps(unet))
    if index is not None:
        (root / "model_index.json").write_text(json.dumps(index))
    for d in extra_dirs:
        (root / d).mkdir()
    return root


SD_UNET = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "cross_attention_dim": 768}


SUPPORTS = "this trainer supports SD1.x, SD2.x and SDXL"


@pytest.mark.parametrize("index,unet,dirs,message", [
    ({"_class_name": "StableDiffusionPipeline"}, {**SD_UNET, "addition_embed_type": "text_time"}, (),
     r"addition_embed_type 'text_time'\) where a SD1.x/SD2.x model takes none; " + SUPPORTS),
    ({"_class_name": "StableDiffusionXLPipeline"}, SD_UNET, ("text_encoder", "text_encoder_2"),
     r"addition_embed_type None\) where a SDXL model takes 'text_time'"),
    ({"_class_name": "StableDiffusionXLPipeline"}, SD_UNET, ("text_encoder",), r"do not match its pipeline"),
    # the SDXL refiner: its own pipeline, OpenCLIP-G alone
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline"}, SD_UNET, ("text_encoder_2",),
     r"is a StableDiffusionXLImg2ImgPipeline model"),
    (None, SD_UNET, ("text_encoder_2",), r"text encoders \(text_encoder_2\) do not match"),
    ({"_class_name": "StableDiffusionInpaintPipeline"}, {**SD_UNET, "in_channels": 9}, (),
     r"is a StableDiffusionInpaintPipeline model; " + SUPPORTS),
    (None, {**SD_UNET, "in_channels": 9}, (), r"takes 9 input channels"),
    (None, {**SD_UNET, "addition_embed_type": "image"}, (), r"added conditioning"),
    (None, {"_class_name": "UNet2DModel", "in_channels": 4}, (), r"its UNet is a UNet2DModel"),
])
def test_other_architectures_are_refused_by_their_configs(tmp_path, index, unet, dirs, message):
    folder = _folder(tmp_path / "m", index, unet, dirs)
    with pytest.raises(ConfigError, match=message) as e:
        check_diffusers_folder(folder)
    assert str(e.value).startswith(str(folder)) and "\n" not in str(e.value)


def test_sd_folders_pass(tiny_sd_folder, tiny_sdxl_folder, tmp_path):
    check_diffusers_folder(tiny_sd_folder)
    check_diffusers_folder(tiny_sdxl_folder)
    check_diffusers_folder(_folder(tmp_path / "m", {"_class_name": "StableDiffusionPipeline"}, SD_UNET))
    broken = _folder(tmp_path / "b", None, SD_UNET)
    (broken / "model_index.json").write_text("{")
    with pytest.raises(ConfigError, match="model_index.json: invalid JSON"):
        check_diffusers_folder(broken)


def test_single_file_keys():
    check_single_file_keys(["model.diffusion_model.out.2.weight", "cond_stage_model.model.ln_final.weight"], "a")
    check_single_file_keys(["conditioner.embedders.0.transformer.text_model.x", "conditioner.embedders.1.model.x"],
                           "sdxl.safetensors")
    with pytest.raises(ConfigError, match=r"^x.safetensors is an SDXL refiner or another model in the SGM layout"):
        check_single_file_keys(["conditioner.embedders.0.model.ln_final.weight"], "x.safetensors")
