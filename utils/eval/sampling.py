"""Sample images during training: the sample-prompt file, diffusers schedulers by name, batched generation with
per-image seeds, and the labelled CFG grid. Nothing here touches the training's randomness.

    source = SampleConfigSource(cfg.sample_prompts, default_seed=cfg.seed, default_size=(512, 512),
                                default_steps=cfg.sample_num_steps)           # a broken file fails here, at start
    scfg = source.reload(warn)                         # at each sampling: edits apply, a broken file keeps the last
    requests = plan_samples(scfg, captions, step=global_step)
    pipe = build_pipeline(unet, te, vae, tokenizer, scheduler_config, scheduler=scfg.scheduler)
    for request, images in generate(pipe, requests, cfg_scales=scfg.cfgs, steps=scfg.num_inference_steps,
                                    device=device, autocast_dtype=None, batch_size=scfg.batch_size):
        grid = make_grid(images, scfg.cfgs)

The prompt file is `.txt` (one prompt a line) or `.json` in EveryDream2's sample_prompts.json format (doc/LOGGING.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from utils.core.config_schema import ConfigError, check_fields, did_you_mean, doc, read_json

DEFAULT_CFGS = [7.0, 4.0, 1.01]   # EveryDream2's; 1.01 (not 1) so diffusers still runs the CFG branch
MAX_RANDOM_CAPTIONS = 4           # an empty prompt file samples this many training captions
# Keys of a JSON file that only document it (EveryDream2's shipped files carry a "documentation" block).
DOC_KEYS = ("documentation", "doc")


# ---------------------------------------------------------------------------------------------- schedulers
@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str                       # a diffusers scheduler class
    kwargs: dict = field(default_factory=dict)


# EveryDream2's names (doc/LOGGING.md). Each base name whose class has use_karras_sigmas also takes a `_k` suffix.
SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler"),
    "ddpm": SchedulerSpec("DDPMScheduler"),
    # SD's own PNDM config skips the Runge-Kutta warm-up; without it a few steps are spent on warm-up alone.
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": SchedulerSpec("LMSDiscreteScheduler"),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "heun": SchedulerSpec("HeunDiscreteScheduler"),
    "kdpm2": SchedulerSpec("KDPM2DiscreteScheduler"),
    "kdpm2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler"),
    "dpm++_2m": SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # lower_order_final: what diffusers switches to anyway (with a warning) for a final sigma of zero.
    "dpm++_2s": SchedulerSpec("DPMSolverSinglestepScheduler",
                              {"algorithm_type": "dpmsolver++", "solver_order": 2, "lower_order_final": True}),
    # The stochastic DPM++ sampler without torchsde (DPMSolverSDEScheduler needs it): the multistep solver's
    # SDE variant, i.e. "DPM++ 2M SDE". EveryDream2's dpm++_2m_sde is the same sampler.
    "dpm++_sde": SchedulerSpec("DPMSolverMultistepScheduler",
                               {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
}
SCHEDULER_ALIASES = {"dpm++": "dpm++_2m", "dpm++_2m_sde": "dpm++_sde", "euler_ancestral": "euler_a",
                     "k_euler": "euler", "k_euler_a": "euler_a", "k_lms": "lms", "k_heun": "heun"}
KARRAS_SUFFIX = "_k"


def _scheduler_class(class_name: str):
    import diffusers
    return getattr(diffusers, class_name)


def _has_init_arg(cls, name: str) -> bool:
    import inspect
    return name in inspect.signature(cls.__init__).parameters


def scheduler_names() -> list[str]:
    """Every canonical name: the base names, then their Karras variants (aliases are accepted too)."""
    karras = [n + KARRAS_SUFFIX for n, s in SCHEDULERS.items()
              if _has_init_arg(_scheduler_class(s.class_name), "use_karras_sigmas")]
    return list(SCHEDULERS) + karras


def parse_scheduler_name(name: str) -> tuple[str, bool]:
    """'DPM++ 2M Karras' -> ('dpm++_2m', True). Case, spaces and '-' vs '_' do not matter. ConfigError if unknown."""
    key = re.sub(r"[\s\-]+", "_", str(name).strip().lower())
    karras = False
    for suffix in ("_karras", KARRAS_SUFFIX):
        base = SCHEDULER_ALIASES.get(key[:-len(suffix)], key[:-len(suffix)]) if key.endswith(suffix) else None
        if base in SCHEDULERS:
            key, karras = base, True
            break
    key = SCHEDULER_ALIASES.get(key, key)
    if key not in SCHEDULERS:
        known = scheduler_names()
        raise ConfigError(f"unknown sample scheduler '{name}'{did_you_mean(key, known + list(SCHEDULER_ALIASES))}; "
                          f"choose one of: {', '.join(known)}")
    if karras and not _has_init_arg(_scheduler_class(SCHEDULERS[key].class_name), "use_karras_sigmas"):
        raise ConfigError(f"sample scheduler '{name}': {key} has no Karras-sigmas variant; use '{key}'")
    return key, karras


def _resolve_scheduler(name: str, zero_terminal_snr: bool) -> tuple[type, dict]:
    """(diffusers class, from_config overrides) for a name; ConfigError for an unknown name or a scheduler that
    cannot sample a zero-terminal-SNR model."""
    from utils.sd.noise import sampling_settings
    key, karras = parse_scheduler_name(name)
    spec = SCHEDULERS[key]
    cls = _scheduler_class(spec.class_name)
    overrides = dict(spec.kwargs)
    if karras:
        overrides["use_karras_sigmas"] = True
    if _has_init_arg(cls, "rescale_betas_zero_snr"):
        # Sample with the betas the model was trained with: the trainer's flag decides, not a key in the config.
        overrides["rescale_betas_zero_snr"] = bool(zero_terminal_snr)
    elif zero_terminal_snr:
        able = [n for n, s in SCHEDULERS.items()
                if _has_init_arg(_scheduler_class(s.class_name), "rescale_betas_zero_snr")]
        raise ConfigError(f"sample scheduler '{name}' cannot sample a zero-terminal-SNR model "
                          f"(enable_zero_terminal_snr); use one of: {', '.join(able)}")
    if zero_terminal_snr:
        overrides.update(sampling_settings(zero_terminal_snr=True).scheduler_overrides)
    return cls, overrides


def check_scheduler(name: str, *, zero_terminal_snr: bool = False) -> None:
    """Raise ConfigError now for a scheduler name that make_sampling_scheduler would refuse later."""
    _resolve_scheduler(name, zero_terminal_snr)


def make_sampling_scheduler(name: str, scheduler_config: dict, *, zero_terminal_snr: bool):
    """A diffusers scheduler for sampling, built from the model's own scheduler config (betas, prediction type,
    steps offset). With zero terminal SNR: rescaled betas and trailing timesteps (utils/sd/noise.py
    sampling_settings; the pipeline then needs guidance_rescale 0.7). ConfigError for an unknown name or a
    scheduler that cannot sample a zero-terminal-SNR model."""
    cls, overrides = _resolve_scheduler(name, zero_terminal_snr)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    return cls.from_config(config, **overrides)


# ---------------------------------------------------------------------------------------------- sample config
@dataclass
class SampleEntry:
    """One entry of samples[] in sample_prompts.json (EveryDream2's keys)."""
    prompt: str | None = doc(None, "The prompt; \"\" samples unconditionally.")
    negative_prompt: str = doc("", "Negative prompt (what classifier-free guidance steers away from).")
    seed: int | None = doc(None, "Seed of this image; -1: a new seed at every sampling; null: the file's seed.",
                           minimum=-1)
    size: list[int] | None = doc(None, "[width, height] in pixels, multiples of 8.", minimum=8, maximum=8192)
    aspect_ratio: float | str | None = doc(None, "Width/height, e.g. 1.5 or \"3:2\": the size is found among "
                                                 "multiples of 64 near resolution² pixels.")
    random_caption: bool = doc(False, "Use a random training caption (a new one at every sampling).")


@dataclass
class SampleFile:
    """The top level of sample_prompts.json (EveryDream2's keys)."""
    batch_size: int | None = doc(None, "Images generated together (null: the trainer's default).", minimum=1)
    seed: int | None = doc(None, "Default seed of every sample (null: the training seed; -1: random).", minimum=-1)
    cfgs: list[float] = doc(DEFAULT_CFGS, "Classifier-free guidance scales: one column of the grid each.",
                            minimum=0.0)
    scheduler: str = doc("ddim", "Sampler name, e.g. ddim, euler_a, dpm++_2m_k (doc/LOGGING.md).")
    num_inference_steps: int | None = doc(None, "Denoising steps (null: sample_num_steps of train.json).",
                                          minimum=1)
    resolution: int | None = doc(None, "Side of square samples and pixel budget of aspect_ratio (null: the "
                                       "training resolution).", minimum=64)
    size: list[int] | None = doc(None, "Default [width, height] of samples.", minimum=8, maximum=8192)
    generate_pretrain_samples: bool = doc(False, "Also sample before the first training step.")
    generate_samples_every_n_steps: int | None = doc(None, "Overrides sample_steps of train.json (read at each "
                                                           "sampling, so it can change during a run).", minimum=1)
    show_progress_bars: bool = doc(False, "Show diffusers' progress bar while sampling.")
    samples: list[dict | str] = doc([], "The samples: objects (SampleEntry keys) or plain prompt strings.")


@dataclass
class SampleSpec:
    """One resolved sample of the config: sizes and defaults applied, seed -1 kept for plan_samples to draw."""
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 555
    size: tuple[int, int] = (512, 512)
    random_caption: bool = False


@dataclass
class SampleConfig:
    source: str = ""                                  # the file it came from ("" when none)
    samples: list[SampleSpec] = field(default_factory=list)    # empty: random training captions
    seed: int = 555                                   # default seed of the file (may be -1)
    run_seed: int = 555                               # the training seed: derives the per-sampling random seeds
    size: tuple[int, int] = (512, 512)                # default size (random-caption samples use it)
    cfgs: list[float] = field(default_factory=lambda: list(DEFAULT_CFGS))
    scheduler: str = "ddim"
    num_inference_steps: int = 30
    batch_size: int = 1
    generate_pretrain_samples: bool = False
    every_n_steps: int | None = None                  # generate_samples_every_n_steps, None: train.json's
    show_progress_bars: bool = False
    note: str = ""                                    # something worth one log line (e.g. file not found)


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 555
    size: tuple[int, int] = (512, 512)
    random_caption: bool = False                      # the prompt is a training caption picked for this sampling


def parse_aspect_ratio(value: float | str, where: str) -> float:
    """1.5, "1.5", "3:2" or "3/2" -> 1.5 (width / height)."""
    try:
        if isinstance(value, str):
            parts = re.split(r"[:/xX]", value.strip())
            ratio = float(parts[0]) / float(parts[1]) if len(parts) == 2 else float(value)
        else:
            ratio = float(value)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{where}: aspect_ratio must be a number like 1.5 or a ratio like \"3:2\", "
                          f"got {json.dumps(value)}") from None
    if not 1 / 8 <= ratio <= 8:
        raise ConfigError(f"{where}: aspect_ratio {json.dumps(value)} is outside 1:8 .. 8:1")
    return ratio


