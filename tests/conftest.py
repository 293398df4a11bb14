"""Shared fixtures. The test process is an entry point, so it monkey-patches first."""
from gevent import monkey

monkey.patch_all()

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
    # Every test has a timeout (pytest-timeout), even if it forgets to ask for one.
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))
