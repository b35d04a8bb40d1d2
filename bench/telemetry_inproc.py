"""What metrics and tracing add to one request inside the service, without HTTP, a
client or another process: the service app driven by direct ASGI calls.

Usage::

    python bench/telemetry_inproc.py                 # 40 rounds: about 1 minute
    python bench/telemetry_inproc.py --rounds 80 --block 400

Seven apps run side by side in one process, each over its own SQLite file
(``embedder=none``, no access log), each preloaded with 100 items through its own PUT:

* ``off``: ``metrics=false``, no tracing (no telemetry middleware, no store timing);
* ``metrics``: the default settings;
* ``metrics+tracing off``: ``tracing=true`` with the sampler ``always_off`` (every
  request span made and dropped: the unsampled path);
* ``metrics+tracing 10%``: ``parentbased_traceidratio`` at 0.1;
* ``metrics+tracing on``: ``always_on`` (every request and store call recorded);
* ``metrics+tracing 10% hm`` and ``1% hm``: the SDK's default ``parentbased_always_on``,
  and hivemem's own ``tracing_sample_ratio`` (0.1, 0.01) in front of it (a request it
  leaves out never reaches the SDK).

One OpenTelemetry SDK tracer provider (no span processor: spans are made, sampled and
ended, exported nowhere) whose sampler is switched to each app's before its block.
Each round runs, for every app in turn (the order reversed every other round), a block
of ``--block`` GETs of those items and a quarter as many PUTs, timing each block with
``time.perf_counter``. The figure per app and verb is the 20th percentile of its
blocks' microseconds per request (the least disturbed blocks; the median is printed
too), and the added cost is that minus ``off``'s. Python's garbage collector runs as
usual.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ["HIVEMEM_EMBEDDER"] = "none"


def _scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"bench"), (b"x-hivemem-agent", b"a0")]
    if body:
        headers += [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("bench", 80),
    }


async def _call(app: Any, method: str, path: str, body: bytes = b"") -> int:
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # a disconnect never comes
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(method, path, body), receive, send)
    return status


async def main(rounds: int, block: int) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider, sampling

    class Switch(sampling.Sampler):
        """Delegates to the sampler of the app being measured."""

        def __init__(self) -> None:
            self.to: sampling.Sampler = sampling.ALWAYS_OFF

        def should_sample(self, *args: Any, **kwargs: Any) -> Any:
            return self.to.should_sample(*args, **kwargs)

        def get_description(self) -> str:
            return "switch"

    switch = Switch()
    trace.set_tracer_provider(TracerProvider(sampler=switch))
    from hivemem.config import Settings
    from hivemem.service.app import create_app

    configs: dict[str, tuple[dict[str, Any], Any]] = {
        "off": ({"metrics": False}, sampling.ALWAYS_OFF),
        "metrics": ({"metrics": True}, sampling.ALWAYS_OFF),
        "metrics+tracing off": ({"metrics": True, "tracing": True}, sampling.ALWAYS_OFF),
        "metrics+tracing 10%": (
            {"metrics": True, "tracing": True},
            sampling.ParentBased(sampling.TraceIdRatioBased(0.1)),
        ),
        "metrics+tracing on": ({"metrics": True, "tracing": True}, sampling.ALWAYS_ON),
        "metrics+tracing 10% hm": (
            {"metrics": True, "tracing": True, "tracing_sample_ratio": 0.1},
            sampling.ParentBased(sampling.ALWAYS_ON),
        ),
        "metrics+tracing 1% hm": (
            {"metrics": True, "tracing": True, "tracing_sample_ratio": 0.01},
            sampling.ParentBased(sampling.ALWAYS_ON),
        ),
    }
    times: dict[str, dict[str, list[float]]] = {n: {"GET": [], "PUT": []} for n in configs}
    with tempfile.TemporaryDirectory() as tmp:
        async with contextlib.AsyncExitStack() as stack:
            apps = {}
            for i, (name, (kw, _)) in enumerate(configs.items()):
                settings = Settings(embedder="none", access_log=False, **kw)
                app = create_app(f"sqlite:///{tmp}/{i}.db", settings)
                await stack.enter_async_context(app.router.lifespan_context(app))
                apps[name] = app
                for k in range(100):
                    body = b'{"value": {"n": %d}}' % k
                    assert await _call(app, "PUT", f"/v1/items/bench/k{k}", body) in (200, 201)
            for r in range(rounds):
                order = list(configs) if r % 2 == 0 else list(reversed(configs))
                for name in order:
                    switch.to = configs[name][1]
                    app = apps[name]
                    t = time.perf_counter()
                    for k in range(block):
                        assert await _call(app, "GET", f"/v1/items/bench/k{k % 100}") == 200
                    times[name]["GET"].append((time.perf_counter() - t) / block * 1e6)
                    puts = max(1, block // 4)
                    t = time.perf_counter()
                    for k in range(puts):
                        await _call(app, "PUT", f"/v1/items/bench/k{k % 100}", b'{"value": 1}')
                    times[name]["PUT"].append((time.perf_counter() - t) / puts * 1e6)
                print(f"round {r + 1}/{rounds}", file=sys.stderr, end="\r")

    def p20(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 5]

    base = {verb: p20(times["off"][verb]) for verb in ("GET", "PUT")}
    print(f"{rounds} rounds of {block} GETs and {max(1, block // 4)} PUTs per app; us/request")
    print(f"{'':22} {'GET p20':>8} {'added':>7} {'median':>8}   {'PUT p20':>8} {'added':>7}")
    for name in configs:
        g, p = p20(times[name]["GET"]), p20(times[name]["PUT"])
        median = statistics.median(times[name]["GET"])
        print(
            f"{name:22} {g:8.1f} {g - base['GET']:+7.1f} {median:8.1f}"
            f"   {p:8.1f} {p - base['PUT']:+7.1f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="rounds (%(default)s)")
    parser.add_argument("--block", type=int, default=200, help="GETs per block (%(default)s)")
    args = parser.parse_args()
    if not 2 <= args.rounds <= 1000 or not 10 <= args.block <= 100_000:
        parser.error("--rounds must be within 2..1000 and --block within 10..100000")
    asyncio.run(main(args.rounds, args.block))
