// zhtune studio page: plain JavaScript, no build step, no external loads. Text from the server (file names,
// logs, model replies) is only ever set as textContent, never parsed as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
const S = { schema: null, files: null, run: null, source: null, chatRun: null, chatAbort: null, losses: [] };
const METHODS = {
  sft: [["LoRA", { finetuning_type: "lora", load_in_4bit: "false" }],
        ["QLoRA (4-bit, CUDA)", { finetuning_type: "lora", load_in_4bit: "true" }],
        ["全参 / full", { finetuning_type: "full", load_in_4bit: "false" }]],
  pt: [["词嵌入 / embeddings", { stage: "embeddings" }], ["LoRA (+ embeddings)", { stage: "lora" }],
       ["全参 / full", { stage: "full" }]],
};

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v; else if (k === "cls") e.className = v; else e.setAttribute(k, v);
  }
  for (const kid of kids) e.append(kid);
  return e;
}
function say(text, kind = "ok") { const m = $("message"); m.textContent = text; m.className = text ? kind : ""; }

async function api(method, path, body) {
  const opts = { method, headers: { "X-Zhtune-Studio": "1" } };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const resp = await fetch(path, opts);
  const data = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
  if (resp.status === 401) $("token-box").hidden = false;
  if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
  return data;
}
async function guarded(fn) { try { say(""); await fn(); } catch (e) { say(e.message, "error"); } }

// ---- tabs, login ----
function showTab(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === name);
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== `tab-${name}`;
  if (name === "runs") refreshRuns();
  if (name === "compare" || name === "chat") refreshRunChoices();
}
async function login(token) {
  await api("POST", "/api/login", { token });
  $("token-box").hidden = true;
}

// ---- new run: recipes, commands, the generated form ----
async function loadCommands() {
  const info = await api("GET", "/api/info");
  $("workspace").textContent = `工作区 / workspace: ${info.workspace}`;
  const sel = $("command");
  sel.replaceChildren(...info.commands.filter((c) => c.runnable).map((c) => el("option", { value: c.name, text: c.name })));
  sel.value = "sft";
  const rec = await api("GET", "/api/recipes");
  for (const g of $("recipe").querySelectorAll("optgroup")) g.remove();
  const groups = [["shipped", "内置配方 / shipped", rec.shipped], ["saved", "已保存 / saved", rec.saved]];
  for (const [source, label, rows] of groups) {
    const g = el("optgroup", { label });
    for (const r of rows.filter((r) => r.name)) {
      g.append(el("option", { value: `${source}:${r.name}`, text: `${r.name} (${r.command}) ${r.description}` }));
    }
    $("recipe").append(g);
  }
}

async function loadForm(command) {
  S.schema = await api("GET", `/api/form?command=${encodeURIComponent(command)}`);
  $("form-description").textContent = S.schema.description;
  const form = $("form");
  form.replaceChildren();
  for (const sec of S.schema.sections) {
    const fs = el("fieldset", {}, el("legend", { text: `${sec.name}${sec.doc ? ": " + sec.doc : ""}` }));
    for (const f of sec.fields) fs.append(fieldRow(sec.name, f));
    form.append(fs);
  }
  const methods = METHODS[command];
  $("method-box").hidden = !methods;
  $("method").replaceChildren(...(methods || []).map(([label], i) => el("option", { value: i, text: label })));
  if (methods && command === "pt") $("method").value = "1";
  for (const id of ["drop", "data-files", "preview-btn"]) $(id).parentElement.hidden = !["sft", "pt"].includes(command);
  markData();
  filterFields();
}

