// hivemem console: a single page over the JSON API (no framework, no build step).
// Every value from the API is put into the page as text (textContent), never as HTML.

const STORE_KEY = "hivemem.console.credentials";
const main = document.getElementById("main");

// ---------------------------------------------------------------------------------------
// Credentials and the API

function credentials() {
  try { return JSON.parse(sessionStorage.getItem(STORE_KEY)) || null; } catch { return null; }
}

function authHeaders(creds = credentials()) {
  if (!creds) return {};
  if (creds.key) return { Authorization: `Bearer ${creds.key}` };
  if (creds.agent) return { "X-Hivemem-Agent": creds.agent };
  return {};
}

class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
  }
}

async function api(method, path, { body, query, headers, signal, creds } = {}) {
  let url = path;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null) q.set(k, v);
    const s = q.toString();
    if (s) url += (url.includes("?") ? "&" : "?") + s;
  }
  const init = { method, headers: { Accept: "application/json", ...authHeaders(creds), ...(headers || {}) }, signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(url, init);
  if (res.status === 204) return null;
  const text = await res.text();
  let data = null;
  if (text) { try { data = JSON.parse(text); } catch { data = { detail: text }; } }
  if (!res.ok) {
    if (res.status === 401 && !creds) signIn("Your key or token was refused (401): sign in again.");
    throw new ApiError(res.status, data);
  }
  return data;
}

/** Path of an item under /v1/items and /v1/history: segments and key, each URL-encoded. */
function itemPath(ns, key) {
  return ns.split("/").map(encodeURIComponent).join("/") + "/" + encodeURIComponent(key);
}

// ---------------------------------------------------------------------------------------
// Small DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function json(value) { return JSON.stringify(value, null, 2); }

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.max(0, seconds);
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function num(n) { return n === null || n === undefined ? "—" : Number(n).toLocaleString(); }

function fields(pairs) {
  return h("dl", { class: "fields" }, pairs.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function notice(text, kind = "bad") {
  return h("div", { class: `notice ${kind}`, role: kind === "bad" ? "alert" : "status" }, text);
}

function errorText(err) {
  if (err instanceof ApiError) {
    const f = err.problem.field ? ` (field: ${err.problem.field})` : "";
    return `${err.status} ${err.problem.title || ""}: ${err.message}${f}`;
  }
  return String(err && err.message ? err.message : err);
}

function page(title, ...children) {
  const nodes = children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false);
  main.replaceChildren(h("h1", {}, title), ...nodes);
  document.title = `${title} · hivemem console`;
}

/** Timers and streams of the page shown; stopped when another page opens. */
let cleanups = [];
function onLeave(fn) { cleanups.push(fn); }
function leave() { for (const fn of cleanups.splice(0)) { try { fn(); } catch { /* gone */ } } }

// ---------------------------------------------------------------------------------------
// Sign in

const dialog = document.getElementById("signin");
let signInWaiters = [];

function signIn(why) {
  document.getElementById("signin-why").textContent = why || "";
  document.getElementById("signin-error").textContent = "";
  if (!dialog.open) dialog.showModal();
  document.getElementById("signin-key").focus();
  return new Promise((resolve) => signInWaiters.push(resolve));
}

document.getElementById("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const key = document.getElementById("signin-key").value.trim();
  const agent = document.getElementById("signin-agent").value.trim();
  const creds = key ? { key } : { agent: agent || "console" };
  const err = document.getElementById("signin-error");
  try {
    const info = await api("GET", "/v1/info", { creds });
    sessionStorage.setItem(STORE_KEY, JSON.stringify(creds));
    document.getElementById("signin-key").value = "";
    dialog.close();
    showWho(info);
    for (const w of signInWaiters.splice(0)) w(info);
    route();
  } catch (e) {
    err.textContent = e instanceof ApiError && e.status === 401
      ? "Refused: the key or token is not valid here (401)."
      : errorText(e);
  }
});
dialog.addEventListener("cancel", (ev) => ev.preventDefault()); // nothing works unsigned

function showWho(info) {
  const who = document.getElementById("who");
  who.textContent = `${info.agent}${info.roles.length ? ` (${info.roles.join(", ")})` : ""} · ${info.store}${info.auth ? "" : " · auth off"}`;
  document.getElementById("signout").hidden = false;
}

document.getElementById("signout").addEventListener("click", () => {
  sessionStorage.removeItem(STORE_KEY);
  document.getElementById("who").textContent = "";
  document.getElementById("signout").hidden = true;
  leave();
  main.replaceChildren();
  signIn("Signed out.");
});

let info = null;
async function ensureInfo() {
  if (info) return info;
  if (!credentials()) {
    info = await signIn("Enter an API key (hivemem agents add) or a bearer token.");
    return info;
  }
  try {
    info = await api("GET", "/v1/info");
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      sessionStorage.removeItem(STORE_KEY);
      info = await signIn("Your key or token was refused (401): sign in again.");
    } else throw e;
  }
  showWho(info);
  return info;
}

// ---------------------------------------------------------------------------------------
// Router: #/page/arg?query

const pages = {};

// A page draws after awaits: one opened before the current one (the address changed
// while it loaded) may finish later and draw over it. A route that ends after a newer one
// began marks the page dirty, and when no route is left running the current page is drawn
// again (which also stops the timers such a route registered after it was left).
let routes = 0; // routes begun
let running = 0; // routes not yet ended
let dirty = false;

