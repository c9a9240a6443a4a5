"""docs/reporting.md, Several accounts: its queries run on the real views, and a view filtered
and grouped by account gives each account its own figures."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

from service.db import asyncpg_dsn

DOC = Path(__file__).resolve().parents[2] / "docs" / "reporting.md"


def section_queries() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("## Several accounts") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```sql\n(.*?)```", section, re.S)
    return [q.strip() for block in blocks for q in block.split(";") if q.strip()]


async def test_the_several_accounts_queries_run_on_the_views(fresh_database_url: str) -> None:
    queries = section_queries()
    assert len(queries) == 3
    conn = await asyncpg.connect(asyncpg_dsn(fresh_database_url))
    try:
        await conn.execute(
            "INSERT INTO sync_failures (account_id, platform, order_id, kind, source, error) "
            "VALUES ('2200001', 'taobao', 'T1', 'permanent', 'webhook', 'x'), "
            "('2200002', 'taobao', 'T2', 'permanent', 'webhook', 'x'), "
            "('2200002', 'taobao', 'T3', 'permanent', 'webhook', 'x')"
        )
        for query in queries:
            await conn.fetch(query)
        health = await conn.fetch(queries[2])
    finally:
        await conn.close()
    assert [(r["account_id"], r["open_failures"]) for r in health] == [
        ("2200001", 1),
        ("2200002", 2),
    ]
