"""SDXL's two text encoders in optimizer.json: the settings chain (text_encoder_2_overrides -> text_encoder_overrides
-> base), freezing per encoder, training one encoder only (freeze_all), and build_optimizer_parts with two tiny CLIP
text models."""
import dataclasses
import json

import pytest
import torch

from optimizer.build import build_optimizer_parts, describe, fused_backward_problems
from optimizer.config import FreezeSettings, load_optimizer_config, optimizer_config_to_json
from optimizer.freezing import freeze_plan
from utils.core.config_schema import ConfigError


def load(tmp_path, data, **kw):
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    warnings = []
    return load_optimizer_config(str(path), warn=warnings.append, **kw), warnings


def error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    return str(info.value)


# --- the settings chain ---

def test_the_second_encoder_inherits_the_first_then_base(tmp_path):
    cfg, warnings = load(tmp_path, {
        "base": {"optimizer": "adamw", "lr": 1e-6, "weight_decay": 0.05, "epsilon": 1e-7},
        "text_encoder_overrides": {"lr": 5e-7, "lr_scheduler": "cosine"},
        "text_encoder_2_overrides": {"lr": 2e-7, "weight_decay": 0}})
    te1, te2 = cfg.text_encoder, cfg.text_encoder_2
    assert (te1.lr, te1.lr_scheduler, te1.weight_decay) == (5e-7, "cosine", 0.05)
    assert te2.lr == 2e-7 and te2.lr_scheduler == "cosine"            # its own, then the first encoder's
    assert te2.weight_decay == 0 and te2.weight_decay is not None      # a literal 0 is kept
    assert (te2.optimizer, te2.epsilon, te2.betas) == ("adamw", 1e-7, [0.9, 0.999])   # base's, then the default
    assert te2.betas is not te1.betas and warnings == []
    assert cfg.settings("text_encoder_2") is te2 and cfg.settings("unet") is cfg.unet


def test_without_its_section_the_second_encoder_trains_like_the_first(tmp_path):
    cfg, _ = load(tmp_path, {"base": {"lr": 2e-6}, "text_encoder_overrides": {"lr": 1e-6, "weight_decay": 0}})
    assert cfg.text_encoder_2 == cfg.text_encoder and cfg.text_encoder_2_freezing == FreezeSettings()
    assert load_optimizer_config(None).text_encoder_2 == load_optimizer_config(None).text_encoder


def test_a_second_encoder_with_another_optimizer_gets_its_defaults(tmp_path):
    cfg, warnings = load(tmp_path, {"base": {"optimizer": "adamw", "d0": 1e-5},
                                    "text_encoder_2_overrides": {"optimizer": "prodigy"}})
    assert (cfg.text_encoder.optimizer, cfg.text_encoder.lr, cfg.text_encoder.d0) == ("adamw", 1e-6, None)
    assert (cfg.text_encoder_2.optimizer, cfg.text_encoder_2.lr, cfg.text_encoder_2.d0) == ("prodigy", 1.0, 1e-5)
    assert warnings == []   # base's d0 reaches the second encoder: not reported as unused


def test_a_key_no_part_reads_is_reported_for_its_section(tmp_path):
    _, warnings = load(tmp_path, {"text_encoder_2_overrides": {"optimizer": "lion", "epsilon": 1e-8}})
    assert warnings == [f"{tmp_path / 'optimizer.json'}: text_encoder_2_overrides: epsilon not used by lion"]


def test_lr_override_and_lr_scale_reach_the_second_encoder(tmp_path):
    cfg, _ = load(tmp_path, {"text_encoder_overrides": {"lr": 5e-7}, "text_encoder_2_overrides": {"lr": 1e-7}},
                  lr_override=3e-6)
    assert cfg.unet.lr == cfg.text_encoder.lr == cfg.text_encoder_2.lr == 3e-6
    cfg, _ = load(tmp_path, {"base": {"lr": 2e-6}, "text_encoder_lr_scale": 0.5})
    assert cfg.text_encoder.lr == cfg.text_encoder_2.lr == pytest.approx(1e-6)


