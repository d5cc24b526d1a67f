"""Values in train.json, optimizer.json and on the command line: null (issue 24: EveryDream2's shipped train.json
writes null for "not set"), non-finite numbers, and config files that are not UTF-8 (issue 21). Every mistake is a
one-line error naming the file or key, exit code 2, no traceback."""
import json
import math
from pathlib import Path

import pytest

import train
from optimizer.config import (FreezeSettings, PartSettings, _OptimizerFile, load_optimizer_config,
                              optimizer_config_to_json)
from utils.run.config import EVERYDREAM2_KEYS, TrainConfig, load_config
from utils.core.config_schema import ConfigError, accepts_null, check_value, field_default, read_json, schema_fields
from utils.eval.validation import ValidationConfig, load_validation_config

ROOT = Path(__file__).resolve().parents[2]
EVERYDREAM2_TRAIN_JSON = ROOT / "tests" / "assets" / "everydream2_train.json"


def write(tmp_path, data, name="train.json") -> str:
    p = tmp_path / name
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return str(p)


def value_for_null(f, tp):
    """What a null must become: the key's default, or None where the key's type gives null its own meaning."""
    return None if accepts_null(tp) else field_default(f)


def run_main(argv, capsys) -> tuple[int, str]:
    rc = train.main(argv)
    out = capsys.readouterr()
    return rc, out.out + out.err


# --- null ---------------------------------------------------------------------------------------------------

def test_everydream2_shipped_train_json_loads_key_for_key():
    """tests/assets/everydream2_train.json is EveryDream2's own train.json (tests/assets/README.md)."""
    shipped = json.loads(EVERYDREAM2_TRAIN_JSON.read_text(encoding="utf-8"))
    assert shipped["ema_update_interval"] is None and shipped["ema_device"] is None  # the keys of issue 24
    warnings = []
    cfg, _ = load_config(["--config", str(EVERYDREAM2_TRAIN_JSON)], warn=warnings.append)
    fields = schema_fields(TrainConfig)
    assert len(warnings) == 1 and "not supported" in warnings[0]
    for key, value in shipped.items():
        if key not in fields:
            assert key in EVERYDREAM2_KEYS and key in warnings[0], key
            continue
        f, tp = fields[key]
        if key == "seed":
            assert value == -1 and 0 <= cfg.seed < 2**31       # -1: a random seed, resolved at load
        elif value is None:
            assert getattr(cfg, key) == value_for_null(f, tp), key
        else:
            assert getattr(cfg, key) == value, key
    assert (cfg.ema_update_interval, cfg.ema_device) == (500, "cpu")


@pytest.mark.parametrize("where", ["train.json", "command line"])
def test_every_train_key_null_takes_its_default_or_keeps_its_null_meaning(tmp_path, where):
    fields = schema_fields(TrainConfig)
    if where == "train.json":
        argv = ["--config", write(tmp_path, {k: None for k in fields}), "--resume_ckpt", "m"]
    else:
        argv = ["--config", write(tmp_path, {"resume_ckpt": "m"})]
        for key in fields:
            if key != "resume_ckpt":   # null would be its default "", and a run needs a model
                argv += [f"--{key}", "null"]
    cfg, _ = load_config(argv)
    for key, (f, tp) in fields.items():
        expected = "m" if key == "resume_ckpt" else value_for_null(f, tp)
        assert getattr(cfg, key) == expected, key
    assert cfg.lr is None and cfg.max_steps is None and cfg.optimizer_config is None  # their own null meanings


def test_null_on_the_command_line_overrides_train_json_with_the_default(tmp_path):
    p = write(tmp_path, {"resume_ckpt": "m", "ema_device": "cuda", "ema_update_interval": 50, "batch_size": 4})
    cfg, _ = load_config(["--config", p, "--ema_device", "null", "--ema_update_interval=null"])
    assert (cfg.ema_device, cfg.ema_update_interval, cfg.batch_size) == ("cpu", 500, 4)


def test_print_config_shows_the_value_a_null_takes(tmp_path, capsys):
    p = write(tmp_path, {"resume_ckpt": "m", "ema_update_interval": None, "ema_device": None, "lr": None})
    rc, out = run_main(["--config", p, "--print-config", "--seed", "null"], capsys)
    printed = json.loads(out)
    assert rc == 0
    assert (printed["ema_update_interval"], printed["ema_device"], printed["seed"]) == (500, "cpu", 555)
    assert printed["lr"] is None   # lr's null keeps its meaning: optimizer.json's lr


