"""The web console (``/ui``) and the API documentation pages in a real browser: Debian's
headless Chromium driven by Selenium through ``chromedriver``.

The browser is cut off from everything but loopback (a proxy that does not exist for
every other host, and a resolver that knows no names), so a page that needed a CDN would
not render. Each test writes screenshots to ``$HIVEMEM_SCREENSHOTS`` (default
``test-artifacts/console``; CI keeps the folder, git ignores it).

Marked ``matrix`` (left out of the default run, like the other heavy process tests) and
``browser``: ``.ci/run`` installs ``chromium`` and ``chromium-driver`` and runs them on
their own, ``-m "matrix and browser" -n 0``, after the other matrix tests, so that the
one-second bound of the live feed is not measured beside a Redis Cluster failover.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

import hivemem
from tests.conftest import ServiceProcess
from tests.test_permissions import POLICY, add_agent

pytestmark = [pytest.mark.matrix, pytest.mark.browser, pytest.mark.xdist_group("browser")]

SHOTS = Path(os.environ.get("HIVEMEM_SCREENSHOTS", "test-artifacts/console"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser(width: int = 1366, height: int = 900) -> Any:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("the browser tests need Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        # Only loopback is reachable: every other host goes to a proxy that is not there
        # (loopback itself bypasses proxies), and no name resolves.
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def open_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A service without auth (the X-Hivemem-Agent header names the caller)."""
    svc = ServiceProcess(tmp_path_factory.mktemp("console") / "hive.db")
    svc.start()
    try:
        yield svc
    finally:
        svc.terminate()


def shot(driver: Any, name: str) -> Path:
    """Save a screenshot of the whole page as ``<SHOTS>/<name>.png``."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, min(max(height + 120, 600), 4000))
    driver.save_screenshot(str(path))
    return path


def wait(driver: Any, condition: Callable[[Any], Any], timeout: float = 10) -> Any:
    """Poll ``condition`` every 50 ms; an element missing or replaced while the page draws
    itself again counts as "not yet"."""
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, 0.05, ignored).until(condition)


def css(driver: Any, selector: str, timeout: float = 10) -> Any:
    return wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector), timeout)


def sign_in(driver: Any, base: str, *, agent: str | None = None, key: str | None = None) -> None:
    driver.get(base + "/ui")
    css(driver, "#signin-key")
    if key is not None:
        driver.find_element(By.ID, "signin-key").send_keys(key)
    else:
        driver.find_element(By.CSS_SELECTOR, "#signin-noauth summary").click()
        driver.find_element(By.ID, "signin-agent").send_keys(agent or "console")
    driver.find_element(By.ID, "signin-submit").click()
    wait(driver, lambda d: d.find_element(By.ID, "who").text != "")


def visit(driver: Any, base: str, hash_: str) -> None:
    """Open the console at ``hash_`` and wait until that page is drawn (the console marks
    ``<main data-ready>`` with the address it drew)."""
    driver.get(f"{base}/ui{hash_}")
    wait(driver, lambda d: d.find_element(By.ID, "main").get_attribute("data-ready") == hash_)


def live(driver: Any) -> None:
    """Wait until the feed page's stream is open (what it said otherwise, on failure)."""
    try:
        wait(driver, lambda d: d.find_element(By.ID, "feed-state").text == "live", 30)
    except TimeoutException:
        state = driver.find_element(By.ID, "feed-state").text
        pytest.fail(f"the feed did not connect: {state!r}; {driver.get_log('browser')}")


def no_console_errors(driver: Any) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # A 409 or 404 the page asked for and shows is logged by Chromium as a failed fetch.
    unexpected = [e for e in errors if " 409 " not in e["message"] and " 404 " not in e["message"]]
    assert not unexpected, unexpected


