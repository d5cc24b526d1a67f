import torch

from utils.core.run_logging import read_later


def test_read_later_gives_the_values_by_name_in_order():
    read = read_later({"loss": torch.tensor(0.25), "norm": torch.tensor([2.0], dtype=torch.float64),
                       "count": torch.tensor(3)})
    assert read() == {"loss": 0.25, "norm": 2.0, "count": 3.0}


def test_read_later_keeps_the_value_of_the_moment_it_was_called():
    loss = torch.tensor(1.5)
    read = read_later({"loss": loss})
    loss += 1  # the trainer goes on accumulating into new windows; the staged value must not follow
    assert read() == {"loss": 1.5}


def test_read_later_of_nothing_is_empty():
    assert read_later({})() == {}
