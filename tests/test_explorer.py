"""The report's explorer: its steps and neighbours (here, in numpy), and the page in headless Chromium driven
through the DevTools protocol (``support.browser``) as a curator would: dragging a threshold, pressing
arrow keys, typing a value, toggling a class, opening a link. Whatever the page shows as a count must be
the line ``perceptclip quantiles --where`` prints for the page's own expression on the same tables, and
that expression must be one ``filter`` parses."""

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.curation.explorer import plan_explorer, score_steps, step_neighbours
from perceptclip.curation.expression import parse_expression
from perceptclip.curation.quantiles import read_scores
from perceptclip.curation.report import write_report
from perceptclip.inputs.shards import write_shard
from support.browser import CHROMIUM, Browser
from support.images import image_bytes, make_image
from support.scoring import score_here

HOSTILE_KEY = "k<img src=x onerror=alert(1)>"
HOSTILE_CAPTION = "</script><script>document.title='pwned'</script>"


# --- steps and neighbours ----------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [
    np.random.default_rng(0).beta(5, 2, 1000), np.random.default_rng(1).normal(-3, 40, 500),
    np.array([0.5]), np.array([0.0, 0.0]), np.array([1e-7, 3e-7]), np.array([-2.5, 7.25]),
    np.random.default_rng(2).normal(0.7, 0.1, 100).astype(np.float32).astype(np.float64)])
def test_steps_are_round_and_cover_every_score(values):
    edges = score_steps(values)
    widths = np.diff(edges)
    assert 1 <= len(widths) <= 102 and np.all(widths > 0)
    assert edges[0] <= values.min() and values.max() < edges[-1]
    width = float(f"{widths[0]:.6g}")
    assert np.allclose(widths, width, rtol=1e-6)
    assert f"{width:e}".split("e")[0].rstrip("0").rstrip(".") in ("1", "2", "2.5", "5")   # a round width
    assert all(len(repr(e)) <= 12 for e in edges.tolist())                 # short decimals, as written


def test_any_threshold_has_a_held_neighbour_within_one_step_on_each_side():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.beta(5, 2, 20_000), rng.uniform(0.2, 0.21, 500)]).astype(np.float32).astype(float)
    rows = np.arange(len(values))
    edges = score_steps(values)
    width = edges[1] - edges[0]
    held = step_neighbours(values, rows, edges, 3)
    assert len(held) <= 6 * (len(edges) - 1) and np.all(np.diff(values[held]) >= 0)
    kept = np.sort(values[held])
    for t in np.concatenate([rng.uniform(edges[0] - width, edges[-1] + width, 2000), edges, values[:200]]):
        for lo, hi in ((t, t + width), (t - width, t)):     # [t, t + w) above, [t - w, t) below
            in_data = np.any((values >= lo) & (values < hi))
            assert in_data == np.any((kept >= lo) & (kept < hi)), (t, lo, hi)
    for t in edges:                                      # at a step's edge, the 3 nearest on each side exactly
        above, below = np.sort(values[values >= t])[:3], np.sort(values[values < t])[-3:]
        assert np.array_equal(kept[kept >= t][:3], above) and np.array_equal(kept[kept < t][-3:], below)


# --- a scored DEST, and its page -----------------------------------------------------------------------------

def samples(first: int, count: int) -> list[dict]:
    return [{"__key__": f"{i:05d}", "jpg": image_bytes(make_image(i, (64 + 4 * (i % 7), 48))),
             "json": json.dumps({"caption": f"picture {i}"}).encode()} for i in range(first, first + count)]


@pytest.fixture(scope="module")
def dest(tmp_path_factory, iqa_artifact, memorability_artifact, emotion_artifact):
    """Two shards scored with two regression models and a classifier: 46 scored samples, one broken JPEG,
    one sample whose key and caption are hostile markup."""
    root = tmp_path_factory.mktemp("explorer")
    write_shard(str(root / "shards" / "part-000000.tar"), samples(0, 24) + [
        {"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg"},
        {"__key__": HOSTILE_KEY, "jpg": image_bytes(make_image(99)), "json": json.dumps({"caption": HOSTILE_CAPTION}).encode()}])
    write_shard(str(root / "shards" / "part-000001.tar"), samples(24, 21))
    scores = root / "scores"
    shards = [str(root / "shards" / f"part-00000{i}.tar") for i in range(2)]
    results = score_here(shards, [iqa_artifact, memorability_artifact, emotion_artifact], str(scores))
    assert [r.ok for r in results] == [25, 21]
    return scores


@pytest.fixture(scope="module")
def page(dest, tmp_path_factory):
    output = tmp_path_factory.mktemp("explorer-page") / "report.html"
    write_report(str(dest), str(output), top_k=4)
    return output


