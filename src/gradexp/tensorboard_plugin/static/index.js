// The gradexp tab: which layer starves, and from when.
//
// TensorBoard loads this module in an iframe and calls render(). Everything is drawn
// from the plugin's JSON routes (./runs, ./heatmap(s), ./time, ./summary, ./statuses): a
// layer x step heatmap of the chosen quantity per run (log colours, cividis: readable in
// print and for colour-blind readers), the per-layer profile at a chosen step, gradients
// through time for recurrent runs, the run's config, and a sweep's runs side by side on
// one colour scale. What the mouse reads, the keyboard reads too (a cursor on a heatmap).

// cividis at 9 evenly spaced points (matplotlib's).
const CIVIDIS = [
  [0, 34, 78], [26, 56, 111], [67, 78, 108], [97, 101, 111], [125, 124, 120],
  [155, 148, 118], [188, 174, 108], [222, 201, 88], [254, 232, 56],
];
// The verdicts' default thresholds (diagnose.vanishing_ratio, exploding_ratio): a run's
// own, from its config, where the view has it (one run); these for the sweep's cards.
const VANISHING = 1e-2;
const EXPLODING = 1e2;

function thresholds(grid) {
  const config = grid.config || {};
  return [config['diagnose.vanishing_ratio'] ?? VANISHING,
    config['diagnose.exploding_ratio'] ?? EXPLODING];
}
const CELL_MAX = 14; // px per heatmap cell at most
const LABEL_WIDTH = 130; // px for the layer names left of a heatmap
const FIRST_SCREEN = 16; // sweep cards fetched and drawn first
// Config groups shown open; the others are one line each until opened.
const HEADLINE = ['model', 'init', 'activation', 'norm', 'clip', 'optim', ''];

const state = {runs: {}, quantities: {}, run: null, quantity: 'signal_bwd', relative: true,
  view: 'run', filter: '', grid: null, step: 0, sweep: null, token: 0,
  statuses: null};

export async function render() {
  document.head.appendChild(el('style', {}, STYLE));
  const body = document.body;
  body.appendChild(el('div', {id: 'controls'}));
  body.appendChild(el('div', {id: 'main'}));
  body.appendChild(el('div', {id: 'tooltip', role: 'status', hidden: ''}));
  // The first screen of the sweep view comes with the run list: one request, one
  // listing of the runs' tags on the server (two in parallel cost more than one).
  const index = await getJSON(`./runs?first=${FIRST_SCREEN}&quantity=${state.quantity}`);
  state.runs = index.runs;
  state.quantities = index.quantities;
  const names = Object.keys(state.runs).sort();
  if (!names.length) {
    document.getElementById('main').appendChild(el('p', {id: 'empty'},
      'No gradexp runs here yet: train one with `gradexp train`, then reload.'));
    return;
  }
  state.run = names[0];
  state.view = names.length > 1 ? 'sweep' : 'run';
  state.firstScreen = index.grids;
  drawControls(names);
  await update();
}

// --- controls ------------------------------------------------------------------------
function drawControls(names) {
  const controls = document.getElementById('controls');
  controls.replaceChildren();
  const quantity = el('select', {id: 'quantity', 'aria-label': 'quantity'},
    ...Object.entries(state.quantities).map(([q, label]) =>
      el('option', {value: q, ...(q === state.quantity ? {selected: ''} : {})}, label)));
  quantity.onchange = () => { state.quantity = quantity.value; update(); };
  const relative = el('input', {id: 'relative', type: 'checkbox',
    ...(state.relative ? {checked: ''} : {})});
  relative.onchange = () => { state.relative = relative.checked; update(); };
  const view = el('select', {id: 'view', 'aria-label': 'view'},
    el('option', {value: 'run', ...(state.view === 'run' ? {selected: ''} : {})}, 'one run'),
    el('option', {value: 'sweep', ...(state.view === 'sweep' ? {selected: ''} : {})},
      `all runs side by side (${names.length})`));
  view.onchange = () => { state.view = view.value; update(); };
  const run = el('select', {id: 'run', 'aria-label': 'run'},
    ...names.map((n) => el('option', {value: n, ...(n === state.run ? {selected: ''} : {})}, n)));
  run.onchange = () => { state.run = run.value; state.view = 'run'; view.value = 'run'; update(); };
  const filter = el('input', {id: 'filter', type: 'search', placeholder: 'filter runs by name',
    value: state.filter, 'aria-label': 'filter runs by name'});
  filter.oninput = () => { state.filter = filter.value; if (state.view === 'sweep') update(); };
  controls.append(
    el('label', {}, 'quantity ', quantity),
    el('label', {}, relative, ' relative to the head'),
    el('label', {}, 'view ', view),
    el('label', {}, 'run ', run),
    filter);
}

