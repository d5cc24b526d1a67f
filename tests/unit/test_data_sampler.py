"""Epoch plans: multipliers, batching rules, runts, DDP split, multi-resolution, schedule file."""
import random
from collections import Counter
from pathlib import Path

import pytest

from data.buckets import nearest_bucket
from data.items import ImageItem
from data.sampler import BatchPlan, epoch_batches, epoch_picks, schedule_filename, write_schedule


def item(i, w=512, h=512, multiply=1.0, batch_id=""):
    return ImageItem(path=Path(f"/d/{i}.png"), rel_path=f"{i}.png", width=w, height=h, main_prompt=str(i),
                     multiply=multiply, batch_id=batch_id)


def mixed_items(n=40):
    sizes = [(512, 512), (768, 512), (512, 768), (1024, 512), (600, 600)]
    return [item(i, *sizes[i % len(sizes)]) for i in range(n)]


# --- multipliers ------------------------------------------------------------------------------------------

def test_whole_multipliers_are_exact():
    picks = Counter(epoch_picks([1.0, 2.0, 0.0, 3.0], random.Random(0)))
    assert picks == {0: 1, 1: 2, 3: 3}


def test_fractional_multipliers_give_floor_of_the_sum_each_epoch():
    multipliers = [2.5] * 100 + [0.3] * 10
    for epoch in range(20):
        picks = Counter(epoch_picks(multipliers, random.Random(epoch)))
        assert sum(picks.values()) == int(sum(multipliers))                 # 253
        assert all(picks[i] in (2, 3) for i in range(100))                  # whole part guaranteed, never 2 extra
        assert all(picks[i] in (0, 1) for i in range(100, 110))


def test_fractional_picks_follow_the_fractions_over_many_epochs():
    multipliers = [0.25, 0.75, 0.5, 0.5]          # sum 2: two picks per epoch
    counts = Counter()
    for epoch in range(4000):
        counts.update(epoch_picks(multipliers, random.Random(epoch)))
    for i, m in enumerate(multipliers):
        assert abs(counts[i] / 4000 - m) < 0.03


def test_multipliers_with_float_noise_do_not_lose_an_image():
    assert len(epoch_picks([0.1] * 10, random.Random(1))) == 1


# --- batches --------------------------------------------------------------------------------------------

def flat(plans):
    return [i for p in plans for i in p.indices]


def test_every_picked_image_appears_once_and_batches_never_mix_buckets():
    items = mixed_items(43)
    plans = epoch_batches(items, batch_size=4, seed=1, epoch=0, resolutions=[512])
    assert sorted(flat(plans)) == list(range(43))                        # nothing dropped or duplicated
    for plan in plans:
        assert {nearest_bucket(items[i].width, items[i].height, 512) for i in plan.indices} == {plan.size}
        assert 1 <= len(plan.indices) <= 4


def test_leftovers_form_one_runt_batch_per_bucket():
    items = [item(i) for i in range(10)]                               # one bucket
    sizes = sorted(len(p.indices) for p in epoch_batches(items, batch_size=4, seed=0, epoch=0, resolutions=[512]))
    assert sizes == [2, 4, 4]
    exact = [item(i) for i in range(4)]                                 # EveryDream2 D10: no false "runt" here
    assert [len(p.indices) for p in epoch_batches(exact, batch_size=4, seed=0, epoch=0, resolutions=[512])] == [4]


def test_batch_ids_are_batched_only_together():
    items = [item(i, batch_id="faces" if i % 3 == 0 else "") for i in range(30)]
    for plan in epoch_batches(items, batch_size=4, seed=2, epoch=0, resolutions=[512]):
        assert len({items[i].batch_id for i in plan.indices}) == 1


def test_multiplied_items_appear_multiply_times():
    items = [item(0, multiply=3.0), item(1)]
    assert Counter(flat(epoch_batches(items, batch_size=2, seed=0, epoch=0, resolutions=[512]))) == {0: 3, 1: 1}


