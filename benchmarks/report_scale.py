"""The report at scale: score tables of ``--rows`` rows (default 1,000,000, in 1,000 shards), then
``perceptclip report`` on them in a fresh process (seconds, peak resident memory, the page's size), then the
page in headless Chromium (load, and one update of the selection).

    python benchmarks/report_scale.py                                   # 1,000,000 rows, 1,000 shards
    python benchmarks/report_scale.py --rows 250000 --exact-limit 250000 --keep /tmp/scale
    python benchmarks/report_scale.py --compare-limits 100000,250000,500000,1000000    # how the limit was chosen

The tables are what the scoring job commits: written by its own ``ScoreWriter`` (schema from
``core.schema``, each table's metadata from the models' ``describe``, a marker per shard after its table,
and a run summary), for three tiny models made here (``make_tiny_artifact``: iqa, memorability, emotion;
no weights are loaded). The scores are drawn, not computed: iqa from a Beta(5, 2), memorability from a
normal, emotion from the softmax of random logits, and 0.3% of rows are error rows without scores. Each
shard is a CSV table of image locations, as ``score --input-kind table`` reads, pointing at ``--images``
generated JPEGs of 192 x 144 on local disk (``support.images``: they compress like photos; 20,000 by
default, so the thumbnails a page holds are nearly all of distinct images), so every thumbnail the report
asks for is read and shrunk for real.

Printed: one JSON line per stage (tables written; the report: seconds, peak RSS, MB, thumbnails; the page:
load seconds, the update's milliseconds), and what the page says the selection keeps against
``quantiles --where`` on the same tables.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def write_images(folder: Path, count: int) -> list[str]:
    """``count`` distinct JPEGs: as many that the thousand or so thumbnails a page holds are nearly all of
    different images (the page holds each distinct thumbnail once, so repeated images would shrink it)."""
    import numpy as np

    from support.images import image_bytes, make_image

    folder.mkdir(parents=True, exist_ok=True)
    big = make_image(0, (2048, 1536))                   # tiles of one large picture: quick, and all different
    at = np.random.default_rng(0).integers(0, [2048 - 192, 1536 - 144], size=(count, 2))
    paths = []
    for i, (x, y) in enumerate(at.tolist()):
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(image_bytes(big.crop((x, y, x + 192, y + 144)), quality=90))
        paths.append(str(path))
    return paths


def page_parts(page: Path) -> dict:
    """What the page's megabytes are: the held scores, the neighbours' thumbnails (each distinct one once),
    the top and bottom grids' thumbnails, the rest."""
    import re

    text = page.read_text()
    data = json.loads(re.search(r'id="explorer-data">(.*?)</script>', text, re.S).group(1))
    scores = sum(len(c["data"]) for c in data["numeric"] + data["classes"])
    neighbours = sum(len(t) for t in data["thumbs"])
    grids = sum(len(uri) for uri in re.findall(r'<img src="(data:[^"]+)"', text))
    return {"scores_mb": round(scores / 1e6, 2), "neighbour_thumbnails": len(data["thumbs"]),
            "neighbours_mb": round(neighbours / 1e6, 2), "grid_thumbnails_mb": round(grids / 1e6, 2),
            "rest_mb": round((len(text) - scores - neighbours - grids) / 1e6, 2)}


def shard_rows(shard: str, first: int, n: int, images: list[str], rng, labels: list[str]):
    """One shard's score rows as the model actors hand them to the driver: its control row, then its rows."""
    import numpy as np
    import pyarrow as pa

    from perceptclip.core.schema import SHARD_ROW

    error = rng.random(n) < 0.003
    status = np.where(error, "error", "ok").astype(object)
    keys = [f"{first + i:09d}" for i in range(n)]
    logits = rng.normal(0, 1.2, size=(n, len(labels))) + np.linspace(1, -1, len(labels))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    def score(values):
        return pa.array(values.astype(np.float32), mask=error)

    columns = {
        "shard": pa.array([shard] * (n + 1)), "key": pa.array([None] + keys),
        "status": pa.array([SHARD_ROW] + list(status)),
        "error": pa.array([None] + [("not_an_image: cannot identify image file" if e else None) for e in error]),
        "url": pa.array([None] + [images[(first + i) % len(images)] for i in range(n)]),
        "caption": pa.array([None] + [f"caption of sample {first + i}" for i in range(n)]),
        "ordinal": pa.array([-1] + list(range(n)), pa.int64()), "shard_rows": pa.array([n] + [0] * n, pa.int64()),
        "width": pa.array([None] + [320] * n, pa.int32()), "height": pa.array([None] + [240] * n, pa.int32()),
    }
    values = {"iqa": rng.beta(5, 2, n), "memorability": rng.normal(0.72, 0.09, n)}
    for name, v in values.items():
        columns[name] = pa.concat_arrays([pa.nulls(1, pa.float32()), score(v)])
    chosen = np.array(labels, dtype=object)[probs.argmax(axis=1)]
    columns["emotion"] = pa.array([None] + [None if e else c for e, c in zip(error, chosen)], pa.string())
    for j, label in enumerate(labels):
        columns[f"emotion_{label}"] = pa.concat_arrays([pa.nulls(1, pa.float32()), score(probs[:, j])])
    return pa.table(columns)


