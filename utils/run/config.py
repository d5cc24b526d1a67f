"""The one typed training config: dataclass defaults < train.json < `--key value` on the command line.

Key names are EveryDream2's, so its users' train.json files load. Keys of EveryDream2 that this trainer does
not support are listed in one warning; any other unknown key is an error with a suggestion.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from typing import Literal

from data.buckets import resolution_problems
from utils.core.config_schema import (ConfigError, accepts_null, check_fields, describe_type, did_you_mean, doc,
                                 field_default, null_meaning, read_json, schema_fields, to_jsonable)

CONFIG_VERSION = 1


@dataclass
class TrainConfig:
    # --- model and data ---
    resume_ckpt: str = doc("", "Model to start from (SD1.x, SD2.x or SDXL): a local diffusers folder, a single "
                               ".safetensors/.ckpt file, a hub id (needs network), 'findlast' (newest checkpoint "
                               "under logdir), or a model built locally: 'builtin:tiny-sd-quickstart' (the "
                               "quickstart's; its VAE reconstructs images), 'builtin:tiny-sd' / 'builtin:tiny-sdxl' "
                               "(the tests'), 'builtin:sd15' / 'builtin:sd21' / 'builtin:sdxl' (random weights, "
                               "for benchmarks).")
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = doc(
        "auto", "What the model predicts. auto: from the model's scheduler config (or a single file's .yaml "
                "sidecar); set v_prediction for an SD2 768-v single file without a sidecar.")
    data_root: str = doc("input", "Folder of training images, searched recursively.")
    resolution: int | list[int] = doc(512, "Base training resolution; aspect buckets keep about resolution² "
                                           "pixels. A list, e.g. [448, 512, 576], trains each batch at one of "
                                           "them, chosen from the seed (multi-resolution).", minimum=64, maximum=2048)
    flip_p: float = doc(0.0, "Probability of a horizontal flip per image.", minimum=0.0, maximum=1.0)
    cond_dropout: float = doc(0.04, "Probability that an image's caption is replaced by the empty caption.",
                              minimum=0.0, maximum=1.0)
    crop_jitter: float = doc(0.02, "Random crop per side at load time, as a fraction of that side (never forces "
                                   "upscaling).", minimum=0.0, maximum=0.25)
    shuffle_tags: bool = doc(False, "Shuffle the comma-separated tags after the main prompt, anew each epoch.")
    keep_tags: int = doc(0, "With shuffle_tags: the first N tags stay in place.", minimum=0)
    write_schedule: bool = doc(False, "Write ep{N}_batch_schedule.txt (batch order, buckets, files) each epoch.")
    # --- batching and length ---
    batch_size: int = doc(2, "Images per micro-batch; one batch holds one aspect bucket.", minimum=1)
    grad_accum: int = doc(1, "Micro-batches per optimizer step; gradients are averaged.", minimum=1)
    max_epochs: int = doc(300, "Epochs to train; an epoch shows each image once (times its multiplier).",
                          minimum=1)
    max_steps: int | None = doc(None, "Stop after this many optimizer steps.", minimum=1,
                                null="run all max_epochs")
    seed: int = doc(555, "Seed for data order, augmentation, noise and sampling; -1 picks one at random "
                         "(the chosen value is saved in the run's train.json).", minimum=-1)
    # --- optimizer ---
    optimizer_config: str | None = doc("optimizer.json", "Path to optimizer.json.",
                                       null="no file: optimizer.json's defaults (AdamW8bit, lr 1e-6, constant)")
    lr: float | None = doc(None, "If set, overrides the learning rate of optimizer.json for UNet and text "
                                 "encoder alike.", minimum=0.0, null="optimizer.json's lr")
    scale_lr: bool = doc(False, "Multiply the learning rates by (batch_size x GPUs x grad_accum)^0.55.")
    clip_grad_norm: float | None = doc(None, "Clip the gradient norm of UNet and text encoder (each) to this.",
                                       minimum=0.0, null="no clipping")
    disable_textenc_training: bool = doc(False, "Freeze the text encoder.")
    disable_unet_training: bool = doc(False, "Freeze the UNet.")
    # --- noise, loss and text conditioning (doc/TECHNIQUES.md) ---
    zero_frequency_noise_ratio: float = doc(0.02, "Offset noise: adds this times a per-channel constant to the "
                                                  "noise (brighter brights, darker darks).", minimum=0.0)
    pyramid_noise_discount: float | None = doc(None, "Multi-resolution (pyramid) noise discount per level, "
                                                     "e.g. 0.03.", minimum=0.0, maximum=1.0, null="off")
    enable_zero_terminal_snr: bool = doc(False, "Rescale betas to zero terminal SNR (arXiv 2305.08891); samples "
                                                "then use trailing timesteps and guidance rescale 0.7.")
    timestep_start: int = doc(0, "Lowest training timestep (inclusive).", minimum=0, maximum=999)
    timestep_end: int = doc(1000, "Highest training timestep (exclusive).", minimum=1, maximum=1000)
    loss_type: Literal["mse", "mae", "huber", "smooth_l1", "mse_huber", "huber_mse"] = doc(
        "mse", "Loss between prediction and target; see doc/TECHNIQUES.md for the timestep-blended ones.")
    min_snr_gamma: float | None = doc(None, "Min-SNR loss weighting gamma (arXiv 2303.09556), e.g. 5.0.",
                                      minimum=1e-6, null="off")
    huber_delta: float = doc(1.0, "Threshold of the huber / smooth_l1 losses (EveryDream2 fixed it at 1).",
                             minimum=1e-6)
    debiased_estimation: bool = doc(False, "Weight the loss by 1/sqrt(SNR) (arXiv 2310.08442).")
    clip_skip: int = doc(0, "Text-encoder layer to condition on: 0/1 last, 2 penultimate (through the final "
                            "layer norm), up to 4.", minimum=0, maximum=4)
    embedding_perturbation: float = doc(0.0, "Gaussian noise of std gamma/sqrt(d) on text embeddings "
                                             "(arXiv 2405.20494); 0: off.", minimum=0.0)
    unmasked_weight: float = doc(0.1, "Masked training: loss weight where the -masklabel.png is black.",
                                 minimum=0.0, maximum=1.0)
    unmasked_probability: float = doc(0.0, "Masked training: fraction of steps that ignore the mask.",
                                      minimum=0.0, maximum=1.0)
    normalize_masked_area_loss: bool = doc(False, "Masked training: scale each image's loss so its mean weight "
                                                  "is 1.")
    # --- EMA (doc/TECHNIQUES.md) ---
    ema_decay_rate: float | None = doc(None, "Turns EMA on: ema = ema*d + weights*(1-d) at each EMA update; "
                                             "e.g. 0.999.", minimum=0.0, maximum=0.999999,
                                   null="no EMA, unless ema_strength_target is set")
    ema_strength_target: float | None = doc(None, "Turns EMA on with d = target^(interval / total steps); "
                                                  "overrides ema_decay_rate; the decay is printed.",
                                            minimum=1e-6, maximum=0.999999, null="ema_decay_rate decides")
    ema_update_interval: int = doc(500, "Optimizer steps between EMA updates.", minimum=1)
    ema_device: Literal["cpu", "cuda"] = doc("cpu", "Where the EMA copy lives: cpu saves GPU memory (the "
                                                    "copy overlaps training), cuda is faster.")
    ema_resume_model: str | None = doc(None, "EMA weights to start from: a diffusers folder (e.g. a "
                                             "checkpoint's _ema folder) or 'findlast'. A resumed checkpoint "
                                             "restores its EMA by itself.",
                                      null="the EMA starts from the weights being trained")
    ema_sample_ema_model: bool = doc(False, "Sample with the EMA weights (the default when EMA is on and "
                                            "neither sample key is set).")
    ema_sample_nonema_model: bool = doc(False, "Sample with the trained (non-EMA) weights.")
    # --- precision and memory ---
    mixed_precision: Literal["auto", "fp16", "bf16", "no"] = doc(
        "auto", "Autocast dtype. auto: bf16 on GPUs that support it, else fp16 with a GradScaler; fp32 on CPU.")
    disable_amp: bool = doc(False, "EveryDream2's switch: train in full fp32 (same as mixed_precision 'no').")
    weight_dtype: Literal["fp32", "bf16"] = doc(
        "fp32", "dtype of the trained weights. bf16 halves their memory (SDXL's UNet and both text encoders in "
                "24 GB): the optimizer computes each update in fp32 and rounds it to bf16 stochastically, so small "
                "updates are not lost; it trains under bf16 autocast and needs adamw8bit or lion8bit with "
                "grouped_8bit_step (doc/OPTIMIZER.md).")
    gradient_checkpointing: bool = doc(False, "Recompute activations in the backward pass: less memory, "
                                              "more compute (doc/PERFORMANCE.md has measurements).")
    fused_backward_pass: bool = doc(False, "Step the optimizer inside the backward pass and free each gradient "
                                           "at once (adamw8bit/lion8bit with grouped_8bit_step; one GPU, "
                                           "grad_accum 1, no clip_grad_norm, bf16 or fp32): the gradients of the "
                                           "whole model never exist together (less memory; doc/PERFORMANCE.md).")
    overlap_optimizer_step: bool = doc(False, "With fused_backward_pass on a CUDA GPU: the optimizer steps on a "
                                              "second CUDA stream, alongside the rest of the backward pass "
                                              "(same arithmetic, same result).")
    attn_type: Literal["sdp", "xformers", "slice"] = doc("sdp", "Attention kernel: torch SDPA, xformers, or "
                                                                "sliced attention (least memory).")
    sdp_backend: Literal["auto", "flash", "efficient", "cudnn"] = doc(
        "auto", "With attn_type sdp on a CUDA GPU: the scaled-dot-product attention kernel tried first; the others "
                "stay as fallbacks for shapes it refuses. auto: torch's own choice (doc/PERFORMANCE.md compares "
                "them).")
    skip_nonfinite_steps: bool = doc(True, "In bf16/fp32, check each step's loss and skip steps whose loss is NaN/inf "
                                           "(one host sync a step; fp16's GradScaler always does this). False: "
                                           "no sync outside logging steps.")
    num_workers: int | None = doc(None, "DataLoader worker processes.", minimum=0,
                                  null="min(8, CPU cores - 1)")
    # --- speed (doc/PERFORMANCE.md) ---
    cache_latents: bool = doc(False, "Encode each image once with the VAE and keep the result on disk (centre crop: "
                                     "crop_jitter and the random crop offset are off; flips are cached too). Steps "
                                     "then skip the VAE; the cache is rebuilt when an image, its bucket or the VAE "
                                     "changes.")
    latent_cache_dir: str | None = doc(None, "Where cached latents go.",
                                       null="<logdir>/.latent_cache, shared by runs")
    cache_te_outputs: bool = doc(True, "With the text encoder frozen (disable_textenc_training): compute each "
                                       "distinct caption's conditioning once and reuse it (exact; bounded to 1 GiB).")
    torch_compile: bool = doc(False, "torch.compile the trained UNet and text encoder. Each batch shape (bucket "
                                     "size and batch size) compiles once, at its first step (minutes on a cold "
                                     "cache, seconds once inductor's disk cache has it; logged per shape); later "
                                     "steps are faster. A compile that fails is logged and that shape runs "
                                     "uncompiled. Inductor's per-call size asserts are off (the guards check inputs).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = doc(
        "default", "With torch_compile: torch.compile's mode. reduce-overhead replays each compiled step as CUDA "
                   "graphs, so the GPU stops waiting for the host's kernel launches (doc/PERFORMANCE.md). The "
                   "graphs keep their memory while samples are made, so a sampling that no longer fits is skipped "
                   "with a warning. Needs grad_accum 1.")
    compile_max_shapes: int = doc(4, "With torch_compile: compile at most this many batch shapes, those with the "
                                     "most batches; the others (rare buckets, short last batches) run uncompiled. "
                                     "One line at the start says which run uncompiled.", minimum=1)
    compile_blocks: bool = doc(False, "With torch_compile: compile each UNet down, mid and up block on its own "
                                      "instead of the whole UNet (smaller graphs; with fused_backward_pass the "
                                      "gradients are freed block by block). Sampling runs the blocks uncompiled.")
    compile_memory_budget: float = doc(1.0, "With torch_compile: the share of the activations the compiled "
                                            "backward may keep. Below 1, torch's partitioner recomputes the "
                                            "cheapest of the others in the backward pass (automatic selective "
                                            "checkpointing: less memory, some extra compute). 1: keep all. "
                                            "Values just below 1 all give one plan (torch's min-cut without its "
                                            "recompute limits); the budget trades finer only below that plan's "
                                            "share (doc/PERFORMANCE.md).",
                                       minimum=0.0, maximum=1.0)
    compile_layout_optimization: bool = doc(
        False, "With torch_compile: make inductor lay the compiled UNet's convolutions out channels-last (NHWC) "
               "inside its graphs while the weights keep their usual layout. Inductor's own rule leaves SD's UNet "
               "in NCHW, and cuDNN then converts at every convolution. Prefer it to channels_last when compiling.")
    channels_last: bool = doc(False, "Keep the UNet's weights and activations in channels-last memory format (for "
                                     "eager runs; compiled runs do better with compile_layout_optimization).")
    # --- logging, samples, saving ---
    project_name: str = doc("myproj", "Names the run folder logs/<project_name>-<timestamp> and checkpoints.")
    logdir: str = doc("logs", "Root folder for runs.")
    log_step: int = doc(25, "Log scalars to TensorBoard every N optimizer steps.", minimum=1)
    sample_prompts: str | None = doc("sample_prompts.txt", "Sample prompts: a .txt (one a line) or EveryDream2-format "
                                                           ".json (doc/LOGGING.md); re-read at every sampling; "
                                                           "missing/empty: random training captions.",
                                        null="random training captions")
    validation_config: str | None = doc(None, "Path to a validation JSON (EveryDream2's validation_config keys; "
                                              "doc/LOGGING.md).", null="no validation loss")
    sample_steps: int = doc(250, "Generate samples every N optimizer steps (and at the end).", minimum=1)
    sample_num_steps: int = doc(30, "Denoising steps per sample image.", minimum=1)
    save_every_n_epochs: int | None = doc(None, "Save a checkpoint at the end of every Nth epoch.", minimum=1,
                                          null="no saves by epoch")
    ckpt_every_n_minutes: float | None = doc(None, "Save a checkpoint every N minutes. If neither interval is "
                                                   "set, 20 minutes.", minimum=0.0,
                                            null="no saves by time, or every 20 minutes if save_every_n_epochs "
                                                 "is null too")
    save_ckpt_dir: str | None = doc(None, "Where single-file .safetensors go.", null="the run's ckpts folder")
    save_full_precision: bool = doc(False, "Write the single-file .safetensors in fp32 instead of fp16.")
    no_save_ckpt: bool = doc(False, "Write only the diffusers checkpoint folders, no single-file .safetensors.")
    save_optimizer: bool = doc(True, "Keep optimizer state in checkpoints so a resume continues exactly "
                                     "(false saves disk; the optimizer then restarts).")
    keep_last_n: int | None = doc(None, "Keep only the newest N checkpoints of the run.", minimum=1,
                                  null="keep all")
    save_ckpts_from_n_epochs: int = doc(0, "Skip the save_every_n_epochs saves before this epoch (time-based "
                                           "saves still happen).", minimum=0)
    load_settings_every_epoch: bool = doc(False, "Re-read the config file at each epoch start for the keys that may "
                                                 "change mid-run: save_every_n_epochs, save_ckpts_from_n_epochs, "
                                                 "save_full_precision, save_optimizer, ckpt_every_n_minutes, "
                                                 "zero_frequency_noise_ratio, min_snr_gamma, clip_skip, sample_steps, "
                                                 "log_step.")
    no_prepend_last: bool = doc(False, "Do not prefix the final checkpoint's name with 'last-'.")
    config_version: int = doc(CONFIG_VERSION, "Version of this file's format; older versions are migrated.",
                              minimum=1, maximum=CONFIG_VERSION)


# EveryDream2 train.json keys this trainer does not (yet) support: accepted with one warning, not an error.
EVERYDREAM2_KEYS = {
    "amp", "batch_size", "ckpt_every_n_minutes", "clip_grad_norm", "clip_skip", "cond_dropout", "data_root",
    "disable_amp", "disable_textenc_training", "disable_unet_training", "embedding_perturbation",
    "ema_decay_rate", "ema_device", "ema_resume_model", "ema_sample_ema_model", "ema_sample_nonema_model",
    "ema_strength_target", "ema_update_interval", "enable_zero_terminal_snr", "flip_p", "gpuid",
    "gradient_checkpointing", "grad_accum", "keep_tags", "load_settings_every_epoch", "log_step", "logdir",
    "loss_type", "lr", "lr_decay_steps", "lr_scheduler", "lr_warmup_steps", "max_epochs", "min_snr_gamma",
    "no_prepend_last", "no_save_ckpt", "optimizer_config", "plugins", "project_name", "pyramid_noise_discount",
    "rated_dataset", "rated_dataset_target_dropout_percent", "resolution", "resume_ckpt", "run_name",
    "sample_prompts", "sample_steps", "save_ckpt_dir", "save_ckpts_from_n_epochs", "save_every_n_epochs",
    "save_full_precision", "save_optimizer", "scale_lr", "seed", "shuffle_tags", "timestep_end",
    "timestep_start", "train_sampler", "validation_config", "wandb", "write_schedule", "zero_frequency_noise_ratio",
    "attn_type", "lowvram", "disable_xformers", "useadam8bit", "ed1_mode", "notebook", "save_every_n_epoch",
}

CLI_ONLY_FLAGS = {
    "--config": "Path to train.json (keys there are overridden by --key value arguments).",
    "--check": "Validate the config, scan the data and decode every image (writes dataset.jsonl), then exit "
               "without loading a model.",
    "--print-config": "Print the resolved config as JSON and exit.",
    "--help": "Show this help.",
}


def _from_everydream2(raw: dict, source: str, warn) -> dict:
    """Version 0 (an EveryDream2 train.json, which has no config_version) to 1."""
    if raw.get("amp") is not None:
        warn(f"{source}: 'amp' is deprecated in EveryDream2 and here; mixed precision is on unless "
             f"'disable_amp' is true or 'mixed_precision' is 'no'")
    raw.pop("amp", None)
    return raw


# config_version N -> the function that brings a file of version N to N + 1 (OneTrainer's scheme). A file without
# config_version is EveryDream2's (version 0); a new format version adds one entry here and bumps CONFIG_VERSION.
MIGRATIONS = {0: _from_everydream2}


def migrate(raw: dict, source: str, warn) -> dict:
    """Bring an older or EveryDream2 config to the current version, one version at a time; every rename is
    reported. The result carries config_version CONFIG_VERSION (a version above it is left for the schema check,
    which names the key and the range)."""
    raw = dict(raw)
    version = raw.get("config_version")
    if version is None:
        version = 0
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version <= CONFIG_VERSION:
        return raw
    for step in range(version, CONFIG_VERSION):
        raw = MIGRATIONS[step](raw, source, warn)
    if "config_version" in raw:
        raw["config_version"] = CONFIG_VERSION
    return raw


def _parse_cli(argv: list[str]) -> tuple[dict, dict]:
    """Split argv into (flags like --config/--check, {key: value}); values parse as JSON, else as strings."""
    fields = schema_fields(TrainConfig)
    flags, values = {}, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': options are written --key value")
        name, eq, inline = arg[2:].partition("=")
        if f"--{name}" in ("--check", "--print-config", "--help"):
            flags[name] = True
            i += 1
            continue
        if name == "config":
            if not eq and i + 1 >= len(argv):
                raise ConfigError("--config needs a path")
            flags["config"] = inline if eq else argv[i + 1]
            i += 1 if eq else 2
            continue
        if eq:
            text = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            text = argv[i + 1]
            i += 2
        elif name in fields and fields[name][1] is bool:
            text = "true"  # a bare boolean flag, as in EveryDream2's --gradient_checkpointing
            i += 1
        else:
            raise ConfigError(f"--{name} needs a value")
        if name not in fields:
            raise ConfigError(f"unknown option --{name}{did_you_mean(name, fields)}")
        try:
            values[name] = json.loads(text)
        except json.JSONDecodeError:
            # "--lr inf" means the float (JSON spells it Infinity), so the finite-number check names the problem
            is_special = text.strip().lower().lstrip("+-") in ("inf", "infinity", "nan")
            values[name] = float(text) if is_special else text
        # "--save_ckpt_dir 123" or "--project_name 2024" mean strings, not numbers
        if fields[name][1] in (str, str | None) and not isinstance(values[name], str) and values[name] is not None:
            values[name] = text
    return flags, values


# The keys load_settings_every_epoch re-reads (EveryDream2's list, plus the save/sample/log intervals).
LIVE_KEYS = ("save_every_n_epochs", "save_ckpts_from_n_epochs", "save_full_precision", "save_optimizer",
             "ckpt_every_n_minutes", "zero_frequency_noise_ratio", "min_snr_gamma", "clip_skip", "sample_steps",
             "log_step")


@dataclass(frozen=True)
class LiveSettings:
    """The LIVE_KEYS' current values. The resolved TrainConfig stays as it was loaded; a mid-run change makes a
    new LiveSettings, and the loop reads these keys from it."""
    save_every_n_epochs: int | None
    save_ckpts_from_n_epochs: int
    save_full_precision: bool
    save_optimizer: bool
    ckpt_every_n_minutes: float | None
    zero_frequency_noise_ratio: float
    min_snr_gamma: float | None
    clip_skip: int
    sample_steps: int
    log_step: int


assert tuple(f.name for f in dataclasses.fields(LiveSettings)) == LIVE_KEYS


def live_settings(cfg: TrainConfig) -> LiveSettings:
    return LiveSettings(**{k: getattr(cfg, k) for k in LIVE_KEYS})


def with_live_settings(cfg: TrainConfig, live: LiveSettings) -> TrainConfig:
    """The config as it stands now (what a checkpoint saves): cfg with the live keys' current values."""
    return dataclasses.replace(cfg, **dataclasses.asdict(live))


