"""``pandasync pay``: pay the orders awaiting payment, each at most once, with an audit trail.

A run looks at the account's orders whose ledger status is ``pending_payment`` (and at those
holding an attempt in flight), within the filters, oldest first. For each one:

1. An attempt in flight is never paid again. ``started`` by a run that still lives: another pay
   run holds it, skip. ``started`` by a run that died (it holds no lock any more), or
   ``unknown``: re-fetch the order; upstream shows it paid → the attempt is closed as ``paid``
   (closed unpaid → ``failed``), saying that a re-fetch confirmed it; still awaiting payment →
   reported as needing a person (``pandasync pay --release`` once they know it was not paid).
2. An order whose last attempt answered a link to pay by hand is left to the person holding the
   link, unless ``--order`` names it.
3. With ``--yes``: insert the ``started`` attempt and COMMIT (the partial unique index refuses
   it when another run got there first); re-fetch the order (a query, with the usual in-place
   retries) and drop the attempt row if upstream no longer awaits payment (the ledger is synced),
   if an earlier attempt paid it, or if paying it would take the run over ``--max-total`` (the
   run stops there); else record the re-fetched amount, COMMIT, and make the payment call ONCE
   (``PandaPonClient.pay_orders``; never ``call_with_retries``). Its outcome is recorded with
   ``finished_at`` and committed, then the order is reconciled so the ledger shows the result.
   Without ``--yes`` nothing is written and no payment call is made: the run re-fetches and
   says what it would do.

What a failed call means for the money (``outcome_of_error``): no answer in time, a connection
lost after the request went out, a 5xx or an unreadable answer leave the outcome ``unknown``;
a refusal (4xx, auth, 429, an envelope code) or a connection never made is ``failed``.

The run holds a session advisory lock on its ``run_id`` while it lives (see
``service.ledger.payments``), so a later run can tell a ``started`` attempt of a live run from
one a crash left.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.db import session_scope
from service.domain import OrderStatus, PaymentState, Platform, ReconcileRequest, SyncSource
from service.ledger import payments as ledger
from service.ledger.models import Order
from service.pandapon.client import PandaPonClient
from service.pandapon.errors import (
    AuthError,
    MalformedResponse,
    PandaPonError,
    UpstreamClientError,
    UpstreamConnectError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from service.pandapon.models import OrderSnapshot
from workers.policy import call_with_retries
from workers.reconcile import Outcome, reconcile_order, set_isolation

log = structlog.get_logger(__name__)

CAP_CURRENCY = "CNY"  # --max-total is in yuan
PAID_STATUSES = (OrderStatus.PAID, OrderStatus.SHIPPED, OrderStatus.COMPLETED)
# A worker may hold the order's reconcile lock for a moment: ask again this often.
SYNC_TRIES = 10
SYNC_PAUSE_S = 0.3


class Verdict(enum.StrEnum):
    """What a run did (or, in a dry run, would do) with one order."""

    WOULD_PAY = "would_pay"  # dry run: it would be paid
    PAID = "paid"
    PAY_BY_HAND = "pay_by_hand"
    HELD_BACK = "held_back"
    FAILED = "failed"
    UNKNOWN = "unknown"
    NOT_AWAITING = "not_awaiting"  # upstream no longer awaits its payment: skipped
    ALREADY_PAID = "already_paid"  # an earlier attempt paid it; upstream does not show it yet
    ANOTHER_RUN = "another_run"  # a live pay run holds its attempt
    NEEDS_PERSON = "needs_person"  # an attempt of unknown outcome; upstream still unpaid
    SETTLED = "settled"  # an attempt of unknown outcome, settled by a re-fetch
    AWAITS_HAND = "awaits_hand"  # its last attempt answered a link to pay by hand
    OVER_CAP = "over_cap"  # paying it would exceed --max-total: the run stops
    NOT_REACHED = "not_reached"  # after the run stopped at the cap
    NOT_COUNTABLE = "not_countable"  # --max-total cannot count it (not CNY, no amount)
    REFETCH_FAILED = "refetch_failed"  # upstream could not be asked: not paid
    NOT_IN_LEDGER = "not_in_ledger"  # --order named it; the ledger does not hold it as awaiting


# Verdicts that make the run exit 1: a call that failed or whose outcome nobody knows, or an
# order a person must look at.
TROUBLE = frozenset({Verdict.FAILED, Verdict.UNKNOWN, Verdict.NEEDS_PERSON, Verdict.REFETCH_FAILED})
# The money a run may have spent: paid, or perhaps paid.
SPENT = frozenset({Verdict.PAID, Verdict.UNKNOWN})
_VERDICT_OF_STATE = {
    PaymentState.PAID: Verdict.PAID,
    PaymentState.PAY_BY_HAND: Verdict.PAY_BY_HAND,
    PaymentState.HELD_BACK: Verdict.HELD_BACK,
    PaymentState.FAILED: Verdict.FAILED,
    PaymentState.UNKNOWN: Verdict.UNKNOWN,
}


@dataclass(frozen=True, slots=True)
class PayRequest:
    """One ``pandasync pay`` run: whose orders, which, how much at most, and by whom."""

    account_id: str
    run_id: str
    requested_by: str
    dry_run: bool = True
    platforms: tuple[Platform, ...] = ()
    order_ids: tuple[str, ...] = ()
    older_than: timedelta | None = None
    max_total: Decimal | None = None  # CNY


@dataclass(slots=True)
class OrderOutcome:
    platform: Platform | None
    order_id: str
    verdict: Verdict
    amount: Decimal | None = None
    currency: str = CAP_CURRENCY
    attempt_id: int | None = None
    pay_url: str | None = None
    detail: str = ""
    ledger_status: str | None = None  # after the sync that followed the call


@dataclass(slots=True)
class PayReport:
    run_id: str
    dry_run: bool
    outcomes: list[OrderOutcome] = field(default_factory=list)

    def count(self, *verdicts: Verdict) -> int:
        return sum(1 for o in self.outcomes if o.verdict in verdicts)

    def totals(self, *verdicts: Verdict) -> dict[str, Decimal]:
        """The amounts of the orders with these verdicts, per currency."""
        sums: dict[str, Decimal] = {}
        for o in self.outcomes:
            if o.verdict in verdicts and o.amount is not None:
                sums[o.currency] = sums.get(o.currency, Decimal("0.00")) + o.amount
        return sums

    @property
    def exit_code(self) -> int:
        """0 when everything went as planned; 1 when an attempt failed or its outcome is
        unknown, or an order needs a person."""
        return 1 if any(o.verdict in TROUBLE for o in self.outcomes) else 0


def awaiting(snapshot: OrderSnapshot) -> bool:
    return snapshot.status is OrderStatus.PENDING_PAYMENT and snapshot.paid_at is None


def shows_paid(snapshot: OrderSnapshot) -> bool:
    return snapshot.status in PAID_STATUSES or snapshot.paid_at is not None


def closed_unpaid(snapshot: OrderSnapshot) -> bool:
    return snapshot.status is OrderStatus.CANCELLED and snapshot.paid_at is None


def outcome_of_error(error: PandaPonError) -> tuple[PaymentState, str]:
    """What a payment call that raised ``error`` did to the money, and why we think so."""
    cause = error.__cause__
    if isinstance(error, UpstreamTimeout):
        if isinstance(cause, httpx.ConnectTimeout | httpx.PoolTimeout):
            return PaymentState.FAILED, "no connection could be made in time: nothing was sent"
        return PaymentState.UNKNOWN, "no answer in time: it may or may not have been paid"
    if isinstance(error, UpstreamConnectError):
        if isinstance(cause, httpx.ConnectError):
            return PaymentState.FAILED, "could not connect: nothing was sent"
        return PaymentState.UNKNOWN, "the connection broke before the answer"
    if isinstance(error, UpstreamRateLimited):
        return PaymentState.FAILED, "rate limited before it was handled: not paid"
    if isinstance(error, AuthError | UpstreamRejected | UpstreamClientError):
        return PaymentState.FAILED, "upstream refused the call"
    if isinstance(error, MalformedResponse):
        return PaymentState.UNKNOWN, "the answer could not be read"
    # A 5xx (and anything else): the request arrived, nobody can say what became of it.
    return PaymentState.UNKNOWN, "upstream answered an error after receiving the call"


def _money(amount: Decimal | None, currency: str) -> str:
    return "?" if amount is None else f"{amount:.2f} {currency}"


class PaymentRun:
    """One run of ``pandasync pay`` over the ledger and PandaPon; ``run()`` does it all."""

    def __init__(
        self,
        engine: AsyncEngine,
        sessions: async_sessionmaker[AsyncSession],
        client: PandaPonClient,
        request: PayRequest,
        *,
        on_outcome: Callable[[OrderOutcome], None] | None = None,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.client = client
        self.request = request
        self.on_outcome = on_outcome
        self.report = PayReport(request.run_id, request.dry_run)
        self.spent = Decimal("0.00")  # CNY the run paid, may have paid or (dry run) would pay

    async def run(self) -> PayReport:
        async with self._alive():
            found = await self._candidates()
            stopped = False
            for candidate in found:
                if stopped:
                    self._emit(
                        self._outcome(
                            candidate, Verdict.NOT_REACHED, detail="the run stopped at the cap"
                        )
                    )
                    continue
                outcome = await self._one(candidate)
                self._emit(outcome)
                stopped = outcome.verdict is Verdict.OVER_CAP
        return self.report

    # --- selection ----------------------------------------------------------------------------

    async def _candidates(self) -> list[ledger.Candidate]:
        request = self.request
        created_before = (
            datetime.now(UTC) - request.older_than if request.older_than is not None else None
        )
        async with self.sessions() as session:
            found = await ledger.candidates(
                session,
                account_id=request.account_id,
                platforms=request.platforms,
                order_ids=request.order_ids,
                created_before=created_before,
            )
            listed = {c.order_id for c in found}
            for order_id in request.order_ids:
                if order_id not in listed:
                    self._emit(await self._not_listed(session, order_id))
        return found

    async def _not_listed(self, session: AsyncSession, order_id: str) -> OrderOutcome:
        """Why an order named with --order is not looked at."""
        query = select(Order.platform, Order.status).where(
            Order.account_id == self.request.account_id, Order.order_id == order_id
        )
        if self.request.platforms:
            query = query.where(Order.platform.in_(list(self.request.platforms)))
        rows = (await session.execute(query)).all()
        if not rows:
            detail = "not in the ledger (for this account and platform)"
            return OrderOutcome(None, order_id, Verdict.NOT_IN_LEDGER, detail=detail)
        platform, status = rows[0]
        if status is OrderStatus.PENDING_PAYMENT:
            detail = "outside --older-than"
        else:
            detail = (
                f"the ledger shows it {status.value}, not awaiting payment "
                f"(`pandasync resync {platform.value} {order_id}` if that is wrong)"
            )
        return OrderOutcome(platform, order_id, Verdict.NOT_IN_LEDGER, detail=detail)

    # --- one order ----------------------------------------------------------------------------

    async def _one(self, candidate: ledger.Candidate) -> OrderOutcome:
        last = candidate.last_attempt
        if last is not None and last.in_flight:
            return await self._in_flight(candidate, last)
        named = candidate.order_id in self.request.order_ids
        if last is not None and last.state is PaymentState.PAY_BY_HAND and not named:
            return self._outcome(
                candidate,
                Verdict.AWAITS_HAND,
                attempt=last,
                pay_url=last.pay_url,
                detail=(
                    "its last answer was a link to pay by hand: a person pays there "
                    "(name it with --order to try again)"
                ),
            )
        if self.request.dry_run:
            return await self._plan(candidate)
        return await self._pay(candidate)

    async def _plan(self, candidate: ledger.Candidate) -> OrderOutcome:
        """The dry run: what ``--yes`` would do, from a re-fetch; nothing written."""
        try:
            snapshot = await self._refetch(candidate)
        except PandaPonError as error:
            return self._refetch_failed(candidate, error)
        if not awaiting(snapshot):
            return self._not_awaiting(candidate, snapshot, synced=False)
        refused = self._over_cap(candidate, snapshot)
        if refused is not None:
            return refused
        self.spent += snapshot.total_amount or Decimal("0")
        return self._outcome(candidate, Verdict.WOULD_PAY, snapshot=snapshot)

    async def _pay(self, candidate: ledger.Candidate) -> OrderOutcome:
        request = self.request
        async with session_scope(self.sessions) as session:
            attempt_id = await ledger.start_attempt(
                session,
                account_id=candidate.account_id,
                platform=candidate.platform,
                order_id=candidate.order_id,
                run_id=request.run_id,
                requested_by=request.requested_by,
                amount=candidate.amount,
                currency=candidate.currency,
            )
        if attempt_id is None:
            return await self._blocked(candidate)
        # From here this run alone may pay the order, until the attempt is finished or dropped.
        try:
            checked = await self._check(candidate, attempt_id)
        except BaseException:
            # No call was made: the row must not look like one whose outcome is unknown.
            try:
                await asyncio.shield(self._discard(attempt_id))
            except BaseException:  # the next run finds it started and orphaned
                log.warning("payment attempt not dropped", attempt_id=attempt_id)
            raise
        if isinstance(checked, OrderOutcome):
            if checked.verdict is Verdict.NOT_AWAITING:
                checked.ledger_status = await self._sync(candidate)
            return checked
        snapshot = checked
        state, outcome = await self._call(candidate, attempt_id, snapshot)
        if outcome.verdict in SPENT and snapshot.currency == CAP_CURRENCY:
            self.spent += snapshot.total_amount or Decimal("0")
        if state is not PaymentState.FAILED:  # a refused call changed nothing upstream
            outcome.ledger_status = await self._sync(candidate)
        return outcome

    async def _check(
        self, candidate: ledger.Candidate, attempt_id: int
    ) -> OrderSnapshot | OrderOutcome:
        """With the attempt row held: the re-fetched order to pay (its amount recorded on the
        row), or why not (the row dropped)."""
        skip: OrderOutcome | None = None
        try:
            snapshot = await self._refetch(candidate)
        except PandaPonError as error:
            skip = self._refetch_failed(candidate, error)
        else:
            if not awaiting(snapshot):
                skip = self._not_awaiting(candidate, snapshot, synced=True)
            else:
                skip = await self._already_paid(candidate, snapshot) or self._over_cap(
                    candidate, snapshot
                )
        async with session_scope(self.sessions) as session:
            if skip is not None:
                await ledger.discard_attempt(session, attempt_id)
                return skip
            await ledger.set_amount(session, attempt_id, snapshot.total_amount, snapshot.currency)
        return snapshot

    async def _already_paid(
        self, candidate: ledger.Candidate, snapshot: OrderSnapshot
    ) -> OrderOutcome | None:
        """An attempt that paid the order already (upstream may not show it yet)."""
        async with self.sessions() as session:
            paid_by = await ledger.paying_attempt(
                session, candidate.account_id, candidate.platform, candidate.order_id
            )
        if paid_by is None:
            return None
        detail = f"attempt {paid_by} paid it; upstream does not show it paid yet"
        return self._outcome(candidate, Verdict.ALREADY_PAID, snapshot=snapshot, detail=detail)

    async def _call(
        self, candidate: ledger.Candidate, attempt_id: int, snapshot: OrderSnapshot
    ) -> tuple[PaymentState, OrderOutcome]:
        """The payment call, once, and its outcome recorded (committed)."""
        platform, order_id = candidate.platform, candidate.order_id
        log.info("payment call", attempt_id=attempt_id, platform=platform.value, order_id=order_id)
        try:
            answer = await self.client.pay_orders(platform, [order_id])
        except PandaPonError as error:
            state, why = outcome_of_error(error)
            await self._finish(
                attempt_id,
                state,
                upstream_code=None if error.code is None else str(error.code),
                upstream_msg=error.msg,
                upstream_request_id=error.request_id,
                error=f"{why} ({type(error).__name__}: {error})",
            )
            # A timeout or a lost connection says all in ``why``; a refusal is in upstream's words.
            plain = isinstance(error, UpstreamTimeout | UpstreamConnectError)
            detail = why if plain else f"{why}: {error}"
            return state, self._attempted(candidate, snapshot, attempt_id, state, None, detail)
        except BaseException as error:
            # Interrupted (Ctrl-C) or a bug, the request perhaps sent: say so before going.
            try:
                await asyncio.shield(
                    self._finish(
                        attempt_id,
                        PaymentState.UNKNOWN,
                        error=f"interrupted during the call ({type(error).__name__})",
                    )
                )
            except BaseException:  # the next run finds the attempt started and orphaned
                log.warning("payment outcome not recorded", attempt_id=attempt_id)
            raise
        result = answer.for_order(order_id)
        await self._finish(
            attempt_id,
            result.state,
            pay_url=result.pay_url,
            upstream_code="200",
            upstream_msg=answer.msg,
            upstream_request_id=answer.request_id,
            error=None if result.state is PaymentState.PAID else result.reason,
        )
        # A link to pay by hand speaks for itself (the reason stays in the attempt's row).
        detail = "" if result.state is PaymentState.PAY_BY_HAND else result.reason or ""
        outcome = self._attempted(
            candidate, snapshot, attempt_id, result.state, result.pay_url, detail
        )
        return result.state, outcome

    async def _in_flight(
        self, candidate: ledger.Candidate, attempt: ledger.Attempt
    ) -> OrderOutcome:
        """An attempt in flight: never paid again; settled by a re-fetch, or for a person."""
        orphaned = False
        if attempt.state is PaymentState.STARTED:
            async with self.sessions() as session:
                alive = await ledger.run_alive(session, attempt.run_id)
            if alive:
                return self._another_run(candidate, attempt)
            orphaned = True
            if not self.request.dry_run:
                note = (
                    f"the pay run {attempt.run_id} stopped without recording the outcome of "
                    "its call"
                )
                async with session_scope(self.sessions) as session:
                    await ledger.mark_orphaned(session, attempt.id, note)
        since = attempt.started_at.replace(microsecond=0).isoformat(" ")
        what = (
            f"its run {attempt.run_id} stopped mid-call (started {since})"
            if orphaned
            else f"outcome unknown since {since}"
        )
        try:
            snapshot = await self._refetch(candidate)
        except PandaPonError as error:
            detail = f"{what}; could not re-fetch the order: {error}"
            return self._outcome(candidate, Verdict.NEEDS_PERSON, attempt=attempt, detail=detail)
        settle: tuple[PaymentState, str] | None = None
        if shows_paid(snapshot):
            paid_at = snapshot.paid_at.isoformat(" ") if snapshot.paid_at else "?"
            settle = (
                PaymentState.PAID,
                f"confirmed paid by a re-fetch of the order (status {snapshot.status.value}, "
                f"paid at {paid_at})",
            )
        elif closed_unpaid(snapshot):
            settle = (
                PaymentState.FAILED,
                "the order closed upstream unpaid (confirmed by a re-fetch of the order)",
            )
        if settle is None:
            detail = (
                f"{what}: upstream shows it {snapshot.status.value}; check PandaPon's console, "
                f"then `pandasync pay --release {attempt.id} --reason …` if it was not paid"
            )
            return self._outcome(
                candidate, Verdict.NEEDS_PERSON, snapshot=snapshot, attempt=attempt, detail=detail
            )
        state, note = settle
        if self.request.dry_run:
            detail = f"{what}: {note}; --yes closes it as {state.value}"
            return self._outcome(
                candidate, Verdict.SETTLED, snapshot=snapshot, attempt=attempt, detail=detail
            )
        async with session_scope(self.sessions) as session:
            await ledger.close_confirmed(session, attempt.id, state, note)
        outcome = self._outcome(
            candidate,
            Verdict.SETTLED,
            snapshot=snapshot,
            attempt=attempt,
            detail=f"{what}: closed as {state.value}, {note}",
        )
        outcome.ledger_status = await self._sync(candidate)
        return outcome

    async def _blocked(self, candidate: ledger.Candidate) -> OrderOutcome:
        """The insert met another attempt in flight, made since the run listed the order."""
        async with self.sessions() as session:
            attempts = await ledger.attempts_of(
                session, candidate.account_id, candidate.platform, candidate.order_id
            )
        holder = next((a for a in reversed(attempts) if a.in_flight), None)
        if holder is not None and holder.state is PaymentState.UNKNOWN:
            detail = "an attempt of unknown outcome holds it: the next run re-fetches it"
            return self._outcome(candidate, Verdict.NEEDS_PERSON, attempt=holder, detail=detail)
        if holder is None:  # it finished meanwhile; this run leaves the order alone
            detail = "another pay run held it a moment ago"
            return self._outcome(candidate, Verdict.ANOTHER_RUN, detail=detail)
        return self._another_run(candidate, holder)

    # --- helpers ------------------------------------------------------------------------------

    async def _refetch(self, candidate: ledger.Candidate) -> OrderSnapshot:
        platform, order_id = candidate.platform, candidate.order_id
        return await call_with_retries(lambda: self.client.order_detail(platform, order_id))

    def _over_cap(
        self, candidate: ledger.Candidate, snapshot: OrderSnapshot
    ) -> OrderOutcome | None:
        cap = self.request.max_total
        if cap is None:
            return None
        amount = snapshot.total_amount
        if amount is None or snapshot.currency != CAP_CURRENCY:
            detail = (
                f"--max-total counts {CAP_CURRENCY}; this order is "
                f"{_money(amount, snapshot.currency)}: not paid"
            )
            return self._outcome(candidate, Verdict.NOT_COUNTABLE, snapshot=snapshot, detail=detail)
        if self.spent + amount > cap:
            detail = (
                f"{_money(self.spent, CAP_CURRENCY)} already counted; with it the run would "
                f"exceed --max-total {_money(cap, CAP_CURRENCY)}: not paid, the run stops"
            )
            return self._outcome(candidate, Verdict.OVER_CAP, snapshot=snapshot, detail=detail)
        return None

    async def _discard(self, attempt_id: int) -> None:
        async with session_scope(self.sessions) as session:
            await ledger.discard_attempt(session, attempt_id)

    async def _finish(self, attempt_id: int, state: PaymentState, **values: str | None) -> None:
        async with session_scope(self.sessions) as session:
            recorded = await ledger.finish_attempt(session, attempt_id, state, **values)
        log.info("payment outcome", attempt_id=attempt_id, state=state.value, recorded=recorded)

    async def _sync(self, candidate: ledger.Candidate) -> str | None:
        """Reconcile the order now so the ledger shows what upstream says; its ledger status
        afterwards (None when the sync did not run: the next sync catches up)."""
        request = ReconcileRequest(
            candidate.account_id, candidate.platform, candidate.order_id, SyncSource.MANUAL
        )
        try:
            for _ in range(SYNC_TRIES):
                result = await reconcile_order(self.engine, self.sessions, self.client, request)
                if result.outcome is not Outcome.BUSY:
                    break
                await asyncio.sleep(SYNC_PAUSE_S)
        except Exception as error:  # the payment is recorded; the ledger catches up later
            log.warning(
                "sync after payment failed",
                order_id=candidate.order_id,
                error=f"{type(error).__name__}: {error}",
            )
            return None
        async with self.sessions() as session:
            status = await session.scalar(
                select(Order.status).where(
                    Order.account_id == candidate.account_id,
                    Order.platform == candidate.platform,
                    Order.order_id == candidate.order_id,
                )
            )
        return None if status is None else status.value

    @asynccontextmanager
    async def _alive(self) -> AsyncIterator[None]:
        """Hold the run's lock for the whole run (a dry run writes nothing and needs none)."""
        if self.request.dry_run:
            yield
            return
        async with self.engine.connect() as conn:
            await set_isolation(conn, "AUTOCOMMIT")
            await ledger.hold_run_lock(conn, self.request.run_id)
            try:
                yield
            finally:
                try:
                    await ledger.release_run_lock(conn, self.request.run_id)
                except BaseException:
                    await conn.invalidate()  # a connection holding the lock must not be reused
                    raise

    def _emit(self, outcome: OrderOutcome) -> None:
        self.report.outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    def _outcome(
        self,
        candidate: ledger.Candidate,
        verdict: Verdict,
        *,
        snapshot: OrderSnapshot | None = None,
        attempt: ledger.Attempt | None = None,
        pay_url: str | None = None,
        detail: str = "",
    ) -> OrderOutcome:
        amount, currency = candidate.amount, candidate.currency
        if snapshot is not None:
            amount, currency = snapshot.total_amount, snapshot.currency
        return OrderOutcome(
            candidate.platform,
            candidate.order_id,
            verdict,
            amount=amount,
            currency=currency,
            attempt_id=None if attempt is None else attempt.id,
            pay_url=pay_url,
            detail=detail,
        )

    def _attempted(
        self,
        candidate: ledger.Candidate,
        snapshot: OrderSnapshot,
        attempt_id: int,
        state: PaymentState,
        pay_url: str | None,
        detail: str,
    ) -> OrderOutcome:
        outcome = self._outcome(
            candidate, _VERDICT_OF_STATE[state], snapshot=snapshot, pay_url=pay_url, detail=detail
        )
        outcome.attempt_id = attempt_id
        return outcome

    def _another_run(self, candidate: ledger.Candidate, attempt: ledger.Attempt) -> OrderOutcome:
        since = attempt.started_at.replace(microsecond=0).isoformat(" ")
        detail = (
            f"another pay run holds it (run {attempt.run_id} by {attempt.requested_by}, "
            f"attempt {attempt.id} since {since})"
        )
        return self._outcome(candidate, Verdict.ANOTHER_RUN, attempt=attempt, detail=detail)

    def _refetch_failed(self, candidate: ledger.Candidate, error: PandaPonError) -> OrderOutcome:
        detail = f"could not re-fetch it from PandaPon, not paid: {error}"
        return self._outcome(candidate, Verdict.REFETCH_FAILED, detail=detail)

    def _not_awaiting(
        self, candidate: ledger.Candidate, snapshot: OrderSnapshot, *, synced: bool
    ) -> OrderOutcome:
        later = "the ledger is synced" if synced else "the ledger catches up at its next sync"
        detail = f"upstream shows it {snapshot.status.value}, no longer awaiting payment: {later}"
        return self._outcome(candidate, Verdict.NOT_AWAITING, snapshot=snapshot, detail=detail)