async function route() {
  const mine = ++routes;
  running++;
  leave();
  delete main.dataset.ready; // set again, to the page's address, once it is drawn
  const drawn = location.hash;
  const hash = location.hash.replace(/^#\/?/, "");
  const [pathPart, queryPart] = hash.split("?");
  const parts = pathPart.split("/").filter((p) => p !== "").map(decodeURIComponent);
  const name = parts[0] || "overview";
  const query = new URLSearchParams(queryPart || "");
  const nav = { item: "namespaces", session: "sessions", task: "tasks", queue: "tasks" }[name] || name;
  for (const a of document.querySelectorAll(".top nav a")) {
    if (a.dataset.page === nav) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const show = pages[name];
  try {
    if (!show) page("Not found", notice(`No page ${name}.`));
    else {
      await ensureInfo();
      main.replaceChildren(h("p", { class: "loading" }, "Loading…"));
      await show(parts.slice(1), query);
    }
  } catch (e) {
    page("Error", notice(errorText(e)));
  }
  running--;
  if (mine !== routes) dirty = true;
  // Ready only when no other route is still running: one begun before ours that ends
  // after it marks the page dirty and draws it again, which would replace what a
  // reader of the mark (the console's tests) already holds.
  else if (location.hash === drawn && running === 0) main.dataset.ready = drawn;
  if (dirty && running === 0) {
    dirty = false;
    route();
  }
}

function go(hash) { if (location.hash === hash) route(); else location.hash = hash; }

// ---------------------------------------------------------------------------------------
// Overview

function parseMetrics(text) {
  // Prometheus text exposition: sum the samples of each family we show.
  const out = { requests: 0, errors: 0, watchers: null, cpu: null, rss: null, byStatus: {} };
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)/);
    if (!m) continue;
    const [, name, labels = "", raw] = m;
    const v = Number(raw);
    if (name === "hivemem_http_requests_total") {
      out.requests += v;
      const st = (labels.match(/status="(\d+)"/) || [])[1];
      if (st && st.startsWith("5")) out.errors += v;
    } else if (name === "hivemem_watchers") out.watchers = (out.watchers || 0) + v;
    else if (name === "process_cpu_seconds_total") out.cpu = v;
    else if (name === "process_resident_memory_bytes") out.rss = v;
  }
  return out;
}

