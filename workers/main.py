"""Entry module of the worker role: ``dramatiq workers.main`` (what ``pandasync worker`` runs).

Configures the broker from settings *before* declaring the actors, releases each process's
runtime at shutdown, and exports metrics through dramatiq's Prometheus middleware (one HTTP
exposition for all worker processes, on ``WORKER_METRICS_PORT``, served by
``workers.runtime.serve_worker_metrics`` on the socket ``pandasync worker`` bound).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import dramatiq
import uvloop
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import AsyncIO, Middleware

from service.broker import configure_broker
from service.config import get_settings
from service.logs import configure_logging
from workers.actors import register
from workers.runtime import (
    close_runtime,
    release_metrics_socket,
    serve_worker_metrics,
    stop_reconciles,
)


class ReleaseRuntime(Middleware):
    """Stop the reconciles in flight when the worker starts to stop (a slow upstream or a
    rate-limit pause must not hold the shutdown: their messages go back to the broker), and
    close the process's engine and HTTP client once its worker threads have finished, while
    the event loop still runs: this middleware sits before AsyncIO, whose own
    ``after_worker_shutdown`` stops the loop."""

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        loop = get_event_loop_thread()
        if loop is not None and loop.loop.is_running():
            loop.run_coroutine(stop_reconciles())

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        loop = get_event_loop_thread()
        if loop is not None:
            loop.run_coroutine(close_runtime())


# The reconciles' event loop (dramatiq's AsyncIO middleware makes it at worker boot): uvloop's
# transports cost a fraction of asyncio's per round trip, and a reconcile is mostly round trips.
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
settings = get_settings()
configure_logging(settings.log_level, settings.log_format)
broker = configure_broker(settings)
if settings.worker_metrics_port:
    from dramatiq.middleware.prometheus import Prometheus

    class WorkerMetrics(Prometheus):
        """dramatiq's worker metrics, exposed by our own side process: on the socket bound
        before dramatiq started, so a taken port never leaves a traceback behind."""

        @property
        def forks(self) -> list[Callable[[], int]]:
            return [serve_worker_metrics]

        def after_process_boot(self, broker: dramatiq.Broker) -> None:
            release_metrics_socket()
            super().after_process_boot(broker)  # type: ignore[no-untyped-call]

    broker.add_middleware(WorkerMetrics())
broker.add_middleware(ReleaseRuntime(), before=AsyncIO)
reconcile = register(broker)
