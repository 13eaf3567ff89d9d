"""The report as one HTML page with nothing outside it: inline CSS (``explorer.css``), inline SVG charts,
``data:`` URI thumbnails, the explorer's data as JSON in a ``<script type="application/json">`` and its
script (``explorer.js``) inline. The page reads without JavaScript as a static report; with it, the
selection controls come alive.

Keys, captions, error messages and even label names come from data nobody here controls: every piece of
text goes through ``html.escape`` on its way into the markup, and the script writes text with
``textContent`` only.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from datetime import UTC, datetime
from importlib import resources

from perceptclip.core.version import __version__
from perceptclip.curation.explorer import ClassControl, Explorer, NumericControl
from perceptclip.curation.quantiles import DEFAULT_LEVELS, ScoreSet, class_shares, quantiles
from perceptclip.curation.thumbnails import Thumb
from perceptclip.inputs.shards import shard_name
from perceptclip.output.layout import RUNS_DIR, shard_of


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def asset(name: str) -> str:
    """One of the page's own files (``explorer.js``, ``explorer.css``), shipped with the package. Checked
    to hold no ``</``: inline, that could end its element."""
    text = resources.files("perceptclip.curation").joinpath(name).read_text(encoding="utf-8")
    if "</" in text:
        raise ValueError(f"perceptclip/curation/{name}: holds '</', which would end its element inline")
    return text


def render(scores: ScoreSet, picks: dict[str, tuple[list[dict], list[dict]]], thumbs: dict[tuple[str, str], Thumb],
           explorer: Explorer, data: str) -> str:
    """The page, top to bottom: the bar (what the selection keeps), how the page works, the selection's
    controls, the density of two scores, each model's quantiles and top and bottom, errors, runs."""
    ok = explorer.scored
    rows = scores.table.num_rows
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    models = [m["name"] for m in scores.models]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>perceptclip report: {esc(scores.dest)}</title><style>{asset('explorer.css')}</style></head><body>",
        selection_bar(),
        '<main><header class="intro">',
        f"<h1>perceptclip report: {esc(scores.dest)}</h1>",
        f'<p class="meta">{rows} samples ({ok} scored, {rows - ok} errors) in {len(scores.files)} score tables; '
        f"generated {esc(generated)} by perceptclip {esc(__version__)}</p>",
        "<nav>" + " · ".join(['<a href="#controls">selection</a>', '<a href="#scatter">two scores</a>']
                             + [f'<a href="#model-{esc(m)}">{esc(m)}</a>' for m in models]
                             + ['<a href="#errors">errors</a>', '<a href="#runs">runs</a>']) + "</nav></header>",
    ]
    if scores.uncommitted:
        parts.append(f'<p class="meta">Left out: {len(scores.uncommitted)} tables without a marker (not committed): '
                     f"{esc(', '.join(shard_of(p) for p in scores.uncommitted))}</p>")
    shares = class_shares(scores)
    stats = quantiles(scores)
    parts += [how_it_works(explorer, picks, thumbs), controls_section(scores, explorer, stats),
              scatter_section(explorer)]
    for model in scores.models:
        parts.append(render_model(scores, model, stats, shares.get(model["name"]), picks[model["name"]], thumbs))
    parts += [render_errors(scores), render_runs(scores), "</main>",
              f'<script type="application/json" id="explorer-data">{data}</script>',
              f"<script>{asset('explorer.js')}</script>", "</body></html>"]
    return "\n".join(parts)


def controls_section(scores: ScoreSet, explorer: Explorer, stats: dict) -> str:
    """Every control, in model order: a regression score's histogram with its threshold and the samples
    nearest it, a classifier's classes as toggles."""
    numeric = {c.name: (i, c) for i, c in enumerate(explorer.numeric)}
    toggles = {c.name: (i, c) for i, c in enumerate(explorer.classes)}
    out = ['<section id="controls"><h2>Selection</h2>']
    for model in scores.models:
        name = model["name"]
        if name in numeric:
            control = numeric_control(*numeric[name], stats[name])
            what = "higher is better" if model.get("higher_is_better", True) else "lower is better"
        elif name in toggles:
            control, what = class_control(*toggles[name]), "classes"
        else:
            control, what = '<p class="meta">no scores, no threshold</p>', ""
        out.append(f'<div class="pick"><h3>{esc(name)} <span class="meta">{esc(what)} · '
                   f'<a href="#model-{esc(name)}">quantiles, top and bottom</a></span></h3>{control}</div>')
    out.append("</section>")
    return "\n".join(out)


