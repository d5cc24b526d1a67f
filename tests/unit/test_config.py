"""train.json / CLI strictness, EveryDream2 compatibility, and the generated doc."""
import json
from pathlib import Path

import pytest

from utils.run.config import TrainConfig, config_markdown, load_config
from utils.core.config_schema import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, data, name="train.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


def test_precedence_defaults_then_file_then_cli(tmp_path):
    p = write(tmp_path, {"resume_ckpt": "m", "batch_size": 4, "lr": 2e-6})
    cfg, _ = load_config(["--config", p, "--batch_size", "6"])
    assert cfg.batch_size == 6           # CLI wins
    assert cfg.lr == 2e-6                # file over default
    assert cfg.grad_accum == TrainConfig.grad_accum  # default


def test_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'bach_size' \(did you mean batch_size\?\)"):
        load_config(["--config", write(tmp_path, {"resume_ckpt": "m", "bach_size": 4})])
    with pytest.raises(ConfigError, match=r"--max_epoch.*did you mean max_epochs"):
        load_config(["--resume_ckpt", "m", "--max_epoch", "3"])


@pytest.mark.parametrize("key,value,msg", [
    ("batch_size", 2.5, "'batch_size' must be int"),
    ("gradient_checkpointing", 1, "'gradient_checkpointing' must be bool"),
    ("attn_type", "flash", '"sdp" | "xformers" | "slice"'),
    ("flip_p", 1.5, r"'flip_p' must be in \[0.0, 1.0\]"),
    ("batch_size", 0, "'batch_size' must be at least 1"),
])
def test_wrong_types_and_ranges_name_the_key(tmp_path, key, value, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(["--config", write(tmp_path, {"resume_ckpt": "m", key: value})])


def test_all_problems_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--config", write(tmp_path, {"resume_ckpt": "m", "bach_size": 4, "lr": "fast"})])
    assert "bach_size" in str(e.value) and "'lr'" in str(e.value)


def test_malformed_json_gives_line_and_column(tmp_path):
    with pytest.raises(ConfigError, match="line 3, column 1"):
        load_config(["--config", write(tmp_path, '{"resume_ckpt": "m",\n "batch_size": 2,\n}')])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(["--config", str(tmp_path / "nope.json")])


def test_everydream2_config_accepted_with_one_warning(tmp_path):
    warnings = []
    ed2 = {"resume_ckpt": "panopstor/EveryDream", "amp": True, "lowvram": False, "useadam8bit": True,
           "batch_size": 8, "max_epochs": 40, "rated_dataset": False, "plugins": None}
    cfg, _ = load_config(["--config", write(tmp_path, ed2)], warn=warnings.append)
    assert cfg.batch_size == 8 and cfg.max_epochs == 40
    unsupported = [w for w in warnings if "not supported" in w]
    assert len(unsupported) == 1
    for key in ("lowvram", "useadam8bit", "rated_dataset", "plugins"):
        assert key in unsupported[0]


def test_cli_values_parse_as_json_else_text():
    cfg, _ = load_config(["--resume_ckpt", "m", "--resolution", "[448, 512]", "--project_name", "2024",
                          "--lr", "1e-6", "--gradient_checkpointing"])
    assert cfg.resolution == [448, 512]
    assert cfg.project_name == "2024"
    assert cfg.lr == 1e-6
    assert cfg.gradient_checkpointing is True


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config(["--resume_ckpt", "m", "--disable_textenc_training", "--disable_unet_training"])
    with pytest.raises(ConfigError, match="resume_ckpt is required"):
        load_config([])
    with pytest.raises(ConfigError, match="multiple of 64"):
        load_config(["--resume_ckpt", "m", "--resolution", "500"])
    with pytest.raises(ConfigError, match="compile_blocks true needs torch_compile true"):
        load_config(["--resume_ckpt", "m", "--compile_blocks", "true"])
    with pytest.raises(ConfigError, match="compile_layout_optimization true needs torch_compile true"):
        load_config(["--resume_ckpt", "m", "--compile_layout_optimization", "true"])
    with pytest.raises(ConfigError, match="compile_mode 'reduce-overhead' needs torch_compile true"):
        load_config(["--resume_ckpt", "m", "--compile_mode", "reduce-overhead"])
    with pytest.raises(ConfigError, match=r"compile_mode 'reduce-overhead' \(CUDA graphs\) needs grad_accum 1, got 2"):
        load_config(["--resume_ckpt", "m", "--torch_compile", "true", "--compile_mode", "reduce-overhead",
                     "--grad_accum", "2"])
    assert load_config(["--resume_ckpt", "m", "--torch_compile", "true", "--compile_mode", "reduce-overhead"])[0] \
        .compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_memory_budget 0.5 needs torch_compile true"):
        load_config(["--resume_ckpt", "m", "--compile_memory_budget", "0.5"])
    with pytest.raises(ConfigError, match=r"compile_memory_budget. must be in \[0.0, 1.0\], got 1.5"):
        load_config(["--resume_ckpt", "m", "--torch_compile", "true", "--compile_memory_budget", "1.5"])
    with pytest.raises(ConfigError, match="sdp_backend 'cudnn' applies to attn_type 'sdp' only"):
        load_config(["--resume_ckpt", "m", "--attn_type", "slice", "--sdp_backend", "cudnn"])


def test_seed_minus_one_is_resolved():
    cfg, _ = load_config(["--resume_ckpt", "m", "--seed", "-1"])
    assert cfg.seed >= 0


def test_disable_amp_means_fp32():
    cfg, _ = load_config(["--resume_ckpt", "m", "--disable_amp"])
    assert cfg.mixed_precision == "no"


def test_config_doc_is_current():
    expected = config_markdown()
    actual = (ROOT / "doc" / "CONFIG.md").read_text(encoding="utf-8")
    assert actual == expected, "doc/CONFIG.md is stale: run `python -m utils.run.config > doc/CONFIG.md`"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in
                                        [ROOT / "train.json", *(ROOT / "examples").glob("*.json")]
                                        if "optimizer" not in p.name and "sample" not in p.name))
