"""Tests run tiny configurations, many inside the pytest process: one thread each, as the training runs use.
`-m "not slow"` leaves out the tests that start processes, resume runs or reset the slow sampling scenario."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]  # tests/ imports the scripts, test_smoke and the tools

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast subset (python -m pytest -m 'not slow')")


def pytest_collection_modifyitems(items):
    """The longest test first, so that with -n 2 one worker runs it while the other runs the rest."""
    items.sort(key=lambda item: item.name != "test_shacpp_learns_dispersion")  # a stable sort keeps the rest in order