def loopback_only(driver: Any, base: str) -> list[dict[str, Any]]:
    """The resources the page loaded, asserted to come from the service; a request for
    anything else must have been refused by the page's Content-Security-Policy before it
    left the browser (Chromium's network log says why each failed)."""
    entries: list[dict[str, Any]] = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => ({name: e.name, "
        "size: e.transferSize, body: e.decodedBodySize}))"
    )
    sent: dict[str, str] = {}
    blocked: dict[str, str] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message.get("method") == "Network.loadingFailed":
            blocked[params["requestId"]] = params.get("blockedReason", "")
    outside = {
        rid: url for rid, url in sent.items() if not url.startswith((base, "data:", f"blob:{base}"))
    }
    assert all(blocked.get(rid) == "csp" for rid in outside), (outside, blocked)
    assert all(e["size"] == 0 for e in entries if not e["name"].startswith(base)), entries
    return [e for e in entries if e["name"].startswith(base)]


# ---------------------------------------------------------------------------------------


def test_an_item_put_by_a_client_is_browsed_to_and_shown(browser: Any, open_service: Any) -> None:
    base = open_service.url
    with hivemem.connect_sync(base, agent="planner") as hive:
        hive.put(
            "team/a", "plan", {"step": 1, "goal": "ship the console"}, metadata={"kind": "plan"}
        )
        hive.put("team/a", "notes", "short", ttl=3600)
        hive.put("team/a/deep", "x", 1)
        hive.put("team/b", "y", 2)
    sign_in(browser, base, agent="console")
    shot(browser, "overview")
    visit(browser, base, "#/namespaces")
    tree = css(browser, "nav.tree")
    assert "team" in tree.text and "a" in tree.text
    browser.find_element(By.CSS_SELECTOR, 'a[data-ns="team/a"]').click()
    count = css(browser, "#items-count")
    wait(browser, lambda d: "2 live items" in count.text)
    tree = browser.find_element(By.CSS_SELECTOR, "nav.tree")  # the page was drawn again
    assert "2 items" in tree.text  # the tree's own count for team/a
    shot(browser, "namespaces")
    browser.find_element(By.LINK_TEXT, "plan").click()
    value = css(browser, "#item-value")
    assert json.loads(value.text) == {"step": 1, "goal": "ship the console"}
    assert "planner" in browser.find_element(By.TAG_NAME, "main").text
    shot(browser, "item")
    visit(browser, base, "#/item/team%2Fa/notes")
    ttl = css(browser, "#ttl")
    assert ttl.text.startswith("in ") and "min" in ttl.text, ttl.text
    no_console_errors(browser)


def test_an_edit_from_a_stale_version_shows_the_conflict(browser: Any, open_service: Any) -> None:
    base = open_service.url
    with hivemem.connect_sync(base, agent="writer") as hive:
        hive.put("team/c", "doc", {"text": "first"})
        sign_in(browser, base, agent="editor")
        visit(browser, base, "#/item/team%2Fc/doc")
        css(browser, "#item-value")
        browser.find_element(By.CSS_SELECTOR, "#edit summary").click()
        hive.put("team/c", "doc", {"text": "written meanwhile by another agent"})  # version 2
    editor = browser.find_element(By.ID, "edit-value")
    editor.clear()
    editor.send_keys('{"text": "my edit of version 1"}')
    browser.find_element(By.ID, "edit-save").click()
    conflict = css(browser, "#conflict")
    assert "Not saved" in conflict.text
    assert "You edited version 1; it is now at version 2" in conflict.text
    shot(browser, "item-conflict")
    with hivemem.connect_sync(base, agent="writer") as hive:
        item = hive.get("team/c", "doc")
    assert item is not None and item.value == {"text": "written meanwhile by another agent"}

    # From the current version the same edit goes through, and the diff shows it.
    conflict.find_element(By.TAG_NAME, "button").click()
    wait(browser, lambda d: d.find_element(By.ID, "item-version").text == "2")
    browser.find_element(By.CSS_SELECTOR, "#edit summary").click()
    editor = browser.find_element(By.ID, "edit-value")
    editor.clear()
    editor.send_keys('{"text": "my edit of version 2"}')
    browser.find_element(By.ID, "edit-save").click()
    wait(browser, lambda d: "Saved as version 3" in d.find_element(By.TAG_NAME, "main").text)
    wait(browser, lambda d: d.find_element(By.ID, "item-version").text == "3")
    diff = css(browser, "#diff")
    added = [e.text for e in diff.find_elements(By.CSS_SELECTOR, ".add")]
    removed = [e.text for e in diff.find_elements(By.CSS_SELECTOR, ".del")]
    assert added == ['+   "text": "my edit of version 2"'], added
    assert removed == ['-   "text": "written meanwhile by another agent"'], removed
    shot(browser, "item-history-diff")


def test_a_write_by_another_process_reaches_the_live_feed_within_a_second(
    browser: Any, open_service: Any
) -> None:
    base = open_service.url
    sign_in(browser, base, agent="watcher")
    visit(browser, base, "#/feed?prefix=live")
    live(browser)
    script = (
        "import sys, time, hivemem\n"
        "with hivemem.connect_sync(sys.argv[1], agent='other-pod') as hive:\n"
        "    hive.put('live/feed', 'tick', {'n': 1})\n"
        "    print(time.time(), flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, base], capture_output=True, text=True, timeout=60, check=True
    )
    written = float(proc.stdout.strip().splitlines()[-1])
    row = css(browser, '#feed .event[data-group="item.put"]', timeout=5)
    seen = time.time()
    assert "live/feed/tick" in row.text and "other-pod" in row.text, row.text
    assert seen - written < 1.0, f"the event appeared {seen - written:.3f} s after the write"
    shot(browser, "feed")

    # Paused, a write is not shown; resumed from the last cursor, it is.
    browser.find_element(By.ID, "feed-pause").click()
    wait(browser, lambda d: d.find_element(By.ID, "feed-state").text == "paused")
    with hivemem.connect_sync(base, agent="other-pod") as hive:
        hive.put("live/feed", "tock", 2)
    time.sleep(0.5)
    assert "live/feed/tock" not in browser.find_element(By.ID, "feed").text
    browser.find_element(By.ID, "feed-pause").click()
    wait(browser, lambda d: "live/feed/tock" in d.find_element(By.ID, "feed").text, timeout=5)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#feed .event")) == 2

    # Unticking a type hides its rows; ticking it again shows them.
    box = browser.find_element(By.XPATH, "//label[normalize-space()='item.put']/input")
    rows = browser.find_elements(By.CSS_SELECTOR, "#feed .event")
    box.click()
    wait(browser, lambda d: not any(r.is_displayed() for r in rows))
    box.click()
    wait(browser, lambda d: all(r.is_displayed() for r in rows))


def test_a_session_opens_as_a_conversation(browser: Any, open_service: Any) -> None:
    base = open_service.url
    with hivemem.connect_sync(base, agent="support-bot") as hive:
        session = hive.create_session(app="support", user="u1", state={"stage": "triage"})
        hive.append_messages(
            session.id,
            [
                {"role": "user", "content": "My export fails with error 42.", "tokens_in": 12},
                {
                    "role": "assistant",
                    "content": "Error 42 means the disk is full; free some space.",
                    "tokens_out": 30,
                    "cost": 0.0021,
                },
            ],
        )
    sign_in(browser, base, agent="console")
    visit(browser, base, "#/sessions?app=support")
    css(browser, "#sessions").find_element(By.LINK_TEXT, session.id).click()
    convo = css(browser, "#conversation")
    wait(browser, lambda d: len(convo.find_elements(By.CSS_SELECTOR, ".msg")) == 2)
    msgs = convo.find_elements(By.CSS_SELECTOR, ".msg")
    assert "My export fails with error 42." in msgs[0].text and "user" in msgs[0].text
    assert "disk is full" in msgs[1].text and "assistant" in msgs[1].text
    assert "user" in msgs[0].get_attribute("class")
    page = browser.find_element(By.TAG_NAME, "main").text
    assert "Turns\n1" in page and "Tokens in\n12" in page and "Tokens out\n30" in page
    assert json.loads(browser.find_element(By.ID, "session-state").text) == {"stage": "triage"}
    shot(browser, "session")


def test_search_shows_the_hit_and_how_it_was_found(browser: Any, open_service: Any) -> None:
    base = open_service.url
    with hivemem.connect_sync(base, agent="researcher") as hive:
        hive.put("team/r", "q3", {"owner": "fin"}, text="the quarterly revenue forecast for Q3")
        hive.put("team/r", "lunch", {"owner": "ops"}, text="where the team goes for lunch")
    sign_in(browser, base, agent="console")
    visit(browser, base, "#/search")
    box = css(browser, "#search-q")
    box.send_keys("revenue forecast", Keys.ENTER)
    hits = css(browser, "#search-hits")
    rows = hits.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert "team/r/q3" in rows[0].text and "words #1" in rows[0].text, rows[0].text
    # Hybrid: the other item may come up by meaning, never by its words.
    assert all("words #" not in r.text for r in rows if "team/r/lunch" in r.text)
    shot(browser, "search")


def test_tasks_and_agents_pages(browser: Any, open_service: Any) -> None:
    base = open_service.url
    with hivemem.connect_sync(base, agent="planner") as hive:
        hive.register("researcher-1", capabilities=["research", "summarise"], ttl=60)
        task = hive.submit("research", {"topic": "vector indexes"}, max_attempts=1)
        hive.submit("research", {"topic": "feeds"})
        claimed = hive.claim("research", lease=30)
        assert claimed is not None and claimed.id == task.id
        hive.fail(claimed, "source unreachable")
        sign_in(browser, base, agent="console")
        visit(browser, base, "#/tasks")
        queues = css(browser, "#queues-table")
        row = queues.find_element(By.XPATH, ".//tr[td/a[text()='research']]")
        assert row.text.split()[:7] == ["research", "1", "0", "0", "0", "1", "0"], row.text
        shot(browser, "queues")
        row.find_element(By.LINK_TEXT, "research").click()
        stats = css(browser, "#queue-stats")
        assert "dead\n1" in stats.text and "ready\n1" in stats.text, stats.text
        shot(browser, "tasks")
        browser.find_element(By.LINK_TEXT, task.id).click()
        css(browser, "#task-requeue")
        assert "source unreachable" in browser.find_element(By.TAG_NAME, "main").text
        shot(browser, "task")
        browser.find_element(By.ID, "task-requeue").click()
        wait(browser, lambda d: d.find_elements(By.ID, "task-cancel"))
        assert hive.get_task(task.id).state == "ready"
        visit(browser, base, "#/agents")
        table = css(browser, "#agents")
        assert "researcher-1" in table.text and "alive" in table.text and "summarise" in table.text
        shot(browser, "agents")


def test_overview_counts_requests_and_the_page_is_small(browser: Any, open_service: Any) -> None:
    base = open_service.url
    sign_in(browser, base, agent="console")
    visit(browser, base, "#/")
    css(browser, "#overview-rate")
    wait(browser, lambda d: d.find_element(By.ID, "overview-rate").text.endswith("/s"), timeout=10)
    assert "sqlite" in browser.find_element(By.TAG_NAME, "main").text
    assert browser.find_element(By.ID, "overview-replicas").text == "1"
    assert "answered this page" in browser.find_element(By.ID, "replicas").text
    entries = loopback_only(browser, base)
    nav = browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0]; return n.decodedBodySize"
    )
    assets = sum(e["body"] for e in entries if "/ui/assets/" in e["name"])
    weight = {"html": nav, "assets": assets, "total": nav + assets}
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "page-weight.json").write_text(json.dumps(weight, indent=2))
    assert weight["total"] < 100_000, weight  # no framework, nothing vendored on /ui
    shot(browser, "overview-rates")


