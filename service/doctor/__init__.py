"""``pandasync doctor``: check the live PandaPon contract on day one.

Most of the upstream contract is assumed (``docs/upstream.md``): paths, field names, the
timestamp unit, whether callbacks are signed. The doctor asks the real PandaPon with the
configured credentials, one line per check (✓ passed, ✗ failed, ? could not be checked), and
ends with the ``PANDASYNC_…=…`` lines that would fix what failed. It calls only the 8 query
endpoints, opens no database and stores nothing.

``checks`` holds the upstream checks, ``listen`` the webhook side, ``report`` the results and
their rendering.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from service.config import Settings
from service.logs import configure_logging
from service.pandapon.client import credentials_from, make_http_client
from service.pandapon.endpoints import EndpointTable

from .checks import OrderRef, check_upstream
from .listen import CallbackReport, listen, render_callback, webhook_check
from .report import Check, exit_code, render_check, render_summary

__all__ = ["OrderRef", "run_doctor"]


async def _run(
    settings: Settings,
    echo: Callable[[str], None],
    *,
    orders: Sequence[OrderRef],
    listen_s: float | None,
    host: str,
    port: int,
) -> int:
    checks: list[Check] = []

    def show(check: Check) -> None:
        checks.append(check)
        for line in render_check(check):
            echo(line)

    echo(
        f"pandasync doctor: {settings.api_base_url} as user-id {settings.user_id}, "
        f"timestamp in {settings.timestamp_unit}"
    )
    async with make_http_client(settings) as http:
        async for check in check_upstream(settings, http, orders=orders):
            show(check)
    show(webhook_check(settings))
    if listen_s is not None:
        count = 0

        def received(report: CallbackReport) -> None:
            nonlocal count
            count += 1
            echo(render_callback(count, report))

        def ready(url: str) -> None:
            echo(
                f"listening on {url} and {url}/<token> for {listen_s:g} s "
                "(answering 200 to everything, storing nothing)"
            )

        show(
            await listen(
                settings,
                host=host,
                port=port,
                seconds=listen_s,
                on_ready=ready,
                on_callback=received,
            )
        )
    for line in render_summary(checks, settings.endpoint_overrides):
        echo(line)
    return exit_code(checks)


def run_doctor(
    settings: Settings,
    echo: Callable[[str], None],
    *,
    orders: Sequence[OrderRef] = (),
    listen_s: float | None = None,
    host: str,
    port: int,
) -> int:
    """Run every check, printing as it goes; the exit status (0 / 1 / 2, see ``report``).

    ConfigError (incomplete credentials, bad endpoint overrides) is raised before any call.
    """
    credentials_from(settings)
    EndpointTable(settings.endpoint_overrides)
    # The client logs every failed call; here those failures are the report itself.
    configure_logging("ERROR", settings.log_format)
    return asyncio.run(_run(settings, echo, orders=orders, listen_s=listen_s, host=host, port=port))