function fieldRow(section, f) {
  const id = `f-${section}-${f.name}`;
  let input;
  if (f.kind === "bool" && !f.optional) {
    input = el("input", { type: "checkbox", id });
    input.checked = f.text === "true";
  } else if (f.kind === "choice" || f.kind === "bool") {
    const choices = f.kind === "bool" ? ["true", "false"] : f.choices.map(String);
    input = el("select", { id }, ...(f.optional ? [el("option", { value: "", text: "(默认 / default)" })] : []),
      ...choices.map((c) => el("option", { value: c, text: c })));
    input.value = f.text;
  } else if (f.kind === "dict" || (f.kind === "list" && f.text.includes("\n")) || f.name === "stages") {
    input = el("textarea", { id, rows: 3 });
    input.value = f.text;
  } else {
    input = el("input", { id, type: "text" });
    input.value = f.text;
    if (f.path) input.setAttribute("list", "dl-paths");
  }
  input.dataset.section = section;
  input.dataset.name = f.name;
  input.dataset.default = f.text;
  const help = `${f.help} [默认 / default: ${f.text === "" ? "none" : f.text}]`;
  return el("div", { cls: "field" }, el("label", { for: id, text: `--${f.name}` }), input, el("div", { cls: "help", text: help }));
}

function filterFields() {
  const q = $("filter").value.trim().toLowerCase();
  for (const fs of $("form").querySelectorAll("fieldset")) {
    let shown = 0;
    for (const row of fs.querySelectorAll(".field")) {
      row.hidden = !!q && !row.textContent.toLowerCase().includes(q);
      shown += row.hidden ? 0 : 1;
    }
    fs.hidden = shown === 0;
  }
}

function inputs() { return [...$("form").querySelectorAll("[data-name]")]; }
function valueOf(input) { return input.type === "checkbox" ? (input.checked ? "true" : "false") : input.value; }
function setValue(input, text) { if (input.type === "checkbox") input.checked = text === "true"; else input.value = text; }
function field(name) { return inputs().find((i) => i.dataset.name === name); }
function formValues() {
  const values = {};
  for (const i of inputs()) (values[i.dataset.section] ||= {})[i.dataset.name] = valueOf(i);
  return values;
}
function applyValues(values) {
  for (const i of inputs()) setValue(i, i.dataset.default);
  for (const [sec, fields] of Object.entries(values)) {
    for (const [name, text] of Object.entries(fields)) {
      const i = inputs().find((x) => x.dataset.section === sec && x.dataset.name === name);
      if (i) setValue(i, text);
    }
  }
  markData();
}
function applyMethod() {
  const methods = METHODS[$("command").value];
  if (!methods) return;
  for (const [name, text] of Object.entries(methods[+$("method").value][1])) { const i = field(name); if (i) setValue(i, text); }
}

async function loadRecipe() {
  const v = $("recipe").value;
  if (!v) { await loadForm($("command").value); return; }
  const [source, name] = [v.slice(0, v.indexOf(":")), v.slice(v.indexOf(":") + 1)];
  const r = await api("POST", "/api/recipes/load", { source, name });
  $("command").value = r.command;
  await loadForm(r.command);
  applyValues(r.values);
  say(`已载入 / loaded ${name}`);
}

// ---- data: files, uploads, preview ----
async function loadFiles() {
  S.files = await api("GET", "/api/files");
  const box = $("data-files");
  box.replaceChildren(...S.files.data.map((p) => el("label", {}, el("input", { type: "checkbox", value: p }), " " + p)));
  for (const c of box.querySelectorAll("input")) c.addEventListener("change", syncData);
  const dl = document.getElementById("dl-paths") || document.body.appendChild(el("datalist", { id: "dl-paths" }));
  const all = ["default", ...S.files.models, ...S.files.gguf, ...S.files.adapters, ...S.files.data];
  dl.replaceChildren(...all.map((p) => el("option", { value: p })));
  markData();
}
function syncData() {
  const chosen = [...$("data-files").querySelectorAll("input:checked")].map((c) => c.value);
  const f = field("train_files");
  if (f) f.value = chosen.join(",");
}
function markData() {
  const f = field("train_files");
  const have = new Set(f ? f.value.split(",").map((s) => s.trim()) : []);
  for (const c of $("data-files").querySelectorAll("input")) c.checked = have.has(c.value);
}
async function upload(files) {
  for (const file of files) {
    const resp = await fetch(`/api/upload?name=${encodeURIComponent(file.name)}`, { method: "PUT", headers: { "X-Zhtune-Studio": "1" }, body: file });
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
    say(`已上传 / uploaded ${data.path}`);
  }
  await loadFiles();
}

