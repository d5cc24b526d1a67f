import torch

from utils.sd.text_conditioning import Conditioning, PromptCache


def fake_encoder(calls, pooled: bool = False):
    def encode(captions):
        calls.append(list(captions))
        hidden = torch.stack([torch.full((3, 2), float(len(c))) for c in captions])
        return Conditioning(hidden, torch.stack([torch.full((5,), -float(len(c))) for c in captions])
                            if pooled else None)
    return encode


def test_each_distinct_caption_is_encoded_once():
    calls, cache = [], PromptCache()
    first = cache.lookup(["a", "bb", "a"], fake_encoder(calls))
    second = cache.lookup(["bb", "ccc"], fake_encoder(calls))
    assert calls == [["a", "bb"], ["ccc"]]
    assert first.hidden[:, 0, 0].tolist() == [1, 2, 1] and second.hidden[:, 0, 0].tolist() == [2, 3]
    assert first.pooled is None
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
    assert out.hidden.shape == (3, 3, 2)


def test_the_pooled_part_is_cached_with_its_caption():
    """SDXL: the pooled embedding comes back in the captions' order, as the hidden states do."""
    calls, cache = [], PromptCache()
    cache.lookup(["a", "bb"], fake_encoder(calls, pooled=True))
    out = cache.lookup(["bb", "a", "ccc"], fake_encoder(calls, pooled=True))
    assert calls == [["a", "bb"], ["ccc"]]
    assert out.pooled[:, 0].tolist() == [-2, -1, -3] and out.hidden[:, 0, 0].tolist() == [2, 1, 3]
    assert cache.bytes == 3 * (3 * 2 + 5) * 4
