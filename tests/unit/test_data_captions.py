"""Caption parsing, config layers and per-load caption assembly (pure functions, no files)."""
import codecs
import random
from collections import Counter

import pytest

from data.captions import (CaptionFileError, Layer, caption_from_filename, decode_text, join_caption,
                           layer_from_folder_file, layer_from_text_caption, layer_from_yaml, merge_layers,
                           resolve_caption, split_caption, training_caption, weighted_draw)


# --- text and file-name captions -------------------------------------------------------------------------

def test_text_caption_first_chunk_is_main_prompt_rest_are_tags():
    assert split_caption("a photo of ted, smiling,  red hat ,") == ("a photo of ted", ["smiling", "red hat"])


def test_text_caption_line_breaks_count_as_spaces():
    assert split_caption("a photo\nof ted,\r\n smiling\n") == ("a photo of ted", ["smiling"])


@pytest.mark.parametrize("stem, expected", [
    ("a photo of ted, smiling_(1)", ("a photo of ted", ["smiling"])),
    ("ted bennet_1", ("ted bennet", [])),
    ("john sitting on a bench_(2)", ("john sitting on a bench", [])),
    ("plain", ("plain", [])),
    ("_leading underscore", ("", [])),
])
def test_file_name_caption_cuts_at_first_underscore(stem, expected):
    assert caption_from_filename(stem) == expected


def test_join_caption_skips_an_empty_main_prompt():
    assert join_caption("a cat", ["b", "c"]) == "a cat, b, c"
    assert join_caption("", ["b"]) == "b"


# --- decoding -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, text, encoding", [
    ("café, crème".encode("utf-8"), "café, crème", "utf-8"),
    (codecs.BOM_UTF8 + "café".encode("utf-8"), "café", "utf-8-sig"),
    (codecs.BOM_UTF16_LE + "café".encode("utf-16-le"), "café", "utf-16"),
    ("café – “quoted”".encode("cp1252"), "café – “quoted”", "cp1252"),
    (b"caf\xe9 \x81", "caf\xe9 \x81", None),   # not cp1252 (0x81 undefined), so latin-1... which is a C1 control
])
def test_decode_text_fallbacks(raw, text, encoding):
    if encoding is None:
        with pytest.raises(CaptionFileError):
            decode_text(raw)
    else:
        assert decode_text(raw) == (text, encoding)


def test_decode_text_rejects_binary_content():
    with pytest.raises(CaptionFileError, match="not a text file"):
        decode_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")


# --- yaml layers ----------------------------------------------------------------------------------------

def test_yaml_keys_are_read():
    layer, warnings = layer_from_yaml({
        "main_prompt": "a dog", "tags": ["brown", {"tag": "park", "weight": 2}], "multiply": 1.5,
        "cond_dropout": 0.1, "flip_p": 0.5, "shuffle_tags": True, "batch_id": "dogs", "loss_scale": 0.5,
        "max_caption_length": 80, "rating": 3, "keep_tags": 1}, "x.yaml")
    assert warnings == []
    assert layer == Layer(main_prompt="a dog", tags=(("brown", 1.0), ("park", 2.0)), multiply=1.5,
                          cond_dropout=0.1, flip_p=0.5, shuffle_tags=True, keep_tags=1, batch_id="dogs",
                          loss_scale=0.5, max_caption_length=80, rating=3.0)


def test_unknown_yaml_key_is_reported_with_a_suggestion_and_the_rest_is_used():
    # EveryDream2 D12: its own docs spell cond_droput, and the value was silently ignored
    layer, warnings = layer_from_yaml({"cond_droput": 0.2, "flip_p": 0.5}, "folder/local.yaml")
    assert layer.flip_p == 0.5 and layer.cond_dropout is None
    assert warnings == ["folder/local.yaml: unknown key 'cond_droput' (did you mean cond_dropout?); ignored"]


def test_main_prompt_list_uses_the_first_and_warns():
    layer, warnings = layer_from_yaml({"main_prompt": ["first", "second"]}, "a.yaml")
    assert layer.main_prompt == "first"
    assert len(warnings) == 1 and "only the first" in warnings[0]


@pytest.mark.parametrize("data, key", [
    ({"flip_p": 1.5}, "flip_p"), ({"cond_dropout": "high"}, "cond_dropout"), ({"multiply": -1}, "multiply"),
    ({"shuffle_tags": "yes"}, "shuffle_tags"), ({"max_caption_length": 0}, "max_caption_length"),
    ({"tags": 5}, "tags"), ({"loss_scale": True}, "loss_scale"), ({"batch_id": [1]}, "batch_id"),
])
def test_bad_yaml_values_are_ignored_with_a_warning(data, key):
    layer, warnings = layer_from_yaml(data, "a.yaml")
    assert len(warnings) == 1 and key in warnings[0]
    assert getattr(layer, key, None) in (None, ())


def test_yaml_that_is_not_a_mapping_is_reported():
    layer, warnings = layer_from_yaml(["a", "b"], "a.yaml")
    assert layer == Layer() and "mapping" in warnings[0]


def test_yaml_caption_text_gives_main_prompt_and_tags_and_explicit_keys_win():
    layer, _ = layer_from_yaml({"caption": "a cat, sleeping", "tags": ["indoors"]}, "a.yaml")
    assert layer.main_prompt == "a cat" and [t for t, _ in layer.tags] == ["indoors", "sleeping"]
    layer, _ = layer_from_yaml({"caption": "a cat, sleeping", "main_prompt": "a kitten"}, "a.yaml")
    assert layer.main_prompt == "a kitten"
    layer, _ = layer_from_yaml({"caption": "ignored.txt"}, "a.yaml", caption_text="from file, tag")
    assert layer.main_prompt == "from file"