def test_plan_is_a_pure_function_of_seed_and_epoch():
    items = mixed_items()
    a = epoch_batches(items, batch_size=3, seed=5, epoch=2, resolutions=[512])
    b = epoch_batches(items, batch_size=3, seed=5, epoch=2, resolutions=[512])
    c = epoch_batches(items, batch_size=3, seed=5, epoch=3, resolutions=[512])
    d = epoch_batches(items, batch_size=3, seed=6, epoch=2, resolutions=[512])
    assert a == b and a != c and a != d


def test_positions_number_the_batches_of_the_epoch():
    plans = epoch_batches(mixed_items(), batch_size=3, seed=0, epoch=0, resolutions=[512])
    assert [p.position for p in plans] == list(range(len(plans)))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ddp_shares_are_equal_disjoint_and_cover_the_epoch(world_size):
    items = mixed_items(41)
    whole = epoch_batches(items, batch_size=4, seed=3, epoch=1, resolutions=[512])
    shares = [epoch_batches(items, batch_size=4, seed=3, epoch=1, resolutions=[512], rank=r, world_size=world_size)
              for r in range(world_size)]
    assert len({len(s) for s in shares}) == 1                                   # equal length
    positions = [p.position for s in shares for p in s]
    assert len(positions) == len(set(positions))                                # disjoint
    assert len(positions) == len(whole) + (-len(whole)) % world_size            # padded to a multiple
    by_position = {p.position: p for s in shares for p in s}
    for plan in whole:
        assert by_position[plan.position].indices == plan.indices
    for extra in range(len(whole), len(positions)):                             # padding repeats from the start
        assert by_position[extra].indices == whole[extra - len(whole)].indices


def test_ddp_with_fewer_batches_than_ranks_still_gives_every_rank_a_batch():
    items = [item(0)]
    shares = [epoch_batches(items, batch_size=4, seed=0, epoch=0, resolutions=[512], rank=r, world_size=4)
              for r in range(4)]
    assert [len(s) for s in shares] == [1, 1, 1, 1]


def test_bad_arguments():
    with pytest.raises(ValueError):
        epoch_batches([item(0)], batch_size=0, seed=0, epoch=0, resolutions=[512])
    with pytest.raises(ValueError):
        epoch_batches([item(0)], batch_size=1, seed=0, epoch=0, resolutions=[512], rank=2, world_size=2)


# --- multi-resolution ---------------------------------------------------------------------------------------

def test_multi_resolution_batches_use_one_resolution_and_its_nearest_bucket():
    items = mixed_items(60)
    resolutions = [448, 512, 576]
    plans = epoch_batches(items, batch_size=4, seed=0, epoch=0, resolutions=resolutions)
    assert sorted(flat(plans)) == list(range(60))
    for plan in plans:
        assert plan.resolution in resolutions
        for i in plan.indices:
            assert nearest_bucket(items[i].width, items[i].height, plan.resolution) == plan.size
    per_resolution = Counter()
    for plan in plans:
        per_resolution[plan.resolution] += len(plan.indices)
    assert set(per_resolution.values()) == {20}                  # images dealt to the resolutions in turn


def test_multi_resolution_choice_changes_per_epoch():
    items = mixed_items(30)
    def resolution_of(epoch):
        return {i: p.resolution for p in epoch_batches(items, batch_size=2, seed=0, epoch=epoch,
                                                       resolutions=[448, 512]) for i in p.indices}
    assert resolution_of(0) != resolution_of(1)


# --- schedule file ----------------------------------------------------------------------------------------

def test_write_schedule(tmp_path):
    items = [item(0), item(1), item(2, 1024, 512)]
    plans = [BatchPlan([0, 1], (512, 512), 0), BatchPlan([2], (704, 320), 1)]
    path = tmp_path / schedule_filename(3)
    write_schedule(plans, items, path)
    assert path.name == "ep3_batch_schedule.txt"
    assert path.read_text().splitlines()[1:] == ["0\t512x512\t2\t0.png\t1.png", "1\t704x320\t1\t2.png"]
