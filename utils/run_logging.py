"""Where a run reports: the console and a log file (same lines), TensorBoard, and metrics.jsonl for scripts."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

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