pages.overview = async () => {
  const [status, index] = await Promise.all([api("GET", "/v1/info"), api("GET", "/v1/index").catch(() => null)]);
  const rates = h("div", { class: "cards", id: "rates" });
  page(
    "Overview",
    h("div", { class: "cards" },
      stat("Store", status.store), stat("Version", status.version),
      stat("Authentication", status.auth ? "on" : "off"), stat("Signed in as", status.agent),
      stat("Feed head", status.head, "overview-head"),
      stat("Replicas seen", num(status.replicas.length), "overview-replicas"),
      stat("Answered by", `${status.replica.host} (pid ${status.replica.pid})`),
      index && stat("Vectors waiting", `${num(index.pending)}${index.lag_seconds ? ` (${age(index.lag_seconds)})` : ""}`),
    ),
    h("h2", {}, "Replicas on this store"),
    h("div", { class: "scroll" }, h("table", { id: "replicas" },
      h("thead", {}, h("tr", {}, ["Replica", "Host", "PID", "Version", "Up for", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, status.replicas.map((r) => h("tr", {}, h("td", { class: "mono" }, r.id), h("td", {}, r.host), h("td", {}, r.pid),
        h("td", {}, r.version), h("td", {}, age(r.uptime_seconds)), h("td", {}, r.id === status.replica.id ? h("span", { class: "badge accent" }, "answered this page") : "")))))),
    h("p", { class: "muted small" }, "Each service writes a row to the store every 10 s that lives 30 s; a replica missing here has stopped or lost the store."),
    h("h2", {}, "Traffic of this replica"),
    rates,
    h("p", { class: "muted small" },
      "Request and error rates come from this replica's /metrics (each replica counts its own; ",
      "Prometheus adds them up across replicas, see deploy/prometheus)."),
  );
  if (!status.metrics) { rates.replaceWith(notice("Metrics are off on this service (setting metrics).", "good")); return; }
  let last = null;
  const tick = async () => {
    let text;
    try {
      const res = await fetch("/metrics", { headers: authHeaders() });
      if (res.status === 403 || res.status === 401) {
        rates.replaceChildren(notice("Reading /metrics needs the role admin or metrics.", "good"));
        return false;
      }
      text = await res.text();
    } catch (e) { rates.replaceChildren(notice(errorText(e))); return true; }
    const m = parseMetrics(text);
    const now = performance.now() / 1000;
    const cells = [stat("Requests served", num(m.requests)), stat("5xx answers", num(m.errors))];
    if (last) {
      const dt = now - last.at;
      const rps = (m.requests - last.m.requests) / dt;
      const eps = (m.errors - last.m.errors) / dt;
      cells.push(stat("Request rate", `${rps.toFixed(1)}/s`, "overview-rate"),
        stat("Error ratio", rps > 0 ? `${((eps / rps) * 100).toFixed(2)} %` : "—"));
      if (m.cpu !== null && last.m.cpu !== null) cells.push(stat("CPU", `${(((m.cpu - last.m.cpu) / dt) * 100).toFixed(0)} %`));
    } else cells.push(stat("Request rate", "measuring…", "overview-rate"));
    if (m.watchers !== null) cells.push(stat("Feed watchers", num(m.watchers)));
    if (m.rss !== null) cells.push(stat("Memory", `${(m.rss / 1048576).toFixed(0)} MiB`));
    rates.replaceChildren(...cells);
    last = { m, at: now };
    return true;
  };
  if (await tick()) {
    const timer = setInterval(tick, 3000);
    onLeave(() => clearInterval(timer));
  }
};

function stat(label, value, id) {
  return h("div", { class: "stat" }, h("div", { class: "label" }, label), h("div", { class: "value", id }, value ?? "—"));
}

// ---------------------------------------------------------------------------------------
// Namespaces and items

async function allPages(path, query, max = 5000) {
  const out = [];
  let cursor = null;
  do {
    const res = await api("GET", path, { query: { ...query, limit: 1000, cursor } });
    out.push(...res.items);
    cursor = res.next_cursor;
  } while (cursor && out.length < max);
  return { items: out, more: Boolean(cursor) };
}

function buildTree(namespaces) {
  const root = { children: new Map(), full: "", own: false };
  for (const ns of namespaces) {
    let node = root;
    const segs = ns.split("/");
    segs.forEach((seg, i) => {
      if (!node.children.has(seg)) node.children.set(seg, { children: new Map(), full: segs.slice(0, i + 1).join("/"), own: false });
      node = node.children.get(seg);
    });
    node.own = true;
  }
  return root;
}

function countUnder(node) {
  let n = node.own ? 1 : 0;
  for (const c of node.children.values()) n += countUnder(c);
  return n;
}

function renderTree(node, selected, counts) {
  const ul = h("ul", { role: "group" });
  for (const [seg, child] of [...node.children.entries()].sort(([a], [b]) => a.localeCompare(b))) {
    const link = h("a", { href: `#/namespaces?ns=${encodeURIComponent(child.full)}`, "aria-current": child.full === selected ? "true" : null, "data-ns": child.full }, seg);
    const label = [link];
    if (child.own && counts.has(child.full)) label.push(h("span", { class: "count" }, `${num(counts.get(child.full))} item${counts.get(child.full) === 1 ? "" : "s"}`));
    if (child.children.size) {
      const open = selected === child.full || selected.startsWith(child.full + "/") || node === undefined;
      const sub = countUnder(child) - (child.own ? 1 : 0);
      label.push(h("span", { class: "count" }, `${label.length > 1 ? "· " : ""}${sub} namespace${sub === 1 ? "" : "s"} below`));
      ul.append(h("li", {}, h("details", { open: open || child.children.size < 8 ? true : null }, h("summary", {}, label), renderTree(child, selected, counts))));
    } else ul.append(h("li", {}, label));
  }
  return ul;
}

pages.namespaces = async (_parts, query) => {
  const selected = query.get("ns") || "";
  const filter = query.get("prefix") || "";
  // One listing gives the tree and its counts: the namespaces holding live items.
  const counted = await allPages("/v1/namespaces/counts", { prefix: filter });
  const list = { items: counted.items.map((c) => c.namespace), more: counted.more };
  const counts = new Map(counted.items.map((c) => [c.namespace, c.items]));
  const tree = h("nav", { class: "tree card", "aria-label": "Namespaces" },
    list.items.length ? renderTree(buildTree(list.items), selected, counts) : h("p", { class: "muted" }, "No namespace holds a live item yet."),
    list.more ? h("p", { class: "muted small" }, "Showing the first 5,000 namespaces: narrow with a prefix.") : null);
  const right = h("section", { "aria-label": "Items" });
  const form = h("form", { class: "inline", onsubmit: (ev) => { ev.preventDefault(); go(`#/namespaces?prefix=${encodeURIComponent(ev.target.prefix.value.trim())}`); } },
    h("label", {}, "Namespace prefix", h("input", { name: "prefix", value: filter, placeholder: "team/research" })),
    h("button", { type: "submit" }, "Filter"));
  page("Namespaces", form, h("div", { class: "split" }, tree, right));
  if (selected) await showItems(right, selected, counts.get(selected));
  else right.append(h("p", { class: "muted" }, "Choose a namespace to see its items."));
}

async function showItems(into, ns, total) {
  into.replaceChildren(h("h2", {}, ns), h("p", { class: "muted small", id: "items-count" }, total === undefined ? "" : `${num(total)} live item${total === 1 ? "" : "s"}`));
  const tbody = h("tbody");
  const table = h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Key"), h("th", { class: "num" }, "Version"), h("th", {}, "Author"), h("th", {}, "Updated"), h("th", {}, "Expires"))), tbody));
  const more = h("div", { class: "pager" });
  into.append(table, more);
  let cursor = null;
  const load = async () => {
    const res = await api("GET", "/v1/items", { query: { prefix: ns, key_prefix: "", limit: 100, cursor } });
    for (const it of res.items) {
      tbody.append(h("tr", {},
        h("td", {}, h("a", { href: `#/item/${encodeURIComponent(ns)}/${encodeURIComponent(it.key)}` }, it.key)),
        h("td", { class: "num" }, it.version), h("td", {}, it.author), h("td", {}, when(it.updated_at)),
        h("td", {}, it.expires_at ? when(it.expires_at) : "never")));
    }
    cursor = res.next_cursor;
    more.replaceChildren(cursor ? h("button", { type: "button", class: "plain", onclick: load }, "Load more") : "");
    if (!tbody.children.length) tbody.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No live items here.")));
  };
  await load();
}

// One item: value, metadata, TTL, history with a diff, edit with compare-and-set, delete.
pages.item = async (parts) => {
  const [ns, key] = parts;
  let item;
  try {
    item = await api("GET", `/v1/items/${itemPath(ns, key)}`);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) { page(`${ns}/${key}`, notice("No such item (it was deleted, expired, or never written)."), backTo(ns)); return; }
    throw e;
  }
  const ttl = h("span", { id: "ttl" });
  const status = h("div", { id: "item-status" });
  const valuePre = h("pre", { id: "item-value" }, json(item.value));
  page(`${ns} / ${key}`, backTo(ns), status,
    h("div", { class: "card" }, fields([
      ["Version", h("span", { id: "item-version" }, String(item.version))],
      ["Author", item.author],
      ["Created", when(item.created_at)],
      ["Updated", when(item.updated_at)],
      ["Expires", item.expires_at ? ttl : "never"],
    ])),
    h("h2", {}, "Value"), valuePre,
    item.text ? [h("h2", {}, "Text (what search indexes)"), h("pre", {}, item.text)] : null,
    Object.keys(item.metadata || {}).length ? [h("h2", {}, "Metadata"), h("pre", {}, json(item.metadata))] : null,
    editor(ns, key, item, status),
    h("h2", {}, "History"), await history(ns, key));
  if (item.expires_at) {
    const end = new Date(item.expires_at).getTime();
    const tickTtl = () => {
      const left = (end - Date.now()) / 1000;
      ttl.textContent = left > 0 ? `in ${age(left)} (${when(item.expires_at)})` : "expired";
    };
    tickTtl();
    const t = setInterval(tickTtl, 1000);
    onLeave(() => clearInterval(t));
  }
};

function backTo(ns) { return h("p", {}, h("a", { href: `#/namespaces?ns=${encodeURIComponent(ns)}` }, `← ${ns}`)); }

function editor(ns, key, item, status) {
  const value = h("textarea", { id: "edit-value", "aria-label": "Value (JSON)", spellcheck: "false" }, json(item.value));
  const meta = h("textarea", { id: "edit-metadata", "aria-label": "Metadata (JSON object)", spellcheck: "false", style: "min-height:70px" }, json(item.metadata || {}));
  const text = h("textarea", { id: "edit-text", "aria-label": "Text", style: "min-height:60px" }, item.text || "");
  const keepTtl = h("input", { type: "checkbox", id: "edit-keep-ttl", checked: item.expires_at ? true : null });
  const save = async (ev) => {
    ev.preventDefault();
    status.replaceChildren();
    let parsed, metadata;
    try { parsed = JSON.parse(value.value); } catch (e) { status.replaceChildren(notice(`The value is not JSON: ${e.message}`)); value.focus(); return; }
    try { metadata = JSON.parse(meta.value || "{}"); } catch (e) { status.replaceChildren(notice(`The metadata is not JSON: ${e.message}`)); meta.focus(); return; }
    const body = { value: parsed, metadata, if_version: item.version };
    if (text.value) body.text = text.value;
    if (item.expires_at && keepTtl.checked) {
      const left = (new Date(item.expires_at).getTime() - Date.now()) / 1000;
      if (left > 0) body.ttl = left;
    }
    try {
      const saved = await api("PUT", `/v1/items/${itemPath(ns, key)}`, { body });
      status.replaceChildren(notice(`Saved as version ${saved.version}.`, "good"));
      status.scrollIntoView({ block: "nearest" });
      setTimeout(() => route(), 600);
    } catch (e) {
      if (e instanceof ApiError && e.status === 409) {
        const now = e.problem.current_version;
        status.replaceChildren(h("div", { class: "notice bad", role: "alert", id: "conflict" },
          h("strong", {}, "Not saved: someone else changed this item. "),
          now ? `You edited version ${item.version}; it is now at version ${now}. ` : `You edited version ${item.version}; it has since been deleted. `,
          "Your text is still in the editor. ",
          h("button", { type: "button", class: "plain", onclick: () => route() }, "Load the current version")));
        status.scrollIntoView({ block: "nearest" });
      } else status.replaceChildren(notice(errorText(e)));
    }
  };
  const del = async () => {
    if (!confirm(`Delete ${ns}/${key} and its history?`)) return;
    try {
      await api("DELETE", `/v1/items/${itemPath(ns, key)}`, { query: { if_version: item.version } });
      go(`#/namespaces?ns=${encodeURIComponent(ns)}`);
    } catch (e) {
      status.replaceChildren(notice(e instanceof ApiError && e.status === 409
        ? `Not deleted: the item changed since you opened it (now version ${e.problem.current_version ?? "?"}). Reload first.`
        : errorText(e)));
    }
  };
  return h("details", { class: "card", id: "edit" },
    h("summary", {}, "Edit"),
    h("form", { onsubmit: save },
      h("label", { for: "edit-value" }, "Value (JSON)"), value,
      h("label", { for: "edit-metadata" }, "Metadata (JSON object)"), meta,
      h("label", { for: "edit-text" }, "Text for search (optional)"), text,
      item.expires_at ? h("label", {}, keepTtl, " keep the remaining TTL") : null,
      h("p", { class: "muted small" }, `Saved with compare-and-set: only if the item is still at version ${item.version}.`),
      h("div", { class: "actions" }, h("button", { type: "submit", id: "edit-save" }, "Save"),
        h("button", { type: "button", class: "danger", onclick: del }, "Delete"))));
}

async function history(ns, key) {
  const res = await api("GET", `/v1/history/${itemPath(ns, key)}`, { query: { limit: 100 } });
  const versions = res.items;
  if (versions.length < 2) return h("p", { class: "muted" }, "One version so far.");
  const by = new Map(versions.map((v) => [v.version, v]));
  const from = h("select", { id: "diff-from", "aria-label": "Older version" }, versions.map((v) => h("option", { value: v.version }, `v${v.version}`)));
  const to = h("select", { id: "diff-to", "aria-label": "Newer version" }, versions.map((v) => h("option", { value: v.version }, `v${v.version}`)));
  from.value = String(versions[1].version);
  to.value = String(versions[0].version);
  const out = h("div", { id: "diff" });
  const show = () => {
    const a = by.get(Number(from.value)), b = by.get(Number(to.value));
    out.replaceChildren(h("p", { class: "muted small" }, `v${a.version} by ${a.author} (${when(a.updated_at)}) → v${b.version} by ${b.author} (${when(b.updated_at)})`),
      h("pre", { class: "diff" }, diffLines(json(a.value).split("\n"), json(b.value).split("\n"))));
  };
  from.addEventListener("change", show);
  to.addEventListener("change", show);
  show();
  const rows = versions.map((v) => h("tr", {}, h("td", { class: "num" }, `v${v.version}`), h("td", {}, v.author), h("td", {}, when(v.updated_at))));
  return h("div", {},
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Version"), h("th", {}, "Author"), h("th", {}, "Written"))), h("tbody", {}, rows))),
    h("h2", {}, "Difference"), h("form", { class: "inline" }, h("label", {}, "From", from), h("label", {}, "To", to)), out);
}

/** Line diff by longest common subsequence (Hunt–McIlroy's idea, O(n·m) table: values
 * here are small); lines removed, added and kept as <span> elements. */
function diffLines(a, b) {
  const n = a.length, m = b.length;
  if (n * m > 4e6) return [h("span", { class: "same" }, "(too large to compare line by line)")];
  const L = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) for (let j = m - 1; j >= 0; j--) L[i][j] = a[i] === b[j] ? L[i + 1][j + 1] + 1 : Math.max(L[i + 1][j], L[i][j + 1]);
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) { out.push(h("span", { class: "same" }, "  " + a[i])); i++; j++; }
    else if (L[i + 1][j] >= L[i][j + 1]) out.push(h("span", { class: "del" }, "- " + a[i++]));
    else out.push(h("span", { class: "add" }, "+ " + b[j++]));
  }
  while (i < n) out.push(h("span", { class: "del" }, "- " + a[i++]));
  while (j < m) out.push(h("span", { class: "add" }, "+ " + b[j++]));
  return out;
}

