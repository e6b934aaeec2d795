// zhtune studio page, second half: runs (live events), compare, chat, and the wiring of every button.
"use strict";

async function refreshRuns() {
  const { runs } = await api("GET", "/api/runs");
  $("run-list").replaceChildren(...runs.map((r) => {
    const li = el("li", { "data-run": r.name }, r.name + " ", el("span", { cls: `badge ${r.state}`, text: r.state }), el("div", { cls: "muted", text: r.command }));
    li.classList.toggle("selected", r.name === S.run);
    li.addEventListener("click", () => guarded(() => openRun(r.name)));
    return li;
  }));
  return runs;
}

async function openRun(name) {
  if (S.source) S.source.close();
  S.run = name;
  S.losses = [];
  $("run-detail").hidden = false;
  $("run-title").textContent = name;
  $("run-state").textContent = "";  // nothing of the run shown before stays on screen
  $("run-state").className = "badge";
  $("log").textContent = "";
  $("progress-bar").style.width = "0";
  $("progress-text").textContent = "";
  $("loss-png").hidden = true;
  $("run-error").hidden = true;
  drawLosses();
  await showDetails();
  const src = new EventSource(`/api/runs/${encodeURIComponent(name)}/events`);
  S.source = src;
  src.onmessage = (ev) => onEvent(JSON.parse(ev.data));
  src.addEventListener("end", () => { src.close(); showDetails(); refreshRuns(); });
  await refreshRuns();
}

async function showDetails() {
  const d = await api("GET", `/api/runs/${encodeURIComponent(S.run)}`);
  setState(d);
  $("run-command").textContent = d.display;
  $("run-recipe").textContent = d.recipe;
  if (d.error) { $("run-error").hidden = false; $("run-error").textContent = `错误 / error: ${d.error}`; }
  const curve = d.plots.find((p) => p.endsWith("loss_curve.png"));
  $("loss-png").hidden = !curve;
  if (curve) $("loss-png").src = `/api/file?path=${encodeURIComponent(curve)}&t=${Date.now()}`;
  $("report-box").hidden = !d.report;
  $("report").textContent = d.report || "";
  $("report-plots").replaceChildren(...d.plots.filter((p) => !p.endsWith("loss_curve.png")).map((p) => el("img", { src: `/api/file?path=${encodeURIComponent(p)}`, alt: p })));
  for (const id of ["open-chat", "merge-run", "export-run"]) $(id).disabled = !d.model;
  $("merge-run").disabled = !(d.model && d.model.adapters.length);
}

function setState(st) {
  const b = $("run-state");
  b.textContent = st.state;
  b.className = `badge ${st.state}`;
  $("stop-run").disabled = st.state !== "running";
  $("resume-run").disabled = ["running", "finished"].includes(st.state);
}

function onEvent(d) {
  setState(d.status);
  if (d.lines && d.lines.length) {
    const log = $("log");
    const text = (log.textContent ? log.textContent + "\n" : "") + d.lines.join("\n");
    log.textContent = text.split("\n").slice(-400).join("\n");
    log.scrollTop = log.scrollHeight;
  }
  const p = d.progress || {};
  if (p.total) {
    $("progress-bar").style.width = `${(100 * p.step) / p.total}%`;
    const eta = p.eta == null ? "?" : `${Math.round(p.eta)} s`;
    $("progress-text").textContent = `${p.stage ? p.stage + ": " : ""}步 / step ${p.step}/${p.total} · 剩余 / ETA ${eta} · ${p.rate}`;
  }
  if (d.losses) {
    S.losses = d.losses;
    drawLosses();
    if (!$("loss-png").hidden || d.losses.length) $("loss-png").src = `/api/file?path=${encodeURIComponent(`runs/${S.run}/out/loss_curve.png`)}&t=${Date.now()}`;
  }
  if (d.error) { $("run-error").hidden = false; $("run-error").textContent = `错误 / error: ${d.error}`; }
}
$("loss-png").addEventListener("load", () => { $("loss-png").hidden = false; });
$("loss-png").addEventListener("error", () => { $("loss-png").hidden = true; });

