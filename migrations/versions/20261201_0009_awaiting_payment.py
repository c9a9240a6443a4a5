"""``report_awaiting_payment``, and the reporting role reads the payment attempts.

``report_awaiting_payment``: one row per order the ledger holds as awaiting payment, with its
amount, its age, when it closes by itself (unknown: no column of the ledger holds such a time,
so ``closes_at`` and ``time_left`` are NULL, documented as such) and its latest payment attempt
(state and ``pay_url``). ``pandasync_reporting`` gets SELECT on it and on ``payment_attempts``,
the audit trail of ``pandasync pay`` (docs/reporting.md).

No table changes: ``payment_attempts`` came with migration 0008.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 21:30:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "pandasync_reporting"

REPORT_AWAITING_PAYMENT = """
CREATE VIEW report_awaiting_payment AS
SELECT
    o.account_id,
    o.platform,
    o.order_id,
    o.raw_status,
    o.total_amount AS amount,
    o.currency,
    o.upstream_created_at AS created_at,
    now() - coalesce(o.upstream_created_at, o.first_seen_at) AS age,
    -- The ledger keeps no close time (Taobao's close_time_without_payment, a sub-order field
    -- of a callback in a format nobody documents, is not read): NULL until the mapping reads one.
    NULL::timestamptz AS closes_at,
    NULL::interval AS time_left,
    coalesce(n.attempts, 0) AS attempts,
    a.id AS last_attempt_id,
    a.state AS last_attempt_state,
    a.started_at AS last_attempt_at,
    a.finished_at AS last_attempt_finished_at,
    a.requested_by AS last_attempt_by,
    a.pay_url,
    a.error AS last_attempt_error,
    o.last_synced_at
FROM orders o
LEFT JOIN LATERAL (
    SELECT p.id, p.state, p.started_at, p.finished_at, p.requested_by, p.pay_url, p.error
    FROM payment_attempts p
    WHERE p.account_id = o.account_id AND p.platform = o.platform AND p.order_id = o.order_id
    ORDER BY p.id DESC
    LIMIT 1
) a ON true
LEFT JOIN LATERAL (
    SELECT count(*) AS attempts
    FROM payment_attempts p
    WHERE p.account_id = o.account_id AND p.platform = o.platform AND p.order_id = o.order_id
) n ON true
WHERE o.status = 'pending_payment'
"""


def _grants(action: str) -> str:
    """GRANT or REVOKE the role's SELECT, only when the role exists."""
    to_from = "TO" if action == "GRANT" else "FROM"
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        EXECUTE '{action} SELECT ON payment_attempts, report_awaiting_payment {to_from} {ROLE}';
    END IF;
END
$$
"""


def upgrade() -> None:
    op.execute(REPORT_AWAITING_PAYMENT)
    op.execute(_grants("GRANT"))


def downgrade() -> None:
    op.execute(_grants("REVOKE"))
    op.execute("DROP VIEW IF EXISTS report_awaiting_payment")