async function update() {
  // A view drawn after a newer one was asked for would replace it: each update gets a
  // number, and a view whose number is stale when its data arrives draws nothing.
  const token = ++state.token;
  const main = document.getElementById('main');
  main.replaceChildren(el('p', {}, 'Loading…'));
  const current = () => token === state.token;
  if (state.view === 'sweep') await drawSweep(main, current);
  else await drawRun(main, current);
}

// --- one run -------------------------------------------------------------------------
async function drawRun(main, current) {
  const info = state.runs[state.run];
  const quantity = info.quantities.includes(state.quantity) ? state.quantity : info.quantities[0];
  const query = new URLSearchParams({run: state.run});
  const [raw, reply] = await Promise.all([
    getJSON(`./heatmap?${new URLSearchParams({run: state.run, quantity})}`),
    getJSON(`./summary?${query}`).catch(() => null),
  ]);
  if (!current()) return;
  const grid = transform(raw);
  const summary = reply && reply.summary; // null while the run is running
  grid.summary = summary;
  grid.config = reply && reply.config;
  state.grid = grid;
  state.step = 0;
  const [lo, hi] = range([grid]);
  main.replaceChildren(
    el('h2', {}, state.run),
    el('p', {class: 'status'}, statusLine(summary)),
    el('p', {class: 'what'}, describe(grid)),
    readableHeatmap(grid, lo, hi, {cell: CELL_MAX, id: 'heatmap'}),
    el('div', {}, colorbar(lo, hi, grid.label)),
    profileSection(grid),
  );
  if (info.time_layers.length) {
    const section = await timeSection(state.run);
    if (!current()) return;
    main.appendChild(section);
  }
  main.appendChild(el('h3', {}, 'verdicts'));
  main.appendChild(verdictTable(info.verdicts));
  main.appendChild(el('h3', {}, 'config'));
  main.appendChild(configSection(grid.config));
  showProfile(0);
}

// The run's composed config ({"model.depth": 20, ...}) by its top-level group, in the
// order the run logged it: the headline groups open, the rest one line until opened.
function configSection(config) {
  if (!config) return el('p', {id: 'config'}, 'no config logged (a run from before gradexp logged it)');
  const groups = new Map();
  for (const [key, value] of Object.entries(config)) {
    const dot = key.indexOf('.');
    const group = dot < 0 ? '' : key.slice(0, dot);
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push([key, dot < 0 ? key : key.slice(dot + 1), value]);
  }
  const shown = (v) => (typeof v === 'string' ? v : JSON.stringify(v));
  return el('div', {id: 'config'}, ...[...groups].map(([group, entries]) => {
    const name = entries.find(([, k]) => k === 'name');
    return el('details', {class: 'config-group', 'data-group': group,
      ...(HEADLINE.includes(group) ? {open: ''} : {})},
    el('summary', {}, group || 'top level', name ? `: ${shown(name[2])}` : ''),
    el('table', {}, el('tbody', {}, ...entries.map(([key, k, v]) =>
      el('tr', {'data-key': key}, el('th', {scope: 'row'}, k), el('td', {}, shown(v)))))));
  }));
}

function statusLine(summary) {
  if (!summary) return 'running (no summary yet)';
  const options = Object.entries(summary.options || {}).map(([k, v]) => `${k}=${v}`).join(' ');
  const metrics = Object.entries(summary.metrics || {})
    .filter(([k]) => k.endsWith('/test')).map(([k, v]) => `${k} ${fmt(v)}`).join(', ');
  return `${summary.status} after ${summary.steps} steps · ${options}` +
    (metrics ? ` · ${metrics}` : '') + (summary.error ? ` · ${summary.error}` : '');
}

// The run/verdicts Markdown: the outcome in words first where the run logged one (its
// **bold** kept), then the table as an HTML table (cells split on unescaped pipes).
function verdictTable(markdown) {
  if (!markdown) return el('p', {id: 'verdicts'}, 'no verdicts logged yet');
  const lines = markdown.trim().split('\n');
  const unescape = (text) => text.replace(/<br>/g, '\n').replace(/\\([\\|*])/g, '$1');
  const words = lines.filter((line) => line.trim() && !line.startsWith('|')).map((line) =>
    el('p', {class: 'outcome'}, ...line.split(/(?<!\\)\*\*/).map((part, k) =>
      (k % 2 ? el('strong', {}, unescape(part)) : unescape(part)))));
  const rows = lines.filter((line) => line.startsWith('|') && !/^\|[-| ]+\|$/.test(line))
    .map((line) => line.replace(/^\|\s*|\s*\|$/g, '').split(/\s*(?<!\\)\|\s*/).map(unescape));
  const [head, ...body] = rows;
  const table = head ? el('table', {id: 'verdicts'},
    el('thead', {}, el('tr', {}, ...head.map((h) => el('th', {}, h)))),
    el('tbody', {}, ...body.map((r) => el('tr', {}, ...r.map((c) => el('td', {}, c)))))) : null;
  return el('div', {}, ...words, table);
}

