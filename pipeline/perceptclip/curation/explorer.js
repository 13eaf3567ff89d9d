// The report's explorer: selection controls over the scores this page holds. Plain JavaScript, no library,
// nothing fetched. The data comes from the JSON script element #explorer-data (written by
// perceptclip.curation.explorer); every piece of text from it reaches the page through textContent.
//
// The selection is the conjunction of the controls, written in the filter's language; that text is kept in
// the address (#where=<URL-encoded expression>). The grammar read back from an address is a subset of the
// filter's: comparisons (>, >=, <, <=) of a score with a number, in / not in / == / != of a classifier's
// column with its classes, true, parentheses and `and`. Anything else is reported as not representable.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("explorer-data").textContent);
  document.documentElement.classList.add("js");
  const STRIP = 6;                       // neighbours shown on each side of a threshold
  const OPS = [">=", ">", "<=", "<"];
  const SYMBOL = {">=": "≥", ">": ">", "<=": "≤", "<": "<"};
  const FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="};
  const SCALE = DATA.exact ? 1 : DATA.scored / Math.max(DATA.rows, 1);   // a sample's count -> all scored

  function bytes(b64) {
    const text = atob(b64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out;
  }

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    return node;
  }

  // --- the controls ------------------------------------------------------------------------------------

  const numeric = DATA.numeric.map((n, index) => {
    const root = document.querySelector(`.control.numeric[data-index="${index}"]`);
    const values = n.type === "f8" ? new Float64Array(bytes(n.data).buffer) : new Float32Array(bytes(n.data).buffer);
    const edges = n.edges, last = edges.length - 1;
    const bins = new Uint8Array(values.length);          // each held row's step (255: no value)
    for (let i = 0; i < values.length; i++) {
      const v = values[i];
      if (!(v >= edges[0] && v < edges[last])) { bins[i] = 255; continue; }
      let lo = 0, hi = last;                              // edges[lo] <= v < edges[hi]
      while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (edges[mid] <= v) lo = mid; else hi = mid; }
      bins[i] = lo;
    }
    let half = 0, median = 0;
    const total = n.counts.reduce((a, b) => a + b, 0);
    while (median < last && half + n.counts[median] < total / 2) half += n.counts[median++];
    const svg = root.querySelector("svg");
    const c = {
      kind: "numeric", index, name: n.name, higher: n.higher, edges, counts: n.counts, values, bins,
      held: n.held, op: "", value: edges[median], root, svg,
      opSelect: root.querySelector("select.op"), input: root.querySelector("input.value"),
      slider: root.querySelector("input.slider"), alone: root.querySelector(".alone"),
      keptBins: new Uint32Array(256), passed: 0, visible: true, tallied: true,
      left: +svg.dataset.left, width: +svg.dataset.width, top: +svg.dataset.top, height: +svg.dataset.height,
    };
    c.yscale = c.height / Math.max(1, Math.max.apply(null, n.counts));
    const group = svg.querySelector("g.kept-bars");
    c.keptRects = n.counts.map((_, i) => {
      const x0 = xOf(c, edges[i]), x1 = xOf(c, edges[i + 1]);
      return group.appendChild(svgEl("rect", {class: "kept", x: x0.toFixed(2), y: c.top + c.height,
                                              width: Math.max(x1 - x0 - 1, 0.5).toFixed(2), height: 0}));
    });
    c.dropped = svg.querySelector("rect.dropped");
    c.line = svg.querySelector("line.threshold");
    c.slots = buildStrip(root.querySelector(".boundary"));
    return c;
  });

  const classes = DATA.classes.map((k, index) => {
    const root = document.querySelector(`.control.classes[data-index="${index}"]`);
    const buffer = bytes(k.data).buffer;
    return {
      kind: "classes", index, name: k.name, labels: k.labels, counts: k.counts, root,
      codes: k.type === "u2" ? new Uint16Array(buffer) : new Uint8Array(buffer),
      on: new Uint8Array(k.labels.length + 1).fill(1, 0, k.labels.length),    // the last code: no label
      active: false, keptCounts: new Uint32Array(k.type === "u2" ? 65536 : 256),
      buttons: Array.from(root.querySelectorAll("button.toggle")),
      hint: root.querySelector(".hint"),
    };
  });

  const byName = new Map();
  numeric.forEach(c => byName.set(c.name, c));
  classes.forEach(c => byName.set(c.name, c));

  function xOf(c, v) {
    const lo = c.edges[0], hi = c.edges[c.edges.length - 1];
    return c.left + Math.min(Math.max((v - lo) / (hi - lo), 0), 1) * c.width;
  }

  function nearestStep(c, v) {
    let best = 0;
    for (let i = 1; i < c.edges.length; i++) if (Math.abs(c.edges[i] - v) < Math.abs(c.edges[best] - v)) best = i;
    return best;
  }

  // --- the expression: written, and read back from an address -------------------------------------------

  function numberText(v) {             // the shortest text that reads back as v; always a float literal
    const s = String(v);
    return /^-?\d+$/.test(s) ? s + ".0" : s;
  }

  function expression() {
    const terms = [];
    for (const name of DATA.order) {
      const c = byName.get(name);
      if (c.kind === "numeric" && c.op) terms.push(`${c.name} ${c.op} ${numberText(c.value)}`);
      if (c.kind === "classes" && c.active) {
        const kept = c.labels.filter((_, i) => c.on[i]).map(label => JSON.stringify(label));
        terms.push(`${c.name} in [${kept.join(", ")}]`);
      }
    }
    return terms.length ? terms.join(" and ") : "true";
  }

  function tokenize(text) {
    const rules = [["space", /\s+/y], ["name", /[A-Za-z_][A-Za-z0-9_]*/y],
                   ["number", /(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.])/y],
                   ["op", /<=|>=|==|!=|<|>/y], ["punct", /[\[\](),+-]/y]];
    const tokens = [];
    let i = 0;
    outer: while (i < text.length) {
      if (text[i] === "'" || text[i] === '"') {
        const [value, end] = readString(text, i);
        tokens.push({type: "string", value, at: i});
        i = end;
        continue;
      }
      for (const [type, re] of rules) {
        re.lastIndex = i;
        const m = re.exec(text);
        if (m) {
          if (type !== "space") tokens.push({type, value: m[0], at: i});
          i = re.lastIndex;
          continue outer;
        }
      }
      throw new Error(`cannot read ${JSON.stringify(text.slice(i, i + 12))} at column ${i + 1}`);
    }
    return tokens;
  }

  function readString(text, start) {   // a plain Python string literal; escapes it might read otherwise refused
    const quote = text[start];
    const simple = {"\\": "\\", "'": "'", '"': '"', n: "\n", t: "\t", r: "\r"};
    let out = "";
    for (let i = start + 1; i < text.length; i++) {
      const ch = text[i];
      if (ch === quote) return [out, i + 1];
      if (ch === "\n") break;
      if (ch !== "\\") { out += ch; continue; }
      const e = text[++i];
      const width = {x: 2, u: 4, U: 8}[e];
      if (e in simple) out += simple[e];
      else if (width && /^[0-9a-fA-F]+$/.test(text.substr(i + 1, width)) && text.substr(i + 1, width).length === width) {
        out += String.fromCodePoint(parseInt(text.substr(i + 1, width), 16));
        i += width;
      } else throw new Error(`a string with the escape \\${e || ""}`);
    }
    throw new Error("a string that does not end");
  }

  function parse(text) {               // -> [{control, op, value} | {control, labels}], or throws why not
    const tokens = tokenize(text);
    let pos = 0;
    const peek = () => tokens[pos] || {type: "end", value: ""};
    const next = () => tokens[pos++] || {type: "end", value: ""};
    const expect = (value) => {
      const t = next();
      if (t.value !== value) throw new Error(`expected ${value} at column ${(t.at ?? text.length) + 1}`);
    };
    const terms = [];
    function conjunction() {
      term();
      while (peek().type === "name" && peek().value === "and") { next(); term(); }
      const t = peek();
      if (t.type === "name" && t.value === "or") throw new Error("it uses 'or'");
    }
    function term() {
      if (peek().value === "(") { next(); conjunction(); expect(")"); return; }
      const t = peek();
      if (t.type === "name" && t.value === "not") throw new Error("it uses 'not'");
      if (t.type === "name" && (t.value === "true" || t.value === "True")) { next(); return; }
      if (t.type === "name" && (t.value === "false" || t.value === "False")) throw new Error("false keeps nothing");
      terms.push(comparison());
      if (peek().type === "op") throw new Error("it chains comparisons");
    }
    function operand() {
      const t = next();
      if (t.type === "name" && !["and", "or", "not", "in", "is", "true", "false", "True", "False"].includes(t.value)) {
        return {name: t.value};
      }
      if (t.type === "string") return {string: t.value};
      let sign = 1, n = t;
      if (t.value === "-" || t.value === "+") { sign = t.value === "-" ? -1 : 1; n = next(); }
      if (n.type !== "number") throw new Error(`expected a score, a number or a class at column ${(n.at ?? text.length) + 1}`);
      const integer = !/[.eE]/.test(n.value);
      if (integer && !/^(0+|[1-9]\d*)$/.test(n.value)) throw new Error(`${n.value} is not a number the filter reads`);
      const value = sign * Number(n.value);
      // the filter compares a float32 column with an integer as float32: exact only up to 2^24
      if (integer && Math.abs(value) > 16777216) throw new Error(`the integer ${n.value} is beyond what a score compares with`);
      if (!Number.isFinite(value)) throw new Error(`${n.value} is not a finite number`);
      return {number: value};
    }
    function list() {
      const open = next();
      if (open.value !== "[" && open.value !== "(") throw new Error("'in' needs a list of classes");
      const close = open.value === "[" ? "]" : ")";
      const items = [];
      let commas = 0;
      while (peek().value !== close) {
        const t = next();
        if (t.type !== "string") throw new Error("'in' needs a list of quoted classes");
        items.push(t.value);
        if (peek().value === ",") { next(); commas++; } else break;
      }
      expect(close);
      if (!items.length) throw new Error("'in' needs at least one class");
      if (close === ")" && !commas) throw new Error("'in' needs a list, not one value in parentheses");
      return items;
    }
    function comparison() {
      const left = operand();
      let op = next();
      let negated = false;
      if (op.type === "name" && op.value === "not" && peek().value === "in") { negated = true; op = next(); }
      if (op.type === "name" && op.value === "in") {
        if (!left.name) throw new Error("'in' needs a score on its left");
        return classTerm(left.name, list(), negated);
      }
      if (op.type !== "op") throw new Error(`expected a comparison at column ${(op.at ?? text.length) + 1}`);
      const right = operand();
      const [name, other, sym] = left.name ? [left.name, right, op.value] : [right.name, left, FLIP[op.value]];
      if (!name || other.name) throw new Error("a comparison needs one score and one value");
      if (other.string !== undefined) {
        if (sym !== "==" && sym !== "!=") throw new Error(`${name} ${sym} a string`);
        return classTerm(name, [other.string], sym === "!=");
      }
      const c = control(name);
      if (c.kind !== "numeric") throw new Error(`${name} holds classes; compare it with quoted classes`);
      if (!OPS.includes(sym)) throw new Error(`${name} ${sym}: a threshold keeps above or below`);
      return {control: c, op: sym, value: other.number};
    }
    function classTerm(name, labels, negated) {
      const c = control(name);
      if (c.kind !== "classes") throw new Error(`${name} is a score, not a classifier's classes`);
      for (const label of labels) {
        if (!c.labels.includes(label)) throw new Error(`${JSON.stringify(label)} is not a class of ${name}`);
      }
      return {control: c, labels: negated ? c.labels.filter(l => !labels.includes(l)) : labels};
    }
    function control(name) {
      const c = byName.get(name);
      if (!c) throw new Error(`this page has no control for ${name}`);
      return c;
    }
    conjunction();
    if (pos < tokens.length) throw new Error(`unexpected ${JSON.stringify(tokens[pos].value)} at column ${tokens[pos].at + 1}`);
    const seen = new Set();
    for (const t of terms) {
      if (seen.has(t.control)) throw new Error(`it has two conditions on ${t.control.name}`);
      seen.add(t.control);
      if (t.labels && !t.labels.length) throw new Error(`it leaves out every class of ${t.control.name}`);
    }
    return terms;
  }

  function apply(terms) {
    for (const c of numeric) c.op = "";
    for (const c of classes) { c.active = false; c.on.fill(1, 0, c.labels.length); }
    for (const t of terms) {
      const c = t.control;
      if (c.kind === "numeric") { c.op = t.op; c.value = t.value; continue; }
      c.active = true;
      c.labels.forEach((label, i) => { c.on[i] = t.labels.includes(label) ? 1 : 0; });
    }
  }

  // --- counting -------------------------------------------------------------------------------------------

  const scatter = setupScatter();
  const mask = new Uint8Array(DATA.rows);      // 1: the row is kept by every control
  let kept = 0;

  // One tight loop per control and per tally, each over one typed array: several times faster than one loop
  // that asks every control about every row.
  function pass(values, op, t) {       // rows that pass one threshold (and the rest of the mask); -> how many pass it
    let n = 0;
    const rows = values.length;
    if (op === ">=") for (let i = 0; i < rows; i++) { const p = values[i] >= t ? 1 : 0; n += p; mask[i] &= p; }
    else if (op === ">") for (let i = 0; i < rows; i++) { const p = values[i] > t ? 1 : 0; n += p; mask[i] &= p; }
    else if (op === "<=") for (let i = 0; i < rows; i++) { const p = values[i] <= t ? 1 : 0; n += p; mask[i] &= p; }
    else for (let i = 0; i < rows; i++) { const p = values[i] < t ? 1 : 0; n += p; mask[i] &= p; }
    return n;
  }

  function tally(codes, into) {        // kept rows per code (a step, a class, a cell); -> all kept rows
    into.fill(0);
    for (let i = 0; i < codes.length; i++) into[codes[i]] += mask[i];
    let n = 0;
    for (let i = 0; i < into.length; i++) n += into[i];
    return n;
  }

  // The same loop for the density's cells (16-bit codes): one function seeing both kinds of arrays would be
  // compiled for neither, and run at half the speed.
  function tallyCells(codes, into) {
    into.fill(0);
    for (let i = 0; i < codes.length; i++) into[codes[i]] += mask[i];
    let n = 0;
    for (let i = 0; i < into.length; i++) n += into[i];
    return n;
  }

  // What is off screen is not tallied: each tally is a pass over every row. An observer marks what comes
  // into view, and asks for an update then.
  function recount() {
    mask.fill(1);
    for (const c of numeric) if (c.op) c.passed = pass(c.values, c.op, c.value);
    for (const c of classes) {
      if (!c.active) continue;
      const on = c.on, codes = c.codes;
      for (let i = 0; i < codes.length; i++) mask[i] &= on[codes[i]];
    }
    let count = -1;
    for (const c of classes) count = tally(c.codes, c.keptCounts);
    for (const c of numeric) {
      c.tallied = c.visible || count < 0;
      if (c.tallied) count = tally(c.bins, c.keptBins);
    }
    if (scatter && scatter.visible) count = tallyCells(scatter.cells, scatter.kept);
    if (count < 0) {
      count = 0;
      for (let i = 0; i < mask.length; i++) count += mask[i];
    }
    kept = count;
  }

  if (window.IntersectionObserver) {
    const watched = new Map(numeric.map(c => [c.root, c]));
    if (scatter) watched.set(scatter.canvas, scatter);
    const observer = new IntersectionObserver((entries) => {
      let shown = false;
      for (const e of entries) {
        const target = watched.get(e.target);
        shown = shown || (e.isIntersecting && !target.visible);
        target.visible = e.isIntersecting;
      }
      if (shown) schedule();
    }, {rootMargin: "200px"});
    for (const el of watched.keys()) observer.observe(el);
  }

  // --- what the page shows --------------------------------------------------------------------------------

  function pythonRepr(s) {             // Python's repr() of a str, as quantiles prints the expression
    const quote = s.includes("'") && !s.includes('"') ? '"' : "'";
    const hex = (n, w) => n.toString(16).padStart(w, "0");
    let out = quote;
    for (const ch of s) {
      const cp = ch.codePointAt(0);
      if (ch === quote || ch === "\\") out += "\\" + ch;
      else if (ch === "\n") out += "\\n";
      else if (ch === "\r") out += "\\r";
      else if (ch === "\t") out += "\\t";
      else if (cp < 0x20 || cp === 0x7f) out += "\\x" + hex(cp, 2);
      else if (cp > 0x7f && /^[\p{C}\p{Z}]$/u.test(ch)) {
        out += cp < 0x100 ? "\\x" + hex(cp, 2) : cp < 0x10000 ? "\\u" + hex(cp, 4) : "\\U" + hex(cp, 8);
      } else out += ch;
    }
    return out + quote;
  }

  function percent(part, whole) {      // Python's f"{100 * share:.1f}%": ties (x.x5 exactly) to even
    if (!whole) return "-";
    const x = 100 * (part / whole);
    if (Number.isInteger(x * 4) && (x * 4) % 2 === 1) {
      const down = Math.floor(x * 10);
      return ((down % 2 === 0 ? down : down + 1) / 10).toFixed(1) + "%";
    }
    return x.toFixed(1) + "%";
  }

  function interval(k, n, total) {     // Wilson's 95% interval for a share seen in a sample of n of total
    const z = 1.96, p = k / n;
    const m = n * (total - 1) / Math.max(total - n, 1);      // a sample of most of the total says more
    const d = 1 + z * z / m, centre = (p + z * z / (2 * m)) / d;
    const half = z * Math.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / d;
    return [Math.max(0, Math.floor(total * (centre - half))), Math.min(total, Math.ceil(total * (centre + half)))];
  }

  const countLine = document.getElementById("count");
  const commandLine = document.getElementById("command");
  const estimateLine = document.getElementById("estimate");

  function showCount(expr) {
    countLine.textContent = "";
    const where = el("span", "where", `--where ${pythonRepr(expr)}`);
    where.title = expr;
    countLine.append(where, " ");
    const keeps = el("span", "keeps");
    const n = DATA.exact ? String(kept) : String(Math.round(kept * SCALE));
    const about = DATA.exact ? "" : "about ";
    const share = DATA.exact ? kept : kept * SCALE;
    keeps.append(`keeps ${about}`, el("b", "", n), ` of ${DATA.total} samples (`,
                 el("b", "", percent(share, DATA.total)), `), ${about}${n} of ${DATA.scored} scored (`,
                 percent(share, DATA.scored), ")");
    countLine.append(keeps);
    if (!DATA.exact) {
      const [lo, hi] = interval(kept, DATA.rows, DATA.scored);
      estimateLine.textContent = `An estimate from a uniform sample of ${DATA.rows} of the ${DATA.scored} scored ` +
        `samples: 95% interval ${lo} to ${hi} (${percent(lo, DATA.scored)} to ${percent(hi, DATA.scored)} of the scored)`;
    }
    const quote = s => "'" + s.replace(/'/g, "'\\''") + "'";
    commandLine.textContent = `perceptclip filter --scores ${quote(DATA.command.scores)} --where ${quote(expr)} ` +
      "--output curated";
  }

  function showNumeric(c) {
    c.opSelect.value = c.op;
    if (document.activeElement !== c.input) c.input.value = String(c.value);
    c.slider.value = String(nearestStep(c, c.value));
    const x = xOf(c, c.value);
    c.line.setAttribute("x1", x.toFixed(2));
    c.line.setAttribute("x2", x.toFixed(2));
    c.line.setAttribute("visibility", "visible");
    c.line.classList.toggle("idle", !c.op);
    const below = c.op === ">=" || c.op === ">";
    c.dropped.setAttribute("x", String(below || !c.op ? c.left : x));
    c.dropped.setAttribute("width", String(!c.op ? 0 : below ? x - c.left : c.left + c.width - x));
    if (c.tallied) c.keptRects.forEach((r, i) => {
      const h = Math.min(c.keptBins[i] * SCALE, c.counts[i]) * c.yscale;
      r.setAttribute("y", (c.top + c.height - h).toFixed(2));
      r.setAttribute("height", h.toFixed(2));
    });
    c.alone.textContent = c.op ? `on its own, ${SYMBOL[c.op]} ${brief(c.value)} keeps ` +
      `${DATA.exact ? "" : "about "}${percent(c.passed * SCALE, DATA.scored)} of the scored samples` :
      "no threshold: drag on the histogram or the slider to set one";
    showStrip(c);
  }

  function buildStrip(box) {
    const sides = {below: box.querySelector(".below"), above: box.querySelector(".above")};
    const slots = {below: [], above: []};
    for (const side of ["below", "above"]) {
      for (let i = 0; i < STRIP; i++) {
        const fig = el("figure", "slot empty");
        const img = el("img");
        img.alt = "";
        const missing = el("div", "missing");
        const cap = el("figcaption");
        const score = el("b"), key = el("span", "key");
        cap.append(score, key);
        fig.append(img, missing, cap);
        sides[side].append(fig);
        slots[side].push({fig, img, missing, score, key});
      }
    }
    slots.edge = box.querySelector(".edge");
    return slots;
  }

  function keptByOthers(sample, except) {   // which other control leaves this sample out, if any
    for (const c of numeric) {
      if (c === except || !c.op) continue;
      const v = sample.values[c.index], t = c.value;
      const pass = v !== null && (c.op === ">=" ? v >= t : c.op === ">" ? v > t : c.op === "<=" ? v <= t : v < t);
      if (!pass) return c.name;
    }
    for (const c of classes) if (c.active && !c.on[sample.codes[c.index]]) return c.name;
    return null;
  }

  function showStrip(c) {
    const held = c.held, value = i => DATA.samples[held[i]].values[c.index];
    let lo = 0, hi = held.length;                    // the first held at or above the threshold
    while (lo < hi) { const mid = (lo + hi) >> 1; if (value(mid) < c.value) lo = mid + 1; else hi = mid; }
    const pick = {below: [], above: []};
    for (let i = 0; i < STRIP; i++) {
      pick.below.push(lo - STRIP + i >= 0 ? held[lo - STRIP + i] : null);     // nearest last
      pick.above.push(lo + i < held.length ? held[lo + i] : null);           // nearest first
    }
    const at = brief(c.value);
    c.slots.edge.textContent = c.op ? `keep ${SYMBOL[c.op]} ${at}` : `at ${at}`;
    c.slots.edge.title = `${c.op ? "keep " + c.op : "at"} ${numberText(c.value)}`;
    for (const side of ["below", "above"]) {
      pick[side].forEach((id, i) => fillSlot(c.slots[side][i], id, c));
    }
  }

  function brief(v) {                  // six digits at most, and a mark where that is not all of it
    const short = Number(v.toPrecision(6));
    return short === v ? String(short) : `${short}…`;
  }

  function shortest(v, t) {            // v in few digits, but never so few that it seems on t's other side
    for (let p = 4; p < 17; p++) {
      const s = Number(v.toPrecision(p));
      if (Math.sign(s - t) === Math.sign(v - t)) return String(s);
    }
    return String(v);
  }

  function fillSlot(slot, id, c) {
    slot.fig.className = "slot";
    if (id === null) { slot.fig.classList.add("empty"); slot.fig.removeAttribute("title"); return; }
    const s = DATA.samples[id];
    const v = s.values[c.index];
    const passes = !c.op || (c.op === ">=" ? v >= c.value : c.op === ">" ? v > c.value :
                             c.op === "<=" ? v <= c.value : v < c.value);
    const other = keptByOthers(s, c);
    slot.fig.classList.add(!c.op ? "neutral" : passes ? "keep" : "drop");
    if (other) slot.fig.classList.add("excluded");
    const src = s.thumb === undefined ? "" : DATA.thumbs[s.thumb];
    if (slot.img.getAttribute("src") !== src) { if (src) slot.img.src = src; else slot.img.removeAttribute("src"); }
    slot.fig.classList.toggle("no-image", !src);
    slot.missing.textContent = src ? "" : s.problem;
    slot.score.textContent = shortest(v, c.value);
    slot.key.textContent = s.key;
    slot.fig.title = `${s.key} in ${s.shard}\n${c.name} ${v}` + (s.caption ? `\n${s.caption}` : "") +
      (!c.op ? "" : passes ? "\nkept by this threshold" : "\ndropped by this threshold") +
      (other ? `\nleft out by ${other}` : "");
  }

  function showClasses(c) {
    c.buttons.forEach((b, i) => {
      b.setAttribute("aria-pressed", c.on[i] ? "true" : "false");
      const n = c.keptCounts[i] * SCALE;
      b.querySelector(".kept").textContent = ` · kept ${DATA.exact ? "" : "≈"}${Math.round(n)}`;
    });
  }

  // --- the scatter of two scores ----------------------------------------------------------------------------

  function setupScatter() {
    const canvas = document.getElementById("scatter-canvas");
    if (!canvas || numeric.length < 2) return null;
    const s = {canvas, x: document.getElementById("scatter-x"), y: document.getElementById("scatter-y"),
               cols: 112, rows: 84, left: 58, right: 12, top: 12, bottom: 40};
    const cells = s.cols * s.rows;                       // and one more: the rows outside the plot
    s.cells = new Uint16Array(DATA.rows);
    s.total = new Float64Array(cells + 1);
    s.kept = new Uint32Array(cells + 1);
    s.visible = true;
    s.y.value = "1";
    const ratio = window.devicePixelRatio || 1;
    canvas.style.width = canvas.width + "px";
    canvas.style.height = canvas.height + "px";
    s.w = canvas.width; s.h = canvas.height;
    canvas.width = s.w * ratio; canvas.height = s.h * ratio;
    s.ctx = canvas.getContext("2d");
    s.ctx.scale(ratio, ratio);
    s.grid = document.createElement("canvas");           // one pixel a cell, drawn scaled up
    s.grid.width = s.cols; s.grid.height = s.rows;
    s.image = s.grid.getContext("2d").createImageData(s.cols, s.rows);
    s.place = () => {
      const cx = numeric[+s.x.value], cy = numeric[+s.y.value];
      const x0 = cx.edges[0], x1 = cx.edges[cx.edges.length - 1], y0 = cy.edges[0], y1 = cy.edges[cy.edges.length - 1];
      for (let i = 0; i < DATA.rows; i++) {
        const u = (cx.values[i] - x0) / (x1 - x0), v = (cy.values[i] - y0) / (y1 - y0);
        s.cells[i] = u >= 0 && u < 1 && v >= 0 && v < 1 ? Math.floor(v * s.rows) * s.cols + Math.floor(u * s.cols) : cells;
      }
      s.total.fill(0);
      for (let i = 0; i < DATA.rows; i++) s.total[s.cells[i]]++;
    };
    for (const select of [s.x, s.y]) select.addEventListener("change", () => { s.place(); schedule(); });
    s.place();
    return s;
  }

  function ticks(c) {                   // round values along a score's range, 1, 2 or 5 times a power of ten apart
    const lo = c.edges[0], hi = c.edges[c.edges.length - 1], span = hi - lo;
    const power = Math.pow(10, Math.floor(Math.log10(span / 6)));
    const step = [1, 2, 5, 10].map(m => m * power).find(d => span / d <= 6);
    const out = [];
    for (let i = Math.ceil(lo / step - 1e-9); i <= Math.floor(hi / step + 1e-9); i++) out.push(Number((i * step).toPrecision(12)));
    return out;
  }

  function drawScatter() {
    const s = scatter;
    if (!s || !s.visible) return;
    const ctx = s.ctx, pw = s.w - s.left - s.right, ph = s.h - s.top - s.bottom;
    const cx = numeric[+s.x.value], cy = numeric[+s.y.value];
    const pixels = s.image.data, cells = s.cols * s.rows;
    let most = 0;
    for (let cell = 0; cell < cells; cell++) most = Math.max(most, s.total[cell]);
    most = Math.log1p(most);
    for (let cell = 0; cell < cells; cell++) {
      const n = s.total[cell], at = 4 * ((s.rows - 1 - Math.floor(cell / s.cols)) * s.cols + cell % s.cols);
      const f = n ? s.kept[cell] / n : 0;
      pixels[at] = 160 + (37 - 160) * f;
      pixels[at + 1] = 160 + (99 - 160) * f;
      pixels[at + 2] = 160 + (210 - 160) * f;
      pixels[at + 3] = n ? 255 * (0.25 + 0.75 * Math.log1p(n) / most) : 0;
    }
    s.grid.getContext("2d").putImageData(s.image, 0, 0);
    ctx.clearRect(0, 0, s.w, s.h);
    ctx.fillStyle = "#fafafa";
    ctx.fillRect(s.left, s.top, pw, ph);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(s.grid, s.left, s.top, pw, ph);
    ctx.strokeStyle = "#333";
    ctx.strokeRect(s.left + 0.5, s.top + 0.5, pw, ph);
    ctx.setLineDash([5, 4]);
    ctx.strokeStyle = "#c0392b";
    if (cx.op) line(s.left + (xOf(cx, cx.value) - cx.left) / cx.width * pw, s.top, null, s.top + ph);
    if (cy.op) line(s.left, s.top + ph - (xOf(cy, cy.value) - cy.left) / cy.width * ph, s.left + pw, null);
    ctx.setLineDash([]);
    ctx.fillStyle = "#333";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "center";
    for (const t of ticks(cx)) {
      const x = s.left + (xOf(cx, t) - cx.left) / cx.width * pw;
      ctx.fillRect(x, s.top + ph, 1, 4);
      ctx.fillText(String(t), x, s.h - 24);
    }
    ctx.textAlign = "right";
    for (const t of ticks(cy)) {
      const y = s.top + ph - (xOf(cy, t) - cy.left) / cy.width * ph;
      ctx.fillRect(s.left - 4, y, 4, 1);
      ctx.fillText(String(t), s.left - 6, y + 4);
    }
    ctx.textAlign = "center";
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText(cx.name, s.left + pw / 2, s.h - 8);
    ctx.save();
    ctx.translate(14, s.top + ph / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(cy.name, 0, 0);
    ctx.restore();

    function line(x0, y0, x1, y1) {
      ctx.beginPath();
      ctx.moveTo(x0, y0);
      ctx.lineTo(x1 === null ? x0 : x1, y1 === null ? y0 : y1);
      ctx.stroke();
    }
  }

  // --- the address, events, updates -----------------------------------------------------------------------

  const warning = document.getElementById("unrepresentable");

  function showWarning(text, why) {
    warning.textContent = "";
    warning.append("This link's selection cannot be shown by the controls (" + why + "): ", el("code", "", text),
                   ". It is not applied: the bar describes what the controls select now.");
    warning.hidden = false;
  }

  function readAddress() {
    const hash = location.hash;
    if (!hash.startsWith("#where=")) return;
    let text;
    try {
      text = decodeURIComponent(hash.slice("#where=".length));
    } catch (e) {
      showWarning(hash, "its address is not URL-encoded text");
      return;
    }
    try {
      const terms = parse(text.trim());
      apply(terms);
      warning.hidden = true;
    } catch (e) {
      apply([]);
      showWarning(text, e.message);
    }
  }

  let pending = false, userChange = false;
  function schedule(fromUser) {
    userChange = userChange || Boolean(fromUser);
    if (pending) return;
    pending = true;
    requestAnimationFrame(update);
  }

  function update() {
    pending = false;
    const started = performance.now();
    recount();
    const expr = expression();
    showCount(expr);
    numeric.forEach(showNumeric);
    classes.forEach(showClasses);
    drawScatter();
    document.documentElement.dataset.updateMs = (performance.now() - started).toFixed(2);   // read by tests
    if (userChange) {
      userChange = false;
      try {
        history.replaceState(null, "", "#where=" + encodeURIComponent(expr));
      } catch (e) {                      // a class name that is not whole Unicode (a lone surrogate)
        warning.textContent = `This selection cannot be written into a link (${e.message}); the bar and the ` +
          "command above hold it.";
        warning.hidden = false;
      }
    }
  }

  function setThreshold(c, value) {
    c.value = value;
    if (!c.op) c.op = c.higher ? ">=" : "<";
    schedule(true);
  }

  for (const c of numeric) {
    c.opSelect.addEventListener("change", () => { c.op = c.opSelect.value; schedule(true); });
    c.slider.addEventListener("input", () => setThreshold(c, c.edges[+c.slider.value]));
    c.input.addEventListener("change", () => {
      const v = Number(c.input.value);
      if (c.input.value.trim() !== "" && Number.isFinite(v)) setThreshold(c, v); else schedule();
    });
    const fromPointer = (event) => {
      const box = c.svg.getBoundingClientRect();
      const x = (event.clientX - box.left) * (c.svg.viewBox.baseVal.width / box.width);
      const step = Math.round((x - c.left) / c.width * (c.edges.length - 1));
      setThreshold(c, c.edges[Math.min(Math.max(step, 0), c.edges.length - 1)]);
    };
    c.svg.addEventListener("pointerdown", (event) => { c.svg.setPointerCapture(event.pointerId); fromPointer(event); });
    c.svg.addEventListener("pointermove", (event) => { if (event.buttons & 1) fromPointer(event); });
  }
  for (const c of classes) {
    c.buttons.forEach((b, i) => b.addEventListener("click", () => {
      const on = c.on.reduce((a, v, j) => a + (j < c.labels.length ? v : 0), 0);
      if (c.on[i] && on === 1) {
        c.hint.textContent = "At least one class stays in: a selection of no class keeps nothing.";
        return;
      }
      c.on[i] = c.on[i] ? 0 : 1;
      c.active = on + (c.on[i] ? 1 : -1) < c.labels.length;
      schedule(true);
    }));
  }

  function copy(button, text) {
    const done = (ok) => {
      button.dataset.label = button.dataset.label || button.textContent;
      button.textContent = ok ? "copied" : "select and copy";
      setTimeout(() => { button.textContent = button.dataset.label; }, 1500);
    };
    if (navigator.clipboard) navigator.clipboard.writeText(text).then(() => done(true), () => done(false));
    else done(false);
  }
  document.getElementById("copy-link").addEventListener("click", (e) => copy(e.target, location.href));
  document.getElementById("copy-command").addEventListener("click", (e) => copy(e.target, commandLine.textContent));
  // the page's own links scroll without touching the address, which holds the selection
  for (const a of document.querySelectorAll('a[href^="#"]')) {
    a.addEventListener("click", (event) => {
      const target = document.getElementById(decodeURIComponent(a.getAttribute("href").slice(1)));
      if (!target) return;
      event.preventDefault();
      target.scrollIntoView({block: "start"});
    });
  }
  window.addEventListener("hashchange", () => { readAddress(); schedule(); });

  readAddress();
  update();
  document.documentElement.classList.add("ready");
})();
