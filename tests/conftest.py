"""Default suite: everything not marked slow. ``pytest -m slow`` runs the slow cases."""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    import pytest

    if config.getoption("-m"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)
