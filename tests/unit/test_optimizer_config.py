"""optimizer.json loading: defaults, inheritance, lr override, EveryDream2 keys, and strict errors."""
import json
import math
from pathlib import Path

import pytest

from optimizer.config import (OPTIMIZERS, LR_SCHEDULERS, SECTIONS, FreezeSettings, keys_markdown,
                              load_optimizer_config, optimizer_config_to_json)
from utils.core.config_schema import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, data, name="optimizer.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(path)


def load(tmp_path, data, **kw):
    warnings = []
    cfg = load_optimizer_config(write(tmp_path, data), warn=warnings.append, **kw)
    return cfg, warnings


def test_no_file_gives_the_documented_defaults():
    cfg = load_optimizer_config(None)
    for part in (cfg.unet, cfg.text_encoder):
        assert part.optimizer == "adamw8bit" and part.lr == 1e-6 and part.lr_scheduler == "constant"
        assert part.betas == [0.9, 0.999] and part.weight_decay == 0.01 and part.epsilon == 1e-8
        assert part.lr_warmup_steps is None and part.lr_decay_steps is None  # from the run length
    assert cfg.text_encoder_freezing == FreezeSettings()
    assert cfg.unet.betas is not cfg.text_encoder.betas  # no list shared between the parts


def test_shipped_optimizer_json_loads_without_warnings():
    warnings = []
    cfg = load_optimizer_config(str(ROOT / "optimizer.json"), warn=warnings.append)
    assert warnings == []
    assert (cfg.unet.optimizer, cfg.unet.lr, cfg.unet.lr_scheduler) == ("adamw8bit", 1e-6, "constant")
    assert (cfg.text_encoder.optimizer, cfg.text_encoder.lr, cfg.text_encoder.lr_scheduler) == \
        ("adamw8bit", 5e-7, "cosine")
    assert cfg.text_encoder.weight_decay == 0.01 and cfg.text_encoder.betas == [0.9, 0.999]


def test_null_overrides_inherit_but_literal_zero_and_false_are_kept(tmp_path):
    cfg, _ = load(tmp_path, {
        "base": {"optimizer": "prodigy", "weight_decay": 0.05, "decouple": True, "d0": 1e-5},
        "text_encoder_overrides": {"weight_decay": 0, "decouple": False, "d0": None, "lr": None}})
    assert cfg.text_encoder.weight_decay == 0 and cfg.text_encoder.weight_decay is not None
    assert cfg.text_encoder.decouple is False
    assert cfg.text_encoder.d0 == 1e-5 and cfg.text_encoder.optimizer == "prodigy"
    assert cfg.text_encoder.lr == 1.0 and cfg.unet.weight_decay == 0.05


def test_missing_sections_and_doc_are_fine(tmp_path):
    cfg, warnings = load(tmp_path, {"base": {"lr": 2e-6}})   # no doc (EveryDream2 D15 crashed here)
    assert cfg.unet.lr == cfg.text_encoder.lr == 2e-6 and warnings == []
    cfg, _ = load(tmp_path, {"doc": ["any", {"free": "text"}], "_comment": "ignored too",
                             "text_encoder_overrides": None, "text_encoder_freezing": None})
    assert cfg.unet.optimizer == "adamw8bit"


def test_defaults_follow_the_chosen_optimizer(tmp_path):
    cfg, _ = load(tmp_path, {"base": {"optimizer": "lion"}, "text_encoder_overrides": {"optimizer": "prodigy"}})
    assert (cfg.unet.lr, cfg.unet.betas, cfg.unet.weight_decay, cfg.unet.epsilon) == (1e-7, [0.9, 0.99], 0.1, None)
    te = cfg.text_encoder
    assert (te.lr, te.d0, te.decouple, te.safeguard_warmup, te.growth_rate) == (1.0, 1e-6, True, True, math.inf)


def test_a_text_encoder_with_another_optimizer_gets_its_own_default_lr(tmp_path):
    # base lr null: the text encoder's prodigy gets 1.0, not the UNet's 1e-6
    cfg, _ = load(tmp_path, {"base": {"optimizer": "adamw"}, "text_encoder_overrides": {"optimizer": "prodigy"}})
    assert cfg.unet.lr == 1e-6 and cfg.text_encoder.lr == 1.0


def test_lr_override_sets_both_parts(tmp_path):
    cfg, _ = load(tmp_path, {"base": {"lr": 1e-6}, "text_encoder_overrides": {"lr": 5e-7}}, lr_override=3e-6)
    assert cfg.unet.lr == cfg.text_encoder.lr == 3e-6
    assert load_optimizer_config(None, lr_override=2e-6).text_encoder.lr == 2e-6


