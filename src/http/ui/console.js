// The chunkbus console. Every figure comes from the node (GET /v1/console,
// GET /v1/categories/{c}/console, the chunk read route for the tail); this
// script only lays them out. Text goes into the page as text, never as HTML.
"use strict";

const REFRESH_MS = 2000;
const TAIL_LINES = 500;
const TOKEN_KEY = "chunkbus-token";

const $ = (id) => document.getElementById(id);
let refreshTimer = null;
let tailGeneration = 0;
// Aborts the tail's requests (its long polls above all) when the tail stops.
let tailAbort = new AbortController();

// Stops the tail: its loops end at their next check, and its requests in
// flight are cancelled now rather than when their long polls time out.
function stopTail() {
  tailGeneration++;
  tailAbort.abort();
  tailAbort = new AbortController();
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const t = token();
  if (t) headers.set("Authorization", "Bearer " + t);
  const resp = await fetch(path, { ...init, headers, cache: "no-store" });
  if (resp.status === 401 || resp.status === 403) {
    const body = await resp.json().catch(() => ({}));
    const err = new Error(body.error || resp.statusText);
    err.status = resp.status;
    throw err;
  }
  return resp;
}

async function json(path, signal) {
  const resp = await api(path, { signal });
  if (!resp.ok) throw new Error(`${path}: ${resp.status} ${resp.statusText}`);
  return resp.json();
}

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fill(tbody, rows) { tbody.replaceChildren(...rows); }

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function rate(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return n.toFixed(n < 10 ? 1 : 0);
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return "now";
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function badge(text, cls) { return el("span", { class: "badge " + cls }, text); }

function sparkline(values) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 120 24");
  svg.setAttribute("preserveAspectRatio", "none");
  if (values.length > 1) {
    const max = Math.max(...values, 1);
    const step = 120 / (values.length - 1);
    const points = values.map((v, i) => `${(i * step).toFixed(1)},${(23 - (v / max) * 22).toFixed(1)}`);
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
  }
  return svg;
}

function diskBar(disk) {
  if (!disk) return "–";
  const bar = el("span", { class: "bar", title: `${bytes(disk.used_bytes)} of ${bytes(disk.total_bytes)}; high water ${disk.high_water_percent}%` });
  const used = el("span");
  used.style.width = Math.min(100, disk.used_percent) + "%";
  const mark = el("i");
  mark.style.left = Math.min(100, disk.high_water_percent) + "%";
  bar.append(used, mark);
  return el("span", {}, bar, ` ${disk.used_percent}% / ${disk.high_water_percent}%`);
}

// ---- overview ----

