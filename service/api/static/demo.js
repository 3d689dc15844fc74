// lensserve demo page: post FITS files to /v1/predict, draw each cutout from /v1/cutout,
// and on request overlay the occlusion map (explain=true) of what drives the answer.
// Files named <stem>_<band>.fits[.gz] for the model's bands are one object, sent together.
"use strict";

const DISPLAY_SCALE = 4; // screen pixels per cutout pixel
const HIST_BINS = 24;
const OVERLAY_ALPHA = 0.65; // opacity of the strongest pixel of an overlaid map

const gallery = document.getElementById("gallery");
const statusLine = document.getElementById("status");
const drop = document.getElementById("drop");
const input = document.getElementById("files");

input.addEventListener("change", () => handleFiles([...input.files]));
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  handleFiles([...e.dataTransfer.files]);
});

const BAND_FILE = /^(.+)_([A-Za-z0-9]+)\.(?:fits|fit)(?:\.gz)?$/i;
let modelBands = null;

// The models' bands, from their cards (g, r, i for the shipped ones).
async function readBands() {
  if (modelBands) return modelBands;
  try {
    const body = await (await fetch("/v1/models")).json();
    const card = Object.values(body.models || {})[0];
    modelBands = card.input.bands.map((b) => b.toLowerCase());
  } catch (exc) {
    modelBands = ["g", "r", "i"];
  }
  return modelBands;
}

// Objects to send: whole files, and groups of one file per band (other bands left out).
function groupObjects(files, bands) {
  const objects = [];
  const groups = new Map();
  const stems = new Set();
  for (const f of files) {
    const m = f.name.match(BAND_FILE);
    if (m && bands.includes(m[2].toLowerCase())) stems.add(m[1]);
  }
  for (const f of files) {
    const m = f.name.match(BAND_FILE);
    if (!m || !stems.has(m[1])) { objects.push({ name: f.name, file: f }); continue; }
    const band = m[2].toLowerCase();
    if (!bands.includes(band)) continue; // z, Y...: the model does not use them
    if (!groups.has(m[1])) {
      const group = { name: m[1], parts: [] };
      groups.set(m[1], group);
      objects.push(group);
    }
    groups.get(m[1]).parts.push([band, f]);
  }
  return objects;
}

async function handleFiles(files) {
  if (!files.length) return;
  gallery.replaceChildren();
  statusLine.textContent = `Sending ${files.length} file(s)…`;
  const objects = groupObjects(files, await readBands());
  const whole = objects.filter((o) => o.file);
  const answers = new Map();
  const wholeResults = whole.length ? await predict(whole.map((o) => o.file)) : [];
  whole.forEach((o, i) => answers.set(o, wholeResults[i]));
  await Promise.all(objects.filter((o) => o.parts).map(async (o) => {
    answers.set(o, (await predictObject(o))[0]);
  }));
  const results = objects.map((o) => answers.get(o));
  const cards = await Promise.all(results.map((r, i) => buildCard(r, objects[i])));
  // Gallery sorted by lens probability, most lens-like first; failed files last.
  const order = results.map((r, i) => i).sort(
    (a, b) => (results[b].lens_probability ?? -1) - (results[a].lens_probability ?? -1));
  gallery.replaceChildren(...order.map((i) => cards[i]));
  const failed = results.filter((r) => r.error).length;
  statusLine.textContent = `${results.length - failed} answered, ${failed} failed.`;
  document.body.dataset.state = "done";
}

function predictQuery() {
  // The page's own ?seed=N (optional) makes the MC-dropout answers reproducible.
  const query = new URLSearchParams({ include_samples: "true", explain: "true" });
  const seed = new URLSearchParams(location.search).get("seed");
  if (seed !== null) query.set("seed", seed);
  return query;
}

// One result per file, in order; a refused request becomes an error on every file.
async function predict(files) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  return postForm(form, files.map((f) => f.name));
}

// One object as one file per band: the fields are the bands; one result.
async function predictObject(object) {
  return postForm(bandForm(object), [object.name]);
}

function bandForm(object) {
  const form = new FormData();
  for (const [band, f] of object.parts) form.append(band, f, f.name);
  return form;
}

