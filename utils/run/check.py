"""`train.py --check`: validate the config and scan the data without loading a model."""
from __future__ import annotations

from pathlib import Path

from data.buckets import resolution_list
from data.dataset import require_usable, scan_dataset, summarize, write_dataset_report
from utils.core.file_writes import create_folder
from utils.core.run_logging import get_logger
from utils.eval.validation import load_validation_config
from utils.run.config import TrainConfig
from utils.run.preflight import data_settings, sample_source


def check_data(cfg: TrainConfig) -> int:
    log = get_logger()
    resolutions = resolution_list(cfg.resolution)
    # every image decoded in full, as the run's scan does: the same verdict, before any training
    scan = scan_dataset(cfg.data_root, data_settings(cfg, resolutions), progress=True, check_usable=False)
    # the prompt and validation files fail here as they would at training start
    sample_source(cfg, resolutions)
    load_validation_config(cfg.validation_config)
    out = create_folder(Path(cfg.logdir) / f"{cfg.project_name}-check", "logdir")
    write_dataset_report(scan, out / "dataset.jsonl")
    log.info(summarize(scan))
    log.info(f"wrote {out / 'dataset.jsonl'}")
    require_usable(scan)  # nothing to train on: exit 2, with the report written to say why
    return 0
