"""``perceptclip report``: one self-contained HTML page about a scored DEST.

    read       the committed score tables and run summaries (perceptclip.curation.quantiles)
    measure    per model: histogram and quantiles of its score, or its class distribution
    rank       per model: the top and bottom k samples (a classifier: by the confidence of its label)
    fetch      thumbnails of only those samples, from their shards (tars, Parquet) or from where they were
               read (tables of locations, folders of image files), shrunk
    render     HTML with inline CSS, inline SVG charts and data: URI thumbnails

The page references nothing outside itself, so it opens offline and can be mailed around. Keys,
captions, error messages and even label names come from data nobody here controls: every piece of
text goes through ``html.escape`` on its way into the page.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from perceptclip.core.storage import filesystem
from perceptclip.core.version import __version__
from perceptclip.curation.quantiles import DEFAULT_LEVELS, ScoreSet, class_shares, quantiles, read_scores
from perceptclip.inputs.shards import ShardError, expand_shards, image_member, shard_name
from perceptclip.model.preprocess import ImageError, decode_image
from perceptclip.output.destination import check_apart
from perceptclip.output.layout import RUNS_DIR, shard_of

THUMB_SIZE = 128            # longest side of a thumbnail, in pixels
HIST_BINS = 30


@dataclass
class Thumb:
    """A sample's thumbnail as a ``data:`` URI, or why there is none."""

    uri: str | None = None
    problem: str | None = None


@dataclass
class ReportResult:
    output: str
    bytes: int
    thumbnails: int
    unavailable: int


def write_report(scores_dest: str, output: str, shards: str | list[str] | None = None, top_k: int = 12,
                 options: dict | None = None, progress: Callable[[str], None] = lambda _: None) -> ReportResult:
    """Read ``scores_dest``, render the report and write it to ``output`` (local path or fsspec URL).
    ``shards``: where the shards live now, as any shard spec; by default the URLs in the tables."""
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0, got {top_k}")
    options = options or {}
    check_apart("--output", output, {"the score tables folder": [scores_dest]})       # a file: no record
    scores = read_scores(scores_dest, options, progress)
    picks = {m["name"]: ranked(scores, m, top_k) for m in scores.models}
    wanted = defaultdict(dict)             # shard -> key -> where the image was read from
    for top, bottom in picks.values():
        for row in top + bottom:
            wanted[row["shard"]][row["key"]] = row["url"]
    locations = shard_locations(list(wanted), shards, options)
    thumbs = fetch_thumbnails(wanted, locations, options, progress)
    page = render(scores, picks, thumbs)
    data = page.encode("utf-8")
    try:
        fs, path = filesystem(output, options)
        fs.pipe_file(path, data)
    except OSError as e:
        raise ValueError(f"{output}: cannot write the report ({e}); give --output a writable path") from None
    return ReportResult(output=output, bytes=len(data), thumbnails=sum(t.uri is not None for t in thumbs.values()),
                        unavailable=sum(t.uri is None for t in thumbs.values()))


# --- rank ------------------------------------------------------------------------------------------------

def ranked(scores: ScoreSet, model: dict, k: int) -> tuple[list[dict], list[dict]]:
    """The ``k`` highest and ``k`` lowest rows by the model's score (a classifier: the probability of
    the label it chose), best first and worst first. Rows without a score take no part."""
    table = scores.table
    if model.get("labels"):
        probs = np.stack([table[c].to_numpy(zero_copy_only=False) for c in model["columns"][1:]], axis=1)
        rank = np.asarray(probs, dtype=np.float64).max(axis=1)        # NaN where the row has no scores
    else:
        rank = np.asarray(table[model["name"]].to_numpy(zero_copy_only=False), dtype=np.float64)
    have = np.flatnonzero(scores.ok & ~np.isnan(rank))
    order = have[np.argsort(rank[have], kind="stable")]
    columns = ["key", "shard", "url", "caption", model["name"]]

    def rows(index):
        picked = table.select(columns).take(index).to_pylist()
        for row, i in zip(picked, index):
            row["rank"] = float(rank[i])
        return picked

    return rows(order[::-1][:k]), rows(order[:k])


# --- fetch -----------------------------------------------------------------------------------------------

