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