def test_shipped_train_configs_parse(path):
    load_config(["--config", str(ROOT / path)])


def test_live_settings_reload_changes_only_live_keys(tmp_path):
    from utils.run.config import live_settings, reload_live_settings, with_live_settings
    p = write(tmp_path, {"resume_ckpt": "m", "save_every_n_epochs": 5, "batch_size": 3})
    cfg, _ = load_config(["--config", p])
    write(tmp_path, {"resume_ckpt": "m", "save_every_n_epochs": 2, "batch_size": 9, "clip_skip": 2})
    live, changes = reload_live_settings(p, live_settings(cfg))
    assert changes == {"save_every_n_epochs": (5, 2), "clip_skip": (0, 2)}
    assert live.save_every_n_epochs == 2 and live.clip_skip == 2
    now = with_live_settings(cfg, live)
    assert now.save_every_n_epochs == 2 and now.clip_skip == 2 and now.batch_size == 3  # batch_size is not live
    assert cfg.save_every_n_epochs == 5 and cfg.clip_skip == 0  # the resolved config itself is never changed
    write(tmp_path, {"resume_ckpt": "m", "clip_skip": 9})
    with pytest.raises(ConfigError, match="clip_skip"):
        reload_live_settings(p, live)


def test_config_versions_migrate_one_step_at_a_time(tmp_path):
    """Migrations are keyed by config_version: an EveryDream2 file (no config_version) is version 0; each entry
    brings its version to the next, and the chain ends at CONFIG_VERSION."""
    from utils.run.config import CONFIG_VERSION, MIGRATIONS, migrate
    assert sorted(MIGRATIONS) == list(range(CONFIG_VERSION))
    warnings = []
    assert migrate({"amp": True, "lr": 1e-6}, "f.json", warnings.append) == {"lr": 1e-6}
    assert "'amp' is deprecated" in warnings[0]
    assert migrate({"config_version": CONFIG_VERSION, "lr": 1}, "f.json", warnings.append) == {
        "config_version": CONFIG_VERSION, "lr": 1}
    p = write(tmp_path, {"resume_ckpt": "m", "config_version": CONFIG_VERSION + 1})
    with pytest.raises(ConfigError, match="config_version"):
        load_config(["--config", p])


@pytest.mark.parametrize("name", ["train.json", "examples/train_24gb_fast.json", "examples/train_12gb.json",
                                  "examples/train_sdxl_24gb.json"])
def test_shipped_configs_pass_the_trainers_checks(name, monkeypatch):
    """The memory and speed presets combine options with conditions (fused_backward_pass with optimizer.json's
    optimizer, grad_accum and clip_grad_norm): the trainer's own checks, which run before any model loads, pass."""
    from utils.run.preflight import preflight   # the trainer's checks, before any model loads
    monkeypatch.chdir(ROOT)   # optimizer_config is relative to where train.py runs
    cfg, _ = load_config(["--config", name])
    if name == "examples/train_24gb_fast.json":   # its optimizer file turns on the Triton kernel: CUDA only
        with pytest.raises(ConfigError, match="triton_8bit_step true needs a CUDA GPU"):
            preflight(cfg)
        cfg.optimizer_config = "optimizer.json"
    preflight(cfg)


def test_fast_preset_optimizer_file_is_optimizer_json_with_the_triton_kernel():
    from optimizer.config import load_optimizer_config, optimizer_config_to_json
    warnings = []
    fast = optimizer_config_to_json(load_optimizer_config(str(ROOT / "examples/optimizer_24gb_fast.json"),
                                                          warn=warnings.append))
    plain = optimizer_config_to_json(load_optimizer_config(str(ROOT / "optimizer.json")))
    assert not warnings and fast.pop("triton_8bit_step") and not plain.pop("triton_8bit_step")
    assert {k: v for k, v in fast.items() if k != "doc"} == {k: v for k, v in plain.items() if k != "doc"}


def test_help_texts_quote_no_gpu_measurements():
    """Measurements go stale with every torch and GPU; they belong in doc/PERFORMANCE.md, not in --help."""
    import re
    from optimizer.config import SECTIONS, keys_markdown
    from utils.run.config import help_text
    text = help_text() + "".join(keys_markdown(cls) for cls in SECTIONS.values())
    found = re.findall(r"H100|H200|A100|RTX ?\d+|\d+(?:\.\d+)? ?ms\b|images/s|\d(?:\.\d+)?x (?:faster|slower)|"
                       r"\d+ ?% (?:faster|slower)|GiB (?:less|more)", text)
    assert not found, found
