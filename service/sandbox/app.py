"""The sandbox as a Starlette app: PandaPon's query endpoints (the table's) plus a control API.

One host serves one account or several (``PANDASYNC_SANDBOX_ACCOUNTS``), as PandaPon serves
many: each account has its own keys, world, faults, payment behaviour, call counts and callback
delivery (``state.AccountWorld``); a request is for the account its ``access-key`` names.

Upstream side (paths, methods and parameter names from the same endpoint table as the client,
overrides included, then moved where the upstream variant says): every request is checked like
PandaPon would check it. Missing headers, a wrong access key, a timestamp outside
±``signature_tolerance_s`` (in the upstream variant's unit), a wrong signature (one signed with
another account's secret included) or a nonce seen before get **HTTP 401** with an envelope
whose ``code`` is 401; a user-id other than the account's gets HTTP 403 / code 403. Unknown
ids and bad parameters get HTTP 200 with an envelope code 404 / 400 (a business error, as the
envelope design suggests). In the ``snake`` variant, the 1688 logistics of an order with no
parcel answers 1688's own code ``"500_2"`` (not shipped yet, ``render.logistics_error``).

Order of checks: added latency, then the fault draw (timeout, 429, 5xx), then auth, then the
request itself — so faults hit signed and unsigned requests alike, like a gateway in front. The
latency and faults are those of the account the ``access-key`` names (an unknown key: the
first account's, which then refuses it).

Routing is looked up per request (a runtime move takes effect at once): a path the sandbox does
not serve gets HTTP 404 and a served path asked with another method HTTP 405, both with the
bare error body of a Java gateway rather than an envelope, so they cannot be mistaken for a
business "not found" (HTTP 200, envelope code 404).

Control side, under ``/_sandbox/``: drive the world, set faults, delivery and the upstream
variant, read the call counts, the callbacks sent and the ground truth, of one account
(``?account=USER_ID``) or, where it says, of all. Documented in docs/sandbox.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from service.sandbox import scenario
from service.sandbox.control import control_routes
from service.sandbox.settings import (
    SandboxSettings,
    load_sandbox_settings,
)
from service.sandbox.state import SandboxState
from service.sandbox.upstream import upstream_app


def create_sandbox_app(settings: SandboxSettings | None = None) -> Starlette:
    """The sandbox app; with no settings, read them from the environment."""
    settings = settings or load_sandbox_settings()
    state = SandboxState.build(settings)

    accounts = list(state.accounts.values())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for account in accounts:
            await account.deliverer.start()
        try:
            for account in accounts:  # each account's world gets its own scenario
                if settings.scenario_orders:
                    scenario.generate(
                        account.world,
                        account.scenario_rng,
                        settings.scenario_orders,
                        settings.scenario_steps,
                    )
            yield
        finally:
            for account in accounts:
                await account.deliverer.aclose()

    app = Starlette(routes=control_routes(), lifespan=lifespan)
    # The upstream side is the router's fallback, not fixed routes: where each endpoint is
    # served can change at runtime (PATCH /_sandbox/upstream).
    app.router.default = upstream_app
    app.state.sandbox = state
    return app