def shard_locations(shards: list[str], spec: str | list[str] | None, options: dict) -> dict[str, str | None]:
    """Where to read each shard named in the tables: the recorded URL, or the shard of the same name
    among ``spec`` (None when it has none)."""
    if spec is None:
        return {s: s for s in shards}
    try:
        found = {shard_name(u): u for u in expand_shards(spec, options)}
    except ValueError as e:
        raise ValueError(f"--shards: {e}") from None
    return {s: found.get(shard_name(s)) for s in shards}


def fetch_thumbnails(wanted: dict[str, dict[str, str | None]], locations: dict[str, str | None], options: dict,
                     progress: Callable[[str], None] = lambda _: None,
                     workers: int = 8) -> dict[tuple[str, str], Thumb]:
    """A thumbnail per wanted (shard, key). Each shard is read once, only up to its last wanted sample,
    several at a time (the time goes in waiting on storage). A sample that cannot be shown gets the
    reason instead: the page shows no broken images."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    thumbs: dict[tuple[str, str], Thumb] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(shard_thumbnails, shard, keys, locations.get(shard), options): shard
                   for shard, keys in sorted(wanted.items())}
        for i, future in enumerate(as_completed(futures), 1):
            shard = futures[future]
            found = future.result()
            progress(f"thumbnails [{i}/{len(futures)}] {shard_name(shard)}: {len(found)} samples")
            thumbs.update({(shard, key): thumb for key, thumb in found.items()})
    return thumbs


def shard_thumbnails(shard: str, keys: dict[str, str | None], url: str | None, options: dict) -> dict[str, Thumb]:
    """One shard's wanted samples (key -> where the image was read from) as thumbnails, read from ``url``
    (None: the shard is nowhere to be found)."""
    if url is None:
        return {key: Thumb(problem=f"{shard_name(shard)} is not among --shards") for key in keys}
    thumbs: dict[str, Thumb] = {}
    try:
        for sample in shard_samples(url, keys, options):
            if sample["__key__"] in keys and sample["__key__"] not in thumbs:
                thumbs[sample["__key__"]] = thumbnail(sample)
                if len(thumbs) == len(keys):
                    break
    except ShardError as e:
        problem = f"{e}; point --shards at where the shards are now"
        return thumbs | {key: Thumb(problem=problem) for key in keys.keys() - thumbs.keys()}
    gone = Thumb(problem=f"not in {url}; was the shard rewritten?")
    return thumbs | {key: gone for key in keys.keys() - thumbs.keys()}


def shard_samples(url: str, keys: dict[str, str | None], options: dict) -> Iterator[dict]:
    """Where to look for the wanted samples: a tar's or a Parquet file's own samples, in order; for a table
    of locations or a folder of image files, only the wanted images, fetched from where they were read."""
    from perceptclip.inputs.base import InputSpec
    from perceptclip.inputs.files import FilesReader
    from perceptclip.inputs.kinds import open_shard
    from perceptclip.inputs.tables import TableReader, fetch_images, fetch_options

    with open_shard(url, InputSpec(), options, check=True) as reader:
        if isinstance(reader, (TableReader, FilesReader)):
            located = ({"__key__": key, "__url__": where} for key, where in keys.items() if where)
            yield from fetch_images(located, fetch_options(options, 60.0), workers=8, timeout=60.0)
            return
        for block in reader.blocks(64):
            yield from block


def thumbnail(sample: dict, size: int = THUMB_SIZE) -> Thumb:
    ext = "__image__" if "__image__" in sample else image_member(sample)
    if sample.get("__error__"):
        return Thumb(problem=sample["__error__"])
    if ext is None or sample.get(ext) is None:
        return Thumb(problem="the sample has no image")
    try:
        img = decode_image(sample[ext], draft_size=size)
    except ImageError as e:
        return Thumb(problem=str(e))
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return Thumb(uri="data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))


# --- render ----------------------------------------------------------------------------------------------

def esc(value) -> str:
    return html.escape(str(value), quote=True)


def num(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1b1b1b; max-width: 1200px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-bottom: 6px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 2px 8px; border: 1px solid #ddd; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.meta { color: #555; } .grid { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; width: 140px; font-size: 11px; overflow-wrap: anywhere; }
figure img, figure .missing { width: 128px; height: 128px; object-fit: contain; background: #eee; display: block; }
figure .missing { display: flex; align-items: center; justify-content: center; text-align: center;
  color: #a33; padding: 4px; box-sizing: border-box; }
svg.chart { display: block; } svg.chart text { font-size: 11px; fill: #333; }
rect.bar { fill: #4a78b5; } line.median { stroke: #c33; stroke-dasharray: 4 3; }
"""