def test_narrow_window_dark_mode_and_keyboard(open_service: Any) -> None:
    base = open_service.url
    driver = _browser()
    try:
        with hivemem.connect_sync(base, agent="planner") as hive:
            hive.put("team/n", "k", {"narrow": True})
        # Headless Chromium's windows are at least 500 px wide: a phone-sized viewport.
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 380, "height": 800, "deviceScaleFactor": 1, "mobile": False},
        )
        sign_in(driver, base, agent="console")
        visit(driver, base, "#/namespaces?ns=team%2Fn")
        css(driver, "#items-count")
        inner, wide = driver.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth]"
        )
        assert inner == 380 and wide <= inner, f"the page is {wide} px wide in {inner} px"
        shot(driver, "narrow-namespaces")

        light = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        driver.execute_cdp_cmd(
            "Emulation.setEmulatedMedia",
            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
        )
        dark = driver.execute_script("return getComputedStyle(document.body).backgroundColor")
        assert light != dark and dark == "rgb(19, 20, 22)", (light, dark)
        shot(driver, "narrow-namespaces-dark")

        # Keyboard: Tab from the top reaches the skip link, then the nav links in order.
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
        reached = []
        for _ in range(9):
            reached.append(driver.switch_to.active_element.text)
            driver.switch_to.active_element.send_keys(Keys.TAB)
        assert reached[:3] == ["Skip to content", "hivemem", "Overview"], reached
        assert "Agents" in reached
    finally:
        driver.quit()