function renderOverview(v) {
  $("node-name").textContent = `node ${v.node} · ${v.version} · up ${duration(v.uptime_seconds)}`;
  $("refreshed").textContent = "as of " + v.taken_at;
  const c = v.cluster;
  $("nodes-up").textContent = `${c.nodes_up} up` + (c.nodes_down ? `, ${c.nodes_down} down` : "");
  $("nodes-up").className = "value " + (c.nodes_down ? "down" : "up");
  $("lines-in").textContent = rate(c.lines_per_second);
  $("bytes-in").textContent = bytes(c.bytes_per_second) + "/s";
  $("s3-backlog").textContent = c.s3_backlog_chunks === null
    ? "S3 off" : `${c.s3_backlog_chunks} chunks, ${bytes(c.s3_backlog_bytes)}`;
  $("errors-5m").textContent = c.errors_last_5m;
  $("under-replicated").textContent = `${c.under_replicated_chunks} (replicas: ${c.replicas || "all"})`;
  $("under-replicated").className = "value " + (c.under_replicated_chunks ? "lagging" : "up");

  fill($("nodes").tBodies[0], v.nodes.map((n) => {
    const state = n.this_node ? badge("this node", "up")
      : n.forgotten ? badge("forgotten", "forgotten")
      : n.up ? badge("up", "up") : badge("down", "down");
    return el("tr", { "data-node": n.name, "data-state": n.up ? "up" : "down" },
      el("td", {}, n.name, n.address ? el("div", { class: "muted" }, n.address) : null),
      el("td", { title: n.last_error || "" }, state,
        n.last_error ? el("div", { class: "muted" }, n.last_error) : null),
      el("td", {}, n.this_node ? "–" : duration(n.last_contact_seconds) + (n.last_contact_seconds >= 1 ? " ago" : "")),
      el("td", {}, n.this_node ? "–" : `${bytes(n.lag_bytes)}, ${duration(n.lag_seconds)}`),
      el("td", {}, diskBar(n.disk)),
      el("td", {}, n.version || "–"));
  }));

  fill($("categories").tBodies[0], v.categories.map((cat) => {
    const ch = cat.chunks;
    return el("tr", { "data-category": cat.name, "data-lines-per-second": cat.lines_per_second },
      el("td", {}, el("a", { href: "#/category/" + encodeURIComponent(cat.name) }, cat.name)),
      el("td", { class: "num" }, rate(cat.lines_per_second)),
      el("td", { class: "num" }, bytes(cat.bytes_per_second) + "/s"),
      el("td", {}, sparkline(cat.history)),
      el("td", {}, `${ch.total}: ${ch.open} / ${ch.local} / ${ch.uploaded} / ${ch.evicted} (${bytes(ch.bytes)})`),
      el("td", {}, duration(cat.oldest_not_uploaded_seconds)),
      el("td", { class: "num" }, bytes(cat.max_consumer_lag_bytes)));
  }));

  const consumers = v.categories.flatMap((cat) => cat.consumers.map((co) => [cat.name, co]));
  fill($("consumers").tBodies[0], consumers.map(([cat, co]) => {
    const positions = Object.entries(co.positions).map(([, p]) => `${p.chunk}@${p.offset}`);
    return el("tr", { "data-consumer": `${cat}/${co.name}`, "data-stalled": co.stalled },
      el("td", {}, cat),
      el("td", {}, co.name),
      el("td", {}, ...positions.flatMap((p) => [p, el("br")]).slice(0, -1)),
      el("td", { class: "num" }, bytes(co.lag_bytes)),
      el("td", {}, duration(co.lag_seconds)),
      el("td", {}, co.last_ack ? duration(co.last_ack_seconds) + " ago" : "not since start"),
      el("td", {}, co.stalled ? badge("stalled", "stalled")
        : co.lag_bytes > 0 ? badge("behind", "lagging") : badge("caught up", "ok")));
  }));

  $("errors").replaceChildren(...(v.errors.length
    ? v.errors.map((e) => el("li", { class: e.level }, `${e.time} ${e.level} ${e.target}: ${e.message}`))
    : [el("li", { class: "muted" }, "none")]));

  const requests = [...v.requests].sort((a, b) => b.count - a.count);
  fill($("requests").tBodies[0], requests.map((r) =>
    el("tr", {}, el("td", {}, `${r.method} ${r.route}`),
      el("td", { class: r.status >= 500 ? "down" : r.status >= 400 ? "lagging" : "" }, r.status),
      el("td", { class: "num" }, r.count))));
}

// ---- category view ----

function renderChunks(d) {
  $("category-title").textContent = d.name;
  fill($("chunks").tBodies[0], d.chunks.map((c) => {
    const where = [c.local ? "local" : null, c.uploaded ? (c.local ? "S3" : "S3 only (evicted)") : null]
      .filter(Boolean).join(" + ") || "held elsewhere";
    return el("tr", { "data-chunk": c.name, "data-state": c.state },
      el("td", {}, c.name), el("td", {}, c.owner),
      el("td", { class: "num" }, bytes(c.size)),
      el("td", { class: "num" }, c.lines === null ? "–" : c.lines),
      el("td", {}, c.state),
      el("td", {}, c.replicas === null ? "copy" : `replicated ${c.replicas}/${d.replicas_wanted}`),
      el("td", {}, where),
      el("td", {}, duration(c.age_seconds)));
  }));
  $("chunks-left-out").textContent = d.left_out ? `${d.left_out} older chunks not shown` : "";
}

