"""``perceptclip quantiles`` and ``perceptclip report`` on a DEST written by the score job's own stages
in this process (``support.scoring``: tiny models, shards written here, one run for the module, its run
summary included). The report is opened in headless Chromium, which says what a reader would see: loaded
thumbnails, drawn charts, no broken images, no fetches."""

import base64
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from html import unescape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from perceptclip.cli import main
from perceptclip.inputs.shards import write_shard
from perceptclip.scoring.config import ScoreConfig
from support.images import image_bytes, make_image
from support.scoring import run_here, score_here

CHROMIUM = "/usr/bin/chromium"
HOSTILE_KEY = "x<img src=q onerror=alert(1)>&amp"
HOSTILE_CAPTION = "<script>document.title='pwned'</script> & \"quotes\""
SCORED = 17


def samples(first: int, count: int) -> list[dict]:
    out = []
    for i in range(first, first + count):
        img = make_image(i, (64 + 8 * (i % 5), 48 + 4 * (i % 3)))
        out.append({"__key__": f"{i:06d}", "jpg": image_bytes(img),
                    "json": json.dumps({"url": f"https://example.com/{i}.jpg", "caption": f"picture {i}"}).encode()})
    return out


@pytest.fixture(scope="module")
def scored(tmp_path_factory, iqa_artifact, emotion_artifact):
    """Two shards scored with an IQA and an emotion model: 17 scored samples, a corrupt JPEG, a sample
    without an image, one sample whose key and caption are hostile HTML; and a third shard that is missing."""
    root = tmp_path_factory.mktemp("report")
    first = samples(0, 8) + [
        {"__key__": "broken", "jpg": b"\xff\xd8 this is not a jpeg"},
        {"__key__": HOSTILE_KEY, "jpg": image_bytes(make_image(99)),
         "json": json.dumps({"caption": HOSTILE_CAPTION}).encode()},
    ]
    second = samples(8, 8) + [{"__key__": "no-image", "json": b"{}"}]
    write_shard(str(root / "shards" / "part-000000.tar"), first)
    write_shard(str(root / "shards" / "part-000001.tar"), second)
    dest = root / "scores"
    summary = run_here([str(root / "shards" / "part-{000000..000002}.tar")], [iqa_artifact, emotion_artifact],
                       str(dest))
    assert len(summary.done) == 2 and [r.failed.split(":")[0] for r in summary.failed] == ["missing"]
    table = pa.concat_tables([pq.read_table(dest / f"part-00000{i}.parquet") for i in range(2)])
    assert Counter(table["status"].to_pylist()) == {"ok": SCORED, "error": 2}
    return {"root": root, "dest": dest, "table": table, "run_id": summary.run_id}


def cli(*args):
    return CliRunner().invoke(main, list(args))


def scored_values(table: pa.Table, column: str) -> np.ndarray:
    ok = table.filter(pa.compute.equal(table["status"], "ok"))
    return np.asarray(ok[column].to_pylist(), dtype=np.float64)


# --- quantiles ---------------------------------------------------------------------------------------------

