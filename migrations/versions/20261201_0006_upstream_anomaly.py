"""Versions that cannot be poisoned: ``orders.upstream_anomaly``, and the frozen orders repaired.

An upstream modification time far in the future (9999-12-31) used to become the order's
version, and every later truth was refused as older. The write now leaves such a time out and
says why in ``orders.upstream_anomaly`` (NULL when the last truth written was sane). This
revision repairs what was stored before: modification times more than a day ahead of the
database clock (``service.pandapon.sanity.FUTURE_TOLERANCE``) are cleared on orders and
refunds, and the order is flagged, so the next reconcile writes the truth.

The downgrade drops the column; the cleared times are not restored (they were not true).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 16:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUTURE = "now() + interval '1 day'"


def upgrade() -> None:
    op.add_column("orders", sa.Column("upstream_anomaly", sa.Text(), nullable=True))
    op.execute(
        "UPDATE orders SET upstream_anomaly = 'upstream time in the future, not used as a "
        "version: order modified at ' || upstream_modified_at::text, "
        f"upstream_modified_at = NULL WHERE upstream_modified_at > {FUTURE}"
    )
    op.execute(
        "UPDATE orders o SET upstream_anomaly = 'upstream time in the future, not used as a "
        "version: a refund modified time' FROM refunds r "
        f"WHERE r.order_pk = o.id AND r.upstream_modified_at > {FUTURE} "
        "AND o.upstream_anomaly IS NULL"
    )
    op.execute(
        f"UPDATE refunds SET upstream_modified_at = NULL WHERE upstream_modified_at > {FUTURE}"
    )


def downgrade() -> None:
    op.drop_column("orders", "upstream_anomaly")