// ---------------------------------------------------------------------------------------
// Search

pages.search = async (_parts, query) => {
  const q = query.get("q") || "";
  const form = h("form", { class: "inline", role: "search", onsubmit: (ev) => {
    ev.preventDefault();
    const f = ev.target;
    const params = new URLSearchParams({ q: f.q.value, prefix: f.prefix.value, mode: f.mode.value, limit: f.limit.value, filter: f.filter.value });
    go(`#/search?${params}`);
  } },
    h("label", {}, "Query", h("input", { name: "q", value: q, required: true, size: 32, id: "search-q" })),
    h("label", {}, "Prefix", h("input", { name: "prefix", value: query.get("prefix") || "", placeholder: "team/" })),
    h("label", {}, "Mode", h("select", { name: "mode" }, ["hybrid", "lexical", "vector"].map((m) => h("option", { value: m, selected: (query.get("mode") || "hybrid") === m ? true : null }, m)))),
    h("label", {}, "Hits", h("input", { name: "limit", type: "number", min: 1, max: 100, value: query.get("limit") || 10, style: "width:6em" })),
    h("label", {}, "Metadata filter (JSON)", h("input", { name: "filter", value: query.get("filter") || "", placeholder: '{"topic": "db"}', size: 24 })),
    h("button", { type: "submit" }, "Search"));
  page("Search", form);
  if (!q) { main.append(h("p", { class: "muted" }, "Hybrid search fuses BM25 (words) and vector similarity (meaning) by reciprocal rank fusion.")); return; }
  const body = { query: q, prefix: query.get("prefix") || "", mode: query.get("mode") || "hybrid", limit: Number(query.get("limit") || 10) };
  if (query.get("filter")) {
    try { body.filter = JSON.parse(query.get("filter")); } catch (e) { main.append(notice(`The filter is not JSON: ${e.message}`)); return; }
  }
  let res;
  try { res = await api("POST", "/v1/search", { body }); } catch (e) { main.append(notice(errorText(e))); return; }
  if (!res.hits.length) { main.append(h("p", { class: "muted", id: "search-none" }, "No hits.")); return; }
  const rows = res.hits.map((hit, i) => {
    const it = hit.item;
    const found = [];
    if (hit.lexical_rank) found.push(h("span", { class: "badge accent" }, `words #${hit.lexical_rank}`));
    if (hit.vector_rank) found.push(" ", h("span", { class: "badge ok" }, `meaning #${hit.vector_rank}`));
    const preview = it.text || (typeof it.value === "string" ? it.value : JSON.stringify(it.value));
    return h("tr", { class: "hit" },
      h("td", { class: "num" }, i + 1),
      h("td", {}, h("a", { href: `#/item/${encodeURIComponent(it.namespace)}/${encodeURIComponent(it.key)}` }, `${it.namespace}/${it.key}`), h("div", { class: "muted small" }, preview.length > 200 ? preview.slice(0, 200) + "…" : preview)),
      h("td", { class: "num" }, hit.score.toFixed(4)),
      h("td", {}, found, hit.lexical_score !== null ? h("div", { class: "muted small" }, `BM25 ${hit.lexical_score.toFixed(3)}`) : null,
        hit.vector_score !== null ? h("div", { class: "muted small" }, `cosine ${hit.vector_score.toFixed(3)}`) : null));
  });
  main.append(h("div", { class: "scroll" }, h("table", { id: "search-hits" }, h("thead", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "Item"), h("th", { class: "num" }, "Score"), h("th", {}, "Found by"))), h("tbody", {}, rows))));
};