def reload_live_settings(path: str, live: LiveSettings) -> tuple[LiveSettings, dict]:
    """Re-read path for the LIVE_KEYS it sets (strictly checked). Returns (new settings, {key: (old, new)})."""
    raw = migrate(read_json(path, "config file"), path, lambda _msg: None)
    values, problems = check_fields(TrainConfig, {k: v for k, v in raw.items() if k in LIVE_KEYS}, path)
    if problems:
        raise ConfigError("; ".join(problems))
    changes = {k: (getattr(live, k), v) for k, v in values.items() if getattr(live, k) != v}
    return dataclasses.replace(live, **{k: new for k, (_old, new) in changes.items()}), changes


def validate(cfg: TrainConfig) -> list[str]:
    """Cross-field checks, all gathered so a user fixes the config in one pass."""
    problems = []
    if not cfg.resume_ckpt:
        problems.append("resume_ckpt is required: a diffusers folder, a hub id, 'findlast' or 'builtin:tiny-sd'")
    if cfg.disable_textenc_training and cfg.disable_unet_training:
        problems.append("disable_textenc_training and disable_unet_training are both true: nothing to train")
    problems += resolution_problems(cfg.resolution)
    if cfg.timestep_start >= cfg.timestep_end:
        problems.append(f"timestep_start ({cfg.timestep_start}) must be below timestep_end ({cfg.timestep_end})")
    for key in ("compile_blocks", "compile_layout_optimization"):
        if getattr(cfg, key) and not cfg.torch_compile:
            problems.append(f"{key} true needs torch_compile true")
    if cfg.compile_mode != "default" and not cfg.torch_compile:
        problems.append(f"compile_mode '{cfg.compile_mode}' needs torch_compile true")
    if cfg.compile_mode == "reduce-overhead" and cfg.grad_accum > 1:
        # the backward graph's outputs become the .grad tensors, and its next replay overwrites them in place
        problems.append(f"compile_mode 'reduce-overhead' (CUDA graphs) needs grad_accum 1, got {cfg.grad_accum}: "
                        f"each replay of the backward graph overwrites the gradients the last micro-batch left; "
                        f"use compile_mode 'default' to accumulate, or a larger batch_size")
    if cfg.overlap_optimizer_step and not cfg.fused_backward_pass:
        problems.append("overlap_optimizer_step true needs fused_backward_pass true (the step it overlaps with the "
                        "backward pass is the one fused_backward_pass moves into it)")
    if cfg.compile_memory_budget < 1.0 and not cfg.torch_compile:
        problems.append(f"compile_memory_budget {cfg.compile_memory_budget} needs torch_compile true (or set it "
                        f"to 1.0; without compiling, gradient_checkpointing true saves activation memory)")
    if cfg.weight_dtype == "bf16" and cfg.mixed_precision in ("fp16", "no"):
        problems.append(f"weight_dtype 'bf16' trains under bf16 autocast; mixed_precision is "
                        f"'{cfg.mixed_precision}': set it to 'bf16' or 'auto' (or weight_dtype 'fp32')")
    if cfg.sdp_backend != "auto" and cfg.attn_type != "sdp":
        problems.append(f"sdp_backend '{cfg.sdp_backend}' applies to attn_type 'sdp' only (attn_type is "
                        f"'{cfg.attn_type}'); set sdp_backend to 'auto' or attn_type to 'sdp'")
    return problems