function appendTail(text) {
  const pre = $("tail");
  const lines = (pre.textContent + text).split("\n");
  const keep = lines.length > TAIL_LINES + 1 ? lines.slice(lines.length - TAIL_LINES - 1) : lines;
  pre.textContent = keep.join("\n");
  pre.scrollTop = pre.scrollHeight;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function chunksOf(category, query, signal) {
  return json(`/v1/categories/${encodeURIComponent(category)}/chunks${query}`, signal);
}

// Follows one owner's newest chunk with long-polling reads, moving on to
// its next chunk when one completes.
async function followOwner(category, start, generation, signal) {
  let { chunk, offset } = start;
  while (generation === tailGeneration) {
    let resp;
    try {
      resp = await api(`/v1/categories/${encodeURIComponent(category)}/chunks/${encodeURIComponent(chunk)}` +
        `?offset=${offset}&max_bytes=65536&wait=20s`, { signal });
    } catch (e) { await sleep(2000); continue; }
    if (generation !== tailGeneration) return;
    if (resp.ok) {
      const text = await resp.text();
      if (text) appendTail(text);
      offset = Number(resp.headers.get("chunkbus-next-offset") || offset);
      const complete = resp.headers.get("chunkbus-complete") === "true";
      const size = Number(resp.headers.get("chunkbus-chunk-size") || 0);
      if (!(complete && offset >= size)) continue;
    } else {
      await sleep(2000);
    }
    // The chunk is complete (or gone): the owner's next one, when it exists.
    const owner = start.owner;
    const next = await chunksOf(category, `?owner=${encodeURIComponent(owner)}&after=${encodeURIComponent(chunk)}&limit=1`, signal).catch(() => []);
    if (next.length) { chunk = next[0].name; offset = 0; } else { await sleep(2000); }
  }
}

async function tail(category, generation, signal) {
  $("tail").textContent = "";
  const followed = new Set();
  let first = true;
  while (generation === tailGeneration) {
    const chunks = await chunksOf(category, "", signal).catch(() => []);
    const newest = new Map();
    for (const c of chunks) newest.set(c.owner, c); // sorted by owner, then index
    for (const [owner, c] of newest) {
      if (followed.has(owner)) continue;
      followed.add(owner);
      // Owners there at the start are followed from their end; owners that
      // appear later from their first chunk's start.
      followOwner(category, { owner, chunk: c.name, offset: first ? c.size : 0 }, generation, signal);
    }
    first = false;
    await sleep(5000);
  }
}

// ---- navigation, refresh, token ----

function route() {
  const m = location.hash.match(/^#\/category\/(.+)$/);
  return m ? { category: decodeURIComponent(m[1]) } : {};
}

function showOnly(id) {
  for (const s of ["login", "overview", "category-view"]) $(s).hidden = s !== id;
}

async function refresh() {
  clearTimeout(refreshTimer);
  const r = route();
  try {
    if (r.category) {
      renderChunks(await json(`/v1/categories/${encodeURIComponent(r.category)}/console`));
      showOnly("category-view");
    } else {
      renderOverview(await json("/v1/console"));
      showOnly("overview");
    }
    $("problem").hidden = true;
  } catch (e) {
    if (e.status === 401) {
      // No token, or one the node does not take: ask for one.
      const refused = token() !== null;
      sessionStorage.removeItem(TOKEN_KEY);
      stopTail();
      $("login-error").textContent = refused ? "The node refused that token: " + e.message : "";
      showOnly("login");
      $("forget-token").hidden = true;
      return;
    }
    if (e.status === 403) {
      showOnly("problem-only");
      $("problem").textContent = "This token may not see that: " + e.message;
      $("problem").hidden = false;
      $("forget-token").hidden = token() === null;
      return;
    }
    $("problem").textContent = "Cannot reach the node: " + e.message + " (retrying)";
    $("problem").hidden = false;
  }
  $("forget-token").hidden = token() === null;
  refreshTimer = setTimeout(refresh, REFRESH_MS);
}

function navigate() {
  stopTail();
  const r = route();
  if (r.category) tail(r.category, tailGeneration, tailAbort.signal);
  refresh();
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("login-error").textContent = "";
  navigate();
});

$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

window.addEventListener("hashchange", navigate);
navigate();