// ---------------------------------------------------------------------------------------
// Live feed: GET /v1/watch read as a stream (EventSource cannot send credentials headers)

const FEED_TYPES = ["item.put", "item.deleted", "item.expired", "session", "task", "agent", "publish", "other"];

function typeGroup(type) {
  if (type.startsWith("item.")) return type;
  for (const g of ["session", "task", "agent", "publish"]) if (type === g || type.startsWith(g + ".")) return g;
  return "other";
}

pages.feed = async (_parts, query) => {
  const prefix = query.get("prefix") || "";
  const list = h("div", { class: "feed card", id: "feed", "aria-live": "polite" });
  const state = h("span", { id: "feed-state", class: "muted" }, "connecting…");
  const cursorOut = h("code", { id: "feed-cursor" }, query.get("after") || "");
  const shown = new Set(FEED_TYPES);
  const boxes = FEED_TYPES.map((t) => h("label", {}, h("input", { type: "checkbox", checked: true, onchange: (ev) => {
    if (ev.target.checked) shown.add(t); else shown.delete(t);
    for (const row of list.children) row.hidden = !shown.has(row.dataset.group);
  } }), ` ${t}`));
  let controller = null;
  let last = query.get("after") || null;
  const pauseBtn = h("button", { type: "button", id: "feed-pause" }, "Pause");
  const form = h("form", { class: "inline", onsubmit: (ev) => {
    ev.preventDefault();
    const p = new URLSearchParams({ prefix: ev.target.prefix.value.trim() });
    if (ev.target.after.value.trim()) p.set("after", ev.target.after.value.trim());
    go(`#/feed?${p}`);
  } },
    h("label", {}, "Namespace prefix", h("input", { name: "prefix", value: prefix, placeholder: "all" })),
    h("label", {}, "Resume after cursor", h("input", { name: "after", value: query.get("after") || "", placeholder: "now", class: "mono" })),
    h("button", { type: "submit" }, "Follow"), pauseBtn);
  page("Live feed", form, h("div", { class: "inline", style: "display:flex;flex-wrap:wrap;gap:10px;margin-bottom:8px" }, boxes),
    h("p", { class: "small" }, state, " · last cursor ", cursorOut), list);

  const add = (ev) => {
    const group = typeGroup(ev.type);
    const target = ev.key !== null && ev.key !== undefined && ev.type.startsWith("item.") && ev.type !== "item.deleted" && ev.type !== "item.expired"
      ? h("a", { href: `#/item/${encodeURIComponent(ev.namespace)}/${encodeURIComponent(ev.key)}` }, `${ev.namespace}/${ev.key}`)
      : `${ev.namespace}${ev.key ? "/" + ev.key : ""}`;
    const row = h("div", { class: "event", "data-group": group, "data-cursor": ev.cursor },
      h("span", { class: "muted small" }, new Date(ev.at).toLocaleTimeString()),
      h("span", {}, h("span", { class: "badge" }, ev.type)),
      h("span", {}, target, ev.version ? h("span", { class: "muted small" }, ` v${ev.version}`) : null, h("span", { class: "muted small" }, ` by ${ev.author}`),
        ev.data !== null && ev.data !== undefined ? h("div", { class: "muted small mono" }, JSON.stringify(ev.data).slice(0, 300)) : null));
    row.hidden = !shown.has(group);
    list.prepend(row);
    while (list.children.length > 500) list.lastChild.remove();
    last = ev.cursor;
    cursorOut.textContent = last;
  };

  const follow = async () => {
    controller = new AbortController();
    const q = new URLSearchParams({ prefix });
    if (last) q.set("after", last);
    try {
      const res = await fetch(`/v1/watch?${q}`, { headers: { Accept: "text/event-stream", ...authHeaders() }, signal: controller.signal });
      if (!res.ok) {
        let p = {};
        try { p = await res.json(); } catch { /* not JSON */ }
        state.textContent = "stopped";
        list.before(notice(errorText(new ApiError(res.status, p))));
        return;
      }
      if (!last) { last = res.headers.get("X-Hivemem-Cursor"); cursorOut.textContent = last || ""; }
      state.textContent = "live";
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = frame.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
          if (data) { try { add(JSON.parse(data)); } catch { /* a ping or a partial frame */ } }
        }
      }
      state.textContent = "ended by the service; reconnecting…";
      setTimeout(() => { if (controller && !controller.signal.aborted) follow(); }, 1000);
    } catch (e) {
      if (controller.signal.aborted) return;
      state.textContent = `disconnected (${e.message}); reconnecting…`;
      setTimeout(() => { if (!controller.signal.aborted) follow(); }, 2000);
    }
  };
  pauseBtn.addEventListener("click", () => {
    if (controller && !controller.signal.aborted) {
      controller.abort();
      state.textContent = "paused";
      pauseBtn.textContent = "Resume";
    } else {
      pauseBtn.textContent = "Pause";
      state.textContent = "connecting…";
      follow();
    }
  });
  onLeave(() => controller && controller.abort());
  follow();
};

