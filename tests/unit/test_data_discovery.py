"""Walking data_root: file kinds, caption sources and precedence, folder files, masks, and bad files."""
import codecs
import os
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from data.discovery import scan_dataset
from data.items import DataSettings
from utils.core.config_schema import ConfigError

S512 = DataSettings(resolution=[512])


def img(path: Path, size=(64, 64), color=(200, 30, 30), mode="RGB", fmt=None, **save_kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, fmt, **save_kw)
    return path


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def by_path(scan):
    return {i.rel_path: i for i in scan.items}


# --- discovery ----------------------------------------------------------------------------------------

def test_recursive_extensions_case_insensitive_and_dot_entries_skipped(tmp_path):
    img(tmp_path / "A.JPG", fmt="JPEG")
    img(tmp_path / "b.Jpeg", fmt="JPEG")
    img(tmp_path / "c.png")
    img(tmp_path / "sub" / "deeper" / "d.webp", fmt="WEBP")
    img(tmp_path / "sub" / "e.bmp", fmt="BMP")
    img(tmp_path / "sub" / "f.jfif", fmt="JPEG")
    img(tmp_path / ".hidden.png")
    img(tmp_path / ".cache" / "g.png")
    img(tmp_path / "h-masklabel.png", mode="L", color=255)     # a mask without image: not a training image
    write(tmp_path / "notes.md", "# not an image")
    scan = scan_dataset(tmp_path, S512)
    assert sorted(by_path(scan)) == ["A.JPG", "b.Jpeg", "c.png", "sub/deeper/d.webp", "sub/e.bmp", "sub/f.jfif"]
    assert scan.skipped == []
    assert any("h-masklabel.png" in w and "mask without an image" in w for w in scan.warnings)


def test_scan_without_decode_reads_headers_only(tmp_path, monkeypatch):
    from PIL import WebPImagePlugin
    for k in range(5):
        exif = Image.Exif()
        exif[0x0112] = 6
        img(tmp_path / f"{k}.png", size=(64 + 64 * k, 64), exif=exif.tobytes())
        img(tmp_path / f"{k}.jpg", size=(64, 64 + 64 * k), fmt="JPEG", exif=exif.tobytes())
        img(tmp_path / f"{k}.webp", size=(64, 64 + 64 * k), fmt="WEBP", exif=exif.tobytes())
        img(tmp_path / f"{k}.bmp", size=(64, 64 + 64 * k), fmt="BMP")

    def no_decoding(self):
        raise AssertionError("the scan decoded pixel data")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", no_decoding)
    scan = scan_dataset(tmp_path, S512, decode=False)
    assert len(scan.items) == 20 and scan.skipped == []
    for item in scan.items:                          # EXIF orientation 6 was read from the headers alone
        suffix = item.rel_path.rsplit(".", 1)[1]
        assert {"png": item.width == 64, "jpg": item.height == 64, "webp": item.height == 64,
                "bmp": item.width == 64}[suffix]


