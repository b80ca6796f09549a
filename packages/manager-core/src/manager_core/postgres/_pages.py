"""Pages of rows bounded in bytes as well as in count.

A list asks for up to 1000 rows, and a row may hold megabytes (an execution's
result, a dead letter's event, a document): 1000 of them would be gigabytes in
the server's memory. :func:`within_bytes` makes PostgreSQL stop a page once the
rows before it hold ``PAGE_BYTES`` of JSON text (a page always has its first row);
the repo answers a :class:`Page` that says whether it was cut, so the API still
hands out a cursor to the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import sqlalchemy as sa

PAGE_BYTES = 8 * 1024 * 1024

T = TypeVar("T")


class Page(list[T]):
    """One page of items; ``cut`` when :data:`PAGE_BYTES` ended it before its limit."""

    cut: bool = False

    @classmethod
    def of(cls, items: Iterable[T], rows: list[Any]) -> Page[T]:
        page = cls(items)
        page.cut = bool(rows) and rows[0].page_rows > len(rows)
        return page


def json_bytes(*columns: sa.ColumnElement[Any]) -> sa.ColumnElement[int]:
    """The size of ``columns`` as text (JSON as it is sent), NULLs counting 0."""
    sizes = [sa.func.coalesce(sa.func.octet_length(sa.cast(c, sa.Text)), 0) for c in columns]
    total = sizes[0]
    for size in sizes[1:]:
        total = total + size
    return total


def within_bytes(
    stmt: sa.Select[Any],
    size: sa.ColumnElement[int],
    order: Iterable[sa.ColumnElement[Any]],
    budget: int = PAGE_BYTES,
) -> sa.Select[Any]:
    """``stmt`` (ordered by ``order``, limited) kept only while the rows before each
    one hold less than ``budget`` bytes; rows also carry ``page_rows``, how many
    ``stmt`` alone would have given."""
    order = list(order)
    inner = stmt.add_columns(
        size.label("page_size"), sa.func.row_number().over(order_by=order).label("page_n")
    ).subquery()
    before = sa.func.sum(inner.c.page_size).over(order_by=inner.c.page_n) - inner.c.page_size
    ranked = sa.select(
        inner, before.label("page_before"), sa.func.count().over().label("page_rows")
    ).subquery()
    return sa.select(ranked).where(ranked.c.page_before < budget).order_by(ranked.c.page_n)