// ---------------------------------------------------------------------------------------
// Sessions

pages.sessions = async (_parts, query) => {
  const form = h("form", { class: "inline", onsubmit: (ev) => {
    ev.preventDefault();
    go(`#/sessions?${new URLSearchParams({ app: ev.target.app.value.trim(), user: ev.target.user.value.trim() })}`);
  } },
    h("label", {}, "App", h("input", { name: "app", value: query.get("app") || "" })),
    h("label", {}, "User", h("input", { name: "user", value: query.get("user") || "" })),
    h("button", { type: "submit" }, "List"));
  const tbody = h("tbody");
  const more = h("div", { class: "pager" });
  page("Sessions", form, h("div", { class: "scroll" }, h("table", { id: "sessions" }, h("thead", {}, h("tr", {},
    ["Session", "App", "User", "Agent", "Turns", "Messages", "Tokens in/out", "Cost", "Last activity"].map((t, i) => h("th", { class: i >= 4 && i <= 7 ? "num" : null }, t)))), tbody)), more);
  let cursor = null;
  const load = async () => {
    const res = await api("GET", "/v1/sessions", { query: { app: query.get("app") || undefined, user: query.get("user") || undefined, limit: 100, cursor } });
    for (const s of res.items) {
      tbody.append(h("tr", {}, h("td", {}, h("a", { href: `#/session/${encodeURIComponent(s.id)}` }, s.id)), h("td", {}, s.app), h("td", {}, s.user ?? "—"), h("td", {}, s.agent ?? "—"),
        h("td", { class: "num" }, num(s.turns)), h("td", { class: "num" }, num(s.messages)), h("td", { class: "num" }, `${num(s.tokens_in)} / ${num(s.tokens_out)}`),
        h("td", { class: "num" }, s.cost.toFixed(4)), h("td", {}, when(s.last_activity_at))));
    }
    if (!tbody.children.length) tbody.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No sessions.")));
    cursor = res.next_cursor;
    more.replaceChildren(cursor ? h("button", { type: "button", class: "plain", onclick: load }, "Load more") : "");
  };
  await load();
};

