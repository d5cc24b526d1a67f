"""The sample-prompt file and what one sampling asks for: sample_prompts as .txt (one prompt a line) or .json in
EveryDream2's sample_prompts.json format (doc/LOGGING.md), sizes from aspect ratios, and the per-sampling plan with
its seeds. Nothing here touches the training's randomness.

    source = SampleConfigSource(cfg.sample_prompts, default_seed=cfg.seed, default_size=(512, 512),
                                default_steps=cfg.sample_num_steps)           # a broken file fails here, at start
    scfg = source.reload(warn)                         # at each sampling: edits apply, a broken file keeps the last
    requests = plan_samples(scfg, captions, step=global_step)

utils/eval/sampling.py turns the requests into images.
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

from utils.core.config_schema import ConfigError, check_fields, doc, read_json
from utils.eval.sample_schedulers import check_scheduler

DEFAULT_CFGS = [7.0, 4.0, 1.01]   # EveryDream2's; 1.01 (not 1) so diffusers still runs the CFG branch
MAX_RANDOM_CAPTIONS = 4           # an empty prompt file samples this many training captions
# Keys of a JSON file that only document it (EveryDream2's shipped files carry a "documentation" block).
DOC_KEYS = ("documentation", "doc")


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
