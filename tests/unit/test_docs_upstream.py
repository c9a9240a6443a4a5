"""docs/upstream.md says what the code does: the endpoint tables equal the endpoint table of
``service/pandapon/endpoints.py`` (method, path, parameter names and the source of each), and
every raw status the mapping knows is listed."""

from __future__ import annotations

import re
from pathlib import Path

from service.pandapon import endpoints, statuses
from service.pandapon.endpoints import Endpoint

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "upstream.md").read_text()
# The code's source of a fact -> the tags the doc may give it ([VN] is a PandaPon page too).
TAGS = {"doc": {"[doc]", "[VN]"}, "doc-v2": {"[doc-v2]"}, "assumed": {"[assumed]"}}
_ROW = re.compile(
    r"^\| `(\w+)` \| `(GET|POST) (/[^ ?`{]*)[^|]*?` [^|]*\| ([^|]+) \|$", re.MULTILINE
)


def section(heading: str) -> str:
    start = DOC.index(f"\n## {heading}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end != -1 else len(DOC)]


def documented_rows() -> dict[str, tuple[str, str, str, list[str]]]:
    """endpoint name -> (method, path, the whole row, its source tags)."""
    rows = {}
    for match in _ROW.finditer(section("Endpoints") + section("Payments")):
        name, method, path, sources = match.groups()
        rows[name] = (method, path, match.group(0), [s.strip() for s in sources.split("/")])
    return rows


def code_endpoints() -> dict[str, Endpoint]:
    payments: dict[str, Endpoint] = dict(getattr(endpoints, "PAYMENT_ENDPOINTS", {}))
    return {**endpoints.DEFAULT_ENDPOINTS, **payments}


def test_the_doc_lists_exactly_the_endpoints_of_the_code() -> None:
    assert set(documented_rows()) == set(code_endpoints())


def test_each_documented_endpoint_is_made_as_the_code_makes_it() -> None:
    rows = documented_rows()
    for name, endpoint in code_endpoints().items():
        method, path, row, sources = rows[name]
        assert (method, path) == (endpoint.method, endpoint.path), name
        for wire_name in endpoint.params.values():
            assert wire_name in row, f"{name}: parameter {wire_name} is not in the doc"
        code_sources = (endpoint.method_source, endpoint.path_source, endpoint.params_source)
        if sources == ["[assumed]"]:  # one tag for all three
            sources = ["[assumed]"] * 3
        assert len(sources) == 3, f"{name}: method / path / parameters, one source each"
        for fact, code, doc in zip(
            ("method", "path", "parameters"), code_sources, sources, strict=True
        ):
            assert doc in TAGS[code], f"{name}: the {fact} is {code} in the code, {doc} in the doc"


def test_every_raw_status_the_mapping_knows_is_listed() -> None:
    listed = section("Statuses")
    tables = {
        "Taobao orders": statuses.TAOBAO_ORDER_STATUSES,
        "1688 orders": statuses.ALIBABA_ORDER_STATUSES,
        "Taobao refunds": statuses.TAOBAO_REFUND_STATUSES,
        "1688 refunds": statuses.ALIBABA_REFUND_STATUSES,
        **{f"{p.value} parcels": s for p, s in statuses.PARCEL_STATUSES.items()},
    }
    missing = [
        f"{table}: {raw}"
        for table, values in tables.items()
        for raw in values
        if f"`{raw}`" not in listed
    ]
    assert not missing, f"not in docs/upstream.md#statuses: {missing}"


def test_the_checks_read_the_tables() -> None:
    rows = documented_rows()
    assert rows["taobao_logistics"][:2] == ("GET", "/open/order/logistics/detail/get")
    assert len(rows) >= 10