def size_for_aspect(aspect_ratio: float, resolution: int, *, step: int = 64) -> tuple[int, int]:
    """(width, height), multiples of `step`, with about resolution² pixels and about the aspect ratio, at any
    resolution (EveryDream2 searched only 256-960 with a fixed ±8192-pixel band, so 1024 and up found nothing:
    D22). Every width that is a multiple of `step` is tried with the two heights around resolution²/width, within
    0.75x-1.25x the pixels; the cost is |log aspect error| + |log pixel-count error|, so a slightly wrong shape
    and a slightly wrong size count alike."""
    budget = resolution * resolution
    candidates = {(resolution // step * step or step,) * 2}
    for w in range(step, budget // step + 1, step):
        for h in (max(step, budget // w // step * step), max(step, -(-budget // w // step) * step)):
            if 0.75 * budget <= w * h <= 1.25 * budget:
                candidates.add((w, h))

    def cost(size):
        w, h = size
        area_error = abs(math.log(w * h / budget))
        # Ties go to the nearer pixel count, then to the less extreme shape: the same rule for tall and wide.
        return round(abs(math.log(w / h / aspect_ratio)) + area_error, 9), round(area_error, 9), abs(math.log(w / h))
    return min(candidates, key=cost)


def _check_size(value: list[int], where: str) -> tuple[int, int]:
    if len(value) != 2 or any(v % 8 for v in value):
        raise ConfigError(f"{where}: size must be [width, height], multiples of 8, got {json.dumps(value)}")
    return int(value[0]), int(value[1])


def read_prompt_lines(path: str | Path | None) -> list[str]:
    """Prompts from a .txt file, one a line (blank lines skipped); a missing file gives none."""
    if not path or not Path(path).is_file():
        return []
    text = Path(path).read_text(encoding="utf-8-sig", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_sample_config(path: str | Path | None, *, default_seed: int, default_size: tuple[int, int],
                       default_steps: int, default_batch_size: int = 1,
                       zero_terminal_snr: bool = False) -> SampleConfig:
    """Read sample_prompts (.txt or .json). No path, a missing file or one without prompts: no samples listed, so
    plan_samples picks random training captions. ConfigError (naming the file) for anything wrong in it."""
    defaults = SampleConfig(source=str(path or ""), seed=default_seed, run_seed=default_seed,
                            size=tuple(default_size), num_inference_steps=default_steps,
                            batch_size=default_batch_size)
    if not path:
        return defaults
    p = Path(path)
    if p.suffix.lower() not in (".txt", ".json"):
        raise ConfigError(f"sample_prompts: {p} must be a .txt file (one prompt a line) or a .json file "
                          f"(doc/LOGGING.md)")
    if not p.is_file():
        return dataclasses.replace(defaults, note=f"sample_prompts {p} not found: sampling random training captions")
    if p.suffix.lower() == ".txt":
        specs = [SampleSpec(prompt=line, seed=default_seed, size=tuple(default_size)) for line in read_prompt_lines(p)]
        return dataclasses.replace(defaults, samples=specs)
    return _load_json(p, defaults, zero_terminal_snr)


def _load_json(p: Path, defaults: SampleConfig, zero_terminal_snr: bool) -> SampleConfig:
    raw = read_json(p, "sample_prompts file")
    top, problems = check_fields(SampleFile, raw, str(p), ignore=DOC_KEYS)
    if problems:
        raise ConfigError("\n".join(problems))
    f = SampleFile(**top)
    if not f.cfgs:
        raise ConfigError(f"{p}: 'cfgs' is empty; give at least one guidance scale, e.g. [7, 4, 1.01]")
    try:
        check_scheduler(f.scheduler, zero_terminal_snr=zero_terminal_snr)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    if f.size is not None and f.resolution is not None:
        raise ConfigError(f"{p}: give 'resolution' or 'size', not both")
    resolution = f.resolution or max(defaults.size)
    size = _check_size(f.size, str(p)) if f.size else (f.resolution, f.resolution) if f.resolution else defaults.size
    seed = defaults.seed if f.seed is None else f.seed
    specs, problems = [], []
    for i, entry in enumerate(f.samples):
        where = f"{p}: samples[{i}]"
        if isinstance(entry, str):
            entry = {"prompt": entry}
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object or a prompt string, got {json.dumps(entry)}")
            continue
        vals, entry_problems = check_fields(SampleEntry, entry, where, ignore=DOC_KEYS)
        if entry_problems:
            problems += entry_problems
            continue
        e = SampleEntry(**vals)
        if e.prompt is None and not e.random_caption:
            problems.append(f"{where} needs a 'prompt' (\"\" for an unconditional sample) or 'random_caption': true")
            continue
        if e.size is not None and e.aspect_ratio is not None:
            problems.append(f"{where}: give 'size' or 'aspect_ratio', not both")
            continue
        try:
            if e.size is not None:
                entry_size = _check_size(e.size, where)
            elif e.aspect_ratio is not None:
                entry_size = size_for_aspect(parse_aspect_ratio(e.aspect_ratio, where), resolution)
            else:
                entry_size = size
        except ConfigError as err:
            problems.append(str(err))
            continue
        specs.append(SampleSpec(prompt=e.prompt or "", negative_prompt=e.negative_prompt,
                                seed=seed if e.seed is None else e.seed, size=entry_size,
                                random_caption=e.random_caption))
    if problems:
        raise ConfigError("\n".join(problems))
    return dataclasses.replace(
        defaults, samples=specs, seed=seed, size=size, cfgs=[float(c) for c in f.cfgs], scheduler=f.scheduler,
        num_inference_steps=f.num_inference_steps or defaults.num_inference_steps,
        batch_size=f.batch_size or defaults.batch_size, generate_pretrain_samples=f.generate_pretrain_samples,
        every_n_steps=f.generate_samples_every_n_steps, show_progress_bars=f.show_progress_bars)


@dataclass
class SampleConfigSource:
    """The sample-prompt file of a run, re-read at every sampling so it can be edited while training.

    Created at setup, where a broken file is a ConfigError (the run has not started). Later, `reload(warn)`
    keeps the last good config when the file breaks, and warns once per distinct problem.
    """
    path: str | None
    default_seed: int
    default_size: tuple[int, int]
    default_steps: int
    default_batch_size: int = 1
    zero_terminal_snr: bool = False
    current: SampleConfig = field(init=False)
    last_error: str | None = field(init=False, default=None)

    def __post_init__(self):
        self.current = self._load()

    def _load(self) -> SampleConfig:
        return load_sample_config(self.path, default_seed=self.default_seed, default_size=self.default_size,
                                  default_steps=self.default_steps, default_batch_size=self.default_batch_size,
                                  zero_terminal_snr=self.zero_terminal_snr)

    def reload(self, warn: Callable[[str], None] = print) -> SampleConfig:
        try:
            self.current = self._load()
            self.last_error = None
        except ConfigError as e:
            if str(e) != self.last_error:
                warn(f"sample_prompts could not be re-read, keeping the previous prompts: {e}")
            self.last_error = str(e)
        return self.current


def _derived_seed(*parts) -> int:
    """A seed from a string of parts through an isolated RNG: never the global `random` or torch state."""
    return random.Random(":".join(map(str, parts))).randrange(2**31)


def plan_samples(sample_config: SampleConfig | str | None, captions: list[str], *, step: int = 0,
                 seed: int | None = None, size: tuple[int, int] | None = None,
                 max_random: int = MAX_RANDOM_CAPTIONS) -> list[SampleRequest]:
    """The requests of one sampling at optimizer step `step`.

    - no samples in the config: up to `max_random` distinct training captions, the same ones at every sampling
      (chosen with the config's seed), so grids compare across steps;
    - random_caption entries: a caption picked anew at each sampling (from the run seed, step and index);
    - seed -1: a new seed at each sampling, derived from (run seed, step, index): isolated, and a rerun of the
      same training reproduces it.
    A path (or None) instead of a SampleConfig loads it with `seed` and `size` (the trainer's older call).
    """
    if not isinstance(sample_config, SampleConfig):
        sample_config = load_sample_config(sample_config, default_seed=555 if seed is None else seed,
                                           default_size=size or (512, 512), default_steps=30)
    c = sample_config
    pool = sorted(set(captions))
    specs = c.samples
    if not specs:
        picker = random.Random(f"{c.run_seed}:{c.seed}:sample-captions")
        chosen = picker.sample(pool, min(max_random, len(pool))) if pool else [""]
        specs = [SampleSpec(prompt=caption, seed=c.seed, size=c.size) for caption in chosen]
    requests = []
    for index, s in enumerate(specs):
        prompt = s.prompt
        if s.random_caption and pool:
            prompt = random.Random(f"{c.run_seed}:{step}:{index}:random-caption").choice(pool)
        sample_seed = _derived_seed(c.run_seed, step, index, "sample-seed") if s.seed == -1 else s.seed
        requests.append(SampleRequest(prompt=prompt, negative_prompt=s.negative_prompt, seed=sample_seed,
                                      size=tuple(s.size), random_caption=s.random_caption))
    return requests


# ---------------------------------------------------------------------------------------------- generation
def build_pipeline(unet, text_encoder, vae, tokenizer, scheduler_config: dict, *, scheduler: str = "ddim",
                   zero_terminal_snr: bool = False, show_progress: bool = False):
    """A StableDiffusionPipeline around the modules being trained (shared, not copied): cheap, so build one per
    sampling and the scheduler may change between samplings."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=make_sampling_scheduler(scheduler, scheduler_config, zero_terminal_snr=zero_terminal_snr),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=not show_progress)
    return pipe


def _encode(pipe, texts: list[str], device, clip_skip: int) -> torch.Tensor:
    """Prompt embeddings exactly as training builds them (utils/sd/text_conditioning.py, the trainer's clip_skip),
    rather than through the pipeline's own clip_skip, which counts differently."""
    from utils.sd.text_conditioning import encode_prompts
    tok = pipe.tokenizer
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    return encode_prompts(pipe.text_encoder, ids, clip_skip=clip_skip)


def _rng_devices(device) -> list:
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def generate(pipe, requests: list[SampleRequest], *, cfg_scales: list[float], steps: int, device,
             autocast_dtype: torch.dtype | None, batch_size: int = 1, guidance_rescale: float = 0.0,
             clip_skip: int = 0, output_type: str = "pil") -> list[tuple[SampleRequest, list]]:
    """[(request, [image per CFG scale])] in the order of `requests`.

    Requests of the same size run together, up to batch_size at a time. Each image has its own CPU generator
    seeded from its request, re-seeded for every CFG column: an image depends neither on its batch mates nor on
    the device, and every column starts from the same noise. The global RNGs are forked, so sampling does not
    change what training draws next. output_type "np" gives float arrays in [0, 1] instead of PIL images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    images: list[list] = [[None] * len(cfg_scales) for _ in requests]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, req in enumerate(requests):
        by_size.setdefault(tuple(req.size), []).append(i)
    dev_type = torch.device(device).type
    with torch.random.fork_rng(devices=_rng_devices(device)), torch.no_grad(), \
            torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for (width, height), indices in by_size.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                cond = _encode(pipe, [requests[i].prompt for i in chunk], device, clip_skip)
                uncond = _encode(pipe, [requests[i].negative_prompt for i in chunk], device, clip_skip)
                for column, scale in enumerate(cfg_scales):
                    generators = [torch.Generator(device="cpu").manual_seed(requests[i].seed) for i in chunk]
                    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, width=width, height=height,
                               num_inference_steps=steps, guidance_scale=scale, guidance_rescale=guidance_rescale,
                               generator=generators, output_type=output_type)
                    for k, i in enumerate(chunk):
                        images[i][column] = out.images[k]
    return [(req, imgs) for req, imgs in zip(requests, images)]


# ---------------------------------------------------------------------------------------------- output
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)      # scalable with FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def cfg_label(scale: float) -> str:
    return f"CFG {scale:g}"


def make_grid(images: list, cfg_scales: list[float] | None = None, *, labels: list[str] | None = None):
    """One row: a column per CFG scale, its value ("CFG 7") written in the image's top-left corner on a dark box
    so it reads on any picture. Width = len(images) x image width; height = image height."""
    from PIL import Image, ImageDraw
    labels = labels if labels is not None else [cfg_label(s) for s in (cfg_scales or [])]
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h), "black")
    font = _font(max(8, min(w, h) // 12))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (i * w, 0))
        if i >= len(labels):
            continue
        left, top, right, bottom = draw.textbbox((0, 0), labels[i], font=font)
        pad = max(1, (bottom - top) // 4)
        draw.rectangle((i * w, 0, i * w + right - left + 2 * pad, bottom - top + 2 * pad), fill=(0, 0, 0))
        draw.text((i * w + pad - left, pad - top), labels[i], fill=(255, 255, 255), font=font)
    return grid


def grid_with_labels(images: list, labels: list[str]):
    """make_grid with labels given as text (the older name)."""
    return make_grid(images, labels=labels)


def safe_filename(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit] or "empty"


def sample_stem(prefix: str, step: int, index: int, request: SampleRequest) -> str:
    """File name without extension: <prefix>gs<step>-<index>-<prompt> (EveryDream2's pattern)."""
    return f"{prefix}gs{step:05d}-{index}-{safe_filename(request.prompt)}"


def sample_tag(prefix: str, index: int, request: SampleRequest) -> str:
    """TensorBoard image tag. Fixed per sample slot (a random caption changes each time, its tag does not), so
    TensorBoard's step slider walks one prompt through training."""
    label = "random_caption" if request.random_caption else safe_filename(request.prompt, 40)
    return f"samples/{prefix}{index:02d}_{label}"


def write_sample(out_dir: Path, stem: str, grid, request: SampleRequest, config: SampleConfig) -> Path:
    """<stem>.jpg (the grid) and <stem>.txt (what made it: prompt, seed, size, scheduler, steps, CFGs)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.jpg"
    grid.save(path, quality=90)
    info = {"prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed,
            "size": list(request.size), "random_caption": request.random_caption, "scheduler": config.scheduler,
            "num_inference_steps": config.num_inference_steps, "cfgs": config.cfgs}
    (out_dir / f"{stem}.txt").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path