def test_text_encoder_lr_scale_applies_only_to_an_inherited_lr(tmp_path):
    cfg, warnings = load(tmp_path, {"base": {"lr": 2e-6}, "text_encoder_lr_scale": 0.5})
    assert cfg.text_encoder.lr == pytest.approx(1e-6) and "text_encoder_lr_scale" in warnings[0]
    cfg, _ = load(tmp_path, {"base": {"lr": 2e-6}, "text_encoder_overrides": {"lr": 3e-7},
                             "text_encoder_lr_scale": 0.5})
    assert cfg.text_encoder.lr == 3e-7


def test_everydream2_top_level_switches_are_read(tmp_path):
    cfg, _ = load(tmp_path, {"apply_grad_scaler_step_tweaks": False, "log_grad_norm": False})
    assert cfg.apply_grad_scaler_step_tweaks is False and cfg.log_grad_norm is False
    assert load_optimizer_config(None).apply_grad_scaler_step_tweaks is True


def test_legacy_freezing_keys_are_converted_with_a_warning(tmp_path):
    cfg, warnings = load(tmp_path, {"text_encoder_freezing": {"freeze_front_n_layers": -2}})
    assert cfg.text_encoder_freezing.unfreeze_last_n_layers == 2
    assert cfg.text_encoder_freezing.freeze_front_n_layers is None and "deprecated" in warnings[0]
    cfg, warnings = load(tmp_path, {"text_encoder_freezing": {"freeze_front_n_layers": 20}})
    assert cfg.text_encoder_freezing.freeze_front_n_layers == 20 and "deprecated" in warnings[0]
    cfg, warnings = load(tmp_path, {"text_encoder_freezing": {"unfreeze_final_n_layers": 2}})
    assert cfg.text_encoder_freezing.unfreeze_last_n_layers == 2 and "unfreeze_final_n_layers" in warnings[0]


def test_everydream2_no_prox_is_ignored_with_a_warning(tmp_path):
    cfg, warnings = load(tmp_path, {"base": {"optimizer": "dadapt_adam", "no_prox": False}})
    assert "no_prox" in warnings[0]


def test_keys_the_optimizer_does_not_read_warn_and_are_cleared(tmp_path):
    cfg, warnings = load(tmp_path, {"base": {"optimizer": "lion", "epsilon": 1e-8, "d0": 1e-6}})
    assert warnings == ["%s: base: d0, epsilon not used by lion" % (tmp_path / "optimizer.json")]
    assert cfg.unet.epsilon is None and cfg.unet.d0 is None


def test_a_base_key_meant_for_the_text_encoder_does_not_warn(tmp_path):
    _, warnings = load(tmp_path, {"base": {"optimizer": "adamw", "d0": 1e-5},
                                  "text_encoder_overrides": {"optimizer": "prodigy"}})
    assert warnings == []


def test_low_lr_for_an_adaptive_optimizer_warns(tmp_path):
    _, warnings = load(tmp_path, {"base": {"optimizer": "prodigy"}}, lr_override=1e-6)
    assert len(warnings) == 2 and "estimates the step size itself" in warnings[0]


def test_resolved_config_round_trips_through_json(tmp_path):
    cfg, _ = load(tmp_path, {"base": {"optimizer": "prodigy", "lr_scheduler": "cosine_with_restarts"},
                             "text_encoder_overrides": {"optimizer": "adafactor", "weight_decay": 0,
                                                        "lr_scheduler": "rex"},
                             "text_encoder_freezing": {"unfreeze_last_n_layers": 2}}, lr_override=None)
    again, warnings = load(tmp_path, optimizer_config_to_json(cfg))
    assert warnings == []
    assert (again.unet, again.text_encoder, again.text_encoder_freezing) == \
        (cfg.unet, cfg.text_encoder, cfg.text_encoder_freezing)


# --- strict loading ---

def error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    return str(info.value)


def test_unknown_keys_are_errors_with_suggestions(tmp_path):
    msg = error(tmp_path, {"bse": {}, "base": {"lr_sheduler": "cosine"},
                           "text_encoder_freezing": {"freeze_embedings": True}})
    assert "unknown key 'bse' (did you mean base?)" in msg
    assert "base: unknown key 'lr_sheduler' (did you mean lr_scheduler?)" in msg
    assert "text_encoder_freezing: unknown key 'freeze_embedings' (did you mean freeze_embeddings?)" in msg


