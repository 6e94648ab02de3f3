"""Shared pytest fixtures. Real-ComfyUI fixtures live in tests/comfy_server.py:

- ``comfy_base`` (session): Path of the server's --base-directory (models/, output/, ...).
- ``comfy`` (session): ComfyClient of a real ComfyUI 0.3.75 server running this pack.

Tests that use either (or carry ``@pytest.mark.comfy``) are skipped with the reason when
``.comfyui/`` is missing (run scripts/setup_dev.sh), so the engine tests still run alone.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comfy_server import comfy_missing_reason, server_fixtures  # noqa: E402

comfy_base, comfy = server_fixtures()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    thread start-up costs more than it saves, and the CPUs are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

_COMFY_FIXTURES = {"comfy", "comfy_base"}


def pytest_configure(config):
    config.addinivalue_line("markers", "comfy: needs a real ComfyUI server (scripts/setup_dev.sh)")


def pytest_collection_modifyitems(config, items):
    reason = comfy_missing_reason()
    for item in items:
        if _COMFY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("comfy"):
            item.add_marker(pytest.mark.comfy)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