def test_an_agent_limited_to_team_a_never_sees_team_b(
    browser: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base_dir = tmp_path_factory.mktemp("console-auth")
    (base_dir / "policy.toml").write_text(POLICY)
    store = base_dir / "hive.db"
    key_a = add_agent(f"sqlite:///{store}", "a")
    key_boss = add_agent(f"sqlite:///{store}", "boss", "admin")
    svc = ServiceProcess(
        store,
        env={
            "HIVEMEM_AUTH": "true",
            "HIVEMEM_EMBEDDER": "none",
            "HIVEMEM_POLICY_FILE": str(base_dir / "policy.toml"),
        },
    )
    svc.start()
    try:
        base = svc.url
        with hivemem.connect_sync(base, api_key=key_boss) as boss:
            boss.put("team/a", "mine", {"word": "zebracorn"}, text="zebracorn notes of a")
            boss.put("team/b", "theirs", {"word": "zebracorn"}, text="zebracorn notes of b")
            b_session = boss.create_session(app="team", user="b", state={"word": "zebracorn"})
        # Without credentials the console asks for them; a wrong key is refused.
        browser.get(base + "/ui")
        css(browser, "#signin-key").send_keys("hm_not-a-key")
        browser.find_element(By.ID, "signin-submit").click()
        wait(browser, lambda d: "401" in d.find_element(By.ID, "signin-error").text)
        browser.find_element(By.ID, "signin-key").clear()
        browser.find_element(By.ID, "signin-key").send_keys(key_a)
        browser.find_element(By.ID, "signin-submit").click()
        wait(browser, lambda d: d.find_element(By.ID, "who").text.startswith("a"))

        def page_has_no_b(hash_: str) -> str:
            visit(browser, base, hash_)
            text = browser.find_element(By.TAG_NAME, "main").text
            assert "team/b" not in text and "theirs" not in text, (hash_, text)
            assert "team/b" not in browser.page_source
            return text

        assert "team" in page_has_no_b("#/namespaces")
        tree = page_has_no_b("#/namespaces?ns=team%2Fa")
        assert "mine" in tree
        hits = page_has_no_b("#/search?q=zebracorn&mode=lexical")
        assert "team/a/mine" in hits
        page_has_no_b("#/sessions")
        assert b_session.id not in browser.page_source  # b's session is not listed to a
        visit(browser, base, f"#/session/{b_session.id}")
        assert "zebracorn" not in browser.page_source
        visit(browser, base, "#/item/team%2Fb/theirs")  # the address names team/b, nothing else
        assert "No such item" in browser.find_element(By.TAG_NAME, "main").text
        assert "notes of b" not in browser.page_source
        page_has_no_b("#/feed")
        live(browser)
        with hivemem.connect_sync(base, api_key=key_boss) as boss:
            boss.put("team/b", "later", 1)
            boss.put("team/a", "later", 1)
        wait(browser, lambda d: "team/a/later" in d.find_element(By.ID, "feed").text, timeout=5)
        assert "team/b" not in browser.find_element(By.ID, "feed").text
        shot(browser, "auth-feed-team-a")
        # Metrics need the admin or metrics role: the overview says so instead of failing.
        overview = page_has_no_b("#/")
        wait(browser, lambda d: "needs the role" in d.find_element(By.TAG_NAME, "main").text)
        assert "a" in overview
    finally:
        svc.terminate()


def test_the_api_docs_render_with_only_loopback_reachable(browser: Any, open_service: Any) -> None:
    base = open_service.url
    browser.get(base + "/docs")
    try:
        wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 20, 20)
    except TimeoutException:
        pytest.fail(f"Swagger UI did not render: {browser.get_log('browser')}")
    assert "hivemem" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    loopback_only(browser, base)
    shot(browser, "docs")
    browser.get(base + "/redoc")
    wait(browser, lambda d: "/v1/items" in d.find_element(By.TAG_NAME, "body").text, 30)
    loopback_only(browser, base)
    shot(browser, "redoc")
