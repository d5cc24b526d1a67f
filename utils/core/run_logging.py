"""Where a run reports: the console and a log file (same lines), TensorBoard, and metrics.jsonl for scripts."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

LOGGER_NAME = "sdtrain"


def get_logger() -> logging.Logger:
    log = logging.getLogger(LOGGER_NAME)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def add_log_file(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    get_logger().addHandler(handler)
    return handler


def quiet_libraries() -> None:
    """Library chatter (weight-loading bars, torchvision notices) would bury the trainer's own lines."""
    import warnings
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def read_later(values: dict) -> Callable[[], dict[str, float]]:
    """Starts copying scalar tensors (device or host) to the host without waiting, and returns a function that
    waits for the copy and gives {name: float}. Reading a CUDA value at once (.item()) makes the host wait for
    the GPU's whole queue, and the GPU then idles while the host queues the next step; a step later the copy has
    long finished and the wait costs nothing."""
    import torch
    if not values:
        return dict
    names = list(values)
    device = next((v.device for v in values.values() if v.device.type == "cuda"), torch.device("cpu"))
    stacked = torch.stack([v.detach().reshape(()).to(device, torch.float32) for v in values.values()])
    if device.type != "cuda":
        floats = stacked.tolist()
        return lambda: dict(zip(names, floats))
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> dict[str, float]:
        copied.synchronize()
        return dict(zip(names, host.tolist()))
    return read


class MetricsSink:
    """TensorBoard scalars/images/text plus one JSON line per logged step (what tests and scripts read)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir))
            self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def image(self, tag: str, pil_image, step: int) -> None:
        if not self.enabled:
            return
        import numpy as np
        self.writer.add_image(tag, np.asarray(pil_image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.writer.close()
            self.jsonl.close()
