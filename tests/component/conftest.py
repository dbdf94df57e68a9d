"""Component fixtures: an in-process Runtime on 127.0.0.1:0, run on both event loops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path

import pytest
import uvloop

from tests.helpers import RuntimeHarness

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Run the async tests of modules that set ``BOTH_LOOPS = True`` once per loop.

    This is pytest-asyncio's hook for it (>= 1.4); overriding the ``event_loop_policy``
    fixture is deprecated, which filterwarnings=error turns into a failure. Other
    modules get the plain asyncio loop (one factory adds no parameter to test ids), and
    ``@pytest.mark.asyncio(loop_factories=[...])`` narrows a single test.
    """
    if getattr(getattr(item, "module", None), "BOTH_LOOPS", False):
        return LOOPS
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def runtimes(tmp_path: Path) -> AsyncIterator[RuntimeHarness]:
    harness = RuntimeHarness(tmp_path)
    try:
        yield harness
    finally:
        await harness.stop_all()
    assert not harness.loop_errors, f"loop exception handler was called: {harness.loop_errors}"
