"""``python -m tests.servers._moto_main HOST PORT``: moto's server, one request at a time.

moto's own ``moto_server`` serves requests on many threads and its DynamoDB backend
has no lock: two ``TransactWriteItems`` whose conditions read the same item can both
pass (measured: 10 threads x 100 compare-and-set increments of one item ended at 990
with 1,000 acknowledged). DynamoDB runs each transaction atomically, so this launcher
serves moto's application behind one lock: each request runs alone, as one atomic
step, and the suite checks hivemem's compare-and-set, not moto's threads.

moto also deep-copies every table a transaction touches before running it, for its
rollback: O(items in the table) per call (27 µs per item here, 140 ms per transaction
at 5,000 items). The patch below keeps the same rollback — the items the transaction
touches, restored when it is cancelled — by copying those items only, so a call costs
what it does on a small table.

A query of the table itself (not of an index) lists and sorts every item of the table
to keep those of one partition key, then compares each with the key condition:
O(items in the table), 50 ms a query at 1,000 items and 0.1 s at 7,000 (the 1,000-task
test's table), for a page of two rows. The second patch hands that query a superset of
what it returns instead: the partition's items (the ones it keeps), and when every sort
key is a string and there is no legacy ``QueryFilter``, only those within the key
condition's bounds and after the page's start, plus one item past each bound, at most
``Limit`` + 5 of them. A bound or the start key excludes at most one item each, and a
page that fills its ``Limit`` ends with a ``LastEvaluatedKey`` when any item follows,
so the page, its key and its counts come out the same (moto compares strings as Python
does, which is the order the bounds use; a ``FilterExpression`` applies after the page
is cut). tests/test_moto_launcher.py checks this against moto's own query. Everything
else (conditions, updates, the query's own filtering, order, limits and pages, TTL, S3,
SNS) is moto's own code.

``HIVEMEM_MOTO_TRACE=FILE`` appends a line per request to FILE: the operation, its
milliseconds under the lock, and the start of its body (for counting what a workload
asks of the store).
"""

from __future__ import annotations

import bisect
import copy
import io
import os
import sys
import threading
import time
from typing import Any


def _patch_transactions() -> None:
    from moto.dynamodb.models import DynamoDBBackend

    real = DynamoDBBackend.transact_write_items

    def transact_write_items(self: Any, transact_items: list[dict[str, Any]]) -> None:
        touched: list[tuple[Any, Any, Any, Any]] = []  # (table, hash, range, old item)
        for entry in transact_items:
            _, op = next(iter(entry.items()))
            name = op.get("TableName")
            if not name or name not in self.tables:
                continue
            table = self.tables[name]
            attrs = op.get("Item") or op.get("Key") or {}
            if table.hash_key_attr not in attrs:
                continue
            from moto.dynamodb.models.dynamo_type import DynamoType

            h = DynamoType(attrs[table.hash_key_attr])
            r = (
                DynamoType(attrs[table.range_key_attr])
                if table.range_key_attr and table.range_key_attr in attrs
                else None
            )
            old = table.get_item(h, r)
            touched.append((table, h, r, copy.deepcopy(old) if old is not None else None))
        saved = {t.name: t for t, *_ in touched}
        # Run moto's transaction with its table copies made cheap: copy.deepcopy of a
        # Table returns the table itself, and a cancelled transaction (which assigns
        # the "copy" back) is undone from the items saved above.
        real_deepcopy = copy.deepcopy

        def shallow(obj: Any, memo: Any = None) -> Any:
            if any(obj is t for t in saved.values()):
                return obj
            return real_deepcopy(obj, memo)

        copy.deepcopy = shallow  # type: ignore[assignment]
        try:
            real(self, transact_items)
        except BaseException:
            copy.deepcopy = real_deepcopy  # type: ignore[assignment]
            for table, h, r, old in reversed(touched):
                current = table.get_item(h, r)
                if old is None:
                    if current is not None:
                        table.delete_item(h, r)
                else:
                    _restore(table, old)
            raise
        finally:
            copy.deepcopy = real_deepcopy  # type: ignore[assignment]

    DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]


