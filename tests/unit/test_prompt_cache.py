import torch

from utils.sd.text_conditioning import PromptCache


def fake_encoder(calls):
    def encode(captions):
        calls.append(list(captions))
        return torch.stack([torch.full((3, 2), float(len(c))) for c in captions])
    return encode


def test_each_distinct_caption_is_encoded_once():
    calls, cache = [], PromptCache()
    first = cache.lookup(["a", "bb", "a"], fake_encoder(calls))
    second = cache.lookup(["bb", "ccc"], fake_encoder(calls))
    assert calls == [["a", "bb"], ["ccc"]]
    assert first[:, 0, 0].tolist() == [1, 2, 1] and second[:, 0, 0].tolist() == [2, 3]
    assert (cache.hits, cache.misses) == (2, 3)


def test_least_recently_used_entries_go_past_the_budget():
    calls = []
    entry_bytes = 3 * 2 * 4
    cache = PromptCache(max_bytes=2 * entry_bytes)
    cache.lookup(["a"], fake_encoder(calls))
    cache.lookup(["b"], fake_encoder(calls))
    cache.lookup(["a"], fake_encoder(calls))       # a is now the most recent
    cache.lookup(["c"], fake_encoder(calls))       # evicts b
    assert list(cache.entries) == ["a", "c"] and cache.bytes == 2 * entry_bytes
    cache.lookup(["b"], fake_encoder(calls))
    assert calls[-1] == ["b"]


def test_a_batch_larger_than_the_budget_is_still_returned_whole():
    cache = PromptCache(max_bytes=1)
    out = cache.lookup(["a", "b", "c"], fake_encoder([]))
    assert out.shape == (3, 3, 2)