def quantiles_line(dest: Path, where: str) -> str:
    """The last line ``perceptclip quantiles --where`` prints: what the expression keeps."""
    result = CliRunner().invoke(main, ["quantiles", "--scores", str(dest), "--where", where])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[-1]


def test_sample_above_the_limit_is_uniform_and_the_same_each_time(dest):
    scores = read_scores(str(dest))
    exact = plan_explorer(scores)
    assert exact.exact and len(exact.rows) == exact.scored == 46
    sampled = plan_explorer(scores, limit=20)
    assert not sampled.exact and len(sampled.rows) == 20 and set(sampled.rows) <= set(exact.rows)
    assert np.array_equal(sampled.rows, plan_explorer(scores, limit=20).rows)
    assert [c.name for c in exact.numeric] == ["iqa", "memorability"] and [c.name for c in exact.classes] == ["emotion"]


def test_page_holds_its_data_inline_and_escaped(page):
    html = page.read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert [attrs for attrs, _ in scripts] == [' type="application/json" id="explorer-data"', ""]
    data = scripts[0][1]
    assert "<" not in data and ">" not in data and "&" not in data       # JSON escapes: nothing ends the element
    parsed = json.loads(data)
    assert parsed["exact"] and parsed["scored"] == 46 and parsed["total"] == 47
    assert HOSTILE_KEY not in html and HOSTILE_CAPTION not in html
    assert any(s["key"] == HOSTILE_KEY for s in parsed["samples"])      # as data, for textContent
    assert not re.search(r"\b(fetch|XMLHttpRequest|WebSocket|EventSource|importScripts|innerHTML|outerHTML)\b", html)
    assert not re.search(r'\s(src|href)="(?!data:|#)', html)


# --- in Chromium -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert Path(CHROMIUM).exists(), "headless Chromium is needed: scripts/setup.sh --with-test-tools installs it"
    with Browser(tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


def shown(tab) -> dict:
    """What the bar says and where the address is."""
    tab.settle()
    return tab.evaluate("""({count: document.getElementById('count').textContent,
        command: document.getElementById('command').textContent,
        where: (() => { try { return location.hash.startsWith('#where=') ? decodeURIComponent(location.hash.slice(7))
                                                                           : null; } catch (e) { return location.hash; } })(),
        warning: document.getElementById('unrepresentable').hidden ? null
                 : document.getElementById('unrepresentable').textContent})""")


def box(tab, selector: str) -> list[float]:
    """Where an element is on screen (left, top, width, height), scrolled to the middle of the view first."""
    return tab.evaluate(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
        e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
        return [r.left, r.top, r.width, r.height]; }})()""")


def written(dest: Path, seen: dict) -> str:
    """The expression of the page's filter command, which must be a command to paste as it is."""
    argv = shlex.split(seen["command"])
    assert argv[:4] == ["perceptclip", "filter", "--scores", str(dest)] and argv[4] == "--where", argv
    return argv[5]


def check_agrees(dest: Path, seen: dict) -> None:
    """After a change on the page: the address holds the page's expression, filter parses it, and the count
    is the line quantiles prints for it."""
    where = written(dest, seen)
    assert seen["where"] == where
    parse_expression(where)
    assert seen["count"] == quantiles_line(dest, where)