function drawLosses() {
  const ns = "http://www.w3.org/2000/svg", svg = $("loss-chart");
  svg.replaceChildren();
  const pts = S.losses;
  const text = (x, y, t) => { const e = document.createElementNS(ns, "text"); e.setAttribute("x", x); e.setAttribute("y", y); e.setAttribute("font-size", 11); e.textContent = t; svg.append(e); };
  if (!pts.length) { text(150, 110, "等待损失 / waiting for the loss…"); return; }
  const xs = pts.map((p) => p.step), ys = pts.map((p) => p.value);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => 50 + (410 * (x - x0)) / Math.max(1, x1 - x0), sy = (y) => 190 - (170 * (y - y0)) / Math.max(1e-9, y1 - y0);
  const series = {};
  for (const p of pts) (series[`${p.stage} ${p.kind}`] ||= []).push(p);
  const colors = ["#1f6feb", "#d1242f", "#1a7f37", "#8250df", "#bf8700"];
  Object.entries(series).forEach(([key, s], i) => {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", s.map((p) => `${sx(p.step).toFixed(1)},${sy(p.value).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", colors[i % colors.length]); line.setAttribute("stroke-width", 2);
    line.setAttribute("class", "loss-line"); line.setAttribute("data-points", s.length);
    svg.append(line);
    text(60 + 120 * i, 14, key.trim());
  });
  text(4, 24, y1.toFixed(3)); text(4, 192, y0.toFixed(3)); text(50, 212, `step ${x0}`); text(420, 212, `${x1}`);
}

async function runAction(path, body) {
  const r = await api("POST", `/api/runs/${encodeURIComponent(S.run)}/${path}`, body || {});
  say(`${path}: ${r.name || S.run} ${r.state || ""}`);
  await openRun(r.name && path !== "stop" && path !== "resume" ? r.name : S.run);
}

// ---- compare ----
async function refreshRunChoices() {
  const { runs } = await api("GET", "/api/runs");
  const done = runs.filter((r) => r.state === "finished");
  $("compare-runs").replaceChildren(...done.map((r) => el("label", {}, el("input", { type: "checkbox", value: r.name }), ` ${r.name} (${r.command})`)));
  const keep = $("chat-run").value;
  $("chat-run").replaceChildren(...done.map((r) => el("option", { value: r.name, text: r.name })));
  if (keep) $("chat-run").value = keep;
}
async function compare() {
  const names = [...$("compare-runs").querySelectorAll("input:checked")].map((c) => c.value);
  const r = await api("GET", `/api/compare?runs=${encodeURIComponent(names.join(","))}`);
  const t = $("compare-table");
  t.replaceChildren(el("tr", {}, ...["任务 / task", "指标 / metric", ...r.columns].map((h) => el("th", { text: h }))));
  for (const row of r.rows) t.append(el("tr", {}, el("td", { text: row.task }), el("td", { text: row.metric }), ...row.cells.map((c) => el("td", { text: c }))));
  if (!r.rows.length) say("这些运行没有评测结果 / these runs have no eval results", "error");
  $("compare-plots").replaceChildren(...Object.values(r.plots).flat().map((p) => el("img", { src: `/api/file?path=${encodeURIComponent(p)}`, alt: p, title: p })));
}

// ---- chat ----
async function openChat(name) {
  S.chatRun = name;
  showTab("chat");
  await refreshRunChoices();
  $("chat-run").value = name;
  let st = await api("POST", `/api/runs/${encodeURIComponent(name)}/chat`);
  while (st.state === "loading") {
    $("chat-state").textContent = `加载模型 / loading the model… ${st.seconds} s`;
    await new Promise((r) => setTimeout(r, 1000));
    st = await api("GET", `/api/runs/${encodeURIComponent(name)}/chat`);
  }
  $("chat-state").textContent = st.state === "ready" ? `就绪 / ready: ${name}` : `失败 / failed: ${st.error}`;
}