def test_quantiles_equal_numpy_and_class_shares_count_labels(scored):
    result = cli("quantiles", "--scores", str(scored["dest"]), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["samples"] == {"total": SCORED + 2, "ok": SCORED, "error": 2}
    levels = out["levels"]
    assert set(out["quantiles"]) == {"iqa"} | {f"emotion_{label}" for label in out["classes"]["emotion"]}
    for column, stat in out["quantiles"].items():
        values = scored_values(scored["table"], column)
        assert stat["count"] == SCORED
        assert list(stat["quantiles"].values()) == pytest.approx(np.quantile(values, levels).tolist(), rel=1e-12)
        assert stat["mean"] == pytest.approx(values.mean())
    labels = Counter(scored["table"]["emotion"].drop_null().to_pylist())
    assert {k: v["count"] for k, v in out["classes"]["emotion"].items() if v["count"]} == labels
    assert sum(v["share"] for v in out["classes"]["emotion"].values()) == pytest.approx(1.0)

    table = cli("quantiles", "--scores", str(scored["dest"]))
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert f"{SCORED + 2} samples in 2 tables, {SCORED} scored, 2 errors" in lines[0]
    iqa = next(line.split() for line in lines if line.startswith("iqa "))
    median = np.quantile(scored_values(scored["table"], "iqa"), 0.5)
    assert iqa[1] == str(SCORED) and float(iqa[3 + levels.index(0.5)]) == pytest.approx(median, rel=1e-3)


def test_where_share_is_what_the_expression_keeps(scored):
    table = scored["table"]
    out = json.loads(cli("quantiles", "--scores", str(scored["dest"]), "--json").stdout)
    # thresholds picked from the printed quantiles, as a user would
    iqa_cut, fear_cut = out["quantiles"]["iqa"]["quantiles"]["0.75"], out["quantiles"]["emotion_fear"]["quantiles"]["0.9"]
    where = f'iqa > {iqa_cut!r} or (emotion_fear >= {fear_cut!r} and emotion not in ["awe"])'
    result = cli("quantiles", "--scores", str(scored["dest"]), "--json", "--where", where)
    assert result.exit_code == 0, result.output
    share = json.loads(result.stdout)["where"]

    rows = table.to_pylist()
    kept = sum(1 for r in rows if r["status"] == "ok"
               and (r["iqa"] > iqa_cut or (r["emotion_fear"] >= fear_cut and r["emotion"] != "awe")))
    assert 0 < kept < SCORED
    assert share == {"expression": where, "kept": kept, "samples": SCORED + 2, "share": kept / (SCORED + 2),
                     "scored": SCORED, "share_of_scored": kept / SCORED}
    text = cli("quantiles", "--scores", str(scored["dest"]), "--where", where).stdout.splitlines()[-1]
    assert text.startswith(f"--where {where!r} keeps {kept} of {SCORED + 2} samples ({100 * kept / (SCORED + 2):.1f}%)")

    for bad, why in [("iqa >", "cannot parse"), ("sharpness > 0.5", "no column 'sharpness'"),
                     ("emotion > 0.5", "emotion is text"), ("__import__('os').system('true')", "only comparisons")]:
        result = cli("quantiles", "--scores", str(scored["dest"]), "--where", bad)
        assert result.exit_code == 1 and "--where" in result.output and why in result.output, (bad, result.output)


def test_only_committed_tables_count(scored, tmp_path):
    dest = tmp_path / "scores"
    shutil.copytree(scored["dest"], dest)
    (dest / "_markers" / "part-000001.json").unlink()      # as if the run died before this commit
    out = json.loads(cli("quantiles", "--scores", str(dest), "--json").stdout)
    first = pq.read_table(dest / "part-000000.parquet")
    assert out["tables"] == 1 and out["samples"]["total"] == first.num_rows


def test_errors_name_what_is_wrong_and_what_to_do(scored, tmp_path):
    missing = cli("quantiles", "--scores", str(tmp_path / "nowhere"))
    assert missing.exit_code == 1
    assert str(tmp_path / "nowhere") in missing.output and "perceptclip score" in missing.output

    dest = tmp_path / "scores"
    shutil.copytree(scored["dest"], dest)
    pq.write_table(pa.table({"key": ["a"]}), dest / "part-000000.parquet")     # committed, but not ours
    foreign = cli("report", "--scores", str(dest), "--output", str(tmp_path / "r.html"))
    assert foreign.exit_code == 1
    assert str(dest / "part-000000.parquet") in foreign.output and "'perceptclip'" in foreign.output

    bad_k = cli("report", "--scores", str(dest), "--output", str(tmp_path / "r.html"), "--top-k", "-1")
    assert bad_k.exit_code == 2 and "--top-k" in bad_k.output

    no_shards = cli("report", "--scores", str(scored["dest"]), "--output", str(tmp_path / "r.html"),
                    "--shards", str(tmp_path / "moved" / "*.tar"))
    assert no_shards.exit_code == 1 and "--shards" in no_shards.output and "matches no shards" in no_shards.output


def test_every_help_has_an_example():
    for command in [[], *([name] for name in main.commands)]:
        result = cli(*command, "--help")
        assert result.exit_code == 0 and re.search(r"Example[^\n]*:\n\s+perceptclip ", result.output), command
    assert re.search(r"Example:\s+perceptclip report --scores", cli("report", "--help").output)
    assert re.search(r"Example:\s+perceptclip quantiles --scores", cli("quantiles", "--help").output)


def test_scores_and_report_on_object_storage(scored, s3_server, tmp_path):
    fs = s3_server.filesystem()
    bucket = s3_server.bucket()
    fs.put(str(scored["dest"]), f"{bucket}/scores", recursive=True)
    local = json.loads(cli("quantiles", "--scores", str(scored["dest"]), "--json").stdout)
    remote = cli("quantiles", "--scores", f"{bucket}/scores", "--json")
    assert remote.exit_code == 0, remote.output
    assert {**json.loads(remote.stdout), "scores_dest": None} == {**local, "scores_dest": None}

    result = cli("report", "--scores", f"{bucket}/scores", "--output", f"{bucket}/report.html", "--top-k", "2")
    assert result.exit_code == 0, result.output
    page = fs.cat_file(f"{bucket}/report.html").decode()
    assert page.count('<img src="data:image/jpeg;base64,') == 2 * 2 * 2 and f"{bucket}/scores" in page


# --- report ------------------------------------------------------------------------------------------------

def figures(page: str, model: str) -> tuple[list[dict], list[dict]]:
    """The top and the bottom grid of a model's section: each figure's key, score and thumbnail URI."""
    section = re.search(rf'<section class="model" id="model-{model}">(.*?)</section>', page, re.S).group(1)
    top, bottom = section.split("<h3>Top ", 1)[1].split("<h3>Bottom ", 1)

    def grid(text):
        return [{"key": unescape(m.group(1)), "score": float(m.group(2)),
                 "img": next(iter(re.findall(r'<img src="([^"]+)"', m.group(3))), None)}
                for m in re.finditer(r'<figure [^>]*data-key="([^"]*)" data-score="([^"]*)">(.*?)</figure>', text, re.S)]

    return grid(top), grid(bottom)


def test_report_ranks_and_reads_thumbnails_from_where_the_shards_are_now(scored, tmp_path):
    # The shards "moved": only part-000000 is at the new place, rewritten with solid red images.
    moved = tmp_path / "moved"
    red = image_bytes(Image.new("RGB", (40, 30), (255, 0, 0)))
    table = scored["table"]
    keys = [row["key"] for row in table.to_pylist() if row["shard"].endswith("part-000000.tar")]
    write_shard(str(moved / "part-000000.tar"), [{"__key__": key, "jpg": red} for key in keys])
    output = tmp_path / "report.html"
    result = cli("report", "--scores", str(scored["dest"]), "--output", str(output), "--top-k", "3",
                 "--shards", str(moved / "*.tar"))
    assert result.exit_code == 0, result.output
    assert "thumbnails [2/2]" in result.stderr                   # progress, the last line always shown
    assert "unavailable" in result.stdout and "--shards" in result.stdout
    page = output.read_text()
    ok = table.filter(pa.compute.equal(table["status"], "ok"))
    by_key = {(row["key"]): row for row in ok.to_pylist()}

    iqa_top, iqa_bottom = figures(page, "iqa")
    values = sorted(scored_values(table, "iqa"))
    assert [f["score"] for f in iqa_top] == pytest.approx(values[::-1][:3])
    assert [f["score"] for f in iqa_bottom] == pytest.approx(values[:3])
    for f in iqa_top + iqa_bottom:
        assert by_key[f["key"]]["iqa"] == pytest.approx(f["score"])

    emotion_top, _ = figures(page, "emotion")
    confidence = {k: max(v for c, v in row.items() if c.startswith("emotion_")) for k, row in by_key.items()}
    assert [f["score"] for f in emotion_top] == pytest.approx(sorted(confidence.values())[::-1][:3])

    for f in iqa_top + iqa_bottom + emotion_top:
        shard = by_key[f["key"]]["shard"]
        if shard.endswith("part-000000.tar"):      # read from the new place: red
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(f["img"].split(",", 1)[1]))))
            assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 50
        else:                                      # not among --shards: says so instead of a broken image
            assert f["img"] is None
    assert "part-000001 is not among --shards" in page


