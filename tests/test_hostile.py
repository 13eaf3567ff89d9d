"""Hostile input: every case of ``support.hostile`` through one real scoring run (local Ray, tiny models),
the counts reconciled, curation of the result kept inside its folder, and property tests that feed
arbitrary bytes to the reader and the decode stage."""

import json
import re
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perceptclip.curation.filter import run_filter, safe_member_name
from perceptclip.inputs.shards import IMAGE_EXTENSIONS, ShardError, read_shard, shard_bytes
from perceptclip.model.preprocess import PreprocessConfig
from perceptclip.scoring.config import load_score_config
from perceptclip.scoring.decode import decode_samples
from perceptclip.scoring.job import run_score
from support.hostile import IGNORED, MAX_PIXELS, observe, write_hostile_shards
from support.images import image_bytes, make_image


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, iqa_artifact, memorability_artifact, ray_local):
    """One scoring run over every hostile shard, with both preprocessings (multi-crop and resize-crop)."""
    root = tmp_path_factory.mktemp("hostile")
    cases = write_hostile_shards(str(root / "shards"))
    cfg = load_score_config(None, input=[str(root / "shards" / "*")], output=str(root / "scores"),
                            models=[iqa_artifact, memorability_artifact], max_pixels=MAX_PIXELS)
    summary = run_score(cfg).to_dict()
    outcomes, reconciliation = observe(cases, str(root / "scores"), summary)
    return {"root": root, "cases": cases, "summary": summary, "outcomes": outcomes,
            "reconciliation": reconciliation}


@pytest.mark.slow
def test_every_hostile_input_has_its_stated_outcome(hostile_run):
    wrong = [(o.case.what, o.case.expect, o.got, o.case.columns, o.columns)
             for o in hostile_run["outcomes"] if not o.as_expected]
    assert wrong == []
    assert len(hostile_run["outcomes"]) == len(hostile_run["cases"])


@pytest.mark.slow
def test_counts_reconcile(hostile_run):
    summary, rec = hostile_run["summary"], hostile_run["reconciliation"]
    assert rec["rows"] == rec["input_samples"] == summary["samples"]["total"]
    assert rec["duplicates"] == rec["lost"] == rec["unexpected"] == 0
    assert summary["shards"] == {"planned": 6, "done": 2, "skipped": 0, "failed": 4}
    expected = Counter(c.expect for c in hostile_run["cases"] if c.key is not None and c.expect != IGNORED)
    assert summary["samples"]["ok"] == rec["ok"] == expected.pop("ok")
    assert summary["samples"]["errors_by_reason"] == dict(expected)
    for name in ("broken-truncated", "broken-not-a-tar", "broken-empty", "broken-truncated-gzip"):
        assert not (hostile_run["root"] / "scores" / f"{name}.parquet").exists()


@pytest.mark.slow
def test_curation_never_writes_outside_its_folder(hostile_run, tmp_path):
    root = hostile_run["root"]
    out = tmp_path / "nest" / "curated"
    before = {p for p in tmp_path.rglob("*")} | {p for p in root.rglob("*")}
    summary = run_filter(str(root / "scores"), "iqa > -1e9", str(out), {}).to_dict()
    written = {p for p in tmp_path.rglob("*") if p.is_file()} | {p for p in root.rglob("*")}
    assert {p for p in written - before if not p.is_relative_to(out)} == set()
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == {
        "hostile-000000.tar", "hostile-gzip.tar", "_markers/hostile-000000.json", "_markers/hostile-gzip.json",
        "_output.json"}                                 # what the curation was made from and with
    # keys that would extract outside the folder are refused, and so are samples whose .json cannot
    # take the scores; every other scored sample is kept
    assert summary["refused_by_reason"] == {"unsafe_name": 2, "unreadable_json": 2}
    ok = hostile_run["reconciliation"]["ok"]
    assert summary["samples"]["kept"] == ok - 4
    with tarfile.open(out / "hostile-000000.tar") as tar:
        names = tar.getnames()
        assert names and all(safe_member_name(n) for n in names)
        assert "dir/sub/key.jpg" in names and not any("escape" in n or "abs/key" in n for n in names)
        tar.extractall(tmp_path / "extracted", filter="data")      # Python's own check agrees
    assert {s["__key__"] for s in read_shard(str(out / "hostile-000000.tar"))} >= {"café-東京", "tab\tnew\nline"}


