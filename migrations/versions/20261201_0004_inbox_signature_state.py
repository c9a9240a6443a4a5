"""What the signature headers of each callback showed: ``webhook_inbox.signature_state``.

Under ``PANDASYNC_WEBHOOK_AUTH=auto`` a callback on the token URL is accepted whatever its
signature headers say, and the outcome is kept here (``valid``, ``absent``, ``stale``,
``mismatch``); rows stored before this revision, and rows of ``token`` mode without a secret,
have NULL (not checked).

Adding a nullable column without a default only touches the catalogue. The CHECK constraint is
added NOT VALID (no scan while the inbox takes writes) and validated in a second step, which
reads the table without blocking writes. The reporting role may read the new column, as it may
read every webhook_inbox column but the raw request.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 00:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONSTRAINT = "ck_webhook_inbox_signature_state"
ROLE = "pandasync_reporting"


def upgrade() -> None:
    op.add_column(
        "webhook_inbox",
        sa.Column(
            "signature_state",
            sa.String(length=32),
            nullable=True,
            comment="What the signature headers showed; NULL: not checked (token mode, no secret).",
        ),
    )
    op.execute(
        f"ALTER TABLE webhook_inbox ADD CONSTRAINT {CONSTRAINT} CHECK (signature_state IN "
        "('valid', 'absent', 'stale', 'mismatch')) NOT VALID"
    )
    op.execute(f"ALTER TABLE webhook_inbox VALIDATE CONSTRAINT {CONSTRAINT}")
    op.execute(_privilege("GRANT"))


def downgrade() -> None:
    # A dropped column keeps its privileges in the catalogue: revoke first.
    op.execute(_privilege("REVOKE"))
    op.drop_column("webhook_inbox", "signature_state")


def _privilege(action: str) -> str:
    """GRANT or REVOKE the reporting role's SELECT on the column, only when the role exists."""
    to_from = "TO" if action == "GRANT" else "FROM"
    return f"""
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
        EXECUTE '{action} SELECT (signature_state) ON webhook_inbox {to_from} {ROLE}';
    END IF;
END
$$
"""