def test_report_without_top_and_bottom(scored, tmp_path):
    """--top-k 0: no top and bottom grids; the thumbnails left are the threshold's neighbours, held as data
    for the page's script (17 samples over fewer steps than 6 a step: every scored sample)."""
    output = tmp_path / "report.html"
    result = cli("report", "--scores", str(scored["dest"]), "--output", str(output), "--top-k", "0")
    assert result.exit_code == 0 and f"{SCORED} thumbnails" in result.stdout
    page = output.read_text()
    assert "<img" not in page and "<h3>Top" not in page and page.count('<svg class="chart') == 2
    data = json.loads(re.search(r'<script type="application/json" id="explorer-data">(.*?)</script>', page).group(1))
    assert len(data["thumbs"]) == SCORED and all(uri.startswith("data:image/jpeg;base64,") for uri in data["thumbs"])


def test_quantiles_and_report_read_a_dest_scored_without_a_cluster(iqa_artifact, emotion_artifact, tmp_path):
    """Quantiles and the report on a DEST of one shard that holds no run summary: the samples counted,
    the mean, and the report's top and bottom with their thumbnails read from the shard."""
    shard = str(tmp_path / "shards" / "part-000000.tar")
    write_shard(shard, samples(0, 6) + [{"__key__": "broken", "jpg": b"\xff\xd8 this is not a jpeg"}])
    dest = tmp_path / "scores"
    results = score_here([shard], [iqa_artifact, emotion_artifact], str(dest))
    assert [(r.rows, r.ok, r.failed) for r in results] == [(7, 6, None)]
    table = pq.read_table(dest / "part-000000.parquet")

    result = cli("quantiles", "--scores", str(dest), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["samples"] == {"total": 7, "ok": 6, "error": 1}
    assert out["quantiles"]["iqa"]["mean"] == pytest.approx(scored_values(table, "iqa").mean())

    result = cli("report", "--scores", str(dest), "--output", str(tmp_path / "report.html"), "--top-k", "2")
    assert result.exit_code == 0, result.output
    top, bottom = figures((tmp_path / "report.html").read_text(), "iqa")
    values = sorted(scored_values(table, "iqa"))
    assert [f["score"] for f in top] == pytest.approx(values[::-1][:2])
    assert [f["score"] for f in bottom] == pytest.approx(values[:2])
    assert all(f["img"].startswith("data:image/jpeg;base64,") for f in top + bottom)   # read from the shard


@pytest.mark.slow
def test_report_renders_in_chromium(scored, tmp_path):
    assert Path(CHROMIUM).exists(), "headless Chromium is needed: scripts/setup.sh --with-test-tools installs it"
    output = tmp_path / "report.html"
    result = cli("report", "--scores", str(scored["dest"]), "--output", str(output), "--top-k", str(SCORED))
    assert result.exit_code == 0, result.output
    page = output.read_text()

    # Nothing outside the page: every src is a data: URI, every link a fragment, no stylesheets; two scripts,
    # both inline: the explorer's data (JSON) and its code.
    assert all(src.startswith("data:image/jpeg;base64,") for src in re.findall(r'\ssrc="([^"]*)"', page))
    assert all(href.startswith("#") for href in re.findall(r'\shref="([^"]*)"', page))
    assert re.findall(r"<script[^>]*>", page) == ['<script type="application/json" id="explorer-data">', "<script>"]
    assert "<link" not in page and "url(" not in page and "@import" not in page
    assert HOSTILE_KEY not in page and HOSTILE_CAPTION not in page

    check = tmp_path / "check.html"
    check.write_text(page.replace("</body>", PAGE_CHECK + "</body>"))
    dom = chromium(tmp_path, "--dump-dom", check.as_uri())
    seen = json.loads(unescape(re.search(r'<pre id="check">(.*?)</pre>', dom, re.S).group(1)))

    assert seen["title"].startswith("perceptclip report") and seen["scripts"] == 3   # the page's two, the check
    assert seen["fetched"] == []
    # every sample in both grids of both models, each thumbnail decoded; none broken, the neighbours' neither
    assert seen["images"] == 2 * 2 * SCORED and seen["broken"] == [] and seen["placeholders"] == 0
    assert seen["neighbours"] >= 6
    assert HOSTILE_KEY in seen["keys"]          # the hostile key arrived as text, not as markup
    charts = {c["title"]: c for c in seen["charts"]}
    assert set(charts) == {f"histogram of {SCORED} scores", "class distribution"}
    for chart in charts.values():
        assert chart["width"] > 100 and chart["height"] > 50 and chart["bars"] > 0
    hist = charts[f"histogram of {SCORED} scores"]
    assert hist["bars_total"] == SCORED                                      # bar titles sum to the counts
    errors = {row[0]: row[1] for row in seen["errors"][1:]}
    assert errors == {"not_an_image": "1", "no_image": "1"}
    assert any("part-000002.tar" in " ".join(row) and "missing" in row for row in seen["failed_shards"])
    assert any(row[0] == scored["run_id"] for row in seen["runs"])

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", output.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    non_white = (np.abs(pixels - 255).sum(axis=2) > 30).mean()
    colourful = (pixels.max(axis=2) - pixels.min(axis=2) > 60).mean()          # thumbnails and bars
    assert non_white > 0.03 and colourful > 0.01


# Run in the page after load: what a reader would see, written into the DOM for --dump-dom.
PAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const rows = sel => [...document.querySelectorAll(sel)].map(tr => [...tr.cells].map(c => c.textContent.trim()));
  const images = [...document.querySelectorAll(".grid img")];
  const charts = [...document.querySelectorAll("svg.chart")].map(svg => {
    const box = svg.getBoundingClientRect();
    const bars = [...svg.querySelectorAll("rect.bar")];
    return {title: svg.querySelector("title").textContent, width: box.width, height: box.height,
            bars: bars.filter(b => b.getBoundingClientRect().height > 0).length,
            bars_total: bars.reduce((n, b) => n + Number(b.querySelector("title").textContent.split(": ").pop()), 0)};
  });
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({
    title: document.title,
    scripts: document.scripts.length,
    fetched: performance.getEntriesByType("resource").map(e => e.name).filter(n => !n.startsWith("data:")),
    images: images.length,
    broken: [...document.images].filter(i => i.getAttribute("src") && !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
    placeholders: document.querySelectorAll(".grid .missing").length,
    neighbours: document.querySelectorAll(".boundary img[src]").length,
    keys: [...document.querySelectorAll("figure")].map(f => f.dataset.key),
    charts,
    errors: rows("#errors table:first-of-type tr"),
    failed_shards: rows("#errors table:nth-of-type(2) tr"),
    runs: rows("#runs tr").slice(1),
  });
  document.body.appendChild(out);
});
</script>"""


def chromium(tmp_path: Path, *args: str) -> str:
    """Headless Chromium with a throwaway profile and nothing that phones home; returns its stdout."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_report_shows_thumbnails_for_every_input_kind(iqa_artifact, tmp_path):
    """Tars, Parquet with the images inside, a table of paths and a folder of image files, scored into one
    DEST: every figure of the report is a thumbnail read from where its image is."""
    from perceptclip.scoring.plan import plan_shards
    from support.inputs import write_image_files, write_image_parquet

    data = tmp_path / "data"
    write_shard(str(data / "tars-000.tar"), samples(0, 3))
    parquet = write_image_parquet(data / "hf-000.parquet", [image_bytes(make_image(10 + i, (40, 30))) for i in range(3)])
    write_image_files(data / "listed", ["a.jpg", "b.png", "c.jpg"])
    (data / "list.csv").write_text("path\nlisted/a.jpg\nlisted/b.png\nlisted/c.jpg\n")
    write_image_files(tmp_path / "photos", ["x.jpg", "y/z.png", "w.jpg"])
    dest = tmp_path / "scores"
    folder = plan_shards(ScoreConfig(input=[str(tmp_path / "photos")], output=str(dest), models=[iqa_artifact]), {})
    shards = [str(data / "tars-000.tar"), parquet, str(data / "list.csv"), *folder.todo]
    assert [r.ok for r in score_here(shards, [iqa_artifact], str(dest))] == [3, 3, 3, 3]
    result = cli("report", "--scores", str(dest), "--output", str(tmp_path / "report.html"), "--top-k", "12")
    assert result.exit_code == 0, result.output
    top, bottom = figures((tmp_path / "report.html").read_text(), "iqa")
    assert len(top) == len(bottom) == 12
    assert all(f["img"] and f["img"].startswith("data:image/jpeg;base64,") for f in top + bottom)
    assert {f["key"] for f in top} >= {"x.jpg", "y/z.png", "0", "1"}