def selection_bar() -> str:
    """The bar on top, filled by the script: what the selection keeps, its expression, the filter command."""
    return ('<header id="selection" class="bar" aria-live="polite">'
            '<div class="line"><div class="count" id="count"><noscript>The selection controls need JavaScript; the '
            "rest of the page reads without it.</noscript></div>"
            '<button type="button" id="copy-link" title="copy a link to this page with this selection">copy link'
            "</button></div>"
            '<div class="line"><span class="tag">filter</span><code id="command"></code>'
            '<button type="button" id="copy-command" title="copy the command">copy command</button></div>'
            '<div class="line note" id="estimate"></div>'
            '<div class="warning" id="unrepresentable" hidden></div></header>')


def how_it_works(explorer: Explorer, picks: dict, thumbs: dict) -> str:
    """What the page holds and how to use it: a line that says it all, the explanation unfolded below."""
    images = sum(1 for t in thumbs.values() if t.uri is not None)
    k = explorer.neighbours
    widths = ", ".join(f"{esc(c.name)} {num(float(c.edges[1] - c.edges[0]), 3)} ({len(c.counts)} steps)"
                       for c in explorer.numeric)
    top = max((len(top) for top, _ in picks.values()), default=0)
    if explorer.exact:
        summary = f"Counts are exact: every one of the {explorer.scored} scored samples."
        counts = (f"Counts are exact: the page holds the scores of all {explorer.scored} scored samples (a page does "
                  f"up to {explorer.limit}), so the numbers on top are those <code>perceptclip quantiles --where</code> "
                  "prints for the same expression.")
    else:
        summary = (f"Counts are estimates, from a uniform sample of {len(explorer.rows)} of the {explorer.scored} "
                   "scored samples.")
        counts = (f"Counts are estimates: {explorer.scored} scored samples are more than the {explorer.limit} whose "
                  f"scores a page holds, so it holds a uniform sample of {len(explorer.rows)} of them (seeded) and "
                  "gives each count with a 95% interval. Histograms and class counts are of every sample.")
    problems = "".join(f"<li>{esc(p)}</li>" for p in explorer.problems)
    return (
        f'<details id="how"><summary>{summary} The page holds {images} thumbnails: the {k} lowest and {k} highest '
        f"of every slider step, and the top and bottom {top} of each model. <u>How this page works</u></summary><ul>"
        "<li>Set a threshold on a score's histogram (drag on it, or the slider under it; arrow keys step) and "
        "choose to keep above or below it; click a class to leave it out. The selection is all of them at once "
        "(<code>and</code>).</li>"
        "<li>The bar on top says what the selection keeps, in the words of <code>perceptclip quantiles "
        "--where</code>, and gives the <code>perceptclip filter</code> command to paste. The page's address ends in "
        "<code>#where=</code> and the expression: copy the link to share the selection. A link whose expression the "
        "controls cannot show (<code>or</code>, <code>not</code>, two conditions on one score) says so, and is not "
        "applied.</li>"
        f"<li>{counts}</li>"
        f"<li>This page holds {images} thumbnails ({len(thumbs) - images} more samples could not be shown: each says "
        f"why). Under each histogram, the samples nearest the threshold: from every step of the slider "
        f"({widths or 'none'}) the page keeps the {k} lowest and the {k} highest samples, so any threshold has a "
        f"neighbour within one step on each side wherever the data has one, and at a threshold the slider sets, "
        f"the {k} nearest on each side are exactly the nearest. Then the top and bottom {top} of each model.</li>"
        f"{problems}</ul></details>")


def scatter_section(explorer: Explorer) -> str:
    if len(explorer.numeric) < 2:
        return ('<section id="scatter"><h2>Two scores</h2><p class="meta">A scatter of two scores needs two scores '
                f"with thresholds; this page has {len(explorer.numeric)}.</p></section>")
    options = "".join(f'<option value="{i}">{esc(c.name)}</option>' for i, c in enumerate(explorer.numeric))
    where = "of every scored sample" if explorer.exact else f"of the sample of {len(explorer.rows)} scored samples"
    return ('<section id="scatter"><h2>Two scores</h2>'
            f'<p class="controls">x <select id="scatter-x">{options}</select> y <select id="scatter-y">{options}'
            f'</select> <span class="meta">density {esc(where)}: blue cells are kept by the selection, grey dropped; '
            "darker, more samples</span></p>"
            '<canvas id="scatter-canvas" width="520" height="400" role="img" aria-label="density of two scores">'
            "</canvas></section>")


