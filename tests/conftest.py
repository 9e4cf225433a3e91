"""Shared test configuration: the rig's fixtures are plugins loaded for every test, and the
hypothesis profiles of the property tests (``tests/unit/test_prop_*.py``).

Profiles: ``ci`` (the default) keeps every property test to a few dozen examples so the
whole set runs in well under half a minute; ``long`` (``HYPOTHESIS_PROFILE=long``) runs
thousands per test for a hunt. Neither uses hypothesis' own deadline, which flakes on a
busy machine: the tests bound each example's time themselves (``tests.rig.bounds``) and
fail on a hang instead of waiting for it.
"""

import os

from hypothesis import HealthCheck, settings

pytest_plugins = ["tests.rig.fixtures", "tests.rig.crishim_fixtures", "tests.rig.node_spdy"]

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=20_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
