"""Buckets: sizes, assignment, frame rounding; the batch sampler's purity, determinism and exact resume."""

import pytest

from data.buckets import Bucket, BucketBatchSampler, assign_bucket, make_buckets

ASPECTS = [832 / 480, 4 / 3, 1.0, 3 / 4, 480 / 832]


def test_make_buckets_rounds_to_multiple_and_keeps_area():
    buckets = make_buckets(480 * 832, ASPECTS, [81, 1], multiple=16)
    assert Bucket(832, 480, 81) in buckets and Bucket(480, 832, 1) in buckets
    assert len(buckets) == 10
    for b in buckets:
        assert b.width % 16 == 0 and b.height % 16 == 0
        assert abs(b.width * b.height / (480 * 832) - 1) < 0.06
    five_b = make_buckets(704 * 1280, [1280 / 704], [121], multiple=32)
    assert five_b == [Bucket(1280, 704, 121)]
    assert five_b[0].name == "1280x704x121" and five_b[0].aspect == pytest.approx(1280 / 704)


def test_make_buckets_rejects_bad_frame_counts():
    with pytest.raises(ValueError, match=r"1 \+ 4k.*\[80\]"):
        make_buckets(1024, [1.0], [80], 16)


def test_assign_bucket_nearest_aspect_then_longest_frames():
    buckets = make_buckets(480 * 832, ASPECTS, [81, 49, 1], multiple=16)
    assert assign_bucket(1920, 1080, 112, buckets) == Bucket(832, 480, 81)
    assert assign_bucket(1080, 1920, 60, buckets) == Bucket(480, 832, 49)  # 60 frames: 49 fits, 81 does not
    assert assign_bucket(1000, 1000, 30, buckets) == Bucket(624, 624, 1)
    assert assign_bucket(640, 480, 81, buckets).aspect == pytest.approx(4 / 3, rel=0.05)
    # log distance: 2:1 is nearer to 16:9 (832/480) than to 4:3
    assert assign_bucket(2000, 1000, 81, buckets) == Bucket(832, 480, 81)


def test_assign_bucket_none_when_too_short():
    buckets = make_buckets(480 * 832, ASPECTS, [81], multiple=16)
    assert assign_bucket(1920, 1080, 80, buckets) is None
    assert assign_bucket(1920, 1080, 81, buckets) == Bucket(832, 480, 81)


ITEMS = ["a"] * 7 + ["b"] * 5 + ["c"] * 3 + ["a"] * 2


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_never_mixes_buckets_and_covers_items(drop_last):
    sampler = BucketBatchSampler(ITEMS, batch_size=2, seed=3, drop_last=drop_last, shuffle=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == (4 + 2 + 1 if drop_last else 5 + 3 + 2)
    for batch in batches:
        assert len({ITEMS[i] for i in batch}) == 1
        assert len(batch) == 2 or not drop_last
    seen = sorted(i for batch in batches for i in batch)
    if drop_last:
        assert len(seen) == 14 and len(set(seen)) == 14
    else:
        assert seen == list(range(len(ITEMS)))


def test_sampler_deterministic_per_seed_and_epoch():
    def run(seed, epoch):
        sampler = BucketBatchSampler(ITEMS, batch_size=2, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)
    unshuffled = list(BucketBatchSampler(ITEMS, batch_size=2, shuffle=False))
    assert unshuffled[0] == [0, 1] and unshuffled[-1] == [14]


def test_sampler_resumes_at_exact_position():
    sampler = BucketBatchSampler(ITEMS, batch_size=2, seed=5)
    sampler.set_epoch(2)
    full = list(sampler)
    it = iter(sampler)
    consumed = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == 4 and consumed == full[:4]

    resumed = BucketBatchSampler(ITEMS, batch_size=2, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop calls this again; it must keep the skip
    assert list(resumed) == full[4:]
    assert list(resumed) == full  # the next pass over the same epoch is whole again
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a new epoch starts at its first batch
    assert len(list(resumed)) == len(full)


def test_sampler_refuses_state_of_other_seed_or_data():
    state = BucketBatchSampler(ITEMS, batch_size=2, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(ITEMS, batch_size=2, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="different dataset"):
        BucketBatchSampler(ITEMS + ["c"], batch_size=2, seed=5).load_state_dict(state)