def load_config(argv: list[str], warn=None) -> tuple[TrainConfig, dict]:
    """Parse argv into (config, flags). Raises ConfigError listing every problem found."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    flags, cli = _parse_cli(argv)
    raw: dict = {}
    if "config" in flags:
        raw = migrate(read_json(flags["config"], "config file"), flags["config"], warn)
    cli = migrate(cli, "command line", warn)
    fields = schema_fields(TrainConfig)
    unsupported = sorted(k for k in raw if k not in fields and k in EVERYDREAM2_KEYS)
    if unsupported:
        warn(f"{flags['config']}: EveryDream2 keys not supported by this trainer, ignored: {', '.join(unsupported)}")
    file_vals, problems = check_fields(TrainConfig, raw, flags.get("config", "config"), ignore=set(unsupported))
    cli_vals, cli_problems = check_fields(TrainConfig, cli, "command line")
    problems += cli_problems
    if problems:
        raise ConfigError("\n".join(problems))
    merged = {**file_vals, **cli_vals}
    if merged.get("seed") == -1:
        merged["seed"] = random.randrange(0, 2**31 - 1)
    if merged.get("disable_amp"):
        merged["mixed_precision"] = "no"
    cfg = TrainConfig(**merged)
    if not flags.get("help") and (problems := validate(cfg)):
        raise ConfigError("\n".join(problems))
    return cfg, flags


def config_to_dict(cfg) -> dict:
    return to_jsonable(cfg)


NULL_RULE = ("A null (JSON null, or --key null) takes the key's default, except where the key's type includes "
             "null: there null has the meaning given for that key.")


def help_text() -> str:
    lines = ["usage: python train.py --config train.json [--key value ...]", "", "options:"]
    for flag, text in CLI_ONLY_FLAGS.items():
        lines.append(f"  {flag:<26} {text}")
    lines += ["", "config keys (train.json or --key value):", NULL_RULE]
    for name, (f, tp) in schema_fields(TrainConfig).items():
        null = f"; null: {null_meaning(f, tp)}" if accepts_null(tp) else ""
        lines.append(f"  --{name} {describe_type(tp)}  (default: {json.dumps(field_default(f))}{null})")
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def config_markdown() -> str:
    """doc/CONFIG.md, generated from the schema (tests fail when the file is stale)."""
    lines = ["# Configuration reference", "",
             "Generated from `utils/run/config.py` by `python -m utils.run.config > doc/CONFIG.md`; do not edit by hand.",
             "", "Every key can be set in `train.json` or on the command line as `--key value` (the command line "
             "wins). Values on the command line are read as JSON where they parse, else as text (`inf` and `nan` "
             "as numbers).", "",
             NULL_RULE + " The null column says what null does for each key; EveryDream2's shipped train.json "
             "writes null for keys it leaves unset, such as `ema_device`. Numbers must be finite: `NaN` and "
             "`Infinity` are errors. The file must be UTF-8 text (UTF-16 or UTF-32 with a byte-order mark, as "
             "PowerShell writes them, are read too).", "",
             "| key | type | default | null | meaning |", "|---|---|---|---|---|"]
    for name, (f, tp) in schema_fields(TrainConfig).items():
        lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
        bounds = "" if lo is None and hi is None else f" Range: [{'' if lo is None else lo}, {'' if hi is None else hi}]."
        type_text = describe_type(tp).replace("|", "\\|")  # a bare | would split the table cell
        lines.append(f"| `{name}` | `{type_text}` | `{json.dumps(field_default(f))}` | "
                     f"{null_meaning(f, tp)} | {f.metadata['help']}{bounds} |")
    lines += ["", "Command-line only:", ""]
    lines += [f"- `{flag}`: {text}" for flag, text in CLI_ONLY_FLAGS.items()]
    lines += ["", "EveryDream2 keys that are accepted but not supported (listed in one warning at start): "
              + ", ".join(f"`{k}`" for k in sorted(EVERYDREAM2_KEYS - set(schema_fields(TrainConfig)))) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(config_markdown())
