import torch

from trainer.algorithms.pool import ImagePool


def images(n, start=0):
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()


def test_size_zero_passes_through():
    pool = ImagePool(0, seed=0)
    batch = images(4)
    assert pool.query(batch) is batch
    assert pool.images == []


def test_fills_then_returns_history_half_the_time():
    pool = ImagePool(50, seed=0)
    first = pool.query(images(50))
    assert torch.equal(first, images(50))  # while filling, images come back unchanged
    from_history = 0
    trials = 4000
    for i in range(trials // 4):
        batch = images(4, start=1000 + 4 * i)
        out = pool.query(batch)
        from_history += int((out[:, 0, 0, 0] != batch[:, 0, 0, 0]).sum())
    assert abs(from_history / trials - 0.5) < 0.03
    assert len(pool.images) == 50


def test_state_dict_round_trip_continues_identically():
    pool = ImagePool(8, seed=5)
    for i in range(5):
        pool.query(images(3, start=10 * i))
    restored = ImagePool(8, seed=123)
    restored.load_state_dict(pool.state_dict())
    for i in range(5):
        batch = images(3, start=100 + 10 * i)
        assert torch.equal(pool.query(batch), restored.query(batch))


def test_loading_a_pool_of_another_size_is_refused():
    import pytest

    with pytest.raises(ValueError, match="size 8 cannot be loaded into a pool of size 4"):
        ImagePool(4, seed=0).load_state_dict(ImagePool(8, seed=0).state_dict())