def test_inherited_problems_are_reported_once(tmp_path):
    msg = error(tmp_path, {"text_encoder_overrides": {"betas": [1.0, 0.99]},
                           "text_encoder_2_overrides": {"lr": 1e-7, "optimizer": "adamw_schedulefree",
                                                        "lr_scheduler": "cosine"}})
    assert msg.count("betas must be below 1") == 1 and "text encoder: betas must be below 1" in msg
    assert "second text encoder: adamw_schedulefree replaces the LR schedule" in msg


# --- freezing per encoder, and training one encoder only ---

def test_freezing_is_per_encoder_and_not_inherited(tmp_path):
    cfg, _ = load(tmp_path, {"text_encoder_freezing": {"unfreeze_last_n_layers": 2},
                             "text_encoder_2_freezing": {"unfreeze_last_n_layers": 8, "freeze_embeddings": False}})
    assert cfg.freezing("text_encoder") == FreezeSettings(unfreeze_last_n_layers=2)
    assert cfg.freezing("text_encoder_2") == FreezeSettings(unfreeze_last_n_layers=8, freeze_embeddings=False)
    cfg, _ = load(tmp_path, {"text_encoder_freezing": {"unfreeze_last_n_layers": 2}})
    assert cfg.text_encoder_2_freezing == FreezeSettings()


def test_freeze_all_says_which_encoder_trains(tmp_path):
    cfg, _ = load(tmp_path, {"text_encoder_freezing": {"freeze_all": True, "freeze_final_layer_norm": False}})
    assert [te for te in ("text_encoder", "text_encoder_2") if cfg.trains_text_encoder(te)] == ["text_encoder_2"]
    cfg, _ = load(tmp_path, {"text_encoder_2_freezing": {"freeze_all": True}})
    assert cfg.trains_text_encoder("text_encoder") and not cfg.trains_text_encoder("text_encoder_2")
    plan = freeze_plan(FreezeSettings(freeze_all=True), 32, lambda m: None)
    assert (plan.trained_layers, plan.freeze_embeddings, plan.freeze_final_layer_norm) == (0, True, True)


def test_freeze_all_with_keys_that_train_something_is_an_error(tmp_path):
    msg = error(tmp_path, {"text_encoder_2_freezing": {"freeze_all": True, "unfreeze_last_n_layers": 2,
                                                       "freeze_embeddings": False}})
    assert ("text_encoder_2_freezing: freeze_all true freezes the whole text encoder; set unfreeze_last_n_layers, "
            "freeze_embeddings to null or freeze_all to false") in msg


def test_typos_in_the_new_sections_suggest_the_key(tmp_path):
    msg = error(tmp_path, {"text_encoder2_overrides": {}, "text_encoder_2_overrides": {"lr_sheduler": "cosine"},
                           "text_encoder_2_freezing": {"freeze_al": True, "unfreeze_last_n_layer": 2}})
    assert "unknown key 'text_encoder2_overrides' (did you mean text_encoder_2_overrides?)" in msg
    assert "text_encoder_2_overrides: unknown key 'lr_sheduler' (did you mean lr_scheduler?)" in msg
    assert "text_encoder_2_freezing: unknown key 'freeze_al' (did you mean freeze_all?)" in msg
    assert "text_encoder_2_freezing: unknown key 'unfreeze_last_n_layer' (did you mean unfreeze_last_n_layers?)" in msg
    assert "unknown key 'text_encoder_2_freezng' (did you mean text_encoder_2_freezing?)" in error(
        tmp_path, {"text_encoder_2_freezng": {}})


def test_a_guessed_training_switch_points_to_freeze_all(tmp_path):
    msg = error(tmp_path, {"base": {"train": False}, "text_encoder_overrides": {"train": False},
                           "text_encoder_2_freezing": {"frozen": True}})
    assert "base: unknown key 'train' (train.json's disable_unet_training freezes the UNet)" in msg
    assert ("text_encoder_overrides: unknown key 'train' (to freeze this text encoder set \"freeze_all\": true in "
            "text_encoder_freezing)") in msg
    assert "text_encoder_2_freezing: unknown key 'frozen' (did you mean freeze_all?" in msg