function describe(grid) {
  const parts = [`${grid.label}: ${grid.layers.length} layers (input at the bottom) x ` +
    `${grid.steps.length} logged steps (${grid.steps[0]}-${grid.steps[grid.steps.length - 1]})`];
  if (grid.relative) {
    const [vanishing, exploding] = thresholds(grid);
    parts.push(`contours: below ${vanishing} of the head (vanishing, magenta) or above ` +
      `${exploding} (exploding, black)`);
  }
  return parts.join('; ');
}

// The grid as drawn: relative to the head (the last layer) at each step when asked and
// meaningful; log10 of the values; null where there is nothing (or a non-positive value).
function transform(raw) {
  const fractions = ['dead_frac', 'sat_frac', 'gate_sat_frac'].includes(raw.quantity);
  const relative = state.relative && !fractions;
  const head = raw.values[raw.values.length - 1];
  const values = raw.values.map((row) => row.map((v, j) => {
    if (v === null) return null;
    if (!relative) return v;
    const h = head[j];
    return h ? v / h : null;
  }));
  const label = (state.quantities[raw.quantity] || raw.quantity) + (relative ? ' / head' : '');
  return {...raw, values, raw: raw.values, relative, label, log: !fractions};
}

function logOf(v, log) {
  if (v === null || v === undefined) return null;
  if (!log) return v;
  return v > 0 ? Math.log10(v) : null;
}

function range(grids) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const g of grids) {
    for (const row of g.values) {
      for (const v of row) {
        const x = logOf(v, g.log);
        if (x === null) continue;
        lo = Math.min(lo, x);
        hi = Math.max(hi, x);
      }
    }
  }
  if (!Number.isFinite(lo)) return [0, 1];
  if (hi - lo < 1e-9) return [lo - 0.5, hi + 0.5];
  return [lo, hi];
}

const MISSING = [235, 235, 235]; // no value (or a non-positive one on a log scale)

function rgb(x, lo, hi) {
  if (x === null) return MISSING;
  const u = Math.min(1, Math.max(0, (x - lo) / (hi - lo))) * (CIVIDIS.length - 1);
  const i = Math.min(CIVIDIS.length - 2, Math.floor(u));
  const f = u - i;
  return CIVIDIS[i].map((a, k) => Math.round(a + f * (CIVIDIS[i + 1][k] - a)));
}

// rgb at 1024 evenly spaced points, for the heatmaps' cells (300k in a 100-run sweep,
// where rgb's arrays were half the time drawing took): within 1 of rgb in every channel.
const LEVELS = 1024;
const LOOKUP = new Uint8Array(3 * LEVELS);
for (let n = 0; n < LEVELS; n++) LOOKUP.set(rgb(n / (LEVELS - 1), 0, 1), 3 * n);

