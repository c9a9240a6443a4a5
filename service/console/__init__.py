"""The operator console: ``/console`` on the web role, pages rendered on the server.

An overview of each account and platform (traffic and lag charts, backlog, failures, sweeps,
unmapped values, orders awaiting payment), the orders with their timelines, the inbox with the
raw body of each message, and the open sync failures with replay and dismiss. Behind
``PANDASYNC_ADMIN_TOKEN``: see ``auth.py``. Mounted by ``service/app.py``; its routes are its
own, so nothing of it runs on the webhook path.
"""

from service.console.routes import console_off_reason, console_routes

__all__ = ["console_off_reason", "console_routes"]
