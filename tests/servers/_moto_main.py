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
what it does on a small table. Everything else (conditions, updates, queries, TTL,
S3, SNS) is moto's own code.
"""

from __future__ import annotations

import copy
import sys
import threading
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
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serialized(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with lock:
            return list(app(environ, start_response))

    run_simple(host, port, serialized, threaded=True)


if __name__ == "__main__":
    main()
