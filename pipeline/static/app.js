"use strict";
// The page's script: the views (tabs) and the Search view. The Map view is map.js, the
// Duplicates and Issues views curation.js; this file runs first and they use its helpers.
// (Files, not inline: the Content-Security-Policy allows no inline scripts, so an injected
// <script> could not run.)
// Results are fetched once per query (up to the chosen count) and paged here, so paging never
// re-uploads or re-embeds the query image.
const PAGE = 24;
const $ = (id) => document.getElementById(id);
let results = [];
let page = 0;
let scoreName = "score";
let lastQuery = null;

// Each view's `show()`, registered by its script; called whenever its tab is opened.
const views = { search: { show() {} } };

function thumbnailUrl(id) { return "/thumbnails/" + encodeURIComponent(id); }

// A thumbnail <img> of an indexed item; an id the index lacks, or whose file is gone (404),
// gets a placeholder that says so instead of a broken image.
function thumbnail(id, inIndex = true) {
  const placeholder = (text) => {
    const box = document.createElement("span");
    box.className = "missing";
    box.textContent = text;
    return box;
  };
  if (!inIndex) return placeholder("not in the index");
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = id;
  img.src = thumbnailUrl(id);
  img.addEventListener("error", () => img.replaceWith(placeholder("no thumbnail")));
  return img;
}

function showView(name) {
  for (const tab of document.querySelectorAll("#tabs button")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `${name}-view`;
  views[name].show();
}

// Opens a view from its tab; the address remembers it (#view=map), so a reload comes back.
function openView(name) {
  if (name === "search") {
    const hash = lastQuery && lastQuery.id ? "#id=" + encodeURIComponent(lastQuery.id) : "";
    history.replaceState(null, "", location.pathname + location.search + hash);
  } else {
    history.replaceState(null, "", "#view=" + name);
  }
  showView(name);
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    const detail = body.detail;
    if (typeof detail === "string") return detail;
    return JSON.stringify(detail);
  } catch (e) {
    return response.statusText;
  }
}

async function loadInfo() {
  try {
    const response = await fetch("/info");
    const info = await response.json();
    for (const [name, shown] of Object.entries(info.views || {})) {
      const tab = document.querySelector(`#tabs button[data-view="${name}"]`);
      if (tab) tab.hidden = !shown;
    }
    const metric = String(info.metric || "").toLowerCase();
    scoreName = metric.startsWith("l2") ? "distance" : "similarity";
    const parts = [
      `${info.kind || "index"}`, `${Number(info.size).toLocaleString()} images`,
      `${info.dim}-d ${info.provenance.layer}`, `weights ${info.provenance.weights}`,
    ];
    if (typeof info.recall === "number") parts.push(`recall@10 ${info.recall.toFixed(3)}`);
    if (info.classifier) parts.push(`classifier: ${info.classifier.classes.length} classes`);
    $("info").textContent = parts.join(" · ");
    return info;
  } catch (e) {
    $("info").textContent = "index information unavailable";
    return null;
  }
}

function showQuery(src, caption) {
  $("query").hidden = false;
  $("query-image").src = src;
  $("query-caption").textContent = caption;
}

function showPrediction(prediction) {
  const box = $("prediction");
  box.replaceChildren();
  if (!prediction) { box.hidden = true; return; }
  const title = document.createElement("div");
  title.append("Predicted: ");
  const label = document.createElement("strong");
  label.textContent = prediction.label;
  title.append(label);
  const list = document.createElement("ol");
  for (const entry of prediction.top) {
    const item = document.createElement("li");
    item.textContent = prediction.score_kind === "probability"
      ? `${entry.label} ${(100 * entry.score).toFixed(1)}%`
      : `${entry.label} (score ${entry.score.toFixed(3)})`;
    list.append(item);
  }
  box.append(title, list);
  box.hidden = false;
}

function render() {
  const grid = $("results");
  grid.replaceChildren();
  const start = page * PAGE;
  results.slice(start, start + PAGE).forEach((match, i) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "result";
    card.dataset.id = match.id;
    card.title = `${match.id}\n${match.path}`;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = match.label || match.id;
    img.src = thumbnailUrl(match.id);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = match.label || match.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${start + i + 1} · ${scoreName} ${Number(match.score).toFixed(3)}`;
    card.append(img, label, score);
    card.addEventListener("click", () => searchId(match.id));
    grid.append(card);
  });
  const pages = Math.max(1, Math.ceil(results.length / PAGE));
  $("pager").hidden = results.length <= PAGE;
  $("page-info").textContent = `page ${page + 1} of ${pages}`;
  $("prev").disabled = page === 0;
  $("next").disabled = page >= pages - 1;
}

async function run(request, description) {
  setStatus(`Searching ${description}…`);
  const started = performance.now();
  let response;
  try {
    response = await request();
  } catch (e) {
    setStatus(`The server cannot be reached: ${e}`, true);
    return null;
  }
  if (!response.ok) {
    setStatus(`${response.status}: ${await errorText(response)}`, true);
    return null;
  }
  const body = await response.json();
  results = body.results;
  page = 0;
  render();
  const ms = Math.round(performance.now() - started);
  setStatus(`${results.length} most similar to ${description} (${ms} ms)`);
  return body;
}

async function searchFile(file) {
  lastQuery = { file };
  showQuery(URL.createObjectURL(file), `${file.name} (uploaded)`);
  const form = new FormData();
  form.append("image", file);
  const k = $("k").value;
  const body = await run(() => fetch(`/search?k=${k}`, { method: "POST", body: form }),
                         file.name);
  showPrediction(body && body.prediction);
}

async function searchId(id) {
  lastQuery = { id };
  showView("search");
  history.replaceState(null, "", "#id=" + encodeURIComponent(id));
  const params = new URLSearchParams({ id, k: $("k").value });
  const item = await fetch("/items/" + encodeURIComponent(id)).then((r) => r.ok ? r.json() : null);
  showQuery(thumbnailUrl(id), item && item.label ? `${item.label} · ${id}` : id);
  showPrediction(null);
  await run(() => fetch(`/search?${params}`), id);
  window.scrollTo(0, 0);
}

$("file").addEventListener("change", (event) => {
  if (event.target.files.length) searchFile(event.target.files[0]);
});
for (const tab of document.querySelectorAll("#tabs button")) {
  tab.addEventListener("click", () => openView(tab.dataset.view));
}
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) searchFile(event.dataTransfer.files[0]);
});
// Dropping anywhere else must not navigate away from the page to the file.
window.addEventListener("dragover", (event) => event.preventDefault());
window.addEventListener("drop", (event) => event.preventDefault());
$("prev").addEventListener("click", () => { page -= 1; render(); });
$("next").addEventListener("click", () => { page += 1; render(); });
$("k").addEventListener("change", () => {
  if (lastQuery && lastQuery.file) searchFile(lastQuery.file);
  else if (lastQuery) searchId(lastQuery.id);
});

// After every script has run (they are deferred), so that each view has registered itself.
document.addEventListener("DOMContentLoaded", async () => {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("id")) searchId(hash.get("id"));
  const info = await loadInfo();
  const view = hash.get("view");
  if (view && views[view] && info && info.views && info.views[view]) showView(view);
});