def test_wrong_types_and_ranges_are_errors(tmp_path):
    msg = error(tmp_path, {"base": {"lr": "1e-6", "lr_warmup_steps": 2.5, "decouple": 1, "betas": 0.9,
                                    "weight_decay": -1},
                           "text_encoder_freezing": {"unfreeze_last_n_layers": -1}, "log_grad_norm": "yes"})
    assert "'lr' must be float | null, got \"1e-6\"" in msg
    assert "'lr_warmup_steps' must be int | null, got 2.5" in msg
    assert "'decouple' must be bool | null, got 1" in msg
    assert "'betas' must be list[float] | null, got 0.9" in msg
    assert "'weight_decay' must be at least 0.0, got -1" in msg
    assert "'unfreeze_last_n_layers' must be at least 0, got -1" in msg
    assert "'log_grad_norm' must be bool, got \"yes\"" in msg


def test_unknown_optimizer_lists_the_valid_ones(tmp_path):
    msg = error(tmp_path, {"base": {"optimizer": "adamw_8bit"}})
    assert "base: unknown optimizer 'adamw_8bit' (did you mean adamw8bit?); valid: " + ", ".join(OPTIMIZERS) in msg
    assert msg.count("\n") == 0  # reported once, not again by the type check


def test_everydream2_optimizers_not_offered_say_what_to_use(tmp_path):
    msg = error(tmp_path, {"text_encoder_overrides": {"optimizer": "dadapt_adan"}})
    assert "text_encoder_overrides: unknown optimizer 'dadapt_adan' (EveryDream2's dadapt_adan is not " in msg
    assert "valid: adamw8bit" in msg


def test_unknown_scheduler_lists_the_valid_ones(tmp_path):
    msg = error(tmp_path, {"base": {"lr_scheduler": "piecewise_constant"}})
    assert "unknown lr_scheduler 'piecewise_constant'" in msg and ", ".join(LR_SCHEDULERS) in msg


def test_all_problems_are_reported_together(tmp_path):
    msg = error(tmp_path, {"base": {"optimizer": "sgd", "lr": "x"}, "extra": 1})
    assert len(msg.splitlines()) == 3


def test_malformed_json_reports_line_and_column(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid JSON at line 3, column 5"):
        load(tmp_path, '{\n  "base": {},\n    oops\n}')


def test_missing_file_and_non_object_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="optimizer config not found"):
        load_optimizer_config(str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load(tmp_path, "[1, 2]")


def test_newer_config_version_is_an_error(tmp_path):
    assert "'config_version' must be in [1, 1], got 2" in error(tmp_path, {"config_version": 2})


def test_cross_field_problems(tmp_path):
    msg = error(tmp_path, {"base": {"betas": [0.9, 0.999, 0.5], "lr_scheduler": "cosine", "lr_warmup_steps": 50,
                                    "lr_decay_steps": 50},
                           "text_encoder_overrides": {"optimizer": "adamw_schedulefree", "betas": [1.0, 0.99]}})
    assert "base: betas must be two numbers" in msg
    assert "base: lr_warmup_steps (50) must be below lr_decay_steps (50)" in msg
    assert "text encoder: betas must be below 1" in msg
    assert "adamw_schedulefree replaces the LR schedule; set lr_scheduler to constant" in msg


def test_conflicting_freezing_keys(tmp_path):
    msg = error(tmp_path, {"text_encoder_freezing": {"unfreeze_last_n_layers": 2, "freeze_front_n_layers": 3}})
    assert "set unfreeze_last_n_layers or freeze_front_n_layers, not both" in msg


def test_doc_tables_match_the_schema():
    """doc/OPTIMIZER.md embeds the generated key tables (`python -m optimizer.config` prints them)."""
    text = (ROOT / "doc" / "OPTIMIZER.md").read_text(encoding="utf-8")
    for title, cls in SECTIONS.items():
        assert f"<!-- keys: {title} -->\n{keys_markdown(cls)}\n" in text, f"regenerate the '{title}' table"


def test_every_json_example_in_the_doc_loads(tmp_path):
    text = (ROOT / "doc" / "OPTIMIZER.md").read_text(encoding="utf-8")
    blocks = text.split("```json\n")[1:]
    assert len(blocks) >= 7
    for i, block in enumerate(blocks):
        snippet = block.split("```")[0]
        data = json.loads(snippet if snippet.lstrip().startswith("{") else "{" + snippet + "}")
        cfg, warnings = load(tmp_path, data)
        assert warnings == [], (i, warnings)