function color(x, lo, hi) {
  const c = rgb(x, lo, hi);
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// A heatmap canvas: rows are layers (input at the bottom), columns logged steps.
// `labels`: the layer names and steps drawn around it (a sweep's cards have none).
function heatmapFigure(grid, lo, hi, {cell, labels, id, width = 900, height = 420}) {
  const rows = grid.layers.length;
  const cols = grid.steps.length;
  const cw = Math.max(2, Math.min(3 * cell, Math.floor(width / Math.max(cols, 1))));
  const ch = Math.max(3, Math.min(2 * cell, Math.floor(height / Math.max(rows, 1))));
  const left = labels ? LABEL_WIDTH : 0;
  const bottom = labels ? 30 : 0;
  const canvas = el('canvas', {
    ...(id ? {id} : {}), width: left + cols * cw + (labels ? 90 : 4), height: rows * ch + bottom + 4,
    role: 'img', 'aria-label': `${grid.label} heatmap: ${rows} layers x ${cols} steps`,
    'data-rows': rows, 'data-cols': cols,
  });
  const ctx = canvas.getContext('2d');
  // One pixel per cell, then scaled up without smoothing: a 100-run sweep draws 300k
  // cells, which fillRect takes ~10x longer to paint.
  const pixels = new ImageData(Math.max(cols, 1), Math.max(rows, 1));
  const data = pixels.data;
  const scale = (LEVELS - 1) / (hi - lo);
  for (let i = 0; i < rows; i++) {
    const y = rows - 1 - i; // input (layer 0) at the bottom
    const row = grid.values[i];
    for (let j = 0; j < cols; j++) {
      const x = logOf(row[j], grid.log);
      const k = 4 * (y * cols + j);
      const n = x === null ? -1 : 3 * Math.round(Math.min(LEVELS - 1, Math.max(0, (x - lo) * scale)));
      const c = n < 0 ? MISSING : LOOKUP;
      const at = n < 0 ? 0 : n;
      data[k] = c[at];
      data[k + 1] = c[at + 1];
      data[k + 2] = c[at + 2];
      data[k + 3] = 255;
    }
  }
  const cells = document.createElement('canvas');
  cells.width = pixels.width;
  cells.height = pixels.height;
  cells.getContext('2d').putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(cells, left, 0, cols * cw, rows * ch);
  if (grid.relative) outline(ctx, grid, left, cw, ch);
  if (labels && grid.summary) markVerdicts(ctx, grid, left, cw, ch);
  if (labels) {
    ctx.fillStyle = '#222';
    ctx.font = '12px sans-serif'; // legible at any row height: fewer names where rows are thin
    ctx.textBaseline = 'middle';
    const every = Math.ceil(14 / ch);
    for (let i = 0; i < rows; i += every) {
      ctx.fillText(grid.layers[i], 2, (rows - 1 - i) * ch + ch / 2, left - 6);
    }
    ctx.font = '12px sans-serif';
    ctx.textBaseline = 'top';
    const ticks = Math.min(cols, 8);
    for (let k = 0; k < ticks; k++) {
      const j = Math.round((k * (cols - 1)) / Math.max(ticks - 1, 1));
      ctx.fillText(`${grid.steps[j]}`, left + j * cw, rows * ch + 6);
    }
    ctx.fillText('training step →', left + cols * cw - 100, rows * ch + 18);
  }
  canvas.gradexp = {grid, left, cw, ch, cursor: null, picture: null, readout: null};
  canvas.addEventListener('mousemove', (e) => hover(e, canvas));
  canvas.addEventListener('mouseleave', () => { tooltip().hidden = true; });
  return canvas;
}

// A heatmap the keyboard reads as the mouse does: Tab focuses it, the arrow keys move a
// cursor cell (up/down a layer, left/right a step, Home/End the first/last step), and
// the cell's layer, step and value show below it, in a status line screen readers
// announce. On the run's own heatmap a click, Enter and left/right set the profile's step.
function readableHeatmap(grid, lo, hi, {cell, id}) {
  const canvas = heatmapFigure(grid, lo, hi, {cell, labels: true, id});
  const profiled = () => state.grid === grid; // the run's heatmap: it sets the profile
  const readout = el('p', {class: 'readout', id: `${id}-readout`, role: 'status',
    'aria-live': 'polite'}, `Tab to the heatmap, then ↑↓ ${grid.row ? 'time step' : 'layer'}, ` +
    `←→ step, Home/End first/last step${profiled() ? ', Enter: the profile at that step' : ''}.`);
  Object.assign(canvas.gradexp, {readout});
  canvas.setAttribute('tabindex', '0');
  // An application, not an image: screen readers pass the arrow keys through to it.
  canvas.setAttribute('role', 'application');
  canvas.setAttribute('aria-roledescription', 'heatmap');
  canvas.setAttribute('aria-describedby', readout.id);
  canvas.addEventListener('focus', () => {
    const g = canvas.gradexp;
    g.cursor = g.cursor || {i: 0, j: profiled() ? state.step : 0};
    moveCursor(canvas, g.cursor.i, g.cursor.j);
  });
  canvas.addEventListener('blur', () => drawCursor(canvas));
  canvas.addEventListener('click', (e) => {
    const at = locate(e, canvas);
    if (!at) return;
    moveCursor(canvas, at.i, at.j);
    if (profiled()) setStep(at.j);
  });
  canvas.addEventListener('keydown', (e) => {
    const {cursor} = canvas.gradexp;
    if (!cursor || e.altKey || e.ctrlKey || e.metaKey) return;
    const last = {i: grid.layers.length - 1, j: grid.steps.length - 1};
    const moves = {
      ArrowUp: [Math.min(last.i, cursor.i + 1), cursor.j], // up: towards the head
      ArrowDown: [Math.max(0, cursor.i - 1), cursor.j],
      ArrowRight: [cursor.i, Math.min(last.j, cursor.j + 1)],
      ArrowLeft: [cursor.i, Math.max(0, cursor.j - 1)],
      Home: [cursor.i, 0],
      End: [cursor.i, last.j],
      Enter: [cursor.i, cursor.j],
    };
    if (!moves[e.key]) return;
    e.preventDefault(); // the page does not scroll
    const [i, j] = moves[e.key];
    moveCursor(canvas, i, j);
    if (profiled() && !['ArrowUp', 'ArrowDown'].includes(e.key)) setStep(j);
  });
  return el('div', {class: 'heatmap'}, canvas, readout);
}

function moveCursor(canvas, i, j) {
  const g = canvas.gradexp;
  g.cursor = {i, j};
  drawCursor(canvas);
  g.readout.textContent = cellText(g.grid, i, j);
  g.readout.dataset.layer = g.grid.layers[i];
  g.readout.dataset.step = g.grid.steps[j];
}

// The cursor over the picture as drawn (kept at the first cursor), while focused.
function drawCursor(canvas) {
  const g = canvas.gradexp;
  const ctx = canvas.getContext('2d');
  if (!g.picture) g.picture = ctx.getImageData(0, 0, canvas.width, canvas.height);
  ctx.putImageData(g.picture, 0, 0);
  if (!g.cursor || document.activeElement !== canvas) return;
  const x = g.left + g.cursor.j * g.cw;
  const y = (g.grid.layers.length - 1 - g.cursor.i) * g.ch;
  // White under black: seen on every colour of the scale and on the contours.
  for (const [stroke, width] of [['#ffffff', 4], ['#000000', 2]]) {
    ctx.strokeStyle = stroke;
    ctx.lineWidth = width;
    ctx.strokeRect(x - 1, y - 1, g.cw + 2, g.ch + 2);
  }
  // A mark under the step axis too: a cell of a few pixels is easy to lose.
  ctx.fillStyle = '#000000';
  const bottom = g.grid.layers.length * g.ch;
  ctx.beginPath();
  ctx.moveTo(x + g.cw / 2, bottom + 1);
  ctx.lineTo(x + g.cw / 2 - 4, bottom + 6);
  ctx.lineTo(x + g.cw / 2 + 4, bottom + 6);
  ctx.fill();
}

// The verdicts' thresholds as contours: the edges between cells beyond a threshold and
// cells that are not (vanishing magenta, exploding black), so the starved region reads
// as one outlined area, from the layer and step where it begins.
function outline(ctx, grid, left, cw, ch) {
  const rows = grid.layers.length;
  const cols = grid.steps.length;
  const [vanishing, exploding] = thresholds(grid);
  const kind = (i, j) => {
    if (i < 0 || i >= rows - 1 || j < 0 || j >= cols) return 0; // the head is 1 by construction
    const v = grid.values[i][j];
    return v === null ? 0 : v < vanishing ? 1 : v > exploding ? 2 : 0;
  };
  ctx.lineWidth = 2;
  for (const [k, stroke] of [[1, '#d81b60'], [2, '#000000']]) {
    ctx.strokeStyle = stroke;
    ctx.beginPath();
    for (let i = 0; i < rows - 1; i++) {
      const top = (rows - 1 - i) * ch; // row i is drawn from here down to top + ch
      for (let j = 0; j < cols; j++) {
        if (kind(i, j) !== k) continue;
        const x = left + j * cw;
        if (kind(i + 1, j) !== k) { ctx.moveTo(x, top); ctx.lineTo(x + cw, top); }
        if (kind(i - 1, j) !== k) { ctx.moveTo(x, top + ch); ctx.lineTo(x + cw, top + ch); }
        if (kind(i, j - 1) !== k) { ctx.moveTo(x, top); ctx.lineTo(x, top + ch); }
        if (kind(i, j + 1) !== k) { ctx.moveTo(x + cw, top); ctx.lineTo(x + cw, top + ch); }
      }
    }
    ctx.stroke();
  }
}

// Each verdict's layer, from the step it begins to the last step it held: a bracket on
// that row, named at its right end.
function markVerdicts(ctx, grid, left, cw, ch) {
  const rows = grid.layers.length;
  for (const v of grid.summary.verdicts || []) {
    const i = grid.layers.indexOf(v.layer);
    if (i < 0 || v.step === null || v.step === undefined) continue;
    const until = (v.evidence && v.evidence.until) ?? v.step;
    const j0 = grid.steps.findIndex((s) => s >= v.step);
    let j1 = grid.steps.findIndex((s) => s > until);
    j1 = j1 < 0 ? grid.steps.length - 1 : Math.max(j0, j1 - 1);
    if (j0 < 0) continue;
    const y = (rows - 1 - i) * ch;
    ctx.strokeStyle = '#ffffff';
    ctx.lineWidth = 3;
    ctx.strokeRect(left + j0 * cw + 1, y + 1, (j1 - j0 + 1) * cw - 2, ch - 2);
    ctx.strokeStyle = '#000000';
    ctx.lineWidth = 1;
    ctx.setLineDash([4, 2]);
    ctx.strokeRect(left + j0 * cw + 1, y + 1, (j1 - j0 + 1) * cw - 2, ch - 2);
    ctx.setLineDash([]);
    ctx.fillStyle = '#222';
    ctx.font = 'bold 12px sans-serif';
    ctx.textBaseline = 'middle';
    ctx.fillText(v.kind, left + grid.steps.length * cw + 6, y + ch / 2);
  }
}

function locate(e, canvas) {
  const {grid, left, cw, ch} = canvas.gradexp;
  const rect = canvas.getBoundingClientRect();
  const x = e.clientX - rect.left - left;
  const y = e.clientY - rect.top;
  const j = Math.floor(x / cw);
  const i = grid.layers.length - 1 - Math.floor(y / ch);
  if (j < 0 || j >= grid.steps.length || i < 0 || i >= grid.layers.length) return null;
  return {i, j};
}

// What a cell holds, for the mouse's tooltip and the keyboard's cursor alike: the run,
// the layer, the step and the value as the event file holds it (relative: also its
// share of the head's).
function cellText(grid, i, j) {
  const value = grid.values[i][j];
  const raw = grid.raw[i][j];
  return `${grid.run} · ${grid.row ?? 'layer '}${grid.layers[i]} · step ${grid.steps[j]} · ` +
    (grid.relative ? `${fmt(value)} of the head (${grid.quantity} ${exact(raw)})`
      : `${grid.quantity} ${exact(raw)}`);
}

function hover(e, canvas) {
  const at = locate(e, canvas);
  const tip = tooltip();
  if (!at) { tip.hidden = true; return; }
  tip.textContent = cellText(canvas.gradexp.grid, at.i, at.j);
  tip.hidden = false;
  tip.style.left = `${e.pageX + 12}px`;
  tip.style.top = `${e.pageY + 12}px`;
}

function colorbar(lo, hi, label) {
  const width = 360;
  const canvas = el('canvas', {id: 'colorbar', width: width + 40, height: 46, role: 'img',
    'aria-label': `colour scale: ${label}, 1e${lo.toFixed(1)} to 1e${hi.toFixed(1)}`});
  const ctx = canvas.getContext('2d');
  for (let x = 0; x < width; x++) {
    ctx.fillStyle = color(lo + ((hi - lo) * x) / (width - 1), lo, hi);
    ctx.fillRect(x + 10, 0, 1, 14);
  }
  ctx.fillStyle = '#222';
  ctx.font = '12px sans-serif';
  ctx.textBaseline = 'top';
  const first = Math.ceil(lo);
  const last = Math.floor(hi);
  const stride = Math.max(1, Math.ceil((last - first + 1) / 8));
  for (let d = first; d <= last; d += stride) {
    const x = 10 + ((d - lo) / (hi - lo)) * (width - 1);
    ctx.fillRect(x, 14, 1, 4);
    ctx.fillText(`1e${d}`, x - 10, 19);
  }
  ctx.fillText(label, 10, 33);
  return canvas;
}

// --- the profile at one step ---------------------------------------------------------
function profileSection(grid) {
  const slider = el('input', {id: 'step', type: 'range', min: 0, max: grid.steps.length - 1,
    value: 0, step: 1, 'aria-label': 'training step of the profile'});
  slider.oninput = () => setStep(Number(slider.value));
  return el('section', {},
    el('h3', {}, 'per-layer profile at step ', el('span', {id: 'step-label'}, `${grid.steps[0]}`)),
    slider,
    el('div', {id: 'profile'}));
}

function setStep(j) {
  state.step = j;
  const slider = document.getElementById('step');
  if (slider) slider.value = j;
  // The keyboard's cursor follows the profile's step (read out when next focused).
  const heatmap = document.getElementById('heatmap');
  if (heatmap && heatmap.gradexp.cursor) {
    heatmap.gradexp.cursor.j = j;
    drawCursor(heatmap);
  }
  showProfile(j);
}

function showProfile(j) {
  const grid = state.grid;
  const target = document.getElementById('profile');
  if (!grid || !target) return;
  document.getElementById('step-label').textContent = `${grid.steps[j]}`;
  const points = grid.values.map((row, i) => [i, logOf(row[j], grid.log)]);
  const theory = grid.summary && grid.summary.theory;
  const predicted = theory && grid.quantity === 'signal_bwd' && grid.relative &&
    theory.signal_bwd && theory.signal_bwd.length === grid.layers.length
    ? theory.signal_bwd.map((v, i) => [i, logOf(v, true)]) : null;
  target.replaceChildren(lineChart(points, grid.layers, grid.label, predicted));
  target.dataset.step = grid.steps[j];
  target.dataset.values = JSON.stringify(grid.values.map((row) => row[j]));
}

function lineChart(points, names, label, predicted = null) {
  const W = 640;
  const H = 220;
  const pad = {l: 60, r: 10, t: 10, b: 40};
  const ys = [...points, ...(predicted || [])].map((p) => p[1]).filter((y) => y !== null);
  const lo = ys.length ? Math.floor(Math.min(...ys)) : 0;
  const hi = ys.length ? Math.max(lo + 1, Math.ceil(Math.max(...ys))) : 1;
  const n = Math.max(points.length - 1, 1);
  const X = (i) => pad.l + (i / n) * (W - pad.l - pad.r);
  const Y = (y) => pad.t + (1 - (y - lo) / (hi - lo)) * (H - pad.t - pad.b);
  const svg = svgEl('svg', {width: W, height: H, role: 'img', 'aria-label': `${label} per layer`});
  for (let d = lo; d <= hi; d += Math.max(1, Math.ceil((hi - lo) / 6))) {
    svg.appendChild(svgEl('line', {x1: pad.l, x2: W - pad.r, y1: Y(d), y2: Y(d), stroke: '#ddd'}));
    svg.appendChild(svgText(`1e${d}`, pad.l - 6, Y(d) + 4, 'end'));
  }
  const path = points.filter((p) => p[1] !== null).map((p, k) =>
    `${k ? 'L' : 'M'}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join('');
  svg.appendChild(svgEl('path', {d: path, fill: 'none', stroke: '#1a386f', 'stroke-width': 2}));
  for (const [i, y] of points) {
    if (y !== null) svg.appendChild(svgEl('circle', {cx: X(i), cy: Y(y), r: 3, fill: '#1a386f'}));
  }
  if (predicted) {
    const theory = predicted.filter((p) => p[1] !== null).map((p, k) =>
      `${k ? 'L' : 'M'}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join('');
    svg.appendChild(svgEl('path', {d: theory, fill: 'none', stroke: '#c0632b',
      'stroke-width': 2, 'stroke-dasharray': '6 4', 'data-series': 'theory'}));
    svg.appendChild(svgText('dashed: mean-field prediction at init', W - pad.r, pad.t + 12, 'end'));
  }
  svg.appendChild(svgText(names[0], pad.l, H - 22, 'start'));
  svg.appendChild(svgText(names[names.length - 1], W - pad.r, H - 22, 'end'));
  svg.appendChild(svgText(`${label} (log scale), input → head`, pad.l, H - 6, 'start'));
  return svg;
}

// --- through time --------------------------------------------------------------------
async function timeSection(run) {
  const data = await getJSON(`./time?${new URLSearchParams({run})}`);
  const section = el('section', {id: 'time'}, el('h3', {}, '‖∂L/∂h_t‖ through time'));
  for (const [layer, g] of Object.entries(data.layers)) {
    const grid = {run, quantity: 'time_grad', layers: g.t.map((t) => `t=${t}`), steps: g.steps,
      values: g.values, raw: g.values, relative: false, log: true, row: `${layer} `,
      label: `${layer}: ‖∂L/∂h_t‖ (rows: time step t, first at the bottom)`};
    const [lo, hi] = range([grid]);
    section.append(el('p', {class: 'what'}, grid.label),
      readableHeatmap(grid, lo, hi, {cell: 10, id: `time-${layer}`}),
      el('div', {}, colorbar(lo, hi, '‖∂L/∂h_t‖')));
  }
  return section;
}

// --- a sweep side by side ------------------------------------------------------------
async function drawSweep(main, current) {
  const needle = state.filter.toLowerCase();
  const names = Object.keys(state.runs).sort().filter((n) => n.toLowerCase().includes(needle));
  // Every run's grid, kept while the quantity stays (filtering is local). The first
  // screen's runs come first, in a request of their own: drawn while the rest load.
  let sweep = state.sweep;
  if (!sweep || sweep.quantity !== state.quantity) {
    sweep = state.sweep = {quantity: state.quantity, grids: {}, complete: false};
    const first = names.slice(0, FIRST_SCREEN);
    const query = new URLSearchParams([['quantity', state.quantity], ...first.map((r) => ['run', r])]);
    const asked = state.firstScreen && !needle && state.quantity === 'signal_bwd'
      ? {grids: state.firstScreen} : await getJSON(`./heatmaps?${query}`);
    state.firstScreen = null;
    Object.assign(sweep.grids, decodeGrids(asked.grids));
    // The rest is asked for before the first screen is drawn: the server reads while
    // this draws (the first screen's runs come again, from the server's cache).
    const all = getJSON(`./heatmaps?${new URLSearchParams({quantity: state.quantity})}`);
    all.catch(() => null);
    if (current()) drawCards(main, names, sweep);
    Object.assign(sweep.grids, decodeGrids((await all).grids));
    sweep.complete = true;
  }
  if (current()) drawCards(main, names, sweep);
  // Each run's status, once every card is drawn (it reads every run's summary).
  if (!state.statuses) {
    state.statuses = (await getJSON('./statuses').catch(() => ({statuses: {}}))).statuses;
  }
  if (!current()) return;
  for (const card of main.querySelectorAll('#sweep .card')) {
    const status = state.statuses[card.dataset.run] || 'running';
    card.querySelector('.run-status').textContent = status;
    card.dataset.status = status;
  }
}

// /heatmaps sends each grid's values as float32 bytes (base64, little-endian, layer by
// layer): rows of numbers here, null where none (NaN) or not finite, as /heatmap has them.
function decodeGrids(grids) {
  for (const g of Object.values(grids)) {
    const text = atob(g.values_f32);
    const bytes = new Uint8Array(text.length);
    for (let k = 0; k < text.length; k++) bytes[k] = text.charCodeAt(k);
    const view = new DataView(bytes.buffer);
    const cols = g.steps.length;
    g.values = g.layers.map((_, i) => {
      const row = new Array(cols);
      for (let j = 0; j < cols; j++) {
        const v = view.getFloat32(4 * (i * cols + j), true);
        row[j] = Number.isFinite(v) ? v : null;
      }
      return row;
    });
    delete g.values_f32;
  }
  return grids;
}

function drawCards(main, names, sweep) {
  const grids = names.filter((run) => sweep.grids[run]).map((run) => transform(sweep.grids[run]));
  const [lo, hi] = range(grids);
  // Each card's button is its one Tab stop: Enter (or a click on it or on the heatmap)
  // opens the run; its status and verdicts are the button's description.
  const cards = grids.map((grid, k) => {
    const canvas = heatmapFigure(grid, lo, hi, {cell: 10, labels: false, width: 300, height: 130});
    const card = el('figure', {class: 'card', 'data-run': grid.run}, canvas,
      el('figcaption', {},
        el('button', {type: 'button', 'aria-describedby': `card-${k}-status card-${k}-verdicts`},
          grid.run),
        el('span', {class: 'run-status', id: `card-${k}-status`}),
        verdictLine(grid.run, `card-${k}-verdicts`)));
    const open = () => {
      state.run = grid.run;
      state.view = 'run';
      drawControls(Object.keys(state.runs).sort());
      update();
    };
    card.querySelector('button').onclick = open;
    canvas.addEventListener('click', open);
    return card;
  });
  const loading = sweep.complete ? '' : ` (${names.length - grids.length} more loading)`;
  main.replaceChildren(
    el('p', {class: 'what'}, `${names.length} runs${loading}, one colour scale; each: layers ` +
      '(input at the bottom) x logged steps; contours: beyond the verdict thresholds. ' +
      'Click a run (or Tab to it, then Enter) to open it.'),
    colorbar(lo, hi, grids[0] ? grids[0].label : ''),
    el('div', {id: 'sweep', ...(sweep.complete ? {'data-complete': ''} : {})}, ...cards));
}

function verdictLine(run, id) {
  const text = state.runs[run].verdicts || '';
  const kinds = [...text.matchAll(/^\| ([a-z_]+) \|/gm)].map((m) => m[1]).filter((k) => k !== 'verdict');
  return el('span', {class: 'verdicts', id}, kinds.length ? [...new Set(kinds)].join(', ') : '');
}

// --- helpers -------------------------------------------------------------------------
async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function fmt(v) {
  if (v === null || v === undefined) return '-';
  return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 ? v.toPrecision(3) : v.toExponential(2);
}

// A value as the event file holds it: the fewest digits that read back as the same
// float32 (what gradexp logs; a double's own shortest form if it is not one).
function exact(v) {
  if (v === null || v === undefined) return '-';
  let shortest = v;
  if (Math.fround(v) === v) {
    for (let digits = 1; digits <= 9; digits++) {
      shortest = Number(v.toPrecision(digits));
      if (Math.fround(shortest) === v) break;
    }
  }
  const plain = v === 0 || (Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4);
  return plain ? String(shortest) : shortest.toExponential();
}

function tooltip() {
  return document.getElementById('tooltip');
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

function svgEl(tag, attrs) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function svgText(text, x, y, anchor) {
  const t = svgEl('text', {x, y, 'text-anchor': anchor, 'font-size': 12, fill: '#222'});
  t.textContent = text;
  return t;
}

const STYLE = `
  body { font: 14px/1.4 system-ui, sans-serif; color: #222; margin: 12px; }
  #controls { display: flex; flex-wrap: wrap; gap: 14px; align-items: center; margin-bottom: 8px; }
  select, input, button { font: inherit; }
  h2 { font-size: 18px; margin: 6px 0; word-break: break-all; }
  h3 { font-size: 15px; margin: 14px 0 4px; }
  .what { color: #444; margin: 2px 0 6px; }
  canvas:focus, button:focus, select:focus, input:focus, summary:focus {
    outline: 2px solid #d81b60; outline-offset: 2px; }
  .card:focus-within { border-color: #d81b60; box-shadow: 0 0 0 1px #d81b60; }
  .card canvas { cursor: pointer; }
  .readout { margin: 2px 0 6px; min-height: 1.4em; font-size: 13px; color: #222; }
  #config { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: flex-start; font-size: 13px; }
  .config-group summary { font-weight: 600; cursor: pointer; }
  .config-group table { border-collapse: collapse; margin: 2px 0 0 14px; }
  .config-group th { font-weight: normal; color: #444; text-align: left; padding: 0 10px 0 0; }
  .config-group td { padding: 0; font-family: ui-monospace, monospace; word-break: break-all; }
  #tooltip { position: absolute; background: #fff; border: 1px solid #888; padding: 4px 6px;
    font-size: 13px; pointer-events: none; box-shadow: 0 1px 4px rgba(0,0,0,.2); }
  #sweep { display: flex; flex-wrap: wrap; gap: 10px; }
  .card { margin: 0; border: 1px solid #ddd; padding: 6px; max-width: 420px; }
  .card figcaption { font-size: 12px; word-break: break-all; }
  .card button { border: none; background: none; color: #1a386f; text-decoration: underline;
    cursor: pointer; padding: 0; text-align: left; }
  .verdicts { display: block; color: #444; }
  .run-status { display: block; font-weight: 600; }
  #verdicts { border-collapse: collapse; font-size: 13px; }
  #verdicts th, #verdicts td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: left;
    white-space: pre-line; }
  .status { font-weight: 600; margin: 2px 0; }
  #step { width: 640px; }
`;
