"""Shared test configuration: the rig's fixtures are plugins loaded for every test."""

pytest_plugins = ["tests.rig.fixtures", "tests.rig.crishim_fixtures", "tests.rig.node_spdy"]
