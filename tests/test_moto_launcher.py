"""The test launcher of moto (tests/servers/_moto_main.py) narrows what a DynamoDB query
looks through; these check that every page it answers is the page moto's own query
answers (items, ``LastEvaluatedKey``, counts), over random keys, key conditions, limits,
directions and filters (seeded)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import _moto_main

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")

#: Characters of the sort keys: ASCII, NUL, a two-byte and a four-byte character.
ALPHABET = "ab0\0é\U0010ffff"


@pytest.fixture
def client() -> Iterator[Any]:
    from moto.dynamodb.models.table import Table

    real = Table.query
    with moto.mock_aws():
        c = boto3.client("dynamodb", region_name="us-east-1")
        c.create_table(
            TableName="t",
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        try:
            yield c
        finally:
            Table.query = real


def pages(client: Any, query: dict[str, Any]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    ask = dict(query)
    for _ in range(100):
        reply = client.query(**ask)
        out.append(
            (reply["Items"], reply.get("LastEvaluatedKey"), reply["Count"], reply["ScannedCount"])
        )
        if "LastEvaluatedKey" not in reply:
            return out
        ask["ExclusiveStartKey"] = reply["LastEvaluatedKey"]
    raise AssertionError("more than 100 pages")


@pytest.mark.parametrize("seed", [1])
def test_the_narrowed_query_answers_the_pages_moto_answers(client: Any, seed: int) -> None:
    from moto.dynamodb.models.table import Table

    rnd = random.Random(seed)
    keys: set[str] = set()
    for i in range(120):
        sk = "".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(1, 4)))
        item = {"pk": {"S": rnd.choice("AB")}, "sk": {"S": sk}, "v": {"N": str(i)}}
        client.put_item(TableName="t", Item=item)
        keys.add(sk)
    known = sorted(keys)
    real = Table.query
    _moto_main._patch_queries()
    narrowed = Table.query
    assert narrowed is not real
    for _ in range(150):
        values: dict[str, Any] = {":pk": {"S": rnd.choice("ABC")}}
        cond = "pk = :pk"
        a = rnd.choice(known) if rnd.random() < 0.7 else rnd.choice(ALPHABET) * 2
        kind = rnd.choice(["", "<", "<=", ">", ">=", "=", "between", "begins"])
        if kind in ("<", "<=", ">", ">=", "="):
            cond += f" AND sk {kind} :a"
            values[":a"] = {"S": a}
        elif kind == "between":
            lo, hi = sorted([a, rnd.choice(known)])
            cond += " AND sk BETWEEN :a AND :b"
            values.update({":a": {"S": lo}, ":b": {"S": hi}})
        elif kind == "begins":
            cond += " AND begins_with(sk, :a)"
            values[":a"] = {"S": a[:1]}
        query: dict[str, Any] = {
            "TableName": "t",
            "KeyConditionExpression": cond,
            "ExpressionAttributeValues": values,
            "ScanIndexForward": rnd.random() < 0.5,
        }
        if rnd.random() < 0.7:
            query["Limit"] = rnd.randint(1, 20)
        if rnd.random() < 0.2:
            query["FilterExpression"] = "v > :z"
            values[":z"] = {"N": "100"}
        Table.query = real
        expected = pages(client, query)
        Table.query = narrowed
        assert pages(client, query) == expected, query