def render_model(scores: ScoreSet, model: dict, stats: dict, shares: dict | None,
                 picks: tuple[list[dict], list[dict]], thumbs: dict) -> str:
    name = model["name"]
    direction = "higher is better" if model.get("higher_is_better", True) else "lower is better"
    out = [f'<section class="model" id="model-{esc(name)}"><h2>{esc(name)}</h2>',
           f'<p class="meta">task {esc(model.get("task"))}, {direction}; backbone {esc(model.get("backbone"))}; '
           f'weights sha256 {esc(str(model.get("weights_sha256"))[:12])}; model {esc(model.get("ref"))}</p>']
    if shares is not None:
        out += ["<h3>Class distribution</h3>", bar_chart_svg(shares), share_table(shares)]
        out += ["<h3>Class probabilities: quantiles</h3>", quantile_table({c: stats[c] for c in model["columns"][1:]})]
        what = f"the probability of the chosen {esc(name)} label"
    else:
        out += ["<h3>Quantiles</h3>", quantile_table({name: stats[name]})]
        what = f"{esc(name)}"
    top, bottom = picks
    if top:                 # none with --top-k 0, or when no sample has a score (the chart says so)
        out += [f"<h3>Top {len(top)} by {what}</h3>", grid(top, model, thumbs),
                f"<h3>Bottom {len(bottom)} by {what}</h3>", grid(bottom, model, thumbs)]
    out.append("</section>")
    return "\n".join(out)


def class_control(index: int, control: ClassControl) -> str:
    """A classifier's classes as toggles, each with its count (the script adds how many the selection keeps)."""
    buttons = "".join(f'<button type="button" class="toggle" aria-pressed="true" data-class="{i}">'
                      f'<span class="label">{esc(label)}</span> <span class="n">{count}</span>'
                      '<span class="kept"></span></button>'
                      for i, (label, count) in enumerate(zip(control.labels, control.counts)))
    return (f'<div class="control classes" data-index="{index}"><div class="toggles">{buttons}</div>'
            '<p class="meta hint">Click a class to leave it out of the selection (or take it back); '
            "with every class in, the selection does not look at this score.</p></div>")


OPS = (("", "no threshold"), (">=", "keep ≥"), (">", "keep >"), ("<=", "keep ≤"), ("<", "keep <"))


def numeric_control(index: int, control: NumericControl, stat: dict) -> str:
    """A score's histogram with its threshold: the keep select, the exact value, the slider under the
    plot, and the strips of the samples nearest the threshold (filled by the script)."""
    options = "".join(f'<option value="{esc(op)}">{esc(label)}</option>' for op, label in OPS)
    step = float(control.edges[1] - control.edges[0])
    return (f'<div class="control numeric" data-index="{index}">'
            f'<div class="row"><select class="op" aria-label="keep">{options}</select>'
            f'<input class="value" type="number" step="{step!r}" aria-label="threshold">'
            '<span class="alone"></span></div>'
            + histogram_svg(control, stat["quantiles"][f"{0.5:g}"])
            + f'<input class="slider" type="range" min="0" max="{len(control.edges) - 1}" step="1" '
              'aria-label="threshold step">'
              '<div class="boundary"><div class="side below"></div><div class="edge"></div>'
              '<div class="side above"></div></div>'
              '<p class="meta legend">The samples nearest the threshold, lower on the left: '
              '<span class="swatch keep"></span> kept by it, <span class="swatch drop"></span> dropped; faded: left '
              "out by another control. Hover for the key, the shard and the caption.</p></div>")


HIST_W, HIST_H, HIST_LEFT, HIST_RIGHT, HIST_TOP, HIST_BOTTOM = 760, 190, 56, 14, 10, 24