async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || !S.chatRun) return;
  $("chat-input").value = "";
  const log = $("chat-log");
  const history = [...log.querySelectorAll(".msg")].map((m) => ({ role: m.dataset.role, content: m.dataset.content || m.textContent }));
  history.push({ role: "user", content: text });
  log.append(el("div", { cls: "msg user", "data-role": "user", text }));
  const bubble = el("div", { cls: "msg assistant", "data-role": "assistant" });
  log.append(bubble);
  S.chatAbort = new AbortController();
  $("chat-stop").disabled = false;
  try {
    const resp = await fetch(`/api/runs/${encodeURIComponent(S.chatRun)}/chat/completions`, {
      method: "POST", signal: S.chatAbort.signal,
      headers: { "Content-Type": "application/json", "X-Zhtune-Studio": "1" },
      body: JSON.stringify({ messages: history, stream: true, max_tokens: 64, temperature: 0.7 }),
    });
    if (!resp.ok) throw new Error((await resp.json().catch(() => ({}))).error || `HTTP ${resp.status}`);
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "", reply = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      const events = buf.split("\n\n");
      buf = events.pop();
      for (const ev of events) {
        const line = ev.split("\n").find((l) => l.startsWith("data: "));
        if (!line || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        reply += (chunk.choices && chunk.choices[0].delta.content) || "";
        bubble.textContent = reply;
        log.scrollTop = log.scrollHeight;
      }
    }
    bubble.dataset.content = reply;
  } catch (e) {
    if (e.name !== "AbortError") say(e.message, "error");
    bubble.dataset.content = bubble.textContent;
  } finally {
    $("chat-stop").disabled = true;
  }
}

// ---- wiring ----
for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => guarded(async () => showTab(b.dataset.tab)));
$("token-send").addEventListener("click", () => guarded(async () => { await login($("token").value); await init(); }));
$("command").addEventListener("change", () => guarded(() => loadForm($("command").value)));
$("method").addEventListener("change", applyMethod);
$("load-recipe").addEventListener("click", () => guarded(loadRecipe));
$("upload").addEventListener("change", () => guarded(() => upload($("upload").files)));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => { e.preventDefault(); $("drop").classList.remove("over"); guarded(() => upload(e.dataTransfer.files)); });
$("preview-btn").addEventListener("click", () => guarded(preview));
$("show-command").addEventListener("click", () => guarded(showCommand));
$("save-recipe").addEventListener("click", () => guarded(saveRecipe));
$("start").addEventListener("click", () => guarded(startRun));
$("stop-run").addEventListener("click", () => guarded(() => runAction("stop")));
$("resume-run").addEventListener("click", () => guarded(() => runAction("resume")));
$("merge-run").addEventListener("click", () => guarded(() => runAction("merge")));
$("export-run").addEventListener("click", () => guarded(() => runAction("export", { quant: $("export-quant").value })));
$("open-chat").addEventListener("click", () => guarded(() => openChat(S.run)));
$("chat-open").addEventListener("click", () => guarded(() => openChat($("chat-run").value)));
$("chat-close").addEventListener("click", () => guarded(async () => { await api("DELETE", `/api/runs/${encodeURIComponent($("chat-run").value)}/chat`); $("chat-state").textContent = "已关闭 / closed"; S.chatRun = null; }));
$("chat-send").addEventListener("click", () => guarded(sendChat));
$("chat-stop").addEventListener("click", () => S.chatAbort && S.chatAbort.abort());
$("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); guarded(sendChat); } });
$("compare-btn").addEventListener("click", () => guarded(compare));
$("filter").addEventListener("input", filterFields);

async function init() {
  await loadCommands();
  await loadForm($("command").value);
  await loadFiles();
}
guarded(async () => {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) { await login(decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
  await init();
});
