"""A pytest plugin: the PandaPon sandbox on a free port, one per test.

Use it from a test module with ``pytest_plugins = ["tests.support.sandbox"]`` (or register it
once in the root conftest). Tests get ``sandbox_server`` (URL, settings, a control-API client
and a factory of service Settings that point the real client at it). To start the sandbox
differently, parametrize ``sandbox_settings`` indirectly with overrides::

    @pytest.mark.parametrize("sandbox_settings", [{"timestamp_unit": "s"}], indirect=True)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.sandbox.app import create_sandbox_app
from service.sandbox.remote import SandboxRemote
from service.sandbox.settings import SandboxSettings
from tests.support.servers import SandboxServer, sandbox_test_settings, serve_in_thread


@pytest.fixture
def sandbox_settings(request: pytest.FixtureRequest) -> SandboxSettings:
    """``sandbox_test_settings()``; parametrize indirectly with a dict of overrides to change it."""
    overrides: dict[str, Any] = getattr(request, "param", None) or {}
    return sandbox_test_settings(**overrides)


@pytest.fixture
async def sandbox_server(sandbox_settings: SandboxSettings) -> AsyncIterator[SandboxServer]:
    app = create_sandbox_app(sandbox_settings)
    with serve_in_thread(app) as url:
        async with SandboxRemote(url) as remote:
            yield SandboxServer(url=url, settings=sandbox_settings, remote=remote)
