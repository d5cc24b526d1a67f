"""What the scan found, for people: dataset.jsonl (one line per image, skipped ones too) and a text summary.

`python -m data.report DATA_ROOT [--resolution 512 ...]` scans a folder without the trainer and prints the summary.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from data.items import DataScan, DataSettings, printable


def item_record(item) -> dict:
    return {
        "path": item.rel_path, "caption": item.caption, "bucket": list(item.bucket), "multiply": item.multiply,
        "batch_id": item.batch_id, "flip_p": item.flip_p, "cond_dropout": item.cond_dropout,
        "loss_scale": item.loss_scale, "mask": item.mask_path is not None, "skipped": None,
        "width": item.width, "height": item.height, "undersized": item.undersized,
        "shuffle_tags": item.shuffle_tags, "keep_tags": item.keep_tags, "notes": list(item.notes),
    }


def skipped_record(rel_path: str, reason: str) -> dict:
    return {"path": rel_path, "caption": None, "bucket": None, "multiply": None, "batch_id": None, "flip_p": None,
            "cond_dropout": None, "loss_scale": None, "mask": False, "skipped": reason}


def write_dataset_report(scan: DataScan, path: Path) -> None:
    """dataset.jsonl: every image by path (relative to data_root), usable ones first, then the skipped files."""
    lines = [json.dumps(item_record(item), ensure_ascii=False) for item in scan.items]
    lines += [json.dumps(skipped_record(rel, reason), ensure_ascii=False) for rel, reason in scan.skipped]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def problem_summary(scan: DataScan) -> str:
    """One line for the console when something needs the user's attention; "" when nothing does."""
    parts = []
    if scan.skipped:
        parts.append(f"{len(scan.skipped)} file(s) skipped")
    if scan.warnings:
        parts.append(f"{len(scan.warnings)} warning(s)")
    if scan.undersized:
        parts.append(f"{len(scan.undersized)} image(s) upscaled")
    return f"data warning: {', '.join(parts)}; details in dataset.jsonl and the summary" if parts else ""


def summarize(scan: DataScan, max_listed: int = 20) -> str:
    """Counts, the bucket histogram at the base resolution, and the undersized and skipped files."""
    items = scan.items
    base = scan.settings.resolution[0]
    epoch_images = int(sum(i.multiply for i in items) + 1e-9)
    lines = [f"data_root: {printable(str(scan.root))}",
             f"images: {len(items)} usable, {len(scan.skipped)} skipped; {epoch_images} per epoch after multipliers; "
             f"{sum(i.mask_path is not None for i in items)} with masks",
             f"resolution: {', '.join(map(str, scan.settings.resolution))} (buckets below at {base})"]
    histogram = Counter(i.bucket for i in items)
    lines.append("buckets:")
    for (w, h), count in sorted(histogram.items(), key=lambda kv: kv[0][0] / kv[0][1]):
        lines.append(f"  {w:>5} x {h:<5} {count:>6}")
    batch_ids = Counter(i.batch_id for i in items if i.batch_id)
    if batch_ids:
        lines.append("batch ids: " + ", ".join(f"{k} ({v})" for k, v in sorted(batch_ids.items())))

    def listing(title: str, rows: list[str]) -> None:
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines.extend(f"  {row}" for row in rows[:max_listed])
            if len(rows) > max_listed:
                lines.append(f"  ... and {len(rows) - max_listed} more (see dataset.jsonl)")

    listing("upscaled (smaller than their bucket)", scan.undersized)
    listing("skipped", [f"{rel}: {reason}" for rel, reason in scan.skipped])
    listing("warnings", scan.warnings)
    if problem := problem_summary(scan):
        lines.append(problem)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from data.discovery import require_usable, scan_dataset
    from utils.core.config_schema import ConfigError
    parser = argparse.ArgumentParser(prog="python -m data.report", description="Scan a training folder and "
                                     "print what the trainer would use.")
    parser.add_argument("data_root")
    parser.add_argument("--resolution", type=int, nargs="+", default=[512])
    parser.add_argument("--jsonl", help="also write dataset.jsonl here")
    args = parser.parse_args(argv)
    try:
        scan = scan_dataset(args.data_root, DataSettings(resolution=args.resolution), progress=True,
                            check_usable=False)
        print(summarize(scan))
        if args.jsonl:
            write_dataset_report(scan, Path(args.jsonl))
        require_usable(scan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