@pytest.mark.slow
def test_moving_a_threshold_and_toggling_a_class_change_the_count_and_the_link(browser, page, dest):
    tab = browser.open(page.as_uri(), 1366, 768)
    first = shown(tab)
    assert first["count"] == quantiles_line(dest, "true") and first["where"] is None and first["warning"] is None

    # a click on the slider's track: a threshold, kept above it (iqa: higher is better)
    x, y, width, height = box(tab, '.control.numeric[data-index="0"] .slider')
    left, top = x, y + height / 2
    tab.click_at(left + 0.7 * width, top)
    moved = shown(tab)
    assert moved["where"].startswith("iqa >= ") and moved["count"] != first["count"]
    check_agrees(dest, moved)

    # drag on the histogram, then step with the arrow keys of the focused slider
    x, y, width_svg, height = box(tab, '.control.numeric[data-index="0"] svg')
    tab.drag((x + 0.8 * width_svg, y + height / 2), (x + 0.45 * width_svg, y + height / 2))
    dragged = shown(tab)
    assert dragged["where"] != moved["where"]
    check_agrees(dest, dragged)
    x, y, width, height = box(tab, '.control.numeric[data-index="0"] .slider')
    tab.click_at(x + 0.6 * width, y + height / 2)
    slider = """document.querySelector('.control.numeric[data-index="0"] .slider').valueAsNumber"""
    clicked = tab.evaluate(slider)
    for _ in range(3):
        tab.press("ArrowLeft", key_code=37)
    stepped = shown(tab)
    assert tab.evaluate(slider) == clicked - 3 and stepped["where"] not in (moved["where"], dragged["where"])
    check_agrees(dest, stepped)

    # keep below instead: the select, by keyboard
    tab.click('.control.numeric[data-index="0"] select.op')
    tab.press("Escape", key_code=27)
    tab.press("ArrowDown", key_code=40)
    below = shown(tab)
    assert re.match(r"iqa > \d", below["where"]), below["where"]
    check_agrees(dest, below)

    # a typed threshold on the second score, then a class left out and taken back
    tab.click('.control.numeric[data-index="1"] input.value')
    tab.evaluate("document.activeElement.select()")
    tab.type_text("-0.0301")
    tab.press("Enter", key_code=13)
    typed = shown(tab)
    assert "memorability < -0.0301" in typed["where"] or "memorability >= -0.0301" in typed["where"]
    check_agrees(dest, typed)
    label = tab.evaluate("document.querySelector('.control.classes .toggle .label').textContent")
    tab.click('.control.classes button.toggle[data-class="0"]')
    toggled = shown(tab)
    assert "emotion in [" in toggled["where"] and json.dumps(label) not in toggled["where"]
    check_agrees(dest, toggled)
    tab.click('.control.classes button.toggle[data-class="0"]')
    assert "emotion" not in shown(tab)["where"]
    assert [u for u in tab.requests() if not u.startswith("data:")] == [page.as_uri()]     # nothing fetched
    assert tab.errors() == []


REPRESENTABLE = [
    "true", "iqa > 0.02", "iqa >= 0.03 and memorability < -0.02", "0.03 < iqa", "(iqa <= 0.04) and (true)",
    'emotion in ["anger", "contentment"]', "emotion == 'anger' and iqa > 0.01", 'emotion != "anger"',
    'emotion not in ("anger",) and memorability >= -1', "iqa > -1e-3 and memorability < 1", "iqa >= 0",
    'emotion in ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]',
]
UNREPRESENTABLE = {
    "iqa > 0.5 or aesthetics < 2": "'or'", "not iqa > 0.5": "'not'", "iqa > 0.2 and iqa < 0.8": "two conditions",
    "0.2 < iqa < 0.8": "chains", "emotion_fear > 0.5": "no control for emotion_fear", "iqa == 0.5": "above or below",
    "emotion == 'Anger'": "not a class", "iqa > 0x10": "cannot read", "iqa > 1_000": "cannot read",
    "emotion in ('anger')": "a list", "false": "keeps nothing", "iqa > ": "expected", "iqa > 99999999999": "integer",
    'emotion in ["a\\d"]': "escape",
}


@pytest.mark.slow
def test_a_link_restores_its_selection_and_counts_as_quantiles_does(browser, page, dest):
    tab = browser.open(page.as_uri(), 1366, 768)
    for i, where in enumerate(REPRESENTABLE):               # each opened afresh, as a link is
        tab.navigate(f"{page.as_uri()}?open={i}#where={quote(where, safe='')}")
        seen = shown(tab)
        assert seen["warning"] is None, (where, seen["warning"])
        assert seen["where"] == where                    # the link stays as it was given
        line = quantiles_line(dest, where)
        assert seen["count"].split(" keeps ", 1)[1] == line.split(" keeps ", 1)[1], where
        canonical = tab.evaluate("document.getElementById('count').querySelector('.where').textContent")
        assert canonical.startswith("--where ")
        # the page's own writing of it: the same samples, and filter reads it
        own = written(dest, seen)
        parse_expression(own)
        assert seen["count"] == quantiles_line(dest, own)
    # thresholds exactly at a sample's score (a float32 read as a double): each side of it counted as filter does
    values = read_scores(str(dest)).values("memorability")
    for i, value in enumerate(values[[0, 7, 20]].tolist()):
        for op in (">=", ">", "<=", "<"):
            where = f"memorability {op} {value!r} and iqa > 0.0"
            tab.navigate(f"{page.as_uri()}?at={i}{op}#where={quote(where, safe='')}")
            seen = shown(tab)
            assert seen["warning"] is None and seen["count"] == quantiles_line(dest, written(dest, seen)), where
            assert seen["count"].split(" keeps ")[1] == quantiles_line(dest, where).split(" keeps ")[1]
    # the link the controls write reads back to the same selection
    tab.navigate(f"{page.as_uri()}#where={quote('iqa >= 0.03 and emotion in [' + chr(34) + 'anger' + chr(34) + ']')}")
    before = shown(tab)
    tab.click('.control.numeric[data-index="1"] .slider')
    after = shown(tab)
    tab.navigate("about:blank")
    tab.navigate(f"{page.as_uri()}#where={quote(after['where'], safe='')}")
    assert shown(tab)["count"] == after["count"] != before["count"]


