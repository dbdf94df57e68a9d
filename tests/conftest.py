"""Fixtures shared by every test directory: real loopback backends and tracked clients.

Helpers live in ``tests/helpers.py`` (``from tests.helpers import ...``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # imported lazily: unit tests must not depend on the runtime importing
    from tests.helpers import Backends, Clients


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    from tests.helpers import Backends

    group = Backends()
    try:
        yield group
    finally:
        await group.close_all()


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    from tests.helpers import Clients

    group = Clients()
    try:
        yield group
    finally:
        await group.close_all()