# --- a person's word on an attempt of unknown outcome -------------------------------------------


class ReleaseRefused(Exception):
    """The attempt cannot be released; the message says why and what to do."""


async def release(
    sessions: async_sessionmaker[AsyncSession],
    client: PandaPonClient,
    attempt_id: int,
    *,
    by: str,
    reason: str,
) -> ledger.Attempt:
    """Release an ``unknown`` attempt whose order a person found not paid: it becomes
    ``failed`` and a later run may pay the order. Refused while upstream shows the order paid
    (a pay run closes that attempt as paid) or when the attempt is not ``unknown``."""
    async with sessions() as session:
        attempt = await ledger.get_attempt(session, attempt_id)
    if attempt is None:
        raise ReleaseRefused(f"no payment attempt {attempt_id}")
    if attempt.state is not PaymentState.UNKNOWN:
        raise ReleaseRefused(
            f"attempt {attempt_id} is {attempt.state.value}, not unknown: nothing to release"
            + (" (run `pandasync pay` to settle a started one)" if attempt.in_flight else "")
        )
    platform, order_id = attempt.platform, attempt.order_id
    snapshot = await call_with_retries(lambda: client.order_detail(platform, order_id))
    if shows_paid(snapshot):
        raise ReleaseRefused(
            f"upstream shows {platform.value} order {order_id} paid: not released; "
            "`pandasync pay` closes the attempt as paid"
        )
    async with session_scope(sessions) as session:
        released = await ledger.release_attempt(session, attempt_id, by, reason)
        after = await ledger.get_attempt(session, attempt_id)
    if not released or after is None:
        raise ReleaseRefused(f"attempt {attempt_id} changed meanwhile: look again")
    return after
