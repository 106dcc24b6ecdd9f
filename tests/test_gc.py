"""The collector held off while autocut builds graphs (``autocut._gc``): off inside, on after
(with the youngest generation collected), left alone where it was off already."""

import gc

import pytest
from torch import nn

import autocut
from autocut._gc import gc_paused


@pytest.fixture
def collections(monkeypatch):
    seen = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: seen.append(generation) or 0)
    return seen


def test_off_inside_on_after_and_one_collection_of_the_young(collections):
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the outer block decides
            assert not gc.isenabled()
        assert not gc.isenabled() and collections == []
    assert gc.isenabled() and collections == [0]


def test_an_error_inside_turns_it_back_on(collections):
    with pytest.raises(ValueError):
        with gc_paused():
            raise ValueError
    assert gc.isenabled() and collections == [0]


def test_where_it_was_off_it_stays_off_and_nothing_is_collected(collections):
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled() and collections == []
    finally:
        gc.enable()


class Watcher(nn.Module):
    """Notes whether the collector was on whenever it runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.seen = []

    def forward(self, x):
        self.seen.append(gc.isenabled())
        return self.conv(x).relu()


@pytest.mark.parametrize("entry", [autocut.discover, lambda m: autocut.adapt(m, n_out=2), autocut.create_body,
                                   autocut.discover_pyramid, autocut.create_pyramid])
def test_the_public_entry_points_run_with_it_off(entry):
    model = Watcher()
    entry(model)
    assert model.seen and not any(model.seen)  # every probe of the model ran with the collector off
    assert gc.isenabled()