def render(scores: ScoreSet, picks: dict[str, tuple[list[dict], list[dict]]],
           thumbs: dict[tuple[str, str], Thumb]) -> str:
    ok = int(scores.ok.sum())
    rows = scores.table.num_rows
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>perceptclip report: {esc(scores.dest)}</title><style>{CSS}</style></head><body>",
        f"<h1>perceptclip report: {esc(scores.dest)}</h1>",
        f'<p class="meta">{rows} samples ({ok} scored, {rows - ok} errors) in {len(scores.files)} score tables; '
        f"generated {esc(generated)} by perceptclip {esc(__version__)}</p>",
        "<nav>" + " · ".join([f'<a href="#model-{esc(m["name"])}">{esc(m["name"])}</a>' for m in scores.models]
                             + ['<a href="#errors">errors</a>', '<a href="#runs">runs</a>']) + "</nav>",
    ]
    if scores.uncommitted:
        parts.append(f'<p class="meta">Left out: {len(scores.uncommitted)} tables without a marker (not committed): '
                     f"{esc(', '.join(shard_of(p) for p in scores.uncommitted))}</p>")
    shares = class_shares(scores)
    stats = quantiles(scores)
    for model in scores.models:
        parts.append(render_model(scores, model, stats, shares.get(model["name"]), picks[model["name"]], thumbs))
    parts += [render_errors(scores), render_runs(scores), "</body></html>"]
    return "\n".join(parts)


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
        out += ["<h3>Histogram</h3>", histogram_svg(scores.values(name), stats[name]),
                "<h3>Quantiles</h3>", quantile_table({name: stats[name]})]
        what = f"{esc(name)}"
    top, bottom = picks
    if top:                 # none with --top-k 0, or when no sample has a score (the chart says so)
        out += [f"<h3>Top {len(top)} by {what}</h3>", grid(top, model, thumbs),
                f"<h3>Bottom {len(bottom)} by {what}</h3>", grid(bottom, model, thumbs)]
    out.append("</section>")
    return "\n".join(out)


def histogram_svg(values: np.ndarray, stat: dict, width: int = 640, height: int = 200) -> str:
    if not len(values):
        return '<p class="meta">no scores</p>'
    counts, edges = np.histogram(values, bins=HIST_BINS)
    left, bottom, top = 48, 24, 8
    plot_w, plot_h = width - left - 8, height - bottom - top
    scale = plot_h / max(int(counts.max()), 1)
    bar_w = plot_w / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = c * scale
        bars.append(f'<rect class="bar" x="{left + i * bar_w:.1f}" y="{top + plot_h - h:.1f}" '
                    f'width="{max(bar_w - 1, 1):.1f}" height="{h:.1f}">'
                    f"<title>{num(edges[i])} to {num(edges[i + 1])}: {int(c)}</title></rect>")
    lo, hi = float(edges[0]), float(edges[-1])
    median = stat["quantiles"][f"{0.5:g}"]
    x_med = left + (median - lo) / (hi - lo) * plot_w if hi > lo else left + plot_w / 2
    return (f'<svg class="chart" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>histogram of {len(values)} scores</title>'
            + "".join(bars)
            + f'<line class="median" x1="{x_med:.1f}" x2="{x_med:.1f}" y1="{top}" y2="{top + plot_h}">'
              f"<title>median {num(median)}</title></line>"
            + f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#333"/>'
            + f'<text x="{left}" y="{height - 6}">{num(lo)}</text>'
            + f'<text x="{left + plot_w}" y="{height - 6}" text-anchor="end">{num(hi)}</text>'
            + f'<text x="{left - 4}" y="{top + 10}" text-anchor="end">{int(counts.max())}</text>'
            + f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text></svg>')


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
