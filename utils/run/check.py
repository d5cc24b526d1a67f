"""`train.py --check`: validate the config and scan the data without loading a model."""
from __future__ import annotations

from pathlib import Path

from data.buckets import resolution_list
from utils.run.config import TrainConfig
from utils.core.run_logging import get_logger


def check_data(cfg: TrainConfig) -> int:
    from data.dataset import DataSettings, require_usable, scan_dataset, summarize, write_dataset_report
    log = get_logger()
    resolutions = resolution_list(cfg.resolution)
    settings = DataSettings(resolution=resolutions, flip_p=cfg.flip_p, cond_dropout=cfg.cond_dropout,
                            shuffle_tags=cfg.shuffle_tags, keep_tags=cfg.keep_tags, crop_jitter=cfg.crop_jitter)
    # every image decoded in full, as the run's scan does: the same verdict, before any training
    scan = scan_dataset(cfg.data_root, settings, progress=True, check_usable=False)
    # the prompt and validation files fail here as they would at training start
    from utils.eval.sample_config import SampleConfigSource
    from utils.eval.validation import load_validation_config
    SampleConfigSource(cfg.sample_prompts, default_seed=cfg.seed, default_size=(resolutions[0], resolutions[0]),
                       default_steps=cfg.sample_num_steps, zero_terminal_snr=cfg.enable_zero_terminal_snr)
    load_validation_config(cfg.validation_config)
    from utils.core.file_writes import create_folder
    out = create_folder(Path(cfg.logdir) / f"{cfg.project_name}-check", "logdir")
    write_dataset_report(scan, out / "dataset.jsonl")
    log.info(summarize(scan))
    log.info(f"wrote {out / 'dataset.jsonl'}")
    require_usable(scan)  # nothing to train on: exit 2, with the report written to say why
    return 0