async function preview() {
  const files = [...$("data-files").querySelectorAll("input:checked")].map((c) => c.value);
  const get = (n) => (field(n) ? valueOf(field(n)) : "");
  $("preview-note").textContent = "读取中 / reading…";
  const p = await api("POST", "/api/preview", {
    files, model: get("model_name_or_path") || "default", tokenizer: get("tokenizer_name_or_path"),
    template: get("template"), max_seq_length: get("max_seq_length") || get("block_size") || 512,
  });
  $("preview-note").textContent = "";
  const box = $("preview");
  box.replaceChildren();
  box.append(el("div", { id: "preview-summary", text: `${p.records} 条记录 / records · 模板 / template ${p.template} · 平均 / mean ${p.mean} tokens · 最长 / longest ${p.longest} · 超过 / over ${p.max_seq_length}: ${p.over_max}` }));
  const t = el("table", { id: "preview-files" }, el("tr", {}, ...["文件 / file", "记录 / records", "格式 / formats", "错误 / bad"].map((h) => el("th", { text: h }))));
  for (const f of p.files) {
    const formats = Object.entries(f.formats).map(([k, v]) => `${k} ${v}`).join(", ");
    t.append(el("tr", {}, el("td", { text: f.path }), el("td", { text: f.records }), el("td", { text: formats }), el("td", { text: f.bad })));
    for (const problem of f.problems) box.append(el("div", { cls: "error", text: problem }));
  }
  box.append(t, histogram(p.histogram));
  box.append(el("div", { cls: "legend muted" }, "图例 / legend: ", el("span", { cls: "seg sup", text: "监督 / supervised" }), " ", el("span", { cls: "seg tpl", text: "模板与提示 / template and prompt" })));
  for (const s of p.samples) {
    const div = el("div", { cls: "sample" }, el("div", { cls: "muted", text: `${s.where} (${s.format})` }));
    for (const seg of s.segments) div.append(el("span", { cls: seg.supervised ? "seg sup" : "seg tpl", text: seg.text }));
    box.append(div);
  }
}

function histogram(bins) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 400 120");
  svg.setAttribute("id", "histogram");
  svg.setAttribute("width", "400");
  const top = Math.max(1, ...bins.map((b) => b.count));
  bins.forEach((b, i) => {
    const w = 380 / bins.length, h = (100 * b.count) / top;
    const r = document.createElementNS(ns, "rect");
    for (const [k, v] of Object.entries({ x: 10 + i * w, y: 105 - h, width: Math.max(1, w - 2), height: h, fill: "#1f6feb" })) r.setAttribute(k, v);
    const tip = document.createElementNS(ns, "title");
    tip.textContent = `${b.lo}-${b.hi} tokens: ${b.count}`;
    r.append(tip);
    svg.append(r);
  });
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 10); label.setAttribute("y", 118); label.setAttribute("font-size", 10);
  label.textContent = `token 长度 / length 0 … ${bins.length ? bins[bins.length - 1].hi : 0}`;
  svg.append(label);
  return svg;
}

// ---- command line, recipe, start ----
function formBody() { return { command: $("command").value, values: formValues(), name: $("run-name").value.trim() || undefined }; }
async function showCommand() {
  const r = await api("POST", "/api/command", formBody());
  $("command-line").textContent = r.command_line;
  $("yaml").textContent = r.yaml;
  $("command-line").hidden = $("yaml").hidden = false;
}
async function saveRecipe() {
  const r = await api("POST", "/api/recipes/save", { ...formBody(), name: $("run-name").value.trim() });
  say(`配方已保存 / recipe saved: ${r.saved}`);
}
async function startRun() {
  const r = await api("POST", "/api/runs", { ...formBody(), name: $("run-name").value.trim() });
  say(`已开始 / started ${r.name}: ${r.command_line}`);
  showTab("runs");
  await openRun(r.name);
}
