"""Resumable checkpoints: a diffusers folder with the trainer state beside the weights.

logs/<run>/ckpts/<project>-ep{EE}-gs{SSSSS}/
    unet/ text_encoder/ vae/ tokenizer/ scheduler/ model_index.json   loadable by StableDiffusionPipeline
    trainer_state.pt       optimizers, LR schedulers, GradScaler, EMA, TrainState, RNG states
    train.json optimizer.json                                          the resolved config of the run
Each is written as a hidden `.<name>.<pid>.<random>.tmp/` beside it and renamed when complete
(utils/core/file_writes.py), so a kill during a save never leaves a folder that `findlast` would take.
"""
from __future__ import annotations

import errno
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from utils.core.config_schema import ConfigError
from utils.core.file_writes import TMP_SUFFIX, remove_stale_temps, replace_folder_atomic

STATE_FILE = "trainer_state.pt"
_STEP_RE = re.compile(r"-gs(\d+)$")


@dataclass
class TrainState:
    """Where training stands; everything else needed to continue is derived from it and the config."""
    seed: int
    epoch: int = 0                 # current epoch (0-based)
    batches_done: int = 0          # micro-batches of this epoch already trained
    global_step: int = 0           # optimizer steps taken
    images_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)


def capture_rng(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "train": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    generator.set_state(state["train"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def checkpoint_name(project_name: str, epoch: int, global_step: int, prefix: str = "") -> str:
    return f"{prefix}{project_name}-ep{epoch:02d}-gs{global_step:05d}"


def save_checkpoint_folder(final: Path, write_contents) -> Path:
    """Call write_contents(tmp_folder), then swap it in as final (the same name again, e.g. a second save at one
    step, replaces it whole). A failure leaves no temp folder and `final` as it was; what a killed save left
    behind is removed first."""
    remove_stale_temps(final.parent)
    try:
        return replace_folder_atomic(final, write_contents)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(f"disk full while saving {final.name}: free space in {final.parent} (earlier "
                              f"checkpoints are intact) or set keep_last_n") from None
        raise


def save_trainer_state(folder: Path, state: dict) -> None:
    torch.save(state, folder / STATE_FILE)


def load_trainer_state(folder: Path) -> dict | None:
    """The trainer state of a checkpoint folder, None if it has none, or ConfigError naming the file and what to
    do when it cannot be used (truncated, damaged, needs code execution, not ours)."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    advice = (f"resume from another checkpoint (an earlier one in {path.parent.parent}), or delete {path} to start "
              f"a new run from this checkpoint's weights")
    try:
        # weights_only: a state file from elsewhere can never run code on load
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            names = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only used to improve the message
            names = []
        if names:
            raise ConfigError(f"{path}: the trainer state needs pickle code execution to load (it references "
                              f"{', '.join(names[:5])}) and is refused, since such a file can run arbitrary code; "
                              f"{advice}") from None
        raise ConfigError(f"{path}: the trainer state is damaged ({_first_sentence(e)}); {advice}") from None
    except EOFError:
        raise ConfigError(f"{path}: the trainer state is empty (a copy or a save that did not finish?); "
                          f"{advice}") from None
    except (RuntimeError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"{path}: the trainer state is truncated or damaged ({_first_sentence(e)}); "
                          f"{advice}") from None
    if not (isinstance(state, dict) and isinstance(state.get("train_state"), dict)
            and "seed" in state["train_state"]):
        raise ConfigError(f"{path}: not a trainer state written by this trainer (no train_state in it); {advice}")
    return state


def _first_sentence(e: Exception) -> str:
    # torch's messages run over several lines and paragraphs; the first sentence says what failed
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.split(". ")[0].rstrip(".") or type(e).__name__


def is_complete_checkpoint(folder: Path) -> bool:
    return (folder.is_dir() and not folder.name.endswith(TMP_SUFFIX) and (folder / "model_index.json").exists()
            and (folder / "unet").is_dir())


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints of one run, oldest first (by global step, then modification time)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete_checkpoint(p) and not p.name.endswith("_ema")]

    def key(p: Path):
        m = _STEP_RE.search(p.name)
        return (int(m.group(1)) if m else -1, p.stat().st_mtime)
    return sorted(found, key=key)


def find_last(logdir: Path) -> Path:
    """The newest complete resumable checkpoint under logdir (EveryDream2's `findlast`)."""
    candidates = []
    for run in Path(logdir).glob("*/ckpts"):
        candidates += [p for p in list_checkpoints(run) if (p / STATE_FILE).exists()]
    if not candidates:
        raise ConfigError(f"resume_ckpt findlast: no complete checkpoint with trainer state under {logdir}/*/ckpts; "
                          f"give a model folder to start a new run")
    return max(candidates, key=lambda p: (p / STATE_FILE).stat().st_mtime)


def prune_checkpoints(ckpt_dir: Path, keep_last_n: int | None, protect: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest keep_last_n checkpoints of a run; returns what was deleted."""
    if not keep_last_n:
        return []
    ckpts = list_checkpoints(ckpt_dir)
    doomed = [p for p in ckpts[:-keep_last_n] if p not in protect]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        ema = p.with_name(p.name + "_ema")
        if ema.exists():
            shutil.rmtree(ema, ignore_errors=True)
    return doomed
