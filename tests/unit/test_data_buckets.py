"""Bucket tables and nearest-aspect assignment."""
from pathlib import Path

import pytest

from data.buckets import bucket_table, is_undersized, nearest_bucket, nearest_in_table, table_markdown
from utils.core.config_schema import ConfigError

ALL_RESOLUTIONS = list(range(64, 2048 + 1, 64))


@pytest.mark.parametrize("resolution", ALL_RESOLUTIONS)
def test_every_table_obeys_the_rules(resolution):
    # EveryDream2 D11: hand-typed tables had 576x640 in the 320 table, 1408x1344 in 1280, 1680 (not /64) in 960
    table = bucket_table(resolution)
    budget = resolution * resolution
    assert (resolution, resolution) in table
    assert len(set(table)) == len(table)
    for w, h in table:
        assert w % 64 == 0 and h % 64 == 0 and w >= 64 and h >= 64
        assert w * h <= budget                        # never more pixels than the square
        assert max(w, h) <= 4 * min(w, h)             # at most 4:1 both ways
        assert (h, w) in table                        # symmetric
        assert w * h >= 0.5 * budget                  # "about" the budget: the floor loses less than one row of 64
    aspects = [w / h for w, h in table]
    assert aspects == sorted(aspects)


def test_the_512_table():
    assert bucket_table(512) == (
        (256, 1024), (256, 960), (256, 896), (256, 832), (320, 768), (320, 704), (384, 640), (448, 576),
        (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
        (1024, 256))


def test_the_768_table_spans_4_to_1():
    table = bucket_table(768)
    assert len(table) == 25 and table[0] == (384, 1536) and table[-1] == (1536, 384)


def test_small_tables_for_tiny_models():
    assert bucket_table(64) == ((64, 64),)
    assert bucket_table(128) == ((64, 256), (64, 192), (128, 128), (192, 64), (256, 64))


def test_upper_region_buckets_are_near_the_budget():
    # for wide buckets at big resolutions the pixel loss from flooring is small
    for w, h in bucket_table(1024):
        assert w * h >= 0.85 * 1024 * 1024


@pytest.mark.parametrize("bad", [0, 100, 500, -64, 32, 512.0, True])
def test_bad_resolution_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="multiple of 64"):
        bucket_table(bad)


@pytest.mark.parametrize("size, resolution, bucket", [
    ((512, 512), 512, (512, 512)),
    ((1000, 1000), 512, (512, 512)),
    ((4000, 3000), 512, (576, 448)),      # 4:3
    ((3000, 2000), 512, (640, 384)),      # 3:2
    ((1920, 1080), 512, (640, 384)),      # 16:9
    ((1080, 1920), 512, (384, 640)),
    ((1024, 512), 512, (704, 320)),       # 2:1 -> 2.2:1 is nearer (log scale) than 5:3
    ((5000, 500), 512, (1024, 256)),      # 10:1 -> the widest
    ((96, 48), 64, (64, 64)),
    ((96, 48), 128, (192, 64)),
])
def test_nearest_bucket(size, resolution, bucket):
    assert nearest_bucket(*size, resolution) == bucket


def test_nearest_bucket_compares_aspect_on_a_log_scale():
    # 2:1 and 1:2 are equally far from square; transposed images get transposed buckets at every resolution
    for res in (256, 512, 768, 1024):
        for w, h in [(1200, 900), (1500, 700), (1000, 333), (901, 899)]:
            bw, bh = nearest_bucket(w, h, res)
            assert nearest_bucket(h, w, res) == (bh, bw)


def test_ties_go_to_the_bucket_with_more_pixels():
    # 1:2 is exactly as far from 1:1 as from 1:4 on a log scale
    assert nearest_in_table(100, 200, ((64, 64), (64, 256))) == (64, 256)
    assert nearest_in_table(100, 200, ((128, 128), (64, 256))) == (64, 256)   # equal pixels: the narrower


def test_undersized():
    assert is_undersized(500, 800, (512, 512))
    assert not is_undersized(512, 600, (512, 512))
    assert is_undersized(96, 48, (64, 64))


def test_table_markdown_lists_every_bucket():
    text = table_markdown(512)
    assert text.count("\n") == 1 + len(bucket_table(512)) and "512 x 512" in text


def test_doc_tables_match_the_code():
    doc = (Path(__file__).resolve().parents[2] / "doc" / "DATA.md").read_text(encoding="utf-8")
    for resolution in (512, 768):
        assert f"### Resolution {resolution} ({len(bucket_table(resolution))} buckets)\n\n" \
               f"{table_markdown(resolution)}\n" in doc
    counts = ", ".join(f"{r}: {len(bucket_table(r))}" for r in (64, 128, 256, 384, 512, 576, 640, 768, 1024, 1536))
    assert f"Table sizes: {counts} buckets." in " ".join(doc.split())