# --- properties ---------------------------------------------------------------------------------------

PREPROCESSING = [PreprocessConfig(kind="multi_crop", size=16, crops=2, max_side=64), PreprocessConfig(size=16)]
VALID = [image_bytes(make_image(1, (24, 16)), "JPEG"), image_bytes(make_image(2, (24, 16)), "PNG"),
         image_bytes(make_image(3, (24, 16)), "GIF"), image_bytes(make_image(4, (24, 16)), "WEBP")]
REASON = r"^[a-z_]+: "


@st.composite
def mutated(draw):
    """A valid small image with a few bytes changed, cut short, or with bytes inserted."""
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["set", "cut", "insert"]))
        if action == "set":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at:]
            if not data:
                break
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


image_ext = st.sampled_from([*IMAGE_EXTENSIONS, "JPG", "seg.png"])
image_data = st.one_of(mutated(), st.sampled_from(VALID), st.binary(max_size=600))
meta_data = st.one_of(st.binary(max_size=200), st.text(max_size=60).map(str.encode),
                      st.dictionaries(st.sampled_from(["url", "caption"]), st.text(max_size=20)).map(
                          lambda d: json.dumps(d).encode()))


@st.composite
def sample_lists(draw):
    """One to three samples: most with an image member (valid, mutated or random bytes, under any image
    extension), with or without a .json, .txt or an unknown member."""
    out = []
    for i in range(draw(st.integers(1, 3))):
        sample = {"__key__": f"k{i}"}
        if draw(st.integers(0, 4)):
            sample[draw(image_ext)] = draw(image_data)
        for ext in draw(st.sets(st.sampled_from(["json", "txt", "cls", "bin"]), max_size=2)):
            sample[ext] = draw(meta_data)
        out.append(sample)
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=sample_lists())
def test_any_bytes_make_exactly_one_row_per_sample(batch):
    block = decode_samples("s.tar", batch, 0, PREPROCESSING, max_pixels=1_000_000)
    assert list(block["key"]) == [s["__key__"] for s in batch]
    assert set(block["status"]) <= {"ok", "error"}
    for status, error, width in zip(block["status"], block["error"], block["width"]):
        assert (status == "ok") == (error is None) and (status == "ok") == (width > 0)
        assert error is None or re.match(REASON, error)
    for name in ("key", "error", "url", "caption"):      # everything is writable to Parquet
        pa.array(list(block[name]), pa.string())
    for i, _p in enumerate(PREPROCESSING):
        assert block[f"crops_{i}"].shape[0] == len(batch) and block[f"crops_{i}"].dtype == np.uint8


GOOD_TAR = shard_bytes([{"__key__": f"k{i}", "jpg": VALID[0], "json": b'{"url": "u"}'} for i in range(3)])


@st.composite
def damaged_tar(draw):
    data = bytearray(GOOD_TAR)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data)


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(st.binary(max_size=3000), damaged_tar()))
def test_any_bytes_as_a_shard_give_samples_or_a_shard_error(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "x.tar"
    path.write_bytes(data)
    try:
        got = read_shard(str(path))
    except ShardError as e:
        assert e.reason in ("not_a_tar", "truncated")
        return
    keys = [s["__key__"] for s in got]
    assert len(keys) == len(set(keys))
    for s in got:
        assert isinstance(s["__key__"], str) and all(isinstance(v, bytes) for k, v in s.items()
                                                     if not k.startswith("__"))
        pa.array([s["__key__"]], pa.string())
