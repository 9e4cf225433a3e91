"""Shared test configuration: the rig's fixtures are plugins loaded for every test, and the
hypothesis profiles of the property tests (``tests/unit/test_prop_*.py``).

Profiles: ``ci`` (the default) keeps every property test to 30 examples so the whole set
runs in about 20 s on a 2-core machine; ``long`` (``HYPOTHESIS_PROFILE=long``) runs 2,000
per test for a hunt, 10 to 15 minutes in all. Neither uses hypothesis' own deadline,
which flakes on a busy machine: the tests bound each example's time themselves
(``tests.rig.bounds``) and fail on a hang instead of waiting for it.
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
    max_examples=2_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
