"""The webhook receiver: PandaPon's callbacks in, durably stored, handed to the workers.

- ``endpoint``: the Starlette endpoint (limits → parse → verify → store → answer);
- ``verify``: signature and token checks (stateless; the nonce is checked at the store);
- ``envelope``: reading the envelope, kind, platform, order and refund ids;
- ``inbox``: the group-commit writer of ``webhook_inbox`` (and ``webhook_nonces``);
- ``handoff``: reconcile messages sent after the commit, off the request's critical path;
- ``relay``: ``relay_once`` for rows that were committed but never handed off;
- ``errors``: what is answered instead of 200; ``metrics``: the Prometheus series;
- ``request_ids``: the X-Request-ID middleware.
"""