def _patch_queries() -> None:
    from moto.dynamodb.models.table import Table

    real = Table.query

    def query(
        self: Any,
        hash_key: Any,
        range_comparison: str | None,
        range_objs: list[Any],
        limit: int | None,
        exclusive_start_key: dict[str, Any] | None,
        scan_index_forward: bool,
        projection_expressions: Any,
        index_name: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        call = (
            hash_key, range_comparison, range_objs, limit, exclusive_start_key,
            scan_index_forward, projection_expressions, index_name, *args,
        )  # fmt: skip
        if index_name or not self.range_key_attr or hash_key is None:
            return real(self, *call, **kwargs)
        # moto keeps ``items`` as {hash key: {range key: item}}; without an index its
        # query keeps the items of ``all_items()`` whose hash key is ``hash_key``.
        partition = list(self.items[hash_key].values()) if hash_key in self.items else []
        # A filter expression applies after the page is cut (as in DynamoDB); only the
        # legacy QueryFilter (extra keyword arguments) takes part in cutting it.
        if not set(kwargs) - {"hash_key_conditions", "range_key_conditions"}:
            partition = _window(
                self.range_key_attr, partition, range_comparison, range_objs, limit,
                exclusive_start_key, scan_index_forward,
            )  # fmt: skip
        self.all_items = lambda: partition  # the instance attribute hides the method
        try:
            return real(self, *call, **kwargs)
        finally:
            del self.all_items

    Table.query = query  # type: ignore[method-assign]


def _window(
    attr: str,
    items: list[Any],
    comparison: str | None,
    bounds: list[Any],
    limit: int | None,
    start: dict[str, Any] | None,
    forward: bool,
) -> list[Any]:
    """A superset of the items a query of one partition returns (see the module notes),
    or ``items`` unchanged when a sort key or a bound is not a string."""
    if any(i.range_key is None or i.range_key.type != "S" for i in items) or any(
        b.type != "S" for b in bounds
    ):
        return items
    ordered = sorted(items, key=lambda i: i.range_key.value)
    keys = [i.range_key.value for i in ordered]
    values = [b.value for b in bounds]
    lo, hi = 0, len(keys)
    if comparison in (">", ">=") and values:
        lo = bisect.bisect_left(keys, values[0])
    elif comparison == "BEGINS_WITH" and values:
        lo = hi = bisect.bisect_left(keys, values[0])
        while hi < len(keys) and keys[hi].startswith(values[0]):  # they sort together
            hi += 1
    elif comparison in ("<", "<=") and values:
        hi = bisect.bisect_right(keys, values[0])
    elif comparison == "BETWEEN" and len(values) == 2:
        lo, hi = bisect.bisect_left(keys, values[0]), bisect.bisect_right(keys, values[1])
    elif comparison == "=" and values:
        lo, hi = bisect.bisect_left(keys, values[0]), bisect.bisect_right(keys, values[0])
    elif comparison is not None:
        return items
    if start is not None:
        mark = (start.get(attr) or {}).get("S")
        if mark is None:
            return items
        if forward:
            lo = max(lo, bisect.bisect_left(keys, mark))
        else:
            hi = min(hi, bisect.bisect_right(keys, mark))
    # One more item on each side: moto ends a page that reached ``Limit`` with a
    # ``LastEvaluatedKey`` when any item follows it, matching or not.
    window = ordered[max(0, lo - 1) : hi + 1]
    if limit:
        window = window[: limit + 5] if forward else window[-(limit + 5) :]
    return window


def _restore(table: Any, item: Any) -> None:
    """Put ``item`` (a moto Item) back in ``table`` as it was."""
    h = item.hash_key
    r = item.range_key
    if r is not None:
        table.items[h][r] = item
    else:
        table.items[h] = item


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    _patch_transactions()
    _patch_queries()
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()
    trace = os.environ.get("HIVEMEM_MOTO_TRACE")

    def serialized(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if not trace:
            with lock:
                return list(app(environ, start_response))
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(size) if size else b""
        environ["wsgi.input"] = io.BytesIO(body)
        with lock:
            started = time.perf_counter()
            out = list(app(environ, start_response))
            took = (time.perf_counter() - started) * 1000
            with open(trace, "a", encoding="utf-8") as f:
                target = environ.get("HTTP_X_AMZ_TARGET", "-").rpartition(".")[2]
                f.write(f"{target} {took:.2f} {body[:300].decode('utf-8', 'replace')}\n")
            return out

    run_simple(host, port, serialized, threaded=True)


if __name__ == "__main__":
    main()