# --- EveryDream2 files and the saved resolved file ---

EVERYDREAM2_FILE = {
    "doc": {"base": "base optimizer settings for unet and text encoder"},
    "base": {"optimizer": "adamw8bit", "lr": 1e-6, "lr_scheduler": "constant", "lr_decay_steps": None,
             "lr_warmup_steps": None, "betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.010},
    "text_encoder_overrides": {"optimizer": None, "lr": 5e-7, "lr_scheduler": "cosine", "lr_decay_steps": None,
                               "lr_warmup_steps": None, "betas": None, "epsilon": None, "weight_decay": None},
    "text_encoder_freezing": {"unfreeze_last_n_layers": None},
    "apply_grad_scaler_step_tweaks": True,
    "log_grad_norm": True,
}


def test_an_everydream2_file_loads_as_before(tmp_path):
    cfg, warnings = load(tmp_path, EVERYDREAM2_FILE)
    assert warnings == []
    assert (cfg.text_encoder.lr, cfg.text_encoder.lr_scheduler) == (5e-7, "cosine")
    assert cfg.text_encoder_2 == cfg.text_encoder and cfg.text_encoder_2_freezing == FreezeSettings()
    saved = optimizer_config_to_json(cfg)   # EveryDream2's layout: no text_encoder_2 sections
    assert set(saved) == {"config_version", "doc", "base", "text_encoder_overrides", "text_encoder_freezing",
                          "apply_grad_scaler_step_tweaks", "log_grad_norm", "grouped_8bit_step", "triton_8bit_step"}


def test_resolved_second_encoder_round_trips(tmp_path):
    cfg, _ = load(tmp_path, {"base": {"optimizer": "adamw"}, "text_encoder_overrides": {"lr": 5e-7},
                             "text_encoder_2_overrides": {"optimizer": "lion", "weight_decay": 0},
                             "text_encoder_freezing": {"freeze_all": True},
                             "text_encoder_2_freezing": {"unfreeze_last_n_layers": 4}})
    saved = optimizer_config_to_json(cfg)
    assert saved["text_encoder_2_overrides"]["optimizer"] == "lion"
    again, warnings = load(tmp_path, saved)
    assert warnings == [] and dataclasses.replace(again, source=cfg.source) == cfg


# --- build_optimizer_parts with two tiny CLIP text models ---

def tiny_text_encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    kw = dict(vocab_size=64, hidden_size=8, intermediate_size=16, num_attention_heads=2, max_position_embeddings=16,
              bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    return (CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, **kw)),
            CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=3, projection_dim=4, **kw)))


def numel(module, keep=lambda name: True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if keep(n))


def build(tmp_path, data, unet, te1, te2, **kw):
    cfg, _ = load(tmp_path, data)
    return build_optimizer_parts(cfg, unet=unet, text_encoders=[("text_encoder", te1), ("text_encoder_2", te2)],
                                 total_steps=10, batch_size=1, grad_accum=1, device_type="cpu",
                                 warn=kw.pop("warn", lambda m: None), **kw)


def test_two_text_encoders_give_three_parts_with_their_lrs(tmp_path):
    unet, (te1, te2) = torch.nn.Linear(8, 8), tiny_text_encoders()
    parts = build(tmp_path, {"base": {"optimizer": "adamw", "lr": 1e-6}, "text_encoder_overrides": {"lr": 5e-7},
                             "text_encoder_2_overrides": {"lr": 2e-7}}, unet, te1, te2)
    assert [p.name for p in parts] == ["unet", "text_encoder", "text_encoder_2"]
    assert [p.optimizer.param_groups[0]["lr"] for p in parts] == [1e-6, 5e-7, 2e-7]
    assert [sum(q.numel() for q in p.params) for p in parts] == [numel(unet), numel(te1), numel(te2)]
    assert [p.total_params for p in parts] == [numel(unet), numel(te1), numel(te2)]
    assert describe(parts).splitlines()[2].startswith("text_encoder_2: adamw (AdamW), lr 2e-07")


