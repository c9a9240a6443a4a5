"""A small async client for the sandbox's control API (tests, ``pandasync dev --demo``, bench).

Amounts go over the wire as strings so they stay exact; answers are the control API's JSON
(orders in their neutral "truth" form, see docs/sandbox.md). ``account`` (or ``for_account``)
addresses one account of a sandbox serving several: every call then carries ``?account=``.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx

from service.domain import Platform

PREFIX = "/_sandbox"


class SandboxControlError(Exception):
    """The control API refused a request; ``status`` and ``reason`` say why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"sandbox control API: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


def _p(platform: Platform | str) -> str:
    return Platform(platform).value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SandboxControlError(200, "unexpected answer shape")
    return value


def _amount(value: Decimal | str | int | None) -> str | None:
    return None if value is None else str(value)


class SandboxRemote:
    def __init__(
        self, base_url: str, http: httpx.AsyncClient | None = None, *, account: str | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.account = account  # a user-id; None: the sandbox's first account (or all, to read)
        self._own = http is None
        self._http = http or httpx.AsyncClient(timeout=30.0, trust_env=False)

    def for_account(self, user_id: str) -> SandboxRemote:
        """The same sandbox, addressing the account ``user_id``; shares this one's HTTP client
        (close this one, not it)."""
        return SandboxRemote(self.base_url, self._http, account=user_id)

    async def __aenter__(self) -> SandboxRemote:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        params: dict[str, str] | None = None,
        wait_s: float | None = None,
    ) -> Any:
        """One control call; ``wait_s``: the server may take that long to answer on purpose."""
        if self.account is not None:
            params = {**(params or {}), "account": self.account}
        response = await self._http.request(
            method,
            f"{self.base_url}{PREFIX}{path}",
            json=payload,
            params=params or None,
            timeout=httpx.USE_CLIENT_DEFAULT if wait_s is None else wait_s + 30.0,
        )
        if response.status_code >= 400:
            try:
                reason = str(response.json().get("error"))
            except ValueError:
                reason = response.text
            raise SandboxControlError(response.status_code, reason)
        return response.json()

    # --- the world ------------------------------------------------------------------------

    async def create_order(
        self,
        platform: Platform | str,
        lines: list[dict[str, Any]] | None = None,
        *,
        shipping_fee: Decimal | str = "0",
        order_id: str | None = None,
    ) -> dict[str, Any]:
        """Create an order; ``lines``: ``[{"title": "…", "quantity": 2, "unit_price": "5"}]``."""
        body: dict[str, Any] = {
            "platform": _p(platform),
            "lines": [
                {**line, "unit_price": _amount(line.get("unit_price"))}
                for line in (lines or [{"title": "沙盒商品", "quantity": 1, "unit_price": "100"}])
            ],
            "shipping_fee": _amount(shipping_fee),
        }
        if order_id is not None:
            body["order_id"] = order_id
        result: dict[str, Any] = (await self._call("POST", "/orders", body))["order"]
        return result

    async def order(self, platform: Platform | str, order_id: str) -> dict[str, Any]:
        result: dict[str, Any] = (await self._call("GET", f"/orders/{_p(platform)}/{order_id}"))[
            "order"
        ]
        return result

    async def orders(self, platform: Platform | str | None = None) -> list[dict[str, Any]]:
        params = {"platform": _p(platform)} if platform else {}
        result: list[dict[str, Any]] = (await self._call("GET", "/orders", params=params))["orders"]
        return result

    async def _act(
        self, platform: Platform | str, order_id: str, action: str, body: Any = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            "POST", f"/orders/{_p(platform)}/{order_id}/{action}", body or {}
        )
        return result

    async def pay(self, platform: Platform | str, order_id: str) -> dict[str, Any]:
        return _dict((await self._act(platform, order_id, "pay"))["order"])

    async def change_price(
        self,
        platform: Platform | str,
        order_id: str,
        *,
        total_amount: Decimal | str | None = None,
        shipping_fee: Decimal | str | None = None,
    ) -> dict[str, Any]:
        body = {"total_amount": _amount(total_amount), "shipping_fee": _amount(shipping_fee)}
        return _dict((await self._act(platform, order_id, "price", body))["order"])

    async def ship(
        self,
        platform: Platform | str,
        order_id: str,
        *,
        tracking_number: str | None = None,
        carrier: str | None = None,
        line_ids: list[str] | None = None,
        events: list[dict[str, Any]] | None = None,
    ) -> str:
        """Ship (all unshipped lines by default); returns the tracking number."""
        body: dict[str, Any] = {"events": events or []}
        for key, value in (
            ("tracking_number", tracking_number),
            ("carrier", carrier),
            ("line_ids", line_ids),
        ):
            if value is not None:
                body[key] = value
        return str((await self._act(platform, order_id, "ship", body))["tracking_number"])

    async def add_event(
        self,
        platform: Platform | str,
        order_id: str,
        tracking_number: str,
        description: str,
        *,
        status: str | None = None,
        location: str | None = None,
    ) -> dict[str, Any]:
        body = {"description": description, "status": status, "location": location}
        action = f"shipments/{tracking_number}/events"
        return _dict((await self._act(platform, order_id, action, body))["order"])

    async def deliver(
        self, platform: Platform | str, order_id: str, tracking_number: str | None = None
    ) -> dict[str, Any]:
        body = {"tracking_number": tracking_number}
        return _dict((await self._act(platform, order_id, "deliver", body))["order"])

    async def confirm(self, platform: Platform | str, order_id: str) -> dict[str, Any]:
        return _dict((await self._act(platform, order_id, "confirm"))["order"])

    async def cancel(
        self, platform: Platform | str, order_id: str, reason: str | None = None
    ) -> dict[str, Any]:
        return _dict((await self._act(platform, order_id, "cancel", {"reason": reason}))["order"])

    async def set_raw_status(
        self, platform: Platform | str, order_id: str, raw_status: str | None
    ) -> dict[str, Any]:
        """Render the order's raw status as ``raw_status`` (None: its own again), e.g. one the
        mapping does not know; a change, so a callback follows."""
        body = {"raw_status": raw_status}
        return _dict((await self._act(platform, order_id, "raw-status", body))["order"])

    async def open_refund(
        self,
        platform: Platform | str,
        order_id: str,
        amount: Decimal | str,
        *,
        line_id: str | None = None,
        reason: str | None = None,
    ) -> dict[str, Any]:
        """Open a refund; returns the refund (its ``refund_id`` among the rest)."""
        body = {"amount": _amount(amount), "line_id": line_id, "reason": reason}
        return _dict((await self._act(platform, order_id, "refunds", body))["refund"])

    async def resolve_refund(
        self, platform: Platform | str, refund_id: str, outcome: str
    ) -> dict[str, Any]:
        path = f"/refunds/{_p(platform)}/{refund_id}/resolve"
        result: dict[str, Any] = (await self._call("POST", path, {"outcome": outcome}))["refund"]
        return result

    async def scenario(
        self, orders: int = 0, steps: int = 4, *, seed: int | None = None, advance: int = 0
    ) -> dict[str, Any]:
        body = {"orders": orders, "steps": steps, "seed": seed, "advance": advance}
        result: dict[str, Any] = await self._call("POST", "/scenario", body)
        return result

    async def reset(self) -> None:
        await self._call("POST", "/reset")

    # --- observing and steering ---------------------------------------------------------

    async def accounts(self) -> list[dict[str, Any]]:
        """Every account the sandbox serves: ``user_id``, ``access_key``, ``callback_url``,
        ``orders``; the first is the default one."""
        result: list[dict[str, Any]] = (await self._call("GET", ""))["accounts"]
        return result

    async def calls(self) -> dict[str, int]:
        result: dict[str, int] = (await self._call("GET", "/calls"))["calls"]
        return result

    async def outcomes(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = (await self._call("GET", "/calls"))["outcomes"]
        return result

    async def reset_calls(self) -> None:
        await self._call("DELETE", "/calls")

    async def set_faults(self, faults: dict[str, dict[str, Any]]) -> None:
        """Replace the faults: ``{"*": {...}, "taobao_logistics": {"server_error": 1.0}}``."""
        await self._call("PUT", "/faults", faults)

    async def clear_faults(self) -> None:
        await self._call("DELETE", "/faults")

    async def configure_delivery(self, **changes: Any) -> dict[str, Any]:
        """Change delivery settings, e.g. ``webhook_url=…, duplicate=0.2, retry_interval_s=0.1``."""
        result: dict[str, Any] = (await self._call("PATCH", "/delivery", changes))["delivery"]
        return result

    async def upstream(self) -> dict[str, Any]:
        """The upstream variant in force: ``timestamp_unit``, ``endpoints``, ``payload_case``."""
        result: dict[str, Any] = (await self._call("GET", "/upstream"))["upstream"]
        return result

    async def set_upstream(self, **patch: Any) -> dict[str, Any]:
        """Merge-patch the upstream variant; returns the variant now in force.

        E.g. ``timestamp_unit="s"``, ``payload_case="snake"`` or
        ``endpoints={"taobao_order_detail": {"path": "/open/order/get"}}``. ``None`` removes a
        key: ``endpoints=None`` puts every endpoint back where the table has it.
        """
        result: dict[str, Any] = (await self._call("PATCH", "/upstream", patch))["upstream"]
        return result

    async def callbacks(self, *, with_body: bool = False, limit: int = 1000) -> dict[str, Any]:
        params = {"limit": str(limit), **({"with_body": "1"} if with_body else {})}
        result: dict[str, Any] = await self._call("GET", "/callbacks", params=params)
        return result

    async def drain(self, within_s: float = 10.0) -> dict[str, Any]:
        """Wait until every callback has been delivered or given up (``drained`` says which)."""
        result: dict[str, Any] = await self._call(
            "POST", "/callbacks/drain", {"within_s": within_s}, wait_s=within_s
        )
        return result
