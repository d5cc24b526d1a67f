"""utils/sd/families.py: the model-family records and detecting a model's family from its configs or keys."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from utils.core.config_schema import ConfigError
from utils.sd.families import (CONFIG_DIR, FAMILIES, PREDICTION_TYPES, family_from_keys, family_from_text_configs,
                               family_of_folder, supported_titles)

# The parts of a single file detection looks at; tiny tensors, the real names.
LDM_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}


def test_every_family_has_every_field_filled():
    # None / {} say "nothing to warn about" (SD1), "no added UNet conditioning", "no extra model_index.json keys"
    optional = {"no_sidecar_warning", "addition_embed_type", "pipeline_extras"}
    for name, family in FAMILIES.items():
        assert family.name == name
        for field in dataclasses.fields(family):
            value = getattr(family, field.name)
            assert field.name in optional or value not in (None, "", (), {}), (name, field.name)
        assert set(family.prediction) == set(PREDICTION_TYPES)
        for files in family.prediction.values():
            assert (CONFIG_DIR / files.import_yaml).is_file() and files.modelspec_architecture
            assert files.sidecar is None or (CONFIG_DIR / files.sidecar).is_file()
        for encoder in family.text_encoders:
            assert encoder.subfolder and encoder.single_file_prefix and encoder.pad_token
            assert encoder.layout in ("hf_clip", "open_clip") and encoder.import_config["hidden_size"] > 0


def test_records_are_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAMILIES["sd1"].title = "x"
    with pytest.raises(TypeError):
        FAMILIES["sd2"].text_encoders[0].import_config["hidden_size"] = 1


def test_family_from_text_configs_and_folder(tmp_path):
    assert family_from_text_configs([{"hidden_act": "quick_gelu"}]).name == "sd1"
    assert family_from_text_configs([{}]).name == "sd1"  # transformers' default activation is CLIP-L's
    assert family_from_text_configs([{"hidden_act": "gelu"}]).name == "sd2"
    assert family_from_text_configs([{}, {"hidden_act": "gelu"}]).name == "sdxl"
    for name, family in FAMILIES.items():
        folder = tmp_path / name
        for encoder in family.text_encoders:
            (folder / encoder.subfolder).mkdir(parents=True)
            (folder / encoder.subfolder / "config.json").write_text(json.dumps(dict(encoder.import_config)))
        assert family_of_folder(folder) is family


def test_an_unknown_text_encoder_layout_is_refused(tmp_path):
    # two CLIP-L-style encoders: no family has that layout
    with pytest.raises(ConfigError, match=r"m: no supported model family .*hf_clip, hf_clip; supported: SD1.x"):
        family_from_text_configs([{}, {}], "m")
    for sub in ("text_encoder", "text_encoder_2"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no supported model family"):
        family_of_folder(tmp_path)


def test_family_from_keys():
    assert family_from_keys({**LDM_KEYS, "cond_stage_model.transformer.text_model.x": torch.zeros(1)}, "a").name \
        == "sd1"
    assert family_from_keys({**LDM_KEYS, "cond_stage_model.model.ln_final.weight": torch.zeros(1)}, "b").name == "sd2"
    sdxl = {**LDM_KEYS, "conditioner.embedders.0.transformer.text_model.x": torch.zeros(1),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}
    assert family_from_keys(sdxl, "e").name == "sdxl"
    with pytest.raises(ConfigError, match=r"^c: not an SD1.x/SD2.x/SDXL single-file checkpoint: lacks the text enc"):
        family_from_keys(LDM_KEYS, "c")
    with pytest.raises(ConfigError, match="is an SDXL refiner or another model in the SGM layout"):
        family_from_keys({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, "d")


def test_supported_titles():
    assert supported_titles() == "SD1.x, SD2.x and SDXL"