def test_live_settings_reload_reads_null_as_the_default(tmp_path):
    from utils.run.config import live_settings, reload_live_settings
    p = write(tmp_path, {"resume_ckpt": "m", "log_step": 5})
    cfg, _ = load_config(["--config", p])
    write(tmp_path, {"resume_ckpt": "m", "log_step": None})
    assert reload_live_settings(p, live_settings(cfg))[1] == {"log_step": (5, 25)}


@pytest.mark.parametrize("sections_as", ["null", "objects of nulls"])
def test_every_optimizer_key_null_gives_the_defaults(tmp_path, sections_as):
    top = {k: None for k in schema_fields(_OptimizerFile)}
    if sections_as == "objects of nulls":
        part = {k: None for k in schema_fields(PartSettings)}
        top.update(base=part, text_encoder_overrides=part,
                   text_encoder_freezing={k: None for k in schema_fields(FreezeSettings)})
    warnings = []
    cfg = load_optimizer_config(write(tmp_path, top, "optimizer.json"), warn=warnings.append)
    assert warnings == []
    resolved, defaults = optimizer_config_to_json(cfg), optimizer_config_to_json(load_optimizer_config(None))
    resolved.pop("doc"), defaults.pop("doc")
    assert resolved == defaults
    for key in ("apply_grad_scaler_step_tweaks", "log_grad_norm", "grouped_8bit_step", "triton_8bit_step"):
        assert getattr(cfg, key) == field_default(schema_fields(_OptimizerFile)[key][0]), key


def test_every_validation_key_null_gives_the_defaults(tmp_path):
    p = write(tmp_path, {k: None for k in schema_fields(ValidationConfig)}, "validation.json")
    assert load_validation_config(p) == ValidationConfig()


# --- non-finite numbers ---------------------------------------------------------------------------------------

def float_keys(cls) -> list[str]:
    return [k for k, (_f, tp) in schema_fields(cls).items() if accepts_float(tp)]


def accepts_float(tp) -> bool:
    return check_value(0.5, tp)[0] or check_value([0.5], tp)[0]


@pytest.mark.parametrize("text", ["NaN", "inf", "-inf", "Infinity", "-Infinity", "nan"])
def test_non_finite_lr_on_the_command_line_is_a_one_line_error(capsys, text):
    rc, out = run_main(["--resume_ckpt", "m", "--lr", text], capsys)
    assert rc == 2 and "Traceback" not in out
    assert "command line: 'lr' must be a finite number, got " in out and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_key_of_train_json_must_be_finite(tmp_path, value):
    keys = float_keys(TrainConfig)
    assert {"lr", "flip_p", "ema_decay_rate", "compile_memory_budget", "ckpt_every_n_minutes"} <= set(keys)
    # json.dumps writes NaN / Infinity / -Infinity, the literals Python's json module reads
    p = write(tmp_path, {"resume_ckpt": "m", **{k: [value] if k == "resolution" else value for k in keys}})
    with pytest.raises(ConfigError) as e:
        load_config(["--config", p])
    for key in keys:
        assert f"{p}: '{key}' must be a finite number, got {json.dumps(value)}" in str(e.value), key


def test_non_finite_number_in_train_json_exits_2_naming_file_and_key(tmp_path, capsys):
    p = write(tmp_path, '{"resume_ckpt": "m", "lr": NaN, "flip_p": Infinity}')
    rc, out = run_main(["--config", p], capsys)
    assert rc == 2 and "Traceback" not in out
    assert f"{p}: 'lr' must be a finite number, got NaN" in out
    assert f"{p}: 'flip_p' must be a finite number, got Infinity" in out


@pytest.mark.parametrize("section", ["base", "text_encoder_overrides"])
def test_every_float_key_of_optimizer_json_must_be_finite(tmp_path, section):
    keys = float_keys(PartSettings)
    part = {k: [0.9, math.nan] if k == "betas" else math.nan for k in keys}
    p = write(tmp_path, {section: part, "text_encoder_lr_scale": -math.inf}, "optimizer.json")
    with pytest.raises(ConfigError) as e:
        load_optimizer_config(p)
    msg = str(e.value)
    for key in keys:
        what = "a number or Infinity" if key == "growth_rate" else "a finite number"
        assert f"{section}: '{key}' must be {what}, got NaN" in msg, key
    assert "'text_encoder_lr_scale' must be a finite number, got -Infinity" in msg