async function postForm(form, names) {
  try {
    const response = await fetch(`/v1/predict?${predictQuery()}`, { method: "POST", body: form });
    const body = await response.json();
    if (response.ok) return body.results;
    const error = body.error || { code: `http_${response.status}`, message: response.statusText };
    return names.map((filename) => ({ filename, error }));
  } catch (exc) {
    return names.map((filename) => ({ filename, error: { code: "network_error", message: String(exc) } }));
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

const fmt = (x, digits = 2) => Number(x).toFixed(digits);

async function buildCard(result, object) {
  const card = el("article", { class: "card", "data-filename": result.filename });
  card.append(el("h2", {}, result.filename));
  if (result.error) {
    card.classList.add("error");
    card.append(el("p", { class: "message" }, `${result.error.code}: ${result.error.message}`));
    return card;
  }
  if (result.lens_probability >= 0.5) card.classList.add("lens");
  const composite = el("canvas", { class: "composite" });
  card.append(composite);
  const radius = result.einstein_radius;
  const q = radius.quantiles;
  const p = result.parameters;
  card.append(el("dl", {},
    el("dt", {}, "lens probability"),
    el("dd", { class: "prob", "data-value": result.lens_probability }, fmt(result.lens_probability, 3)),
    el("dt", {}, "θ_E"),
    el("dd", { class: "theta", "data-value": p.theta_E }, `${fmt(p.theta_E)}″`),
    el("dt", {}, "θ_E (MC mean ± std)"),
    el("dd", {}, `${fmt(radius.mean)} ± ${fmt(radius.std)}″`),
    el("dt", {}, "68% interval"),
    el("dd", { class: "ci68" }, `[${fmt(q["0.16"])}, ${fmt(q["0.84"])}]″`),
    el("dt", {}, "95% interval"),
    el("dd", { class: "ci95" }, `[${fmt(q["0.025"])}, ${fmt(q["0.975"])}]″`),
    el("dt", {}, "lens centre"),
    el("dd", {}, `(${fmt(p.center_x)}, ${fmt(p.center_y)})″`),
  ));
  if (radius.samples) card.append(histogram(radius.samples, q));
  if (result.warnings && result.warnings.length) {
    card.append(el("p", { class: "warnings" }, result.warnings.join("; ")));
  }
  try {
    const cutout = await fetchPixels(object);
    drawComposite(composite, cutout, p, null);
    if (result.explanation) card.append(overlayControls(composite, cutout, result));
  } catch (exc) {
    card.append(el("p", { class: "message" }, `image not shown: ${exc.message}`));
  }
  return card;
}

async function fetchPixels(object) {
  const response = object.parts
    ? await fetch("/v1/cutout", { method: "POST", body: bandForm(object) })
    : await fetch("/v1/cutout", {
      method: "POST",
      body: object.file,
      headers: { "content-type": "application/fits", "x-filename": object.file.name },
    });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function median(values) {
  const v = values.filter(Number.isFinite).sort((a, b) => a - b);
  return v.length ? v[Math.floor(v.length / 2)] : 0;
}

function percentile(values, level) {
  const v = values.filter(Number.isFinite).sort((a, b) => a - b);
  return v.length ? v[Math.min(v.length - 1, Math.floor(level * v.length))] : 0;
}

// Lupton et al. (2004) colour composite: all bands are scaled by the same asinh-stretched
// intensity, so colours survive where the stretch saturates.
function luptonRGB(cutout) {
  const [g, r, i] = cutout.pixels; // bands g, r, i -> blue, green, red
  const n = g.length;
  const flat = (band) => band.flat().map((x) => (x === null ? NaN : x));
  const planes = [i, r, g].map(flat);
  // Background: the median of each band (the cutouts are mostly sky).
  const sky = planes.map((p) => { const m = median(p); return p.map((x) => x - m); });
  const intensity = sky[0].map((_, k) => (sky[0][k] + sky[1][k] + sky[2][k]) / 3);
  const noise = 1.4826 * median(intensity.map((x) => Math.abs(x)));
  const beta = Math.max(3 * noise, 1e-12); // softening: linear below ~3 sigma of the sky
  const top = Math.max(percentile(intensity, 0.998), beta * 10);
  const Q = Math.asinh(top / beta); // the 99.8th percentile of I reaches 1
  const rgba = new Uint8ClampedArray(n * n * 4);
  for (let row = 0; row < n; row++) {
    for (let col = 0; col < n; col++) {
      const k = row * n + col;
      const I = intensity[k];
      const f = I > 0 ? Math.asinh(I / beta) / Q / I : 0;
      let rgb = sky.map((p) => Math.max(0, (Number.isFinite(p[k]) ? p[k] : 0) * f));
      const peak = Math.max(...rgb);
      if (peak > 1) rgb = rgb.map((x) => x / peak);
      // FITS row 0 is the bottom of the picture (y grows upwards, as in ds9).
      const out = ((n - 1 - row) * n + col) * 4;
      rgba.set([rgb[0] * 255, rgb[1] * 255, rgb[2] * 255, 255], out);
    }
  }
  return new ImageData(rgba, n, n);
}

// A toggle and a choice of map; the composite is redrawn with the map over it, or without.
function overlayControls(canvas, cutout, result) {
  const toggle = el("input", { type: "checkbox", class: "overlay-toggle" });
  const which = el("select", { class: "overlay-map" },
    el("option", { value: "lens_probability" }, "P(lens)"),
    el("option", { value: "theta_E" }, "θ_E"));
  const redraw = () => drawComposite(canvas, cutout, result.parameters,
    toggle.checked ? { name: which.value, values: result.explanation[which.value] } : null);
  toggle.addEventListener("change", redraw);
  which.addEventListener("change", redraw);
  return el("p", { class: "overlay" },
    el("label", {}, toggle, " show what drives "), which,
    el("span", { class: "legend" }, " (red raises it, blue lowers it)"));
}

// Occlusion map over the composite: red where hiding the light lowers the answer (the light
// raises it), blue where it raises it; opacity grows with |value|. Row 0 at the bottom.
function drawOverlay(ctx, map) {
  const n = map.values.length;
  const peak = Math.max(...map.values.flat().map(Math.abs));
  if (!(peak > 0)) return;
  for (let row = 0; row < n; row++) {
    for (let col = 0; col < n; col++) {
      const v = map.values[row][col];
      if (v === 0) continue;
      ctx.fillStyle = v > 0 ? "rgb(255, 40, 40)" : "rgb(40, 120, 255)";
      ctx.globalAlpha = (OVERLAY_ALPHA * Math.abs(v)) / peak;
      ctx.fillRect(col * DISPLAY_SCALE, (n - 1 - row) * DISPLAY_SCALE, DISPLAY_SCALE, DISPLAY_SCALE);
    }
  }
  ctx.globalAlpha = 1;
}

function drawComposite(canvas, cutout, parameters, overlay) {
  const n = cutout.pixels[0].length;
  const small = document.createElement("canvas");
  small.width = small.height = n;
  small.getContext("2d").putImageData(luptonRGB(cutout), 0, 0);
  canvas.width = canvas.height = n * DISPLAY_SCALE;
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  canvas.dataset.overlay = overlay ? overlay.name : "off";
  if (overlay) drawOverlay(ctx, overlay);
  // center_x/center_y are arcsec from the cutout centre, pixel (n-1)/2; x with column, y with row.
  const scale = cutout.pixel_scale_arcsec;
  const col = (n - 1) / 2 + parameters.center_x / scale;
  const row = (n - 1) / 2 + parameters.center_y / scale;
  const x = (col + 0.5) * DISPLAY_SCALE;
  const y = (n - 1 - row + 0.5) * DISPLAY_SCALE;
  const r = (parameters.theta_E / scale) * DISPLAY_SCALE;
  canvas.dataset.circle = [x, y, r].map((v) => v.toFixed(2)).join(",");
  ctx.strokeStyle = "#ffe14d";
  ctx.lineWidth = 2; // wide enough to cover whole pixels, so its colour shows unblended
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  ctx.stroke();
  ctx.beginPath();
  ctx.moveTo(x - 4, y); ctx.lineTo(x + 4, y); ctx.moveTo(x, y - 4); ctx.lineTo(x, y + 4);
  ctx.stroke();
}

function histogram(samples, q) {
  const canvas = el("canvas", { class: "histogram", width: 256, height: 90 });
  const ctx = canvas.getContext("2d");
  const lo = Math.min(...samples, q["0.025"]);
  const hi = Math.max(...samples, q["0.975"]);
  const width = (hi - lo) / HIST_BINS || 1;
  const counts = new Array(HIST_BINS).fill(0);
  for (const s of samples) counts[Math.min(HIST_BINS - 1, Math.floor((s - lo) / width))]++;
  const top = Math.max(...counts);
  const pad = 14;
  const toX = (v) => ((v - lo) / (hi - lo || 1)) * canvas.width;
  const barW = canvas.width / HIST_BINS;
  ctx.fillStyle = "#6b8fc7";
  counts.forEach((c, b) => {
    const h = (c / top) * (canvas.height - pad - 4);
    ctx.fillRect(b * barW + 1, canvas.height - pad - h, barW - 2, h);
  });
  // 68% (solid) and 95% (dashed) intervals.
  ctx.strokeStyle = "#b30000";
  for (const [key, dash] of [["0.16", []], ["0.84", []], ["0.025", [3, 3]], ["0.975", [3, 3]]]) {
    ctx.setLineDash(dash);
    ctx.beginPath();
    ctx.moveTo(toX(q[key]), 0);
    ctx.lineTo(toX(q[key]), canvas.height - pad);
    ctx.stroke();
  }
  ctx.setLineDash([]);
  ctx.fillStyle = "#333";
  ctx.font = "11px sans-serif";
  ctx.fillText(`${fmt(lo)}″`, 0, canvas.height - 2);
  const label = `${fmt(hi)}″  θ_E samples (${samples.length})`;
  ctx.fillText(label, canvas.width - ctx.measureText(label).width, canvas.height - 2);
  return canvas;
}