pages.session = async (parts) => {
  const id = parts[0];
  const s = await api("GET", `/v1/sessions/${encodeURIComponent(id)}`);
  const convo = h("div", { class: "conversation", id: "conversation" });
  const seconds = (new Date(s.last_activity_at) - new Date(s.started_at)) / 1000;
  page(`Session ${s.id}`, h("p", {}, h("a", { href: `#/sessions?app=${encodeURIComponent(s.app)}` }, `← sessions of ${s.app}`)),
    h("div", { class: "cards" }, stat("Turns", num(s.turns)), stat("Messages", num(s.messages)), stat("Tokens in", num(s.tokens_in)),
      stat("Tokens out", num(s.tokens_out)), stat("Cost", s.cost.toFixed(4)), stat("Duration", age(seconds))),
    h("div", { class: "card" }, fields([["App", s.app], ["User", s.user ?? "—"], ["Agent", s.agent ?? "—"], ["Created by", s.created_by],
      ["Started", when(s.started_at)], ["Last activity", when(s.last_activity_at)], ["Expires", s.expires_at ? when(s.expires_at) : "never"]])),
    h("h2", {}, "Conversation"), convo,
    h("h2", {}, `State (version ${s.state_version})`), h("pre", { id: "session-state" }, json(s.state)));
  let after = 0;
  const more = h("div", { class: "pager" });
  convo.after(more);
  const load = async () => {
    const res = await api("GET", `/v1/sessions/${encodeURIComponent(id)}/messages`, { query: { after, limit: 200 } });
    for (const m of res.messages) {
      const content = typeof m.content === "string" ? m.content : json(m.content);
      const costs = m.tokens_in || m.tokens_out || m.cost ? ` · ${m.tokens_in}/${m.tokens_out} tokens · ${m.cost}` : "";
      convo.append(h("div", { class: `msg ${["user", "assistant", "system", "tool"].includes(m.role) ? m.role : ""}`, "data-seq": m.seq },
        h("div", { class: "meta" }, `#${m.seq} ${m.role} · ${m.author} · ${when(m.created_at)}${costs}`), h("div", { class: "content" }, content)));
      after = m.seq;
    }
    if (!convo.children.length) convo.append(h("p", { class: "muted" }, "No messages yet."));
    more.replaceChildren(res.messages.length === 200 ? h("button", { type: "button", class: "plain", onclick: load }, "Load more") : "");
  };
  await load();
};

// ---------------------------------------------------------------------------------------
// Tasks

