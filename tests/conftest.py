"""Hypothesis profiles: "ci" (default) is bounded and derandomised; run
``python -m pytest --hypothesis-profile=thorough`` for a longer sweep over more models."""

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


# --- a sample of the zoo sweeps, for mutation testing ------------------------------------------

# The per-model sweeps: one test per timm module or torchvision model (shapes on the meta device).
ZOO_SWEEPS = ("test_timm.py::test_body_shape_matches_forward_features",
              "test_torchvision.py::test_body_shape_matches_the_tensor_the_model_reduces")


def pytest_addoption(parser):
    parser.addoption("--zoo-sample", type=int, default=1, metavar="K",
                     help="run every K-th model of the per-model zoo sweeps (mutation testing runs a mutant "
                          "against every test that reaches it; the whole sweep makes each survivor cost minutes)")


def pytest_collection_modifyitems(config, items):
    k = config.getoption("--zoo-sample")
    if k <= 1:
        return
    seen: dict[str, int] = {}
    keep, drop = [], []
    for item in items:
        sweep = next((s for s in ZOO_SWEEPS if item.nodeid.split("[")[0].endswith(s)), None)
        if sweep is None:
            keep.append(item)
            continue
        i = seen[sweep] = seen.get(sweep, -1) + 1
        (keep if i % k == 0 else drop).append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
