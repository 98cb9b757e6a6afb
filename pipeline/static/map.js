"use strict";
// The Map view: every point of /map (from `fc7 map`) on a canvas, coloured by label or by
// issue; wheel zooms, drag pans, hovering shows the nearest point's thumbnail, a click searches
// from it.
//
// Built to stay smooth at 100,000+ points: the points are written straight into one ImageData
// (a few pixels each, one pass, no path or fillStyle per point) and put on the canvas once per
// frame, and a frame is drawn only when the view changed (requestAnimationFrame). Hover and
// click find the nearest point through a grid over the data (counting sort, built once), so
// they look at a few cells, not at every point. The hover ring is drawn on a second canvas, so
// moving the mouse never redraws the points.
const fc7map = (() => {
  const BACKGROUND = 0xffffffff; // opaque white, as the ImageData's little-endian RGBA words
  const HOVER_PX = 10; // how near the cursor (CSS px) a point must be to be hovered or clicked
  const DRAG_PX = 4; // a press that moves further is a drag, not a click
  // Issue colours, most important first: a point with several issues shows the first.
  const ISSUES = [
    { bit: 0, name: "label issue", rgb: [220, 38, 38] },
    { bit: 2, name: "train/test leak", rgb: [147, 51, 234] },
    { bit: 1, name: "outlier", rgb: [234, 138, 0] },
    { bit: 3, name: "duplicate", rgb: [37, 99, 235] },
  ];
  const NO_ISSUE = [200, 205, 212];
  const NO_LABEL = [150, 156, 164];

  let data = null; // {ids, x, y, labels, issues, labelNames, missing, n}
  let loading = null;
  let mode = "label";
  const colours = {}; // mode -> Uint32Array, one colour per point
  const orders = {}; // mode -> Uint32Array, the order points are drawn in (last on top)
  const legends = {}; // mode -> [{rgb, text}]
  let grid = null;
  const view = { cx: 0, cy: 0, scale: 1, fit: 1 }; // data centre; CSS px per data unit
  let image = null;
  let pixels = null;
  let frameRequested = false;
  let hovered = -1;
  let press = null;
  const stats = { fetchMs: null, parseMs: null, firstFrameMs: null, frames: 0, drawMs: 0 };

  const canvas = () => $("map-canvas");

  function packed([r, g, b]) { return ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0; }

  // Distinct colours for any number of labels: hues a golden angle apart, three lightnesses.
  function labelRgb(index) {
    const h = (index * 137.508) % 360;
    const l = [0.45, 0.6, 0.35][Math.floor(index / 12) % 3];
    const s = 0.7;
    const f = (n) => {
      const k = (n + h / 30) % 12;
      const a = s * Math.min(l, 1 - l);
      return Math.round(255 * (l - a * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
    };
    return [f(0), f(8), f(4)];
  }

  function cssRgb(rgb) { return `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`; }

  async function load() {
    const started = performance.now();
    const response = await fetch("/map");
    if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
    const text = await response.text();
    stats.fetchMs = performance.now() - started;
    const body = JSON.parse(text);
    const n = body.ids.length;
    data = {
      n,
      ids: body.ids,
      x: Float32Array.from(body.x),
      y: Float32Array.from(body.y),
      labels: Int32Array.from(body.labels),
      labelNames: body.label_names,
      issues: body.issues ? Uint8Array.from(body.issues) : null,
      missing: new Set(body.not_in_index),
      method: body.method,
    };
    prepareColours();
    buildGrid();
    stats.parseMs = performance.now() - started - stats.fetchMs;
  }

  function prepareColours() {
    const { n, labels, labelNames, issues } = data;
    const palette = labelNames.map((_, i) => packed(labelRgb(i)));
    const noLabel = packed(NO_LABEL);
    const byLabel = new Uint32Array(n);
    const counts = new Int32Array(labelNames.length + 1);
    for (let i = 0; i < n; i++) {
      const label = labels[i];
      byLabel[i] = label < 0 ? noLabel : palette[label];
      counts[label < 0 ? labelNames.length : label]++;
    }
    colours.label = byLabel;
    orders.label = Uint32Array.from({ length: n }, (_, i) => i);
    const shown = 14;
    legends.label = labelNames.slice(0, shown).map((name, i) => (
      { rgb: labelRgb(i), text: `${name} (${counts[i].toLocaleString()})` }));
    if (labelNames.length > shown) {
      legends.label.push({ rgb: null, text: `+ ${labelNames.length - shown} more labels` });
    }
    if (counts[labelNames.length]) {
      legends.label.push(
        { rgb: NO_LABEL, text: `no label (${counts[labelNames.length].toLocaleString()})` });
    }
    if (!issues) return;
    // Points without issues first, so that every flagged point is drawn on top.
    const rank = new Uint8Array(n);
    const byIssue = new Uint32Array(n);
    const issueCounts = new Int32Array(ISSUES.length + 1);
    for (let i = 0; i < n; i++) {
      let found = ISSUES.length;
      for (let k = 0; k < ISSUES.length; k++) {
        if (issues[i] & (1 << ISSUES[k].bit)) { found = k; break; }
      }
      rank[i] = ISSUES.length - found;
      byIssue[i] = packed(found < ISSUES.length ? ISSUES[found].rgb : NO_ISSUE);
      issueCounts[found]++;
    }
    colours.issue = byIssue;
    orders.issue = Uint32Array.from(orders.label).sort((a, b) => rank[a] - rank[b] || a - b);
    legends.issue = ISSUES.map((issue, k) => (
      { rgb: issue.rgb, text: `${issue.name} (${issueCounts[k].toLocaleString()})` }));
    legends.issue.push(
      { rgb: NO_ISSUE, text: `none (${issueCounts[ISSUES.length].toLocaleString()})` });
  }

  // Points by grid cell (counting sort): `items` lists the points of cell c from start[c].
  function buildGrid() {
    const { n, x, y } = data;
    let minX = Infinity, maxX = -Infinity, minY = Infinity, maxY = -Infinity;
    for (let i = 0; i < n; i++) {
      if (x[i] < minX) minX = x[i];
      if (x[i] > maxX) maxX = x[i];
      if (y[i] < minY) minY = y[i];
      if (y[i] > maxY) maxY = y[i];
    }
    if (!n) { minX = minY = 0; maxX = maxY = 1; }
    const side = Math.max(1, Math.min(1024, Math.ceil(Math.sqrt(n / 2))));
    const cellW = (maxX - minX) / side || 1;
    const cellH = (maxY - minY) / side || 1;
    const cells = new Int32Array(n);
    const start = new Int32Array(side * side + 1);
    for (let i = 0; i < n; i++) {
      const cx = Math.min(side - 1, Math.floor((x[i] - minX) / cellW));
      const cy = Math.min(side - 1, Math.floor((y[i] - minY) / cellH));
      cells[i] = cy * side + cx;
      start[cells[i] + 1]++;
    }
    for (let c = 0; c < side * side; c++) start[c + 1] += start[c];
    const next = start.slice(0, side * side);
    const items = new Int32Array(n);
    for (let i = 0; i < n; i++) items[next[cells[i]]++] = i;
    grid = { minX, maxX, minY, maxY, side, cellW, cellH, start, items };
  }

  // The point nearest to data coordinates (x, y) within `radius` (data units), or -1.
  function nearest(x, y, radius) {
    const g = grid;
    const clamp = (v) => Math.max(0, Math.min(g.side - 1, v));
    const c0 = clamp(Math.floor((x - radius - g.minX) / g.cellW));
    const c1 = clamp(Math.floor((x + radius - g.minX) / g.cellW));
    const r0 = clamp(Math.floor((y - radius - g.minY) / g.cellH));
    const r1 = clamp(Math.floor((y + radius - g.minY) / g.cellH));
    let best = -1;
    let bestD = radius * radius;
    for (let r = r0; r <= r1; r++) {
      for (let c = c0; c <= c1; c++) {
        const cell = r * g.side + c;
        for (let k = g.start[cell]; k < g.start[cell + 1]; k++) {
          const i = g.items[k];
          const dx = data.x[i] - x, dy = data.y[i] - y;
          const d = dx * dx + dy * dy;
          if (d <= bestD) { best = i; bestD = d; }
        }
      }
    }
    return best;
  }

  function cssSize() { const c = canvas(); return [c.clientWidth, c.clientHeight]; }

  function fit() {
    const [w, h] = cssSize();
    const spanX = grid.maxX - grid.minX || 1, spanY = grid.maxY - grid.minY || 1;
    view.fit = 0.92 * Math.min(w / spanX, h / spanY);
    view.scale = view.fit;
    view.cx = (grid.minX + grid.maxX) / 2;
    view.cy = (grid.minY + grid.maxY) / 2;
  }

  function toScreen(x, y) {
    const [w, h] = cssSize();
    return [(x - view.cx) * view.scale + w / 2, h / 2 - (y - view.cy) * view.scale];
  }

  function toData(sx, sy) {
    const [w, h] = cssSize();
    return [view.cx + (sx - w / 2) / view.scale, view.cy - (sy - h / 2) / view.scale];
  }

  function resize() {
    const dpr = window.devicePixelRatio || 1;
    const [w, h] = cssSize();
    for (const c of [canvas(), $("map-overlay")]) {
      c.width = Math.max(1, Math.round(w * dpr));
      c.height = Math.max(1, Math.round(h * dpr));
    }
    requestFrame();
  }

  function requestFrame() {
    if (frameRequested || !data) return;
    frameRequested = true;
    requestAnimationFrame(draw);
  }

  function draw() {
    frameRequested = false;
    const started = performance.now();
    const c = canvas();
    const w = c.width, h = c.height;
    const context = c.getContext("2d");
    if (!image || image.width !== w || image.height !== h) {
      image = context.createImageData(w, h);
      pixels = new Uint32Array(image.data.buffer);
    }
    pixels.fill(BACKGROUND);
    const dpr = c.width / Math.max(1, c.clientWidth);
    const s = view.scale * dpr;
    const ox = w / 2 - view.cx * s, oy = h / 2 + view.cy * s;
    // Points grow a little as one zooms in; fewer points get bigger ones.
    const base = data.n < 2000 ? 7 : data.n < 20000 ? 3 : 2;
    const grown = Math.min(base * 3, base * Math.cbrt(view.scale / view.fit));
    const size = Math.max(1, Math.round(grown * dpr));
    const half = size / 2;
    const xs = data.x, ys = data.y, colour = colours[mode], order = orders[mode];
    const maxX = w - size, maxY = h - size;
    for (let k = 0; k < order.length; k++) {
      const i = order[k];
      const fx = xs[i] * s + ox - half;
      const fy = oy - ys[i] * s - half;
      if (!(fx >= 0 && fy >= 0 && fx <= maxX && fy <= maxY)) continue;
      const value = colour[i];
      let row = (fy | 0) * w + (fx | 0);
      for (let dy = 0; dy < size; dy++, row += w) {
        for (let dx = 0; dx < size; dx++) pixels[row + dx] = value;
      }
    }
    context.putImageData(image, 0, 0);
    drawOverlay();
    stats.frames += 1;
    stats.drawMs += performance.now() - started;
    if (stats.firstFrameMs === null) stats.firstFrameMs = performance.now();
  }

  function drawOverlay() {
    const c = $("map-overlay");
    const context = c.getContext("2d");
    context.clearRect(0, 0, c.width, c.height);
    if (hovered < 0) return;
    const dpr = c.width / Math.max(1, c.clientWidth);
    const [sx, sy] = toScreen(data.x[hovered], data.y[hovered]);
    context.lineWidth = 2 * dpr;
    context.strokeStyle = "#111827";
    context.beginPath();
    context.arc(sx * dpr, sy * dpr, 8 * dpr, 0, 2 * Math.PI);
    context.stroke();
  }

  function pointAt(event) {
    const rect = canvas().getBoundingClientRect();
    const sx = event.clientX - rect.left, sy = event.clientY - rect.top;
    const [x, y] = toData(sx, sy);
    return [nearest(x, y, HOVER_PX / view.scale), sx, sy];
  }

  function issueText(i) {
    if (!data.issues || !data.issues[i]) return "";
    return ISSUES.filter((issue) => data.issues[i] & (1 << issue.bit))
      .map((issue) => issue.name).join(", ");
  }

  function hover(i, sx, sy) {
    const tip = $("map-tip");
    if (i !== hovered) {
      hovered = i;
      drawOverlay();
      if (i >= 0) {
        const id = data.ids[i];
        const image = $("map-tip-image");
        image.hidden = data.missing.has(i);
        if (!image.hidden) image.src = thumbnailUrl(id);
        image.alt = id;
        $("map-tip-id").textContent = id;
        const label = data.labels[i] < 0 ? "no label" : data.labelNames[data.labels[i]];
        const issues = issueText(i);
        const absent = data.missing.has(i) ? " · not in the index" : "";
        $("map-tip-label").textContent = (issues ? `${label} · ${issues}` : label) + absent;
        tip.dataset.id = id;
      }
    }
    tip.hidden = i < 0;
    if (i >= 0) {
      const [w, h] = cssSize();
      // Beside the cursor, on the side with room.
      tip.style.left = `${sx + 16 + 200 > w ? Math.max(0, sx - 216) : sx + 16}px`;
      tip.style.top = `${Math.max(0, Math.min(h - 240, sy + 16))}px`;
    }
  }

  function click(i) {
    if (i < 0) return;
    const id = data.ids[i];
    if (data.missing.has(i)) {
      $("map-status").textContent = `${id} is not in the index: it cannot be searched from`;
      return;
    }
    searchId(id);
  }

  function legend() {
    const list = $("map-legend");
    list.replaceChildren();
    for (const entry of legends[mode]) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      if (entry.rgb) swatch.style.background = cssRgb(entry.rgb);
      else swatch.classList.add("none");
      item.append(swatch, entry.text);
      list.append(item);
    }
  }

  function listen() {
    const frame = $("map-frame");
    new ResizeObserver(resize).observe(frame);
    frame.addEventListener("wheel", (event) => {
      event.preventDefault();
      const rect = canvas().getBoundingClientRect();
      const sx = event.clientX - rect.left, sy = event.clientY - rect.top;
      const [x, y] = toData(sx, sy);
      const factor = Math.exp(-event.deltaY * (event.deltaMode === 1 ? 0.05 : 0.0015));
      view.scale = Math.max(view.fit / 4, Math.min(view.fit * 5000, view.scale * factor));
      // Keep the data point under the cursor where it is.
      const [w, h] = cssSize();
      view.cx = x - (sx - w / 2) / view.scale;
      view.cy = y + (sy - h / 2) / view.scale;
      hover(-1);
      requestFrame();
    }, { passive: false });
    frame.addEventListener("pointerdown", (event) => {
      if (event.button !== 0) return;
      frame.setPointerCapture(event.pointerId);
      press = { x: event.clientX, y: event.clientY, cx: view.cx, cy: view.cy, dragged: false };
    });
    frame.addEventListener("pointermove", (event) => {
      if (press) {
        const dx = event.clientX - press.x, dy = event.clientY - press.y;
        if (Math.abs(dx) + Math.abs(dy) > DRAG_PX) press.dragged = true;
        if (press.dragged) {
          view.cx = press.cx - dx / view.scale;
          view.cy = press.cy + dy / view.scale;
          hover(-1);
          requestFrame();
          return;
        }
      }
      const [i, sx, sy] = pointAt(event);
      hover(i, sx, sy);
    });
    frame.addEventListener("pointerup", (event) => {
      const wasClick = press && !press.dragged;
      press = null;
      if (wasClick) click(pointAt(event)[0]);
    });
    frame.addEventListener("pointerleave", () => { if (!press) hover(-1); });
    $("map-reset").addEventListener("click", () => { fit(); requestFrame(); });
    $("map-colour").addEventListener("change", () => {
      mode = $("map-colour").value;
      legend();
      requestFrame();
    });
  }

  async function show() {
    if (!loading) {
      loading = load().then(() => {
        listen();
        $("map-colour-control").hidden = !data.issues;
        const labels = data.labelNames.length;
        $("map-status").textContent = `${data.n.toLocaleString()} images · ${labels} labels`
          + (data.method ? ` · ${data.method}` : "");
        legend();
        return true;
      }).catch((err) => {
        $("map-status").textContent = `The map cannot be loaded: ${err.message}`;
        $("map-status").classList.add("error");
        return false;
      });
    }
    if (!(await loading)) return;
    // The canvas has its size only once the view is shown.
    const first = image === null;
    resize();
    if (first) fit();
    requestFrame();
  }

  views.map = { show };
  // For tests and benchmarks: where a point is on screen (client coordinates), what was drawn.
  return {
    screenOf(id) {
      const i = data ? data.ids.indexOf(id) : -1;
      if (i < 0) return null;
      const rect = canvas().getBoundingClientRect();
      const [sx, sy] = toScreen(data.x[i], data.y[i]);
      return { x: rect.left + sx, y: rect.top + sy };
    },
    stats: () => ({ ...stats, points: data ? data.n : 0 }),
  };
})();
