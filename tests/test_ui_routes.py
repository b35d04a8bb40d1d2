"""The console's and the documentation pages' routes without a browser (the browser tests
are tests/test_console.py): what is served, from where, and behind which credentials."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import hivemem
from hivemem.service.app import create_app
from hivemem.service.ui import ASSETS

AGENT = {"X-Hivemem-Agent": "viewer"}
VENDOR = Path(str(ASSETS)) / "vendor"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = hivemem.Settings(embedder="none")
    with TestClient(create_app(f"sqlite:///{tmp_path}/ui.db", settings)) as c:
        yield c


def test_root_redirects_to_the_console_and_its_files_are_served(client: TestClient) -> None:
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/ui"
    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = re.findall(r'(?:src|href)="(/ui/assets/[^"]+)"', page.text)
    assert sorted(assets) == [
        "/ui/assets/console.css",
        "/ui/assets/console.js",
        "/ui/assets/favicon.svg",
    ]
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert client.get("/ui/assets/../../config.py").status_code == 404
    assert client.get("/ui/assets/nothing.js").status_code == 404


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_pages_load_nothing_but_this_service(client: TestClient, path: str) -> None:
    page = client.get(path)
    assert page.status_code == 200
    urls = re.findall(r'(?:src|href|spec-url)=["\']([^"\']+)', page.text)
    urls += re.findall(r"url: '([^']+)'", page.text)
    assert urls, page.text
    for url in urls:
        assert url.startswith("/"), f"{path} loads {url}"
        if url.startswith("/ui/assets/") or url == "/openapi.json":
            assert client.get(url).status_code == 200, url
    assert "img-src 'self' data:" in page.headers["content-security-policy"]


def test_the_vendored_files_are_the_ones_listed_with_their_licences() -> None:
    readme = (VENDOR / "README.md").read_text()
    listed = [
        (digest, name)
        for digest, name in (line.split() for line in readme.splitlines() if len(line.split()) == 2)
        if re.fullmatch(r"[0-9a-f]{64}", digest)
    ]
    assert len(listed) == 4, listed
    for digest, name in listed:
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    for folder in ("swagger-ui", "redoc"):
        assert (VENDOR / folder / "LICENSE").is_file()
    assert (VENDOR / "swagger-ui" / "NOTICE").is_file()


def test_info_names_the_store_and_the_caller(client: TestClient) -> None:
    client.put("/v1/items/ns/k", json={"value": 1}, headers=AGENT)
    info = client.get("/v1/info", headers=AGENT)
    assert info.status_code == 200
    body = info.json()
    assert body["store"] == "sqlite" and body["auth"] is False and body["agent"] == "viewer"
    assert body["head"] == client.get("/v1/events/head", headers=AGENT).json()["cursor"]
    assert body["metrics"] is True and body["version"] == hivemem.__version__
    assert body["replica"]["pid"] > 0 and body["replica"]["uptime_seconds"] >= 0


def test_with_auth_on_the_pages_open_but_info_needs_credentials(tmp_path: Path) -> None:
    settings = hivemem.Settings(embedder="none", auth=True)
    with TestClient(create_app(f"sqlite:///{tmp_path}/auth.db", settings)) as c:
        # The pages hold no data; the data behind them asks for a key.
        for path in ("/ui", "/ui/assets/console.js", "/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 200, path
        refused = c.get("/v1/info", headers=AGENT)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].lower().startswith("bearer")


def test_info_lists_the_replicas_sharing_the_store(tmp_path: Path) -> None:
    settings = hivemem.Settings(embedder="none")
    url = f"sqlite:///{tmp_path}/shared.db"
    with TestClient(create_app(url, settings)) as one:
        first = one.get("/v1/info", headers=AGENT).json()
        assert [r["id"] for r in first["replicas"]] == [first["replica"]["id"]]
        with TestClient(create_app(url, settings)) as two:
            second = two.get("/v1/info", headers=AGENT).json()
            seen = one.get("/v1/info", headers=AGENT).json()["replicas"]
            assert sorted(r["id"] for r in seen) == sorted(
                [first["replica"]["id"], second["replica"]["id"]]
            )
            assert all(r["version"] == hivemem.__version__ for r in seen)
        # A replica that stops deletes its row; one that dies lets it expire (30 s).
        after = one.get("/v1/info", headers=AGENT).json()["replicas"]
        assert [r["id"] for r in after] == [first["replica"]["id"]]
        # Its rows are bookkeeping: never in the feed.
        events = one.get("/v1/events", params={"after": "0"}, headers=AGENT).json()["items"]
        assert not any(e["namespace"].startswith("_hivemem") for e in events), events
