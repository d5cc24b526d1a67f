"""Validation loss: EveryDream2's validation_config, the held-out split, when to validate, and a loss that is
measured with fixed noise and timesteps so its curve shows the model, not the dice.

    vcfg = load_validation_config(cfg.validation_config)                      # None: validation off
    train_items, val_sets, stabilize = split_for_validation(scan.items, vcfg, scan_fn=scan_folder)
    sets = validation_sets(val_sets, stabilize, batch_size=vcfg.batch_size or cfg.batch_size, seed=vcfg.seed,
                           resolution=512)
    if validation_due(global_step, steps_per_epoch, vcfg.every_n_epochs):
        for s in sets:
            value = evaluate_loss(loss_fn, BatchDataset(s.items, s.plans, seed=vcfg.seed, epoch=0, augment=False),
                                  seed=vcfg.seed)                            # -> TensorBoard s.tag

Pure functions and dataclasses; the trainer supplies the forward pass (loss_fn) and the folder scanner (scan_fn).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Iterable, Literal

import torch

from utils.core.config_schema import ConfigError, check_fields, doc, read_json

VAL_TAG = "loss/val"
STABILIZE_TAG = "loss/stabilize-train"
RELATIVE_PREFIX = "loss_relative/"
# EveryDream2's divergence warning: after more than 11 validations, when the last 5 trend upwards.
DIVERGENCE_MIN_POINTS = 12
DIVERGENCE_WINDOW = 5
DOC_KEYS = ("documentation", "doc")          # EveryDream2's validation_default.json documents itself in-file


@dataclass
class ValidationConfig:
    validate_training: bool = doc(True, "Master switch.")
    val_split_mode: Literal["automatic", "manual", "none"] = doc(
        "automatic", "automatic: hold out auto_split_proportion of the training images; manual: validate on "
                     "manual_data_root; none: no held-out set (extra_manual_datasets and stabilize still run).")
    auto_split_proportion: float = doc(0.15, "Fraction held out by the automatic split: ceil(p x images), at least "
                                             "1, removed from training.", minimum=0.0, maximum=1.0)
    manual_data_root: str | None = doc(None, "Validation image folder (with its own captions) for manual mode.")
    val_data_root: str | None = doc(None, "Older name of manual_data_root.")
    extra_manual_datasets: dict = doc({}, "{name: folder}: more validation sets, each logged as loss/<name>.")
    every_n_epochs: float = doc(1.0, "Validate every N epochs; fractions subdivide an epoch (0.5: twice per "
                                     "epoch). Also once before the first step.", minimum=1e-6)
    seed: int = doc(555, "Seed of the split and of the validation noise and timesteps.")
    batch_size: int | None = doc(None, "Validation batch size (null: the training batch_size).", minimum=1)
    stabilize_training_loss: bool = doc(False, "Also evaluate a fixed subset of the training images (they keep "
                                               "training) the same way: loss/stabilize-train.")
    stabilize_split_proportion: float = doc(0.15, "Size of that subset: ceil(p x training images), at least 1.",
                                            minimum=0.0, maximum=1.0)
    use_relative_loss: bool = doc(False, "Also log every validation loss divided by its first value "
                                         "(loss_relative/<name>; below 1 = better than before training).")


def load_validation_config(path: str | None) -> ValidationConfig | None:
    """The validation config of train.json's validation_config, or None when validation is off (no path, or
    validate_training false). Strict: unknown keys and bad values are a ConfigError naming the file."""
    if not path:
        return None
    raw = read_json(path, "validation_config file")
    values, problems = check_fields(ValidationConfig, raw, str(path), ignore=DOC_KEYS)
    vcfg = ValidationConfig(**values) if not problems else None
    if vcfg is not None:
        problems += check_validation_config(vcfg, str(path))
    if problems:
        raise ConfigError("\n".join(problems))
    if vcfg.val_data_root is not None:          # the legacy key becomes the current one
        vcfg = dataclasses.replace(vcfg, manual_data_root=vcfg.manual_data_root or vcfg.val_data_root,
                                   val_data_root=None)
    return vcfg if vcfg.validate_training else None


def check_validation_config(v: ValidationConfig, source: str) -> list[str]:
    problems = []
    if v.manual_data_root and v.val_data_root and v.manual_data_root != v.val_data_root:
        problems.append(f"{source}: manual_data_root and its older name val_data_root disagree; keep one")
    root = v.manual_data_root or v.val_data_root
    if v.val_split_mode == "manual" and not root:
        problems.append(f"{source}: val_split_mode 'manual' needs manual_data_root (the validation image folder)")
    if v.val_split_mode != "manual" and root:
        problems.append(f"{source}: manual_data_root is set but val_split_mode is '{v.val_split_mode}'; set "
                        f"val_split_mode to 'manual' to validate on it, or remove manual_data_root")
    if v.val_split_mode == "automatic" and not 0 < v.auto_split_proportion < 1:
        problems.append(f"{source}: auto_split_proportion must be between 0 and 1 (exclusive), got "
                        f"{v.auto_split_proportion}; use val_split_mode 'none' for no held-out set")
    if v.stabilize_training_loss and not 0 < v.stabilize_split_proportion <= 1:
        problems.append(f"{source}: stabilize_split_proportion must be in (0, 1], got {v.stabilize_split_proportion}")
    for name, folder in v.extra_manual_datasets.items():
        if not isinstance(folder, str) or not folder:
            problems.append(f"{source}: extra_manual_datasets['{name}'] must be a folder path")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\- ]*", name):
            problems.append(f"{source}: extra_manual_datasets name '{name}' must be letters, digits, '_', '-', "
                            f"'.' or spaces (it becomes the TensorBoard tag loss/<name>)")
        if name in ("val", "stabilize-train"):
            problems.append(f"{source}: extra_manual_datasets name '{name}' is taken by a built-in tag")
    return problems


# ---------------------------------------------------------------------------------------------- split
def as_validation_item(item):
    """A copy that evaluates, not trains: multiplier 1, no flip, crop jitter, caption dropout or tag shuffle,
    default batch group and loss scale 1 (EveryDream2 drops batch_id and loss_scale the same way)."""
    return dataclasses.replace(item, multiply=1.0, flip_p=0.0, crop_jitter=0.0, cond_dropout=0.0,
                               shuffle_tags=False, batch_id="", loss_scale=1.0)


def _items_of(scanned) -> list:
    return list(getattr(scanned, "items", scanned))


def _sorted_by_path(items) -> list:
    return sorted(items, key=lambda it: str(it.path))


def _draw(items: list, proportion: float, rng: random.Random) -> list:
    """ceil(p x N) items (at least 1), drawn from items sorted by path, so the draw depends only on the seed and
    the set of files, not on the scan order."""
    pool = _sorted_by_path(items)
    n = max(1, math.ceil(proportion * len(pool) - 1e-9))
    rng.shuffle(pool)
    return pool[:n]


def split_for_validation(items: list, vcfg: ValidationConfig | None, *,
                         scan_fn: Callable[[str], object]) -> tuple[list, dict[str, list], list]:
    """(train_items, {set name: items}, stabilize_items).

    Set names are the TensorBoard tag suffixes: "val" (automatic or manual), then each extra_manual_datasets name.
    automatic: ceil(p x N) items are removed from training, drawn with the validation seed in an isolated RNG.
    manual and extra sets: scan_fn(folder) (a list of items or a DataScan) scans them like training data.
    stabilize: a fixed subset of the remaining training items; they also stay in training.
    Validation items are copies without augmentation or multipliers (as_validation_item). The training items keep
    their order. ConfigError when a split would leave no training image or a validation folder shares images
    with the training set.
    """
    if vcfg is None or not vcfg.validate_training:
        return list(items), {}, []
    train = list(items)
    sets: dict[str, list] = {}
    if vcfg.val_split_mode == "automatic":
        if len(train) < 2:
            raise ConfigError(f"validation: the automatic split needs at least 2 training images, found "
                              f"{len(train)}; use val_split_mode 'manual' or 'none'")
        held = _draw(train, vcfg.auto_split_proportion, random.Random(f"{vcfg.seed}:validation-split"))
        if len(held) >= len(train):
            raise ConfigError(f"validation: auto_split_proportion {vcfg.auto_split_proportion} would hold out "
                              f"all {len(train)} training images")
        held_paths = {str(it.path) for it in held}
        train = [it for it in train if str(it.path) not in held_paths]
        sets["val"] = [as_validation_item(it) for it in _sorted_by_path(held)]
    elif vcfg.val_split_mode == "manual":
        sets["val"] = [as_validation_item(it) for it in _items_of(scan_fn(vcfg.manual_data_root))]
    for name, folder in vcfg.extra_manual_datasets.items():
        sets[name] = [as_validation_item(it) for it in _items_of(scan_fn(folder))]
    train_paths = {str(it.path) for it in train}
    for name, val_items in sets.items():
        shared = [it for it in val_items if str(it.path) in train_paths]
        if shared:
            raise ConfigError(f"validation set '{name}': {len(shared)} of its images are also training images "
                              f"(e.g. {shared[0].path}); keep validation folders outside data_root")
        if not val_items:
            raise ConfigError(f"validation set '{name}' has no images")
    stabilize = []
    if vcfg.stabilize_training_loss:
        drawn = _draw(train, vcfg.stabilize_split_proportion, random.Random(f"{vcfg.seed}:stabilize-split"))
        stabilize = [as_validation_item(it) for it in _sorted_by_path(drawn)]
    return train, sets, stabilize


def describe_split(n_train: int, val_sets: dict[str, list], stabilize_items: list) -> str:
    """One log line: what is validated on."""
    parts = [f"{name}: {len(v)} images" for name, v in val_sets.items()]
    if stabilize_items:
        parts.append(f"stabilize-train: {len(stabilize_items)} training images")
    return f"validation: {', '.join(parts) or 'nothing to validate'}; training on {n_train} images"


# ---------------------------------------------------------------------------------------------- sets and schedule
@dataclass
class ValidationSet:
    tag: str                 # the TensorBoard tag: loss/val, loss/<name>, loss/stabilize-train
    items: list              # validation copies (as_validation_item)
    plans: list              # data.sampler.BatchPlan, fixed for the whole run


def validation_sets(val_sets: dict[str, list], stabilize_items: list, *, batch_size: int, seed: int,
                    resolution: int) -> list[ValidationSet]:
    """Fixed batches for every set at one resolution (the base training resolution): the same images in the same
    batches at every validation. Buckets and runt batches follow the training rules (data/sampler.py)."""
    from data.sampler import epoch_batches
    named = [(f"loss/{name}", items) for name, items in val_sets.items()]
    if stabilize_items:
        named.append((STABILIZE_TAG, stabilize_items))
    return [ValidationSet(tag, items, epoch_batches(items, batch_size=batch_size, seed=seed, epoch=0,
                                                    resolutions=[resolution]))
            for tag, items in named]


def validation_due(optimizer_step: int, steps_per_epoch: int, every_n_epochs: float) -> bool:
    """Whether to validate after `optimizer_step` optimizer steps.

    Step 0 is always due: the trainer validates once before the first step (call it with global_step 0 before
    the loop, only when not resuming). After that, due whenever the step count crosses a multiple of
    every_n_epochs x steps_per_epoch: with 10 steps per epoch, 1 -> steps 10, 20, ...; 0.5 -> 5, 10, ...;
    0.25 -> 3 (2.5 crossed), 5, 8, 10; 2 -> 20, 40. Exact fractions, so 0.1 x 10 is 1, not 1.0000000000000002.
    """
    if optimizer_step <= 0:
        return optimizer_step == 0
    if steps_per_epoch < 1 or every_n_epochs <= 0:
        raise ValueError(f"need steps_per_epoch >= 1 and every_n_epochs > 0, got {steps_per_epoch}, "
                         f"{every_n_epochs}")
    interval = Fraction(str(every_n_epochs)).limit_denominator(10**6) * steps_per_epoch
    return math.floor(optimizer_step / interval) > math.floor((optimizer_step - 1) / interval)


# ---------------------------------------------------------------------------------------------- evaluation
def eval_seed(seed: int, batch_index: int) -> int:
    """The generator seed of one validation batch: the same at every evaluation, different between batches."""
    digest = hashlib.sha256(f"{seed}:{batch_index}:validation".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _batch_images(batch) -> int:
    captions = batch.get("captions") if isinstance(batch, dict) else None
    return len(captions) if captions is not None else 1


def evaluate_loss(loss_fn: Callable[[object, torch.Generator], torch.Tensor | float], batches: Iterable, *,
                  seed: int) -> float:
    """Mean loss per image over `batches` (BatchDataset(..., augment=False) or a DataLoader over it; None entries,
    batches whose images all failed to load, are skipped).

    loss_fn(batch, generator) returns the batch's mean loss. Batch i gets a fresh CPU generator seeded with
    eval_seed(seed, i), so latent sampling, noise and timesteps are identical at every evaluation and the curve
    moves only when the weights do. Runs under no_grad with the global RNGs forked: validating does not change
    what training draws. The caller puts the model in eval mode.
    """
    total, count = 0.0, 0
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        for i, batch in enumerate(batches):
            if batch is None:
                continue
            generator = torch.Generator(device="cpu").manual_seed(eval_seed(seed, i))
            loss = loss_fn(batch, generator)
            n = _batch_images(batch)
            total += float(loss) * n          # one host sync per batch: validation is not the hot loop
            count += n
    if count == 0:
        raise ValueError("evaluate_loss: no batch to evaluate (every image failed to load?)")
    return total / count


def validation_loss_settings(settings):
    """The training LossSettings with the loss made plain MSE (no loss_type, min-SNR or debiased weighting), as
    EveryDream2 validates; noise settings (offset, pyramid, timestep range) stay as trained."""
    return dataclasses.replace(settings, loss_type="mse", min_snr_gamma=None, debiased_estimation=False)


# ---------------------------------------------------------------------------------------------- history
@dataclass
class ValidationHistory:
    """Validation losses of the run: relative losses (use_relative_loss) and the divergence warning.

    EveryDream2 accepted use_relative_loss and did nothing with it (D20). Here it logs loss_relative/<name> =
    loss / the set's first value (step 0 for a fresh run), a unitless curve that compares sets of different
    difficulty and is never negative (EveryDream2 issue #119). Keep it in the trainer's resumable state
    (state_dict) so the baseline survives a resume.
    """
    relative: bool = False
    baseline: dict[str, float] = field(default_factory=dict)
    val_losses: list[float] = field(default_factory=list)
    diverging: bool = False

    def record(self, step: int, values: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """(extra scalars to log, warnings) for one validation's {tag: loss}."""
        extra, warnings = {}, []
        for tag, value in values.items():
            self.baseline.setdefault(tag, value)
            if self.relative and self.baseline[tag] > 0:
                extra[RELATIVE_PREFIX + tag.split("/", 1)[1]] = value / self.baseline[tag]
        if VAL_TAG in values:
            self.val_losses.append(values[VAL_TAG])
            recent = self.val_losses[-DIVERGENCE_WINDOW:]
            rising = len(self.val_losses) >= DIVERGENCE_MIN_POINTS and \
                sum(b - a for a, b in zip(recent, recent[1:])) / (len(recent) - 1) > 0
            if rising and not self.diverging:
                warnings.append(f"step {step}: {VAL_TAG} has risen over the last {DIVERGENCE_WINDOW} validations "
                                f"({recent[0]:.4f} -> {recent[-1]:.4f}); the model may be overfitting")
            self.diverging = rising
        return extra, warnings

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key != "relative":      # the current config decides whether relative losses are logged
                setattr(self, key, value)
