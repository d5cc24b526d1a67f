"""dataset.jsonl, the summary text, the `python -m data.report` command, and the shipped quickstart data."""
import importlib.util
import json
from pathlib import Path

from PIL import Image

from data.dataset import DataSettings, epoch_batches, scan_dataset, summarize, write_dataset_report
from data.report import main as report_main
from data.report import problem_summary

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart_data"


def img(path: Path, size=(64, 64), mode="RGB", color=(1, 2, 3)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def small_dataset(tmp_path):
    img(tmp_path / "a cat_(1).png", (640, 384))
    img(tmp_path / "a cat_(1)-masklabel.png", (640, 384), "L", 255)
    img(tmp_path / "sub" / "tiny.png", (100, 100))
    (tmp_path / "sub" / "multiply.txt").write_text("2")
    (tmp_path / "sub" / "batch_id.txt").write_text("group")
    (tmp_path / "broken.jpg").write_bytes(b"")
    return scan_dataset(tmp_path, DataSettings(resolution=[512], flip_p=0.5))


def test_dataset_jsonl_has_one_line_per_image_including_skipped(tmp_path):
    scan = small_dataset(tmp_path / "data")
    out = tmp_path / "dataset.jsonl"
    write_dataset_report(scan, out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == {"a cat_(1).png", "sub/tiny.png", "broken.jpg"}
    cat = by_path["a cat_(1).png"]
    assert (cat["caption"], cat["bucket"], cat["multiply"], cat["batch_id"], cat["flip_p"], cat["cond_dropout"],
            cat["loss_scale"], cat["mask"], cat["skipped"]) == \
        ("a cat", [640, 384], 1.0, "", 0.5, 0.04, 1.0, True, None)
    tiny = by_path["sub/tiny.png"]
    assert (tiny["multiply"], tiny["batch_id"], tiny["mask"], tiny["undersized"]) == (2.0, "group", False, True)
    assert by_path["broken.jpg"]["skipped"] == "empty file (0 bytes)" and by_path["broken.jpg"]["caption"] is None


def test_summary_lists_counts_buckets_undersized_and_skipped(tmp_path):
    scan = small_dataset(tmp_path)
    text = summarize(scan)
    assert "images: 2 usable, 1 skipped; 3 per epoch after multipliers; 1 with masks" in text
    assert "  640 x 384        1" in text and "  512 x 512        1" in text
    assert "upscaled (smaller than their bucket) (1):\n  sub/tiny.png" in text
    assert "skipped (1):\n  broken.jpg: empty file (0 bytes)" in text
    assert "batch ids: group (1)" in text
    assert text.splitlines()[-1] == problem_summary(scan)
    assert problem_summary(scan).startswith("data warning: 1 file(s) skipped")


def test_summary_of_a_clean_dataset_has_no_warning_line(tmp_path):
    img(tmp_path / "a.png", (512, 512))
    scan = scan_dataset(tmp_path, DataSettings(resolution=[512]))
    assert problem_summary(scan) == "" and "data warning" not in summarize(scan)


def test_long_listings_are_cut(tmp_path):
    for k in range(30):
        img(tmp_path / f"{k}.png", (64, 64))
    text = summarize(scan_dataset(tmp_path, DataSettings(resolution=[512])), max_listed=5)
    assert "... and 25 more (see dataset.jsonl)" in text


def test_report_command(tmp_path, capsys):
    img(tmp_path / "a.png")
    assert report_main([str(tmp_path), "--resolution", "64", "--jsonl", str(tmp_path / "d.jsonl")]) == 0
    assert "images: 1 usable" in capsys.readouterr().out and (tmp_path / "d.jsonl").exists()
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "data_root not found" in capsys.readouterr().err


# --- the shipped quickstart data --------------------------------------------------------------------------------

def test_quickstart_data_scans_cleanly_at_resolution_64():
    scan = scan_dataset(QUICKSTART, DataSettings(resolution=[64]))
    items = {i.rel_path: i for i in scan.items}
    assert 30 <= len(items) <= 40 and scan.skipped == [] and scan.warnings == []
    assert sum(p.stat().st_size for p in QUICKSTART.rglob("*") if p.is_file()) < 300_000
    assert {i.bucket for i in scan.items} == {(64, 64)}
    aspects = {round(i.width / i.height, 2) for i in scan.items}
    assert {1.0, 1.5, 0.67, 2.0, 0.5} <= aspects
    assert {p.suffix for p in QUICKSTART.iterdir() if p.is_file()} >= {".png", ".jpg", ".txt"}
    assert sum(i.mask_path is not None for i in scan.items) == 1
    assert any(path.endswith("_(1).jpg") or path.endswith("_(1).png") for path in items)
    assert all("_(" not in i.caption for i in scan.items)
    striped = [i for i in scan.items if i.rel_path.startswith("striped/")]
    assert striped and all(i.multiply == 2.0 and i.flip_p == 0.5 and i.tags[-1] == "striped background"
                           for i in striped)
    sidecar = items["shape_00.png"]
    assert sidecar.caption.endswith("background, flat colours, simple")
    plans = epoch_batches(scan.items, batch_size=4, seed=555, epoch=0, resolutions=[64])
    assert sum(len(p.indices) for p in plans) == len(items) + len(striped)


def test_quickstart_generator_is_deterministic_and_matches_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_quickstart_data", ROOT / "examples" / "make_quickstart_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate(tmp_path / "q")
    fresh = {p.relative_to(tmp_path / "q").as_posix(): p for p in (tmp_path / "q").rglob("*") if p.is_file()}
    shipped = {p.relative_to(QUICKSTART).as_posix(): p for p in QUICKSTART.rglob("*") if p.is_file()}
    assert sorted(fresh) == sorted(shipped)
    for name, path in fresh.items():
        if path.suffix in (".txt", ".yaml"):
            assert path.read_bytes() == shipped[name].read_bytes()
        else:   # compare decoded images: encoders may differ in bytes between Pillow builds
            with Image.open(path) as a, Image.open(shipped[name]) as b:
                assert a.size == b.size and a.mode == b.mode
                if path.suffix == ".png":
                    assert a.tobytes() == b.tobytes()