def write_scores(root: Path, rows: int, shards: int, images: list[str]) -> str:
    """``rows`` score rows in ``shards`` committed score tables under root/scores, and their CSV shards."""
    import numpy as np

    from perceptclip.core.clock import utc_now
    from perceptclip.model.debug import make_tiny_artifact
    from perceptclip.model.reference import ModelSpec
    from perceptclip.output.commit import ScoreWriter
    from perceptclip.output.runs import RunProgress, RunSummary, write_summary

    models = [ModelSpec.resolve(make_tiny_artifact(str(root / "models" / task), task=task, seed=i))
              for i, task in enumerate(("iqa", "memorability", "emotion"), 1)]
    labels = list(models[2].meta.labels)
    dest = str(root / "scores")
    started = time.perf_counter()
    summary = RunSummary(run_id="report-scale", output=dest, started_at=utc_now(),
                         models=[m.describe() for m in models], storage={})
    progress = RunProgress(summary, shards, started, say=lambda line: None)
    writer = ScoreWriter(dest, {}, models, run_id="report-scale", overwrite=False)
    rng = np.random.default_rng(0)
    (root / "shards").mkdir(exist_ok=True)
    per = math.ceil(rows / shards)
    for s in range(shards):
        first, n = s * per, min(per, rows - s * per)
        shard = str(root / "shards" / f"part-{s:06d}.csv")
        Path(shard).write_text("key,path\n" + "".join(f"{first + i:09d},{images[(first + i) % len(images)]}\n"
                                                      for i in range(n)))
        progress(writer.add(shard_rows(shard, first, n, images, rng, labels)))
    summary.planned = shards
    progress.finish()
    summary.duration_s = time.perf_counter() - started
    write_summary(summary, {})
    return dest


def peak_mb() -> float:
    """This process's peak resident memory: VmHWM, of this program alone (``ru_maxrss`` would also count
    the pages of the parent it was forked from, kept across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report_once(dest: str, output: str, exact_limit: int) -> None:
    """In this process: the report, timed; one JSON line with its figures and the process's peak RSS."""
    from perceptclip.curation.report import write_report

    start = time.perf_counter()
    result = write_report(dest, output, exact_limit=exact_limit)
    print(json.dumps({"stage": "report", "seconds": round(time.perf_counter() - start, 1),
                      "peak_rss_mb": round(peak_mb()),
                      "page_mb": round(result.bytes / 1e6, 2), "thumbnails": result.thumbnails,
                      "unavailable": result.unavailable}))


def browse(page: Path, profile: Path) -> dict:
    """The page in Chromium at 1366 x 768: seconds until it is drawn, then a class left out and 30 steps of
    the first slider (arrow keys), the median and 90th percentile of the updates' milliseconds as the page
    measures them (count, bars, neighbours, density); and what its bar says."""
    from support.browser import Browser

    with Browser(profile, timeout=120) as browser:
        start = time.perf_counter()
        tab = browser.open(page.as_uri(), 1366, 768)
        tab.settle()
        loaded = time.perf_counter() - start
        tab.click('.control.classes button.toggle[data-class="1"]')
        tab.click('.control.numeric[data-index="0"] input.slider')      # focused: the arrow keys move it
        updates = []
        for i in range(30):              # along the slider and back: each a new threshold
            tab.press("ArrowRight" if i < 15 else "ArrowLeft", key_code=39 if i < 15 else 37)
            tab.settle()
            updates.append(float(tab.evaluate("document.documentElement.dataset.updateMs")))
        updates.sort()
        where = tab.evaluate("decodeURIComponent(location.hash.slice(7))")
        return {"stage": "page", "load_s": round(loaded, 2), "update_ms_median": updates[len(updates) // 2],
                "update_ms_p90": updates[int(0.9 * len(updates))],
                "where": where, "count": tab.evaluate("document.getElementById('count').textContent"),
                "estimate": tab.evaluate("document.getElementById('estimate').textContent")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--images", type=int, default=20000, help="distinct JPEGs the tables point at")
    parser.add_argument("--exact-limit", type=int, default=None, help="default: the report's own (EXACT_LIMIT)")
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep (default: a temporary folder)")
    parser.add_argument("--compare-limits", default="",
                        help="comma-separated exact limits: also render and open the page at each (how the limit was chosen)")
    parser.add_argument("--report-once", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report_once:
        return report_once(args.report_once[0], args.report_once[1], int(args.report_once[2]))
    from perceptclip.curation.explorer import EXACT_LIMIT

    limit = args.exact_limit or EXACT_LIMIT
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        images = write_images(root / "images", args.images)
        dest = write_scores(root, args.rows, args.shards, images)
        print(json.dumps({"stage": "tables", "rows": args.rows, "shards": args.shards,
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        page = root / "report.html"
        subprocess.run([sys.executable, __file__, "--report-once", dest, str(page), str(limit)], check=True)
        print(json.dumps({"stage": "page's parts", **page_parts(page)}), flush=True)
        seen = browse(page, root / "chromium-profile")
        print(json.dumps(seen), flush=True)
        from perceptclip.curation.quantiles import describe_scores, format_description, read_scores

        truth = format_description(describe_scores(read_scores(dest), where=seen["where"])).splitlines()[-1]
        print(json.dumps({"stage": "quantiles --where", "line": truth}), flush=True)
        for other in [int(v) for v in args.compare_limits.split(",") if v]:
            page = root / f"report-{other}.html"
            subprocess.run([sys.executable, __file__, "--report-once", dest, str(page), str(other)], check=True)
            seen = browse(page, root / "chromium-profile")
            print(json.dumps({"stage": f"page, exact up to {other}", **{k: seen[k] for k in (
                "load_s", "update_ms_median", "update_ms_p90")}}), flush=True)


if __name__ == "__main__":
    main()