def test_broken_symlink_and_unreadable_file_are_reported(tmp_path):
    img(tmp_path / "ok.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    locked = img(tmp_path / "locked.png")
    locked.chmod(0)
    try:
        readable = os.access(locked, os.R_OK)        # root can read anything
        scan = scan_dataset(tmp_path, S512)
    finally:
        locked.chmod(0o644)
    reasons = dict(scan.skipped)
    assert reasons["dangling.png"] == "broken symbolic link (its target does not exist)"
    if not readable:
        assert reasons["locked.png"] == "cannot read the file: permission denied"


def test_symlink_loops_and_dangling_links_are_reported_not_fatal(tmp_path):
    img(tmp_path / "ok.png")
    (tmp_path / "self").symlink_to("self")                  # a link to itself: stat() fails with ELOOP
    (tmp_path / "self.png").symlink_to("self.png")
    (tmp_path / "ping").symlink_to("pong")                  # two links pointing at each other
    (tmp_path / "pong").symlink_to("ping")
    img(tmp_path / "a" / "in_a.png")                        # two real folders linking to each other
    (tmp_path / "a" / "to_b").symlink_to("../b")
    img(tmp_path / "b" / "in_b.png")
    (tmp_path / "b" / "to_a").symlink_to("../a")
    (tmp_path / "gone").symlink_to("nowhere")               # dangling links of every kind
    (tmp_path / "gone.txt").symlink_to("nowhere.txt")
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    scan = scan_dataset(tmp_path, S512)
    assert sorted(by_path(scan)) == ["a/in_a.png", "a/to_b/in_b.png", "ok.png"]
    r = dict(scan.skipped)
    assert r["self.png"].startswith("symbolic link loop") and r["gone.png"].startswith("broken symbolic link")
    for name, reason in [("self", "symbolic link loop"), ("ping", "symbolic link loop"),
                         ("pong", "symbolic link loop"), ("gone", "broken symbolic link"),
                         ("gone.txt", "broken symbolic link")]:
        assert any(w.startswith(f"{name}: {reason}") for w in scan.warnings), (name, scan.warnings)
    assert any("already scanned (symlink loop?)" in w for w in scan.warnings)


def test_non_utf8_file_name_is_escaped_in_reports_and_decoded_for_its_caption(tmp_path):
    from data.report import summarize, write_dataset_report
    import json
    raw = os.fsencode(tmp_path)
    Image.new("RGB", (64, 64)).save(raw + b"/caf\xe9 au lait_1.png")        # Latin-1 / Windows-1252 bytes
    Image.new("RGB", (64, 64)).save(raw + b"/sidecar\xff.png")
    (Path(os.fsdecode(raw + b"/sidecar\xff.txt"))).write_text("from the sidecar")
    os.mkdir(raw + b"/dir\xfe")
    Image.new("RGB", (64, 64)).save(raw + b"/dir\xfe/x.png")
    (Path(os.fsdecode(raw + b"/dir\xfe/bad\x81\xff.png"))).write_bytes(b"")
    scan = scan_dataset(tmp_path, S512)
    items = by_path(scan)
    assert sorted(items) == ["caf\\xe9 au lait_1.png", "dir\\xfe/x.png", "sidecar\\xff.png"]
    cafe = items["caf\\xe9 au lait_1.png"]
    assert cafe.caption == "café au lait" and cafe.path.exists()
    assert any("not valid UTF-8" in n and "Windows-1252" in n for n in cafe.notes)
    assert items["sidecar\\xff.png"].caption == "from the sidecar" and not items["sidecar\\xff.png"].notes
    assert dict(scan.skipped) == {"dir\\xfe/bad\\x81\\xff.png": "empty file (0 bytes)"}
    out = tmp_path / "dataset.jsonl"
    write_dataset_report(scan, out)
    paths = [json.loads(line)["path"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(paths) == sorted([*items, "dir\\xfe/bad\\x81\\xff.png"])
    summarize(scan).encode("utf-8")                         # printable: no surrogate escapes left


@pytest.mark.parametrize("fmt, suffix", [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")])
def test_exif_orientation_5_to_8_swaps_width_and_height(tmp_path, fmt, suffix):
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        img(tmp_path / f"o{orientation}{suffix}", size=(128, 64), fmt=fmt, exif=exif.tobytes())
    sizes = {i.rel_path: (i.width, i.height) for i in scan_dataset(tmp_path, S512).items}
    assert sizes == {f"o1{suffix}": (128, 64), f"o3{suffix}": (128, 64), f"o6{suffix}": (64, 128),
                     f"o8{suffix}": (64, 128)}


# --- captions -----------------------------------------------------------------------------------------

def test_file_name_caption(tmp_path):
    img(tmp_path / "a photo of ted, smiling_(1).jpg", fmt="JPEG")
    item = scan_dataset(tmp_path, S512).items[0]
    assert (item.main_prompt, item.tags, item.caption) == ("a photo of ted", ["smiling"], "a photo of ted, smiling")


def test_txt_and_caption_sidecars(tmp_path):
    img(tmp_path / "one.png")
    write(tmp_path / "one.txt", "a red square, flat, simple\n")
    img(tmp_path / "two.png")
    write(tmp_path / "two.caption", "a blue square")
    items = by_path(scan_dataset(tmp_path, S512))
    assert items["one.png"].caption == "a red square, flat, simple"
    assert items["two.png"].caption == "a blue square"


def test_sidecar_yaml_with_weights_and_settings(tmp_path):
    img(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "main_prompt: a cat\ntags:\n  - tag: fluffy\n    weight: 2\n  - indoors\n"
                               "multiply: 3\nflip_p: 0.25\ncond_dropout: 0.5\nloss_scale: 2\nbatch_id: cats\n"
                               "shuffle_tags: true\nmax_caption_length: 50\nrating: 5\n")
    item = scan_dataset(tmp_path, S512).items[0]
    assert item.caption == "a cat, fluffy, indoors" and item.tag_weights == [2.0, 1.0]
    assert (item.multiply, item.flip_p, item.cond_dropout, item.loss_scale, item.batch_id, item.shuffle_tags,
            item.max_caption_length) == (3.0, 0.25, 0.5, 2.0, "cats", True, 50)


def test_yaml_caption_key_may_name_a_caption_file(tmp_path):
    img(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "caption: words.txt\n")
    write(tmp_path / "words.txt", "a caption from a file, tagged")
    assert scan_dataset(tmp_path, S512).items[0].caption == "a caption from a file, tagged"


def test_precedence_global_then_folder_files_then_local_then_sidecar(tmp_path):
    write(tmp_path / "global.yaml", "main_prompt: from global\ntags: [g]\nflip_p: 0.1\nloss_scale: 3\n"
                                    "multiply: 5\n")
    write(tmp_path / "sub" / "global.yml", "flip_p: 0.2\ntags: [g2]\n")
    write(tmp_path / "sub" / "multiply.txt", "2")
    write(tmp_path / "sub" / "local.yaml", "multiply: 4\ncond_dropout: 0.3\n")
    img(tmp_path / "root.png")
    img(tmp_path / "sub" / "plain.png")
    img(tmp_path / "sub" / "own.png")
    write(tmp_path / "sub" / "own.txt", "own prompt, own tag")
    img(tmp_path / "sub" / "deeper" / "inherits.png")
    items = by_path(scan_dataset(tmp_path, S512))
    root, plain, own, deep = (items[k] for k in ("root.png", "sub/plain.png", "sub/own.png",
                                                 "sub/deeper/inherits.png"))
    assert (root.caption, root.flip_p, root.multiply, root.loss_scale) == ("from global, g", 0.1, 5.0, 3.0)
    # sub: its global.yml wins over the root's, local.yaml over multiply.txt; folder files/local do not inherit
    assert (plain.caption, plain.flip_p, plain.multiply, plain.cond_dropout) == ("from global, g2, g", 0.2, 4.0, 0.3)
    assert own.caption == "own prompt, own tag, g2, g" and own.multiply == 4.0
    assert (deep.flip_p, deep.multiply, deep.cond_dropout) == (0.2, 5.0, 0.04)


def test_several_sidecars_merge_and_a_conflict_is_reported(tmp_path):
    img(tmp_path / "x.png")
    write(tmp_path / "x.yaml", "main_prompt: yaml prompt\ntags: [from yaml]\nflip_p: 0.5\n")
    write(tmp_path / "x.txt", "text prompt, from text")
    scan = scan_dataset(tmp_path, S512)
    item = scan.items[0]
    assert item.caption == "text prompt, from text, from yaml" and item.flip_p == 0.5
    assert any("different main prompts" in n for n in item.notes)


def test_global_yaml_tags_apply_to_file_name_captions(tmp_path):
    write(tmp_path / "global.yaml", "tags: [by artist]\n")
    img(tmp_path / "a dog_(3).png")
    assert scan_dataset(tmp_path, S512).items[0].caption == "a dog, by artist"


def test_caption_encodings(tmp_path):
    for name, data in [("bom", codecs.BOM_UTF8 + "café, crème".encode()),
                       ("cp1252", "naïve – test".encode("cp1252")),
                       ("utf16", codecs.BOM_UTF16_LE + "über".encode("utf-16-le"))]:
        img(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(data)
    items = by_path(scan_dataset(tmp_path, S512))
    assert items["bom.png"].caption == "café, crème"
    assert items["cp1252.png"].caption == "naïve – test"
    assert items["utf16.png"].caption == "über"


# --- folder files and train.json globals ----------------------------------------------------------------

def test_folder_files_apply_to_their_folder_only(tmp_path):
    sub = tmp_path / "sub"
    for name, text in [("multiply.txt", "1.5"), ("batch_id.txt", "set a"), ("cond_dropout.txt", "0.2"),
                       ("flip_p.txt", "0.7"), ("loss_scale.txt", "0.5"), ("shuffle_tags.txt", "")]:
        write(sub / name, text)
    img(sub / "in.png")
    img(sub / "child" / "below.png")
    items = by_path(scan_dataset(tmp_path, DataSettings(resolution=[512], flip_p=0.1, cond_dropout=0.05)))
    inside, below = items["sub/in.png"], items["sub/child/below.png"]
    assert (inside.multiply, inside.batch_id, inside.cond_dropout, inside.flip_p, inside.loss_scale,
            inside.shuffle_tags) == (1.5, "set a", 0.2, 0.7, 0.5, True)
    assert (below.multiply, below.batch_id, below.cond_dropout, below.flip_p, below.loss_scale,
            below.shuffle_tags) == (1.0, "", 0.05, 0.1, 1.0, False)


def test_train_json_flip_p_and_cond_dropout_apply_when_nothing_overrides(tmp_path):
    # EveryDream2 D5: the global flip_p never reached the images
    img(tmp_path / "a.png")
    settings = DataSettings(resolution=[512], flip_p=0.5, cond_dropout=0.1, shuffle_tags=True, keep_tags=2,
                            crop_jitter=0.01)
    item = scan_dataset(tmp_path, settings).items[0]
    assert (item.flip_p, item.cond_dropout, item.shuffle_tags, item.keep_tags, item.crop_jitter) == \
        (0.5, 0.1, True, 2, 0.01)


def test_bad_folder_file_is_reported_and_ignored(tmp_path):
    write(tmp_path / "multiply.txt", "twice")
    img(tmp_path / "a.png")
    scan = scan_dataset(tmp_path, S512)
    assert scan.items[0].multiply == 1.0
    assert any(w.startswith("multiply.txt: expected one number") for w in scan.warnings)


def test_unknown_yaml_key_reported_rest_used(tmp_path):
    write(tmp_path / "local.yaml", "cond_droput: 0.5\nflip_p: 0.3\n")
    img(tmp_path / "a.png")
    scan = scan_dataset(tmp_path, S512)
    assert scan.items[0].flip_p == 0.3 and scan.items[0].cond_dropout == 0.04
    assert "local.yaml: unknown key 'cond_droput' (did you mean cond_dropout?); ignored" in scan.warnings


def test_weights_without_shuffling_are_reported(tmp_path):
    img(tmp_path / "a.png")
    write(tmp_path / "a.yaml", "main_prompt: m\ntags: [{tag: x, weight: 2}, y]\n")
    assert any("weights only act when shuffle_tags is on" in w for w in scan_dataset(tmp_path, S512).warnings)


# --- masks ---------------------------------------------------------------------------------------------

def test_mask_is_attached_to_its_image(tmp_path):
    img(tmp_path / "cat.png")
    img(tmp_path / "cat-masklabel.png", mode="L", color=255)
    img(tmp_path / "dog.jpg", fmt="JPEG")
    items = by_path(scan_dataset(tmp_path, S512))
    assert items["cat.png"].mask_path == tmp_path.resolve() / "cat-masklabel.png"
    assert items["dog.jpg"].mask_path is None and len(items) == 2


def test_unreadable_or_mismatched_mask_is_reported(tmp_path):
    img(tmp_path / "a.png")
    write(tmp_path / "a-masklabel.png", "not a png")
    img(tmp_path / "b.png", size=(64, 64))
    img(tmp_path / "b-masklabel.png", size=(32, 32), mode="L", color=255)
    scan = scan_dataset(tmp_path, S512)
    items = by_path(scan)
    assert items["a.png"].mask_path is None and "trains without a mask" in items["a.png"].notes[0]
    assert items["b.png"].mask_path is not None and "stretched" in items["b.png"].notes[0]
    assert any(w.startswith("a.png: mask a-masklabel.png") for w in scan.warnings)


# --- buckets and undersized -------------------------------------------------------------------------------

def test_bucket_at_base_resolution_and_undersized_at_any_resolution(tmp_path):
    img(tmp_path / "big.png", size=(1024, 683))
    img(tmp_path / "small.png", size=(300, 300))
    img(tmp_path / "mid.png", size=(540, 540))          # fits 512, upscaled for 576
    scan = scan_dataset(tmp_path, DataSettings(resolution=[512, 576]))
    items = by_path(scan)
    assert items["big.png"].bucket == (640, 384) and items["small.png"].bucket == (512, 512)
    assert sorted(scan.undersized) == ["mid.png", "small.png"]


# --- bad files --------------------------------------------------------------------------------------------

def reasons(scan):
    return dict(scan.skipped)


def test_bad_image_files_are_skipped_with_reasons(tmp_path):
    img(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    write(tmp_path / "text.png", "this is not an image")
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "header_cut.png").write_bytes(good[:20])
    img(tmp_path / "anim.gif", fmt="GIF")
    scan = scan_dataset(tmp_path, S512)
    assert [i.rel_path for i in scan.items] == ["good.png"]
    r = reasons(scan)
    assert r["empty.jpg"] == "empty file (0 bytes)"
    assert "not an image PIL can read" in r["text.png"]
    assert "header_cut.png" in r
    assert "unsupported image format '.gif'" in r["anim.gif"]


def cut(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


def noisy(path: Path, size=(256, 256), fmt=None) -> Path:
    """An image that compresses badly, so cutting its file cuts pixel data, not just trailing metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3)).save(path, fmt)
    return path


def bad_pixel_data(folder: Path) -> list[str]:
    """Files whose header reads fine but whose pixel data does not decode."""
    cut(noisy(folder / "cut.jpg", fmt="JPEG"))
    cut(noisy(folder / "cut.png"))
    cut(noisy(folder / "cut.webp", fmt="WEBP"))               # PIL's WebP decoder fails already in the header
    cut(noisy(folder / "cut.bmp", fmt="BMP"))
    png = noisy(folder / "crc.png").read_bytes()              # one flipped byte inside the compressed data
    (folder / "crc.png").write_bytes(png[:1000] + bytes([png[1000] ^ 0xFF]) + png[1001:])
    return ["crc.png", "cut.bmp", "cut.jpg", "cut.png"]


def test_corrupt_pixel_data_is_skipped_by_the_scan_with_the_loaders_verdict(tmp_path):
    from data.dataset import BatchDataset, BatchPlan
    img(tmp_path / "good.jpg", fmt="JPEG")
    bad = bad_pixel_data(tmp_path)
    headers_only = scan_dataset(tmp_path, S512, decode=False)      # what the loader would meet
    assert len(headers_only.items) == 5 and list(reasons(headers_only)) == ["cut.webp"]
    good = next(k for k, i in enumerate(headers_only.items) if i.rel_path == "good.jpg")
    loader = {}                                                     # the loader's reasons, image by image
    for k, item in enumerate(headers_only.items):
        batch = BatchDataset(headers_only.items, [BatchPlan([good, k], (512, 512), 0)], seed=0, epoch=0)[0]
        loader.update(batch["skipped"])
    scan = scan_dataset(tmp_path, S512)
    assert [i.rel_path for i in scan.items] == ["good.jpg"]
    assert {k: v for k, v in reasons(scan).items() if k != "cut.webp"} == loader and sorted(loader) == bad
    assert all(r.startswith("corrupt or truncated image data") for r in loader.values())


def test_the_full_decode_uses_the_loaders_function_in_threads(tmp_path, monkeypatch):
    import threading
    import data.transforms as transforms
    for k in range(6):
        img(tmp_path / f"{k}.png")
    seen, original = [], transforms.load_rgb

    def spy(path, cover=None):
        seen.append((Path(path).name, cover, threading.current_thread() is threading.main_thread()))
        return original(path, cover)
    monkeypatch.setattr(transforms, "load_rgb", spy)
    assert len(scan_dataset(tmp_path, S512).items) == 6
    assert sorted(seen) == [(f"{k}.png", (512, 512), False) for k in range(6)]


def test_a_mask_with_corrupt_pixel_data_is_dropped_at_scan_time(tmp_path):
    img(tmp_path / "a.png")
    noisy(tmp_path / "a-masklabel.png", size=(64, 64))
    cut(tmp_path / "a-masklabel.png")
    scan = scan_dataset(tmp_path, S512)
    item = scan.items[0]
    assert item.mask_path is None
    assert any(w.startswith("a.png: mask a-masklabel.png: corrupt or truncated") and "without a mask" in w
               for w in scan.warnings)


def test_the_full_decode_leaves_the_warning_filters_as_they_were(tmp_path, monkeypatch):
    """Two threads inside the reader at once, the first leaving first: with warnings.catch_warnings() the second's
    exit would put back the filter list it saw on entry, one with the first's filter in it, for good."""
    import threading
    import time
    import warnings
    import data.discovery as discovery
    from PIL import ImageFile
    for k in range(2):
        img(tmp_path / f"{k}.png")
    monkeypatch.setattr(discovery, "DECODE_THREADS", 2)
    both_inside, arrivals, original = threading.Barrier(2, timeout=10), [], ImageFile.ImageFile.load

    def overlapping_load(self):
        arrivals.append(threading.get_ident())
        both_inside.wait()
        if arrivals[-1] == threading.get_ident():
            time.sleep(0.2)                     # the later arrival leaves later
        return original(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", overlapping_load)
    before = list(warnings.filters)
    scan_dataset(tmp_path, S512)
    assert warnings.filters == before


def test_decompression_bombs_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    img(tmp_path / "over_2x.png", size=(50, 50))       # 2500 > 2 * limit: PIL's error
    img(tmp_path / "over_1x.png", size=(40, 30))       # 1200 > limit: PIL's warning, also refused
    img(tmp_path / "ok.png", size=(20, 20))
    scan = scan_dataset(tmp_path, S512)
    assert [i.rel_path for i in scan.items] == ["ok.png"]
    for name in ("over_2x.png", "over_1x.png"):
        assert "decompression bomb" in reasons(scan)[name]


def test_undecodable_caption_falls_back_to_the_file_name(tmp_path):
    img(tmp_path / "a blue dog_(1).png")
    (tmp_path / "a blue dog_(1).txt").write_bytes(b"\x00\x01\x02binary\xff\xfe")
    scan = scan_dataset(tmp_path, S512)
    item = scan.items[0]
    assert item.caption == "a blue dog"
    assert "caption taken from the file name" in item.notes[0]
    assert any(w.startswith("a blue dog_(1).png: a blue dog_(1).txt: not a text file") for w in scan.warnings)


def test_broken_yaml_sidecar_falls_back_and_broken_global_is_ignored(tmp_path):
    write(tmp_path / "global.yaml", "tags: [unclosed\n")
    img(tmp_path / "a cat.png")
    write(tmp_path / "a cat.yaml", "main_prompt: x\n  bad: indent\n")
    scan = scan_dataset(tmp_path, S512)
    assert scan.items[0].caption == "a cat"
    assert any(w.startswith("global.yaml: broken yaml at line") for w in scan.warnings)
    assert any("a cat.yaml: broken yaml at line 2" in n for n in scan.items[0].notes)


def test_yaml_caption_file_missing_is_reported(tmp_path):
    img(tmp_path / "a.png")
    write(tmp_path / "a.yaml", "caption: missing.txt\n")
    scan = scan_dataset(tmp_path, S512)
    assert scan.items[0].caption == "a" and "not found" in scan.items[0].notes[0]


def test_empty_caption_is_reported(tmp_path):
    img(tmp_path / "_1.png")
    item = scan_dataset(tmp_path, S512).items[0]
    assert item.caption == "" and "empty caption" in item.notes[0]


# --- fatal problems -------------------------------------------------------------------------------------------

def test_missing_data_root(tmp_path):
    with pytest.raises(ConfigError, match=f"data_root not found: {tmp_path / 'nope'}"):
        scan_dataset(tmp_path / "nope", S512)


def test_data_root_is_a_file(tmp_path):
    f = img(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="data_root is not a folder"):
        scan_dataset(f, S512)


def test_no_usable_images(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no usable images in data_root .*empty.png: empty file"):
        scan_dataset(tmp_path, S512)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ConfigError, match="no usable images in data_root .*nothing"):
        scan_dataset(tmp_path / "nothing", S512)


def test_all_multipliers_zero(tmp_path):
    img(tmp_path / "a.png")
    write(tmp_path / "multiply.txt", "0")
    with pytest.raises(ConfigError, match="multipliers"):
        scan_dataset(tmp_path, S512)


@pytest.mark.parametrize("settings, key", [
    (DataSettings(resolution=[500]), "resolution"), (DataSettings(resolution=[]), "resolution"),
    (DataSettings(resolution=[512], flip_p=2.0), "flip_p"), (DataSettings(resolution=[512], keep_tags=-1), "keep_tags"),
    (DataSettings(resolution=[512], crop_jitter=0.5), "crop_jitter"),
])
def test_bad_settings_are_config_errors(tmp_path, settings, key):
    with pytest.raises(ConfigError, match=key):
        scan_dataset(tmp_path, settings)


def test_int_resolution_is_accepted():
    assert DataSettings(resolution=512).resolution == [512]