def test_bad_tag_weight_falls_back_to_one():
    layer, warnings = layer_from_yaml({"tags": [{"tag": "x", "weight": -2}, {"tag": "y", "wieght": 2}]}, "a.yaml")
    assert layer.tags == (("x", 1.0), ("y", 1.0)) and len(warnings) == 2


def test_merge_layers_later_scalars_win_and_tags_union_specific_first():
    general = Layer(main_prompt="g", tags=(("style", 1.0), ("shared", 1.0)), flip_p=0.1, multiply=2.0)
    specific = Layer(tags=(("own", 1.0), ("shared", 3.0)), flip_p=0.5)
    merged = merge_layers(general, specific)
    assert merged.main_prompt == "g" and merged.flip_p == 0.5 and merged.multiply == 2.0
    assert merged.tags == (("own", 1.0), ("shared", 3.0), ("style", 1.0))


def test_resolve_caption_file_name_only_without_main_prompt():
    assert resolve_caption(Layer(main_prompt="yaml prompt"), "a cat_(1)").main_prompt == "yaml prompt"
    parts = resolve_caption(Layer(tags=(("style", 2.0),)), "a cat, sitting_(1)")
    assert parts.from_filename and parts.main_prompt == "a cat"
    assert parts.tags == ["sitting", "style"] and parts.weights == [1.0, 2.0]


def test_text_sidecar_layer():
    assert layer_from_text_caption(" , only tags") == Layer(main_prompt=None, tags=(("only tags", 1.0),))


@pytest.mark.parametrize("name, text, expected", [
    ("multiply.txt", "2.5\n", Layer(multiply=2.5)),
    ("batch_id.txt", " faces \n", Layer(batch_id="faces")),
    ("cond_dropout.txt", "0.1", Layer(cond_dropout=0.1)),
    ("flip_p.txt", "0.5", Layer(flip_p=0.5)),
    ("loss_scale.txt", "-0.5", Layer(loss_scale=-0.5)),
    ("shuffle_tags.txt", "", Layer(shuffle_tags=True)),
])
def test_folder_files(name, text, expected):
    assert layer_from_folder_file(name, text, name) == (expected, [])


@pytest.mark.parametrize("name, text", [("multiply.txt", "two"), ("flip_p.txt", "2"), ("multiply.txt", "-1"),
                                        ("batch_id.txt", "  "), ("loss_scale.txt", "nan")])
def test_bad_folder_files_are_ignored_with_a_warning(name, text):
    layer, warnings = layer_from_folder_file(name, text, f"sub/{name}")
    assert layer == Layer() and warnings[0].startswith(f"sub/{name}: ")


# --- per-load caption ---------------------------------------------------------------------------------------

TAGS = ["t1", "t2", "t3", "t4", "t5", "t6"]


def caption(rng, **kw):
    args = dict(shuffle=True, keep_tags=0, max_caption_length=2048, cond_dropout=0.0)
    args.update(kw)
    return training_caption("main", TAGS, [1.0] * len(TAGS), rng=rng, **args)


def test_no_shuffle_keeps_order():
    assert caption(random.Random(0), shuffle=False) == "main, t1, t2, t3, t4, t5, t6"


def test_shuffle_keeps_main_prompt_first_and_all_tags():
    seen = set()
    for seed in range(20):
        parts = caption(random.Random(seed)).split(", ")
        assert parts[0] == "main" and sorted(parts[1:]) == TAGS
        seen.add(tuple(parts))
    assert len(seen) > 10


def test_keep_tags_stay_in_place():
    # EveryDream2 D6: keep_tags was clamped to 0 and never had an effect
    for seed in range(20):
        parts = caption(random.Random(seed), keep_tags=2).split(", ")
        assert parts[:3] == ["main", "t1", "t2"] and sorted(parts[3:]) == TAGS[2:]


def test_shuffle_is_a_function_of_the_rng():
    assert caption(random.Random("1:2:3")) == caption(random.Random("1:2:3"))


def test_cond_dropout_gives_the_empty_caption_at_the_right_rate():
    empty = sum(caption(random.Random(s), cond_dropout=0.25) == "" for s in range(2000))
    assert 400 < empty < 600
    assert all(caption(random.Random(s), cond_dropout=1.0) == "" for s in range(10))


def test_weighted_shuffle_prefers_heavy_tags_and_respects_max_length():
    tags, weights = ["heavy", "light1", "light2"], [10.0, 1.0, 1.0]
    firsts = Counter(training_caption("m", tags, weights, shuffle=True, keep_tags=0, max_caption_length=2048,
                                      cond_dropout=0.0, rng=random.Random(s)).split(", ")[1] for s in range(600))
    assert firsts["heavy"] > 400
    short = training_caption("m", tags, weights, shuffle=True, keep_tags=0, max_caption_length=len("m, heavy"),
                             cond_dropout=0.0, rng=random.Random(1))
    assert len(short) <= len("m, heavy")


def test_weighted_draw_without_replacement_skips_zero_weights():
    drawn = weighted_draw(["a", "b", "zero"], [1.0, 1.0, 0.0], 0, 100, random.Random(3))
    assert sorted(drawn) == ["a", "b"]


def test_weighted_shuffle_keeps_kept_tags_first():
    out = training_caption("m", ["k", "x", "y"], [1.0, 5.0, 1.0], shuffle=True, keep_tags=1,
                           max_caption_length=2048, cond_dropout=0.0, rng=random.Random(0))
    assert out.startswith("m, k, ")
