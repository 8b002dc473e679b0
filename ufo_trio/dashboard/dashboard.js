// ufo_trio fleet dashboard: polls the JSON API every 2 s and renders it.
// Every string that comes from the server (and so from clients) is set with textContent or
// setAttribute, never parsed as HTML. The API key lives in sessionStorage and goes out only as
// an Authorization header.
"use strict";
(function () {
  const KEY = "ufo_trio.api_key";
  const POLL_MS = 2000;
  const HOUR_MS = 3600 * 1000;
  const $ = (id) => document.getElementById(id);

  class AuthError extends Error {}

  let timer = null;
  let generation = 0; // bumped by start/stop so a poll still in flight cannot start a second loop
  let openTask = null; // session_id shown in the transcript panel
  let openTaskRunning = false; // refresh that transcript on each poll while the task runs

  // --- API ----------------------------------------------------------------------------------
  async function api(path) {
    const key = sessionStorage.getItem(KEY);
    if (!key) throw new AuthError("Enter the API key to open the dashboard.");
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + key, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
    if (response.status === 401) {
      throw new AuthError("Wrong API key: the server answered 401 Unauthorized. Enter the key again.");
    }
    if (response.status === 404) return null; // route not on this server: use a fallback
    if (!response.ok) {
      let detail = "";
      try { detail = (await response.json()).detail || ""; } catch (e) { /* not JSON */ }
      throw new Error("HTTP " + response.status + (detail ? ": " + String(detail) : "") + " for " + path.split("?")[0]);
    }
    return response.json();
  }

  async function load() {
    const since = new Date(Date.now() - HOUR_MS).toISOString();
    const [devices, running, recent, hour] = await Promise.all([
      api("/api/devices"),
      api("/api/tasks?status=running&limit=500"),
      api("/api/tasks?limit=50"),
      api("/api/tasks?limit=500&since=" + encodeURIComponent(since)),
    ]);
    const data = { history: running !== null, devices: null, running: [], recent: [], hour: [] };
    if (devices !== null) {
      data.devices = devices.devices || [];
    } else {
      data.devices = await fallbackClients();
    }
    if (running !== null) {
      data.running = running.tasks || [];
      data.recent = (recent && recent.tasks) || [];
      data.hour = (hour && hour.tasks) || [];
      data.hourCapped = Boolean(hour && hour.next_cursor);
    } else {
      const sessions = await api("/api/sessions");
      data.running = ((sessions && sessions.sessions) || []).map((s) => ({
        session_id: s.session_id, task_name: s.task_name, requester_id: s.requester_id,
        executor_id: s.executor_id, created_at: s.started_at, agent: null, commands: null,
        last_tool: null, status: "running",
      }));
      data.recent = await endedSinceOpened(data.running);
      data.hour = data.recent;
    }
    return data;
  }

  // Without the task history, the page remembers the sessions it saw running and, once one is
  // gone, asks /api/task_result for how it ended: "recent" then lists what ended while this tab
  // was open (a task that starts and ends between two polls is not seen).
  const watched = new Map();
  let seenEnded = [];
  async function endedSinceOpened(running) {
    const live = new Set(running.map((t) => t.session_id));
    for (const t of running) watched.set(t.session_id, t);
    for (const [sid, t] of Array.from(watched)) {
      if (live.has(sid)) continue;
      watched.delete(sid);
      const r = await api("/api/task_result/" + encodeURIComponent(t.task_name));
      const status = r && r.status === "done" ? "completed" : (r && r.status === "failed" ? "failed" : null);
      if (status === null) continue; // unknown (e.g. evicted): nothing to show
      seenEnded.unshift(Object.assign({}, t, { status: status, error: r.error || null, ended_at: new Date().toISOString() }));
    }
    seenEnded = seenEnded.slice(0, 50);
    return seenEnded;
  }

  // Older servers: /api/clients has the online ids only (no roles), /api/sessions the rest.
  async function fallbackClients() {
    const clients = await api("/api/clients");
    const ids = (clients && clients.online_clients) || [];
    return ids.map((id) => ({
      client_id: id, role: "device", platform: null, hostname: null, online: true,
      connected_at: null, last_heartbeat: null, sessions_running: null, target_id: null,
      last_seen: null,
    }));
  }

  // --- helpers ------------------------------------------------------------------------------
  function text(value) {
    return value === null || value === undefined || value === "" ? "–" : String(value);
  }

  function el(tag, content, className) {
    const node = document.createElement(tag);
    if (content instanceof Node) node.appendChild(content);
    else node.textContent = text(content);
    if (className) node.className = className;
    return node;
  }

  function badge(label) {
    const span = document.createElement("span");
    span.className = "badge " + (["online", "offline", "running", "completed", "failed"].includes(label) ? label : "");
    span.textContent = text(label);
    return span;
  }

  function ms(iso) {
    const t = iso ? Date.parse(iso) : NaN;
    return Number.isNaN(t) ? null : t;
  }

  function duration(seconds) {
    if (seconds === null || seconds < 0) return "–";
    if (seconds < 60) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
    const minutes = Math.floor(seconds / 60);
    if (seconds < 600) return minutes + " min" + (seconds % 60 >= 1 ? " " + Math.floor(seconds % 60) + " s" : "");
    if (seconds < 3600) return minutes + " min";
    const rest = Math.floor((seconds % 3600) / 60);
    return Math.floor(seconds / 3600) + " h" + (rest ? " " + rest + " min" : "");
  }

  function ago(iso) {
    const t = ms(iso);
    return t === null ? "–" : duration(Math.max(0, (Date.now() - t) / 1000)) + " ago";
  }

  function timeCell(iso) {
    const td = el("td", ago(iso));
    if (iso) td.setAttribute("title", String(iso));
    return td;
  }

  function fill(tableId, rows, columns, emptyText, onClick) {
    const tbody = $(tableId).tBodies[0];
    const fresh = document.createElement("tbody");
    if (rows.length === 0) {
      const td = el("td", emptyText, "empty");
      td.colSpan = columns;
      fresh.appendChild(el("tr", td));
    }
    for (const cells of rows) {
      const tr = document.createElement("tr");
      for (const cell of cells.cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
      if (onClick) {
        tr.tabIndex = 0;
        tr.addEventListener("click", () => onClick(cells.item));
        tr.addEventListener("keydown", (event) => { if (event.key === "Enter") onClick(cells.item); });
      }
      fresh.appendChild(tr);
    }
    tbody.replaceWith(fresh);
  }

  // --- rendering ----------------------------------------------------------------------------
  function render(data) {
    const devices = data.devices.filter((d) => d.role !== "constellation");
    const constellations = data.devices.filter((d) => d.role === "constellation");
    const ended = data.hour.filter((t) => t.status !== "running");
    $("n-devices").textContent = String(devices.filter((d) => d.online).length);
    $("n-running").textContent = String(data.running.length);
    $("n-completed").textContent = String(ended.filter((t) => t.status === "completed").length) + (data.hourCapped ? "+" : "");
    $("n-failed").textContent = String(ended.filter((t) => t.status === "failed").length) + (data.hourCapped ? "+" : "");
    drawChart(ended);

    fill("devices", devices.map((d) => ({ item: d, cells: [
      el("td", d.client_id), el("td", badge(d.online ? "online" : "offline")), el("td", d.platform),
      el("td", d.hostname), d.online ? timeCell(d.connected_at) : el("td", "–"),
      d.online ? timeCell(d.last_heartbeat) : el("td", "–"), el("td", d.sessions_running),
      d.online ? el("td", "now") : timeCell(d.last_seen),
    ] })), 8, "No devices have registered yet.");

    fill("constellations", constellations.map((c) => ({ item: c, cells: [
      el("td", c.client_id), el("td", badge(c.online ? "online" : "offline")),
      el("td", c.target_id ? c.target_id : "any device (unscoped)"),
      c.online ? timeCell(c.connected_at) : el("td", "–"),
      c.online ? el("td", "now") : timeCell(c.last_seen),
    ] })), 5, "No constellations.");

    fill("running", data.running.map((t) => {
      const start = ms(t.created_at);
      return { item: t, cells: [
        el("td", t.task_name), el("td", text(t.requester_id) + " → " + text(t.executor_id)), el("td", t.agent),
        el("td", start === null ? "–" : duration((Date.now() - start) / 1000)),
        el("td", t.commands), el("td", t.last_tool),
      ] };
    }), 6, "No session is running.");

    fill("recent", data.recent.map((t) => {
      const start = ms(t.created_at);
      const end = ms(t.ended_at);
      return { item: t, cells: [
        el("td", badge(t.status)), el("td", t.task_name), el("td", t.executor_id),
        t.ended_at ? timeCell(t.ended_at) : el("td", "–"),
        el("td", start !== null && end !== null ? duration((end - start) / 1000) : (start !== null ? duration((Date.now() - start) / 1000) : "–")),
        el("td", t.error),
      ] };
    }), 6, data.history ? "No tasks yet." : "No task has ended since this page was opened (this server keeps no task history).",
    data.history ? (t) => showTranscript(t.session_id) : undefined);
  }

  function drawChart(ended) {
    const svg = $("chart");
    const NS = "http://www.w3.org/2000/svg";
    const minutes = 60;
    const completed = new Array(minutes).fill(0);
    const failed = new Array(minutes).fill(0);
    const now = Date.now();
    for (const t of ended) {
      const end = ms(t.ended_at);
      if (end === null) continue;
      const slot = minutes - 1 - Math.floor((now - end) / 60000);
      if (slot < 0 || slot >= minutes) continue;
      (t.status === "completed" ? completed : failed)[slot] += 1;
    }
    const top = Math.max(1, ...completed.map((c, i) => c + failed[i]));
    const W = 600;
    const width = W / minutes;
    const height = 78;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const axis = document.createElementNS(NS, "line");
    for (const [k, v] of [["x1", 0], ["x2", W], ["y1", height + 0.5], ["y2", height + 0.5], ["class", "axis"]]) axis.setAttribute(k, String(v));
    svg.appendChild(axis);
    for (const [x, label, anchor] of [[0, "-60 min", "start"], [W, "now", "end"]]) {
      const t = document.createElementNS(NS, "text");
      t.setAttribute("x", String(x));
      t.setAttribute("y", "90");
      t.setAttribute("text-anchor", anchor);
      t.setAttribute("class", "axis");
      t.textContent = label;
      svg.appendChild(t);
    }
    for (let i = 0; i < minutes; i++) {
      let y = height;
      for (const [count, cls] of [[completed[i], "ok"], [failed[i], "bad"]]) {
        if (count === 0) continue;
        const h = (count / top) * (height - 4);
        y -= h;
        const rect = document.createElementNS(NS, "rect");
        rect.setAttribute("x", String(i * width + 0.5));
        rect.setAttribute("y", String(y));
        rect.setAttribute("width", String(width - 1));
        rect.setAttribute("height", String(h));
        rect.setAttribute("class", cls);
        const title = document.createElementNS(NS, "title");
        title.textContent = count + " " + (cls === "ok" ? "completed" : "failed") + ", " + (minutes - 1 - i) + " min ago";
        rect.appendChild(title);
        svg.appendChild(rect);
      }
    }
  }

  // Opens (or, for a running task, refreshes on each poll) the transcript of one task.
  async function showTranscript(sessionId, refresh) {
    const panel = $("transcript");
    if (!refresh) {
      openTask = sessionId;
      openTaskRunning = false;
      panel.hidden = false;
      $("transcript-title").textContent = text(sessionId);
      $("transcript-request").textContent = "Loading…";
      $("transcript-result").textContent = "";
      panel.scrollIntoView({ block: "nearest" });
    }
    let task;
    try {
      task = await api("/api/tasks/" + encodeURIComponent(sessionId));
    } catch (err) {
      return handleError(err);
    }
    if (openTask !== sessionId) return;
    const steps = $("transcript-steps");
    while (steps.firstChild) steps.removeChild(steps.firstChild);
    const meta = $("transcript-meta");
    while (meta.firstChild) meta.removeChild(meta.firstChild);
    if (task === null) {
      $("transcript-request").textContent = "This task is no longer in the history.";
      openTaskRunning = false;
      return;
    }
    openTaskRunning = task.status === "running";
    for (const [label, value] of [["Task", task.task_name], ["Status", task.status], ["Requester", task.requester_id],
      ["Executor", task.executor_id], ["Agent", task.agent], ["Platform", task.platform], ["Created", task.created_at],
      ["Ended", task.ended_at], ["Error", task.error]]) {
      meta.appendChild(el("dt", label));
      meta.appendChild(el("dd", value));
    }
    $("transcript-request").textContent = text(task.request);
    $("transcript-result").textContent = task.result === undefined || task.result === null ? "–" : JSON.stringify(task.result, null, 2);
    for (const step of task.steps || []) {
      const li = document.createElement("li");
      const head = el("div", "sent " + ago(step.sent_at) + (step.timed_out ? " · timed out" : "") + (step.received_at ? " · answered" : ""));
      li.appendChild(head);
      li.appendChild(el("pre", JSON.stringify({ commands: step.commands, results: step.results }, null, 2)));
      if (step.model_turns) li.appendChild(el("pre", JSON.stringify(step.model_turns, null, 2)));
      steps.appendChild(li);
    }
    if (!task.steps || task.steps.length === 0) steps.appendChild(el("li", "No COMMAND was sent."));
  }

  // --- control ------------------------------------------------------------------------------
  function setStatus(message, isError) {
    const status = $("status");
    status.textContent = message;
    status.classList.toggle("error", Boolean(isError));
  }

  function showLogin(message) {
    stop();
    $("board").hidden = true;
    $("forget-key").hidden = true;
    $("login").hidden = false;
    $("login-message").textContent = message || "";
    setStatus(message ? "Not signed in" : "Enter the API key", Boolean(message));
    $("api-key").focus();
  }

  function handleError(err) {
    if (err instanceof AuthError) {
      sessionStorage.removeItem(KEY);
      showLogin(err.message);
      return;
    }
    setStatus("Update failed: " + String(err.message || err) + " — retrying", true);
  }

  async function tick(gen) {
    timer = null;
    try {
      const data = await load();
      if (gen !== generation) return;
      $("login").hidden = true;
      $("board").hidden = false;
      $("forget-key").hidden = false;
      render(data);
      if (openTask !== null && openTaskRunning) showTranscript(openTask, true);
      setStatus("Live · updated " + new Date().toLocaleTimeString(), false);
    } catch (err) {
      if (gen !== generation) return;
      handleError(err);
      if (err instanceof AuthError) return;
    }
    timer = setTimeout(tick, POLL_MS, gen);
  }

  function stop() {
    generation += 1;
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  function start() {
    stop();
    tick(generation);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("api-key").value.trim();
      $("api-key").value = "";
      if (!value) return showLogin("The API key must not be empty.");
      sessionStorage.setItem(KEY, value);
      $("login-message").textContent = "";
      start();
    });
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showLogin("");
    });
    $("transcript-close").addEventListener("click", () => {
      openTask = null;
      openTaskRunning = false;
      $("transcript").hidden = true;
    });
    if (sessionStorage.getItem(KEY)) start();
    else showLogin("");
  });
})();