def histogram_svg(control: NumericControl, median: float | None) -> str:
    """Bars of the score's steps (every scored sample); the script adds the kept bars and the threshold."""
    counts, edges = control.counts, control.edges
    plot_w, plot_h = HIST_W - HIST_LEFT - HIST_RIGHT, HIST_H - HIST_BOTTOM - HIST_TOP
    lo, hi = float(edges[0]), float(edges[-1])
    x = lambda v: HIST_LEFT + (v - lo) / (hi - lo) * plot_w                     # noqa: E731
    scale = plot_h / max(int(counts.max()), 1)
    bars = []
    for i, c in enumerate(counts):
        h = c * scale
        bars.append(f'<rect class="bar" x="{x(edges[i]):.2f}" y="{HIST_TOP + plot_h - h:.2f}" '
                    f'width="{max(x(edges[i + 1]) - x(edges[i]) - 1, 0.5):.2f}" height="{h:.2f}">'
                    f"<title>{num(edges[i])} to {num(edges[i + 1])}: {int(c)}</title></rect>")
    median_line = "" if median is None else (
        f'<line class="median" x1="{x(median):.1f}" x2="{x(median):.1f}" y1="{HIST_TOP}" y2="{HIST_TOP + plot_h}">'
        f"<title>median {num(median)}</title></line>")
    base = HIST_TOP + plot_h
    return (f'<svg class="chart histogram" width="{HIST_W}" height="{HIST_H}" viewBox="0 0 {HIST_W} {HIST_H}" '
            f'role="img" data-left="{HIST_LEFT}" data-width="{plot_w}" data-top="{HIST_TOP}" data-height="{plot_h}">'
            f"<title>histogram of {int(counts.sum())} scores</title>"
            f'<rect class="dropped" x="{HIST_LEFT}" y="{HIST_TOP}" width="0" height="{plot_h}"/>'
            + "".join(bars) + '<g class="kept-bars"></g>' + median_line
            + f'<line class="threshold" x1="0" x2="0" y1="{HIST_TOP - 4}" y2="{base}" visibility="hidden"/>'
            + f'<line x1="{HIST_LEFT}" x2="{HIST_LEFT + plot_w}" y1="{base}" y2="{base}" stroke="#333"/>'
            + "".join(f'<line class="tick" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{base}" y2="{base + 4}"/>'
                      f'<text x="{x(t):.1f}" y="{HIST_H - 6}" text-anchor="middle">{num(t)}</text>' for t in ticks(lo, hi))
            + f'<text x="{HIST_LEFT - 4}" y="{HIST_TOP + 10}" text-anchor="end">{int(counts.max())}</text>'
            + f'<text x="{HIST_LEFT - 4}" y="{base}" text-anchor="end">0</text></svg>')


def ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round values between ``lo`` and ``hi`` to label an axis with: at most ``most``, 1, 2 or 5 times a power
    of ten apart."""
    span = hi - lo
    if not span > 0:
        return [lo]
    power = 10.0 ** math.floor(math.log10(span / most))
    step = next(m * power for m in (1, 2, 5, 10) if span / (m * power) <= most)
    first = math.ceil(lo / step - 1e-9)
    return [float(f"{i * step:.12g}") for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def bar_chart_svg(shares: dict[str, dict], width: int = 640) -> str:
    row_h, label_w = 20, 120
    height = row_h * len(shares) + 8
    most = max([s["count"] for s in shares.values()] + [1])
    bars = []
    for i, (label, s) in enumerate(shares.items()):
        y = 4 + i * row_h
        w = (width - label_w - 120) * s["count"] / most
        bars.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{esc(label)}</text>'
                    f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row_h - 4}">'
                    f'<title>{esc(label)}: {s["count"]}</title></rect>'
                    f'<text x="{label_w + w + 6:.1f}" y="{y + 14}">{s["count"]} ({num(_percent(s["share"]), 3)}%)</text>')
    return (f'<svg class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>class distribution</title>{"".join(bars)}</svg>')


def _percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def share_table(shares: dict[str, dict]) -> str:
    rows = "".join(f'<tr><td>{esc(label)}</td><td class="n">{s["count"]}</td>'
                   f'<td class="n">{num(_percent(s["share"]), 3)}%</td></tr>' for label, s in shares.items())
    return f"<table><tr><th>label</th><th>samples</th><th>share</th></tr>{rows}</table>"


def quantile_table(stats: dict[str, dict]) -> str:
    levels = [f"{q:g}" for q in DEFAULT_LEVELS]
    head = "".join(f"<th>q{esc(q)}</th>" for q in levels)
    rows = "".join(
        f'<tr><td>{esc(column)}</td><td class="n">{s["count"]}</td><td class="n">{num(s["mean"])}</td>'
        + "".join(f'<td class="n">{num(s["quantiles"][q])}</td>' for q in levels) + "</tr>"
        for column, s in stats.items())
    return f"<table><tr><th>score</th><th>samples</th><th>mean</th>{head}</tr>{rows}</table>"


def grid(rows: list[dict], model: dict, thumbs: dict[tuple[str, str], Thumb]) -> str:
    figures = []
    for row in rows:
        thumb = thumbs.get((row["shard"], row["key"])) or Thumb(problem="not fetched")
        if thumb.uri is not None:
            picture = f'<img src="{thumb.uri}" alt="{esc(row["key"])}">'
        else:
            picture = f'<div class="missing">{esc(thumb.problem)}</div>'
        score = f'{esc(row[model["name"]])} ({num(row["rank"], 3)})' if model.get("labels") else num(row["rank"])
        caption = row.get("caption") or ""
        caption = caption if len(caption) <= 80 else caption[:79] + "…"
        figures.append(f'<figure title="{esc(row["shard"])}" data-key="{esc(row["key"])}" '
                       f'data-score="{row["rank"]!r}">{picture}<figcaption><b>{score}</b><br>'
                       f"{esc(row['key'])}<br>{esc(caption)}</figcaption></figure>")
    return f'<div class="grid">{"".join(figures)}</div>'


def render_errors(scores: ScoreSet) -> str:
    rows = scores.table.num_rows
    errors = scores.table.filter(scores.table["error"].is_valid()).select(["key", "shard", "error"]).to_pylist()
    out = ["<section id=\"errors\"><h2>Errors</h2>"]
    if errors:
        by_reason = Counter(row["error"].split(":", 1)[0] for row in errors)
        examples = {}
        for row in errors:
            examples.setdefault(row["error"].split(":", 1)[0], row)
        body = "".join(
            f'<tr><td>{esc(reason)}</td><td class="n">{count}</td><td class="n">{num(100 * count / rows, 3)}%</td>'
            f'<td>{esc(examples[reason]["key"])} in {esc(shard_name(examples[reason]["shard"]))}: '
            f'{esc(examples[reason]["error"].split(":", 1)[-1].strip())}</td></tr>'
            for reason, count in by_reason.most_common())
        out.append(f"<table><tr><th>reason</th><th>samples</th><th>share</th><th>example</th></tr>{body}</table>")
    else:
        out.append('<p class="meta">no sample errors</p>')
    committed = {shard_of(p) for p in scores.files}
    failed = {f["shard"]: f for run in scores.runs for f in run.get("failed_shards", [])
              if shard_name(f["shard"]) not in committed}
    if failed:
        body = "".join(f"<tr><td>{esc(f['shard'])}</td><td>{esc(f['reason'])}</td><td>{esc(f['message'])}</td></tr>"
                       for f in failed.values())
        out.append("<h3>Shards that could not be read (no table)</h3>"
                   f"<table><tr><th>shard</th><th>reason</th><th>message</th></tr>{body}</table>")
    out.append("</section>")
    return "\n".join(out)


def render_runs(scores: ScoreSet) -> str:
    if not scores.runs:
        return f'<section id="runs"><h2>Runs</h2><p class="meta">no run summaries under {RUNS_DIR}/</p></section>'
    body = []
    for run in scores.runs:
        shards, samples = run.get("shards", {}), run.get("samples", {})
        by_reason = ", ".join(f"{r} {n}" for r, n in sorted(samples.get("errors_by_reason", {}).items()))
        body.append(
            f"<tr><td>{esc(run.get('run_id'))}</td><td>{esc(run.get('started_at'))}</td>"
            f'<td class="n">{num(run.get("duration_s"))}</td>'
            + "".join(f'<td class="n">{esc(shards.get(k, ""))}</td>' for k in ("planned", "done", "skipped", "failed"))
            + "".join(f'<td class="n">{esc(samples.get(k, ""))}</td>' for k in ("total", "ok", "error"))
            + f"<td>{esc(by_reason)}</td>"
            f'<td class="n">{num(run.get("images_per_s"))}</td><td class="n">{num(run.get("steady_images_per_s"))}</td>'
            f"<td>{esc(', '.join(m.get('name', '') for m in run.get('models', [])))}</td></tr>")
    head = ("<tr><th>run</th><th>started</th><th>seconds</th><th>shards planned</th><th>done</th><th>skipped</th>"
            "<th>failed</th><th>samples</th><th>ok</th><th>errors</th><th>errors by reason</th><th>images/s</th>"
            "<th>steady images/s</th><th>models</th></tr>")
    return f'<section id="runs"><h2>Runs</h2><table>{head}{"".join(body)}</table></section>'
