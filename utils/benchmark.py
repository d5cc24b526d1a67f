"""Measure the trainer's own step and data pipeline on a full-size SD architecture with random weights.

    python -m utils.benchmark --arch sd15 --resolution 512 --batch_size 6 --steps 30 [--max_vram_gb 22] [--key value ...]

Builds the SD1.5 or SD2.1 architecture (configs shipped, nothing downloaded), writes synthetic JPEGs to a
temporary data_root, and runs the same Trainer that train.py runs. After the warm-up steps it reports images/s
(end to end, data loading included), step time, and peak allocated / reserved GPU memory. Any other
train.json key can be passed through as --key value (e.g. --mixed_precision fp16 --gradient_checkpointing).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def write_synthetic_images(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Smooth random images saved as JPEG, so decoding costs what real photos cost."""
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(count):
        small = rng.integers(0, 255, (h // 32, w // 32, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        img.save(folder / f"synthetic image {i}_{i}.jpg", quality=90)


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["sd15", "sd21", "tiny-sd"], default="sd15")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=6)
    ap.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    ap.add_argument("--max_vram_gb", type=float, default=None, help="cap this process's GPU memory")
    ap.add_argument("--images", type=int, default=None, help="synthetic images (default: enough for the steps)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--data_only", action="store_true",
                    help="time the data pipeline alone (decode, crop, resize, collate) with --num_workers workers")
    ap.add_argument("--num_workers", type=int, default=None)
    ap.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("W", "H"),
                    help="synthetic JPEG size (default: resolution x resolution)")
    args, passthrough = ap.parse_known_args(argv)

    import torch
    if args.max_vram_gb and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_vram_gb * 2**30 / total))

    from utils.config import load_config
    from utils.trainer import Trainer

    work = Path(args.workdir or tempfile.mkdtemp(prefix="sdbench-"))
    data = work / "data"
    n_images = args.images or args.batch_size * (args.steps + args.warmup)
    if not data.exists():
        write_synthetic_images(data, n_images, tuple(args.image_size or (args.resolution, args.resolution)))
    if args.data_only:
        return _time_data_pipeline(data, args)
    total_steps = args.warmup + args.steps
    argv_cfg = ["--resume_ckpt", f"builtin:{args.arch}", "--data_root", str(data), "--logdir", str(work / "logs"),
                "--project_name", "bench", "--resolution", str(args.resolution), "--batch_size",
                str(args.batch_size), "--max_steps", str(total_steps), "--max_epochs", "1000",
                "--log_step", str(args.warmup), "--sample_steps", "1000000", "--cond_dropout", "0",
                "--no_save_ckpt", "--ckpt_every_n_minutes", "100000", *passthrough]
    cfg, _ = load_config(argv_cfg)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        timings = {}

        def on_log(step: int) -> None:  # called at each log step; steps warmup..warmup+steps are timed
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            timings[step] = time.perf_counter()
            if step == args.warmup and torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

        trainer.log_hook = on_log
        trainer.cfg.log_step = args.warmup
        trainer.train(final_outputs=False)
    except torch.OutOfMemoryError:
        result = {"arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size, "oom": True}
        print(json.dumps(result), flush=True)
        return result
    finally:
        trainer.cleanup()
    # log steps are multiples of `warmup`: time from the first log step to the last one
    marks = sorted(timings)
    t_steps = marks[-1] - marks[0]
    dt = (timings[marks[-1]] - timings[marks[0]]) / t_steps
    result = {"arch": args.arch, "resolution": args.resolution, "batch_size": args.batch_size,
              "timed_steps": t_steps, "step_ms": round(dt * 1e3, 1), "images_per_s": round(args.batch_size / dt, 2),
              "options": " ".join(passthrough)}
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(result), flush=True)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _time_data_pipeline(data: Path, args) -> dict:
    """Images/s of scan -> batch plans -> BatchDataset -> DataLoader, the path the trainer uses, no model."""
    import os
    import torch
    from data.dataset import BatchDataset, DataSettings, epoch_batches, scan_dataset
    scan = scan_dataset(data, DataSettings(resolution=[args.resolution]))
    plans = epoch_batches(scan.items, batch_size=args.batch_size, seed=1, epoch=0, resolutions=[args.resolution])
    workers = args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    loader = torch.utils.data.DataLoader(BatchDataset(scan.items, plans, seed=1, epoch=0), batch_size=None,
                                         num_workers=workers, prefetch_factor=4 if workers else None,
                                         pin_memory=torch.cuda.is_available())
    warm = min(len(plans) // 4, 4 * max(1, workers))
    images, t0 = 0, None
    for i, batch in enumerate(loader):
        if i == warm:
            t0, images = time.perf_counter(), 0
        images += len(batch["captions"])
    dt = time.perf_counter() - t0
    result = {"data_only": True, "resolution": args.resolution, "image_size": args.image_size,
              "num_workers": workers, "images": images, "images_per_s": round(images / dt, 1)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run(sys.argv[1:])