pages.tasks = async (_parts, query) => {
  const queue = query.get("queue") || "";
  const all = await api("GET", "/v1/queues");
  const form = h("form", { class: "inline", onsubmit: (ev) => { ev.preventDefault(); go(`#/tasks?${new URLSearchParams({ queue: ev.target.queue.value.trim(), state: ev.target.state.value })}`); } },
    h("label", {}, "Queue", h("input", { name: "queue", value: queue, required: true, list: "queues", id: "tasks-queue" })),
    h("datalist", { id: "queues" }, all.map((q) => h("option", { value: q.queue }))),
    h("label", {}, "State", h("select", { name: "state" }, ["", "ready", "delayed", "running", "completed", "dead", "cancelled"].map((s) => h("option", { value: s, selected: (query.get("state") || "") === s ? true : null }, s || "any")))),
    h("button", { type: "submit" }, "Show"));
  if (!queue) {
    const cols = ["ready", "delayed", "running", "completed", "dead", "cancelled"];
    page("Tasks", form, all.length
      ? h("div", { class: "scroll" }, h("table", { id: "queues-table" },
          h("thead", {}, h("tr", {}, h("th", {}, "Queue"), cols.map((c) => h("th", { class: "num" }, c)), h("th", { class: "num" }, "Oldest ready"))),
          h("tbody", {}, all.map((q) => h("tr", {}, h("td", {}, h("a", { href: `#/tasks?queue=${encodeURIComponent(q.queue)}` }, q.queue)),
            cols.map((c) => h("td", { class: "num" }, c === "dead" && q.dead ? h("span", { class: "badge bad" }, num(q.dead)) : num(q[c]))),
            h("td", { class: "num" }, age(q.oldest_ready_seconds)))))))
      : h("p", { class: "muted" }, "No queue holds a task yet (or none this agent may use)."));
    return;
  }
  const stats = await api("GET", `/v1/queues/${encodeURIComponent(queue)}/stats`);
  page(`Queue ${queue}`, h("p", {}, h("a", { href: "#/tasks" }, "← all queues")), form,
    h("div", { class: "cards", id: "queue-stats" }, ["ready", "delayed", "running", "completed", "dead", "cancelled"].map((k) => stat(k, num(stats[k]))),
      stat("Oldest ready", age(stats.oldest_ready_seconds))));
  const tbody = h("tbody");
  const more = h("div", { class: "pager" });
  main.append(h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Task", "State", "Attempt", "Priority", "Submitted by", "Claimed by", "Updated"].map((t) => h("th", {}, t)))), tbody)), more);
  let cursor = null;
  const load = async () => {
    const res = await api("GET", `/v1/queues/${encodeURIComponent(queue)}/tasks`, { query: { state: query.get("state") || undefined, limit: 100, cursor } });
    for (const t of res.items) tbody.append(taskRow(t));
    if (!tbody.children.length) tbody.append(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No tasks.")));
    cursor = res.next_cursor;
    more.replaceChildren(cursor ? h("button", { type: "button", class: "plain", onclick: load }, "Load more") : "");
  };
  await load();
};

function stateBadge(state) {
  const kind = { completed: "ok", dead: "bad", cancelled: "bad", running: "accent" }[state] || "";
  return h("span", { class: `badge ${kind}` }, state);
}

function taskRow(t) {
  return h("tr", {}, h("td", {}, h("a", { href: `#/task/${encodeURIComponent(t.id)}`, class: "mono" }, t.id)), h("td", {}, stateBadge(t.state)),
    h("td", { class: "num" }, `${t.attempt}/${t.max_attempts}`), h("td", { class: "num" }, t.priority), h("td", {}, t.submitted_by), h("td", {}, t.claimed_by ?? "—"), h("td", {}, when(t.updated_at)));
}

pages.task = async (parts) => {
  const t = await api("GET", `/v1/tasks/${encodeURIComponent(parts[0])}`);
  const status = h("div");
  const act = (verb) => async () => {
    try {
      await api("POST", `/v1/tasks/${encodeURIComponent(t.id)}/${verb}`, { body: {} });
      route();
    } catch (e) { status.replaceChildren(notice(errorText(e))); }
  };
  page(`Task ${t.id}`, h("p", {}, h("a", { href: `#/tasks?queue=${encodeURIComponent(t.queue)}` }, `← queue ${t.queue}`)), status,
    h("div", { class: "card" }, fields([["State", stateBadge(t.state)], ["Queue", t.queue], ["Attempt", `${t.attempt} of ${t.max_attempts}`], ["Priority", t.priority],
      ["Submitted by", t.submitted_by], ["Claimed by", t.claimed_by ?? "—"], ["Lease until", t.lease_expires_at ? when(t.lease_expires_at) : "—"],
      ["Due", when(t.run_at)], ["Created", when(t.created_at)], ["Finished", when(t.finished_at)], ["Idempotency key", t.idempotency_key ?? "—"]])),
    h("div", { class: "actions" },
      ["dead", "cancelled"].includes(t.state) ? h("button", { type: "button", onclick: act("requeue"), id: "task-requeue" }, "Requeue") : null,
      ["ready", "delayed", "running"].includes(t.state) ? h("button", { type: "button", class: "danger", onclick: act("cancel"), id: "task-cancel" }, "Cancel") : null),
    h("h2", {}, "Payload"), h("pre", {}, json(t.payload)),
    t.result !== null ? [h("h2", {}, "Result"), h("pre", {}, json(t.result))] : null,
    h("h2", {}, "Attempts that failed"),
    t.errors.length ? h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, Object.keys(t.errors[0]).map((k) => h("th", {}, k)))),
      h("tbody", {}, t.errors.map((e) => h("tr", {}, Object.values(e).map((v) => h("td", { class: "small" }, typeof v === "string" ? v : JSON.stringify(v)))))))) : h("p", { class: "muted" }, "None."));
};

// ---------------------------------------------------------------------------------------
// Agents (the registry)

pages.agents = async (_parts, query) => {
  const form = h("form", { class: "inline", onsubmit: (ev) => { ev.preventDefault(); go(`#/agents?${new URLSearchParams({ capability: ev.target.capability.value.trim() })}`); } },
    h("label", {}, "Capability", h("input", { name: "capability", value: query.get("capability") || "" })), h("button", { type: "submit" }, "Filter"));
  const agents = await api("GET", "/v1/registry", { query: { capability: query.get("capability") || undefined, healthy: "all" } });
  const now = Date.now();
  page("Agents", form, h("div", { class: "scroll" }, h("table", { id: "agents" }, h("thead", {}, h("tr", {}, ["Agent", "Health", "Heartbeat age", "Capabilities", "Endpoint", "Registered by"].map((t) => h("th", {}, t)))),
    h("tbody", {}, agents.length ? agents.map((a) => h("tr", {}, h("td", {}, a.name), h("td", {}, h("span", { class: `badge ${a.healthy ? "ok" : "bad"}` }, a.healthy ? "alive" : "down")),
      h("td", {}, age((now - new Date(a.last_seen).getTime()) / 1000)), h("td", {}, a.capabilities.map((c) => [h("span", { class: "badge" }, c), " "])),
      h("td", {}, a.endpoint ?? "—"), h("td", {}, a.registered_by))) : h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No agent is registered."))))));
};

// ---------------------------------------------------------------------------------------

window.addEventListener("hashchange", route);
route();