@pytest.mark.slow
def test_an_expression_the_controls_cannot_show_is_shown_as_such(browser, page, dest):
    tab = browser.open(page.as_uri(), 1366, 768)
    for where, why in UNREPRESENTABLE.items():             # the address edited in place: no new document
        tab.navigate(f"{page.as_uri()}#where={quote(where, safe='')}")
        seen = shown(tab)
        assert seen["warning"] is not None and where.strip() in seen["warning"] and why in seen["warning"], (where, seen)
        assert seen["where"] == where                    # left in the address, not rewritten
        assert seen["count"] == quantiles_line(dest, "true")     # nothing of it applied, and the bar says "true"
    tab.navigate(f"{page.as_uri()}#where=%E0%A4%A")
    assert "not URL-encoded" in shown(tab)["warning"]
    assert tab.errors() == []


@pytest.mark.slow
def test_above_the_limit_the_page_says_its_counts_are_estimates(browser, dest, tmp_path):
    output = tmp_path / "sampled.html"
    write_report(str(dest), str(output), top_k=2, exact_limit=30)
    where = "iqa >= 0.03"
    tab = browser.open(f"{output.as_uri()}#where={quote(where)}", 1366, 768)
    seen = shown(tab)
    estimate = tab.evaluate("document.getElementById('estimate').textContent")
    assert "keeps about " in seen["count"] and "of 47 samples" in seen["count"]
    assert "uniform sample of 30 of the 46 scored samples" in estimate and "95% interval" in estimate
    lo, hi = map(int, re.search(r"interval (\d+) to (\d+) ", estimate).groups())
    truth = int(re.search(r"keeps (\d+) of", quantiles_line(dest, where)).group(1))
    assert lo <= truth <= hi
    assert "Counts are estimates" in output.read_text()


@pytest.mark.slow
def test_the_page_at_a_laptop_size_holds_still_and_responds(browser, page, tmp_path):
    tab = browser.open(page.as_uri(), 1366, 768)
    tab.settle()
    layout = """[...document.querySelectorAll('main section, main h3, .boundary, .control, canvas')]
                 .map(e => { const r = e.getBoundingClientRect(); return [Math.round(r.top + scrollY), Math.round(r.height)]; })
                 .concat([document.getElementById('selection').getBoundingClientRect().height])"""
    before = tab.evaluate(layout)
    shots = Path(os.environ.get("PERCEPTCLIP_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    tab.screenshot(shots / "report-1366x768.png")
    tab.click('.control.numeric[data-index="0"] .slider')
    tab.click('.control.classes button.toggle[data-class="4"]')
    tab.click('.control.numeric[data-index="1"] .slider')
    for _ in range(4):
        tab.press("ArrowRight", key_code=39)
    tab.settle()
    assert tab.evaluate(layout) == before                 # nothing moved while the selection changed
    assert float(tab.evaluate("document.documentElement.dataset.updateMs")) < 50
    broken = tab.evaluate("[...document.images].filter(i => i.getAttribute('src') && !(i.complete && i.naturalWidth)).length")
    assert broken == 0
    assert tab.evaluate("document.querySelectorAll('.boundary .slot:not(.empty) img[src]').length") >= 12
    assert tab.evaluate("document.title").startswith("perceptclip report")       # no script from the data ran
    # the hostile sample next to a threshold: its key shown as text, nothing of it run as markup
    data = json.loads(tab.evaluate("document.getElementById('explorer-data').textContent"))
    value = next(s["values"][0] for s in data["samples"] if s["key"] == HOSTILE_KEY)
    tab.evaluate(f"location.hash = 'where=' + encodeURIComponent('iqa >= {value!r}')")
    tab.settle()
    keys = tab.evaluate("[...document.querySelectorAll('.control[data-index=\"0\"] .slot .key')].map(k => k.textContent)")
    assert HOSTILE_KEY in keys and tab.evaluate("document.querySelectorAll('img[onerror], script').length") == 2
    tab.evaluate("document.getElementById('model-iqa').scrollIntoView()")
    tab.screenshot(shots / "report-1366x768-iqa.png")
    full = tab.screenshot(shots / "report-full.png", full_page=True)
    assert tab.errors() == []
    assert full.stat().st_size > 50_000
    shutil.copy(page, shots / "report.html") if "PERCEPTCLIP_SCREENSHOTS" in os.environ else None