def test_each_encoder_gets_its_own_freezing(tmp_path):
    unet, (te1, te2) = torch.nn.Linear(8, 8), tiny_text_encoders()
    parts = build(tmp_path, {"base": {"optimizer": "adamw"}, "text_encoder_freezing": {"unfreeze_last_n_layers": 1},
                             "text_encoder_2_freezing": {"unfreeze_last_n_layers": 1, "freeze_final_layer_norm": True}},
                  unet, te1, te2)
    te1_trained = numel(te1, lambda n: n.startswith(("encoder.layers.1.", "final_layer_norm.")))
    te2_trained = numel(te2, lambda n: n.startswith(("text_model.encoder.layers.2.", "text_projection.")))
    assert [sum(q.numel() for q in p.params) for p in parts] == [numel(unet), te1_trained, te2_trained]
    assert sum(p.numel() for p in te2.parameters() if p.requires_grad) == te2_trained
    assert (parts[1].freeze_plan.total_layers, parts[2].freeze_plan.total_layers) == (2, 3)


@pytest.mark.parametrize("frozen, trained", [("text_encoder", "text_encoder_2"), ("text_encoder_2", "text_encoder")])
def test_train_one_text_encoder_only(tmp_path, frozen, trained):
    unet, (te1, te2) = torch.nn.Linear(8, 8), tiny_text_encoders()
    warnings = []
    parts = build(tmp_path, {"base": {"optimizer": "adamw"}, f"{frozen}_freezing": {"freeze_all": True}},
                  unet, te1, te2, warn=warnings.append)
    assert [p.name for p in parts] == ["unet", trained] and warnings == []
    modules = {"text_encoder": te1, "text_encoder_2": te2}
    assert not any(p.requires_grad for p in modules[frozen].parameters())
    assert all(p.requires_grad for p in modules[trained].parameters())


def test_an_encoder_passed_as_none_is_not_trained(tmp_path):
    unet, (te1, te2) = torch.nn.Linear(8, 8), tiny_text_encoders()
    assert [p.name for p in build(tmp_path, {}, None, None, te2)] == ["text_encoder_2"]
    with pytest.raises(ConfigError, match="nothing to train"):
        build(tmp_path, {}, None, None, None)


def test_text_encoder_names_are_checked(tmp_path):
    cfg = load_optimizer_config(None)
    te1, _ = tiny_text_encoders()
    for bad in ([("text_encoder_3", te1)], [("text_encoder", te1), ("text_encoder", te1)]):
        with pytest.raises(ValueError):
            build_optimizer_parts(cfg, unet=None, text_encoders=bad, total_steps=1, batch_size=1, grad_accum=1,
                                  device_type="cpu")


def test_fused_backward_problems_check_each_trained_encoder(tmp_path):
    cfg, _ = load(tmp_path, {"text_encoder_2_overrides": {"optimizer": "adamw"}})
    both = ["text_encoder", "text_encoder_2"]
    kw = dict(train_unet=True, grad_accum=1, clip_grad_norm=None, fp16=False, processes=1)
    assert fused_backward_problems(cfg, train_text_encoders=both, **kw) == [
        "optimizer.json text_encoder_2_overrides: optimizer 'adamw': use adamw8bit or lion8bit"]
    assert fused_backward_problems(cfg, train_text_encoders=["text_encoder"], **kw) == []
    cfg, _ = load(tmp_path, {"text_encoder_2_overrides": {"optimizer": "adamw"},
                             "text_encoder_2_freezing": {"freeze_all": True}})
    assert fused_backward_problems(cfg, train_text_encoders=both, **kw) == []   # frozen by optimizer.json