def test_growth_rate_infinity_means_unlimited_and_round_trips(tmp_path):
    p = write(tmp_path, {"base": {"optimizer": "prodigy", "growth_rate": math.inf}}, "optimizer.json")
    cfg = load_optimizer_config(p)
    assert cfg.unet.growth_rate == math.inf
    again = load_optimizer_config(write(tmp_path, optimizer_config_to_json(cfg), "again.json"))
    assert again.unet == cfg.unet


def test_non_finite_number_in_optimizer_json_exits_2_naming_file_and_key(tmp_path, capsys):
    opt = write(tmp_path, '{"base": {"lr": NaN}, "text_encoder_overrides": {"weight_decay": Infinity}}',
                "optimizer.json")
    rc, out = run_main(["--resume_ckpt", "m", "--optimizer_config", opt, "--logdir", str(tmp_path / "logs")],
                       capsys)
    assert rc == 2 and "Traceback" not in out
    assert f"{opt}: base: 'lr' must be a finite number, got NaN" in out
    assert f"{opt}: text_encoder_overrides: 'weight_decay' must be a finite number, got Infinity" in out


# --- encodings ------------------------------------------------------------------------------------------------

CONFIG_TEXT = '{"resume_ckpt": "m", "project_name": "caf\u00e9", "batch_size": 3}'


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "cp1252"])
def test_train_json_not_utf8_exits_2_naming_the_file(tmp_path, capsys, encoding):
    """utf-16 writes a byte-order mark: read. The others are not UTF-8 and cannot be told apart for certain."""
    p = write(tmp_path, CONFIG_TEXT.encode(encoding))
    rc, out = run_main(["--config", p, "--print-config"], capsys)
    assert "Traceback" not in out
    if encoding == "utf-16":
        assert rc == 0 and json.loads(out)["project_name"] == "caf\u00e9" and json.loads(out)["batch_size"] == 3
        return
    assert rc == 2 and out.startswith(f"error: {p}: not UTF-8 text (") and out.strip().endswith("save it as UTF-8")
    assert ("it looks like UTF-16" in out) == encoding.startswith("utf-16")
    if encoding == "cp1252":
        assert f"byte 0xe9 at line 1, column {CONFIG_TEXT.index(chr(0xe9)) + 1}" in out


@pytest.mark.parametrize("encoding", ["utf-16-le", "cp1252"])
def test_optimizer_json_not_utf8_exits_2_naming_the_file(tmp_path, capsys, encoding):
    opt = write(tmp_path, '{"doc": "caf\u00e9", "base": {"lr": 2e-6}}'.encode(encoding), "optimizer.json")
    rc, out = run_main(["--resume_ckpt", "m", "--optimizer_config", opt], capsys)
    assert rc == 2 and "Traceback" not in out
    assert f"error: {opt}: not UTF-8 text" in out and "save it as UTF-8" in out


@pytest.mark.parametrize("encoding,readable", [("utf-8", True), ("utf-8-sig", True), ("utf-16", True),
                                               ("utf-32", True), ("utf-16-le", False), ("utf-32-be", False),
                                               ("latin-1", False)])
def test_read_json_reads_utf8_and_marked_utf16_and_names_anything_else(tmp_path, encoding, readable):
    """read_json also reads validation_config and sample_prompts .json files."""
    p = write(tmp_path, '{"caption": "\u00e9t\u00e9"}'.encode(encoding), "any.json")
    if readable:
        assert read_json(p, "any file") == {"caption": "\u00e9t\u00e9"}
    else:
        with pytest.raises(ConfigError, match=rf"^{p}: not UTF-8 text \(.*\): save it as UTF-8$"):
            read_json(p, "any file")


def test_utf16_with_a_broken_byte_order_mark_text_is_named(tmp_path):
    p = write(tmp_path, CONFIG_TEXT.encode("utf-16")[:-1])
    with pytest.raises(ConfigError, match="not valid UTF-16 text despite its byte-order mark: save it as UTF-8"):
        read_json(p, "config file")
