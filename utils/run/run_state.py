"""Everything a training run holds, typed, in one place.

`Run` is created cheaply by utils/run/preflight.py (config checked, nothing loaded), filled once by
utils/run/setup.py, and then read and advanced by the loop (utils/run/loop.py) and its pieces: the step, the
agreement between processes, logging, previews and saves. Every attribute is declared here, so a reader (and
cleanup) knows what exists at each stage without probing.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from data.buckets import resolution_list
from utils.run.checkpoint import TrainState
from utils.run.config import LiveSettings, TrainConfig


@dataclass
class Models:
    """The model parts and how the step uses them."""
    sd: Any                                  # utils.sd.models.SDModel: the plain modules (samples, saves, EMA)
    folder: Path                             # the diffusers folder they came from (frozen parts are copied from it)
    train_unet: bool
    train_text_encoders: tuple[bool, ...]    # per text encoder, in sd.text_encoders' order
    unet: torch.nn.Module                    # what the step calls: sd.unet, DDP-wrapped and/or compiled
    text_encoders: tuple                     # likewise, per text encoder
    noise_scheduler: Any
    te_cache: Any = None                     # PromptCache while the text encoder is frozen and cache_te_outputs
    # the trained modules' parameters in a fixed order (EMA state and swaps rely on the order)
    trained_params: list = field(default_factory=list)

    @property
    def train_te(self) -> bool:
        """Whether any text encoder trains (gradients flow through the text conditioning)."""
        return any(self.train_text_encoders)

    def step_modules(self) -> list[tuple[torch.nn.Module, bool]]:
        """(module the step calls, trained) for the UNet and each text encoder."""
        return [(self.unet, self.train_unet), *zip(self.text_encoders, self.train_text_encoders)]


@dataclass
class StepCounts:
    """Optimizer steps per epoch (epochs may differ by a few batches) and in all."""
    epoch_steps: list[int]
    total_steps: int

    @property
    def per_epoch(self) -> int:
        return self.epoch_steps[0]


@dataclass
class Previews:
    """Validation sets and the sample prompt file, both read before any model loads."""
    validation: Any                          # ValidationConfig or None
    history: Any                             # ValidationHistory
    sets: list
    samples: Any                             # SampleConfigSource


@dataclass
class LogWindow:
    """What accumulates between two logging steps (on the device, so that the step never waits for the host)."""
    loss: torch.Tensor
    micro: int = 0
    images: int = 0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class StagedLog:
    """A logging step's scalars, written at the next step once their copy to the host has finished."""
    step: int
    read: Callable[[], dict]
    on_host: dict


@dataclass
class Stops:
    """Signals, and what the processes agreed at the last step."""
    requested: str | None = None             # "SIGINT" / "SIGTERM": stop after this step and save
    signals_seen: int = 0
    abort_signal: str | None = None          # a second signal: stop at once, no save
    pending_signal: str | None = None        # several processes: seen here, not yet agreed (processes.py)
    save_agreed: bool = False                # several processes: the main one's save clock said "save"
    images_synced: int = 0                   # images_seen as of the last agreement
    old_handlers: dict = field(default_factory=dict)


@dataclass
class Run:
    # preflight: the config and this machine, checked; nothing loaded
    cfg: TrainConfig
    config_path: str | None                  # re-read each epoch with load_settings_every_epoch
    live: LiveSettings                       # the keys that may change mid-run; cfg itself never changes
    opt_cfg: Any                             # optimizer.config.OptimizerConfig
    accelerator: Any
    device: torch.device
    is_main: bool
    processes: int
    amp_dtype: torch.dtype | None
    torch_settings: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    stops: Stops = field(default_factory=Stops)
    log_hook: Callable[[int], None] | None = None   # benchmark timing: called with the step at each logging step
    # setup
    run_dir: Path | None = None
    log_handler: Any = None
    scan: Any = None                         # data.items.DataScan: the training images
    previews: Previews | None = None
    models: Models | None = None
    latent_index: Any = None
    steps: StepCounts | None = None
    parts: list = field(default_factory=list)       # optimizer.build.OptimizerPart per trained model
    scaler: Any = None
    generator: torch.Generator | None = None
    state: TrainState | None = None
    ema: Any = None
    metrics: Any = None                      # utils.core.run_logging.MetricsSink
    compiled_shapes: Any = None              # utils.run.compile_shapes.CompiledShapes with torch_compile
    # the loop
    batches: Any = None                      # the DataLoader iterator of the epoch in progress (loader.py)
    window: LogWindow | None = None
    staged_log: StagedLog | None = None
    nonfinite_run: int = 0
    backward_skipped: bool = False           # fused_backward_pass: this step's loss was not finite, no backward
    out_of_memory: bool = False
    started: float = 0.0
    last_save_time: float = 0.0

    @property
    def resolutions(self) -> list[int]:
        return resolution_list(self.cfg.resolution)

    @property
    def compile_seconds(self) -> float | None:
        """Time spent in the first step of each compiled shape (compiling and its first run), over the run."""
        return sum(self.compiled_shapes.seconds.values()) if self.compiled_shapes else None

    def finished(self) -> bool:
        return self.state.global_step >= self.steps.total_steps
