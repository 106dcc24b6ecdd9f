"""Hypothesis profiles: "ci" (default) is bounded and derandomised; run
``python -m pytest --hypothesis-profile=thorough`` for a longer sweep over more models. The
``one_thread`` fixture, for modules that train."""

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=8,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_thread():
    """pytest-xdist already runs a process per core: more threads per process only contend
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that trains)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _nothing_remembered():
    """Each test starts with no recipe kept (:mod:`autocut.memo`): a cut an earlier test found
    would answer a later test's call without running the code that test checks."""
    from autocut import memo

    memo.clear_cache()
