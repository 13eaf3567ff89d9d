"""Each converter on a miniature of its dataset's layout, written here; shards are read back with tarfile."""

import csv
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from perceptclip.cli import main
from perceptclip.training.convert import convert, parse_fractions
from perceptclip.training.datasets import make_key
from support.images import image_bytes, make_image


def read_shards(paths) -> dict[str, dict]:
    """{key: {ext: bytes}} over all shards, checking each key's files are adjacent and in order."""
    samples: dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def write_image(path: Path, seed: int, fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image_bytes(make_image(seed, (40, 30)), fmt)
    path.write_bytes(data)
    return data


@pytest.fixture
def koniq(tmp_path):
    root = tmp_path / "koniq"
    originals = {}
    rows = [["image_name", "c1", "MOS", "SD", "MOS_zscore"]]
    for i in range(12):
        name = f"{1000 + i}.jpg"
        originals[name] = write_image(root / "1024x768" / name, i)
        rows.append([name, "3", f"{1 + i * 0.3:.2f}", "0.5", f"{i - 6:.1f}"])
    rows.append(["broken.jpg", "3", "not-a-number", "0.5", "0"])      # line 14: malformed MOS
    rows.append(["absent.jpg", "3", "2.5", "0.5", "0"])              # line 15: listed, image missing
    with open(root / "koniq10k_scores_and_distributions.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root, originals


def test_koniq_writes_original_bytes_and_labels_and_reports_bad_rows(koniq, tmp_path):
    root, originals = koniq
    report = convert("koniq", str(root), str(tmp_path / "out"), shard_size=5)
    assert report.written == 12
    assert [Path(s).name for s in report.shards] == ["all-000000.tar", "all-000001.tar", "all-000002.tar"]
    samples = read_shards(report.shards)
    assert samples["1003"]["jpg"] == originals["1003.jpg"]
    meta = json.loads(samples["1003"]["json"])
    assert meta["label"] == pytest.approx(1.9) and meta["mos_zscore"] == pytest.approx(-3.0)
    assert meta["dataset"] == "koniq10k" and meta["image_name"] == "1003.jpg"
    problems = [str(p) for p in report.problems]
    csv_path = str(root / "koniq10k_scores_and_distributions.csv")
    assert any(p.startswith(f"{csv_path}:14: malformed row") for p in problems), problems
    assert any(p.startswith(f"{csv_path}:15: image not found") for p in problems), problems
    assert len(problems) == 2


def test_conversion_is_deterministic_and_random_splits_partition(koniq, tmp_path):
    root, _ = koniq
    a = convert("koniq", str(root), str(tmp_path / "a"), split="train", seed=3)
    b = convert("koniq", str(root), str(tmp_path / "b"), split="train", seed=3)
    assert Path(a.shards[0]).read_bytes() == Path(b.shards[0]).read_bytes()
    parts = {}
    for split in ("train", "val", "test"):
        r = convert("koniq", str(root), str(tmp_path / "splits"), split=split, seed=3,
                    fractions={"train": 0.5, "val": 0.25, "test": 0.25})
        parts[split] = set(read_shards(r.shards)) if r.shards else set()
        for _key, sample in read_shards(r.shards).items():
            assert json.loads(sample["json"])["split"] == split
    assert parts["train"] and parts["val"] | parts["test"]
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert parts["train"] | parts["val"] | parts["test"] == {str(1000 + i) for i in range(12)}
    other_seed = convert("koniq", str(root), str(tmp_path / "c"), split="train", seed=4,
                         fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    assert set(read_shards(other_seed.shards)) != parts["train"]
    # the split follows the names in the label file, not where the dataset is stored
    import shutil

    moved = shutil.copytree(root, tmp_path / "elsewhere" / "koniq")
    again = convert("koniq", str(moved), str(tmp_path / "moved"), split="train", seed=3,
                    fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    assert set(read_shards(again.shards)) == parts["train"]


def test_lamem_reads_the_chosen_split_and_reports_malformed_lines(tmp_path):
    root = tmp_path / "lamem"
    (root / "splits").mkdir(parents=True)
    originals = {f"img{i:05d}.jpg": write_image(root / "images" / f"img{i:05d}.jpg", i) for i in range(6)}
    (root / "splits" / "train_1.txt").write_text(
        "img00000.jpg 0.81\nimg00001.jpg 0.5\n\nimg00002.jpg\nimg00003.jpg 0.62\nmissing.jpg 0.7\n")
    (root / "splits" / "test_1.txt").write_text("img00004.jpg 0.33\nimg00005.jpg 0.9\n")
    report = convert("lamem", str(root), str(tmp_path / "out"), split="train_1")
    samples = read_shards(report.shards)
    assert sorted(samples) == ["img00000", "img00001", "img00003"]
    assert json.loads(samples["img00000"]["json"])["label"] == pytest.approx(0.81)
    assert samples["img00003"]["jpg"] == originals["img00003.jpg"]
    txt = root / "splits" / "train_1.txt"
    assert [str(p) for p in report.problems] == [
        f"{txt}:4: malformed line: expected 'image_name score', got 'img00002.jpg'",
        f"{txt}:6: image not found: {root / 'images' / 'missing.jpg'}",
    ]
    test = convert("lamem", str(root), str(tmp_path / "out"), split="test_1")
    assert sorted(read_shards(test.shards)) == ["img00004", "img00005"] and Path(test.shards[0]).name == "test_1-000000.tar"
    with pytest.raises(ValueError, match="train_1"):
        convert("lamem", str(root), str(tmp_path / "out"), split="train_9")


def test_emoset_labels_are_class_names_and_bad_entries_name_their_line(tmp_path):
    root = tmp_path / "emoset"
    entries = []
    for i, emotion in enumerate(["awe", "fear", "sadness", "amusement"]):
        rel = f"image/{emotion}/{emotion}_{i:05d}.jpg"
        write_image(root / rel, i)
        entries.append([emotion, rel, f"annotation/{emotion}/{emotion}_{i:05d}.json"])
    entries.append(["boredom", "image/awe/awe_00009.jpg", "annotation/awe/awe_00009.json"])
    entries.append(["awe", "image/awe/gone.jpg", "annotation/awe/gone.json"])
    entries.append(["awe"])
    (root / "val.json").write_text("[\n" + ",\n".join(json.dumps(e) for e in entries) + "\n]\n")
    report = convert("emoset", str(root), str(tmp_path / "out"), split="val")
    samples = read_shards(report.shards)
    assert sorted(samples) == ["amusement_00003", "awe_00000", "fear_00001", "sadness_00002"]
    meta = json.loads(samples["fear_00001"]["json"])
    assert meta["label"] == "fear" and meta["annotation_path"] == "annotation/fear/fear_00001.json"
    problems = [str(p) for p in report.problems]
    val = root / "val.json"
    assert problems[0].startswith(f"{val}:6: unknown emotion 'boredom'")
    assert problems[1].startswith(f"{val}:8: malformed entry")
    assert problems[2] == f"{val}:7: image not found: {root / 'image/awe/gone.jpg'}"


@pytest.mark.parametrize("text, reason", [("[1, 2", "not valid JSON"), ("[" * 100_000, "nested too deeply")])
def test_an_emoset_split_file_that_is_not_json_is_a_clear_error(tmp_path, text, reason):
    root = tmp_path / "emoset"
    root.mkdir()
    (root / "val.json").write_text(text)
    with pytest.raises(ValueError, match=reason):
        convert("emoset", str(root), str(tmp_path / "out"), split="val")


def test_manifest_csv_and_parquet_with_paths_and_urls(tmp_path):
    images = tmp_path / "pics"
    a = write_image(images / "a.jpg", 1)
    b = write_image(images / "sub" / "b.png", 2, fmt="PNG")
    c = write_image(tmp_path / "elsewhere" / "a.jpg", 3)      # same file name, other folder
    noext = images / "raw"
    noext.write_bytes(image_bytes(make_image(4, (20, 20)), "PNG"))
    rows = [("pics/a.jpg", "0.25"), ("pics/sub/b.png", "0.75"), (f"file://{tmp_path}/elsewhere/a.jpg", "3"),
            ("pics/raw", "1"), ("pics/nothing.jpg", "2"), ("", "1"), ("pics/a.jpg", "")]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    report = convert("manifest", str(tmp_path / "m.csv"), str(tmp_path / "out"))
    samples = read_shards(report.shards)
    assert samples["a"]["jpg"] == a and samples["b"]["png"] == b and samples["a-2"]["jpg"] == c
    assert "png" in samples["raw"]                               # format sniffed when the name has no extension
    assert json.loads(samples["a"]["json"])["label"] == 0.25
    assert json.loads(samples["b"]["json"])["label"] == 0.75 and json.loads(samples["a-2"]["json"])["label"] == 3
    m = tmp_path / "m.csv"
    assert [str(p).split(": ")[0] for p in report.problems] == [f"{m}:7", f"{m}:8", f"{m}:6"]

    table = pa.table({"url": [str(images / "a.jpg"), str(images / "sub" / "b.png")], "label": [0.5, 0.75]})
    pq.write_table(table, tmp_path / "m.parquet")
    report = convert("manifest", str(tmp_path / "m.parquet"), str(tmp_path / "pq"))
    samples = read_shards(report.shards)
    assert json.loads(samples["b"]["json"])["label"] == 0.75 and not report.problems


def test_key_and_fraction_parsing():
    assert make_key("image/awe/awe_001.v2.jpg") == "awe_001_v2"
    assert parse_fractions("train=0.8,test=0.2") == {"train": 0.8, "test": 0.2}
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fractions("train=0.8,test=0.3")
    with pytest.raises(ValueError, match="name=number"):
        parse_fractions("train")


def test_cli_convert_prints_problems_and_a_summary(koniq, tmp_path):
    root, _ = koniq
    result = CliRunner().invoke(main, ["convert", "koniq", str(root), "--output", str(tmp_path / "cli"),
                                       "--split", "train", "--fractions", "train=0.5,val=0.5", "--seed", "1"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["split"] == "train" and summary["written"] >= 1 and summary["problems"] >= 1
    assert "malformed row" in result.stderr
    bad = CliRunner().invoke(main, ["convert", "lamem", str(root), "--output", str(tmp_path / "x"), "--split", "nope"])
    assert bad.exit_code != 0 and "train_1" in bad.output


def test_manifest_and_images_on_s3_to_shards_on_s3(s3_server, tmp_path):
    fs = s3_server.filesystem()
    bucket = s3_server.bucket()
    data = {}
    for i in range(3):
        data[f"img{i}.jpg"] = image_bytes(make_image(20 + i, (30, 30)))
        fs.pipe(f"{bucket[5:]}/raw/img{i}.jpg", data[f"img{i}.jpg"])
    fs.pipe(f"{bucket[5:]}/raw/labels.csv", b"path,label\nimg0.jpg,0.1\nimg1.jpg,0.2\nimg9.jpg,0.3\nimg2.jpg,0.4\n")
    report = convert("manifest", f"{bucket}/raw/labels.csv", f"{bucket}/shards")
    assert report.shards == [f"{bucket}/shards/all-000000.tar"] and report.written == 3
    assert [str(p) for p in report.problems] == [f"{bucket}/raw/labels.csv:4: image not found: {bucket}/raw/img9.jpg"]
    local = tmp_path / "all-000000.tar"
    fs.get_file(report.shards[0][5:], str(local))
    samples = read_shards([local])
    assert samples["img2"]["jpg"] == data["img2.jpg"] and json.loads(samples["img2"]["json"])["label"] == 0.4


def write_manifest(folder: Path, labels: list[str], name: str = "labels.csv") -> Path:
    """A manifest of one generated image per label, images in ``folder/pics``; returns the manifest's path."""
    with open(folder / name, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, label in enumerate(labels):
            write_image(folder / "pics" / f"p{i:03d}.jpg", 500 + i)
            w.writerow([f"pics/p{i:03d}.jpg", label])
    return folder / name


def test_a_second_conversion_into_the_same_output_is_refused_naming_the_first_unless_overwrite(tmp_path):
    """Case 3 of "No silent harm": 25 samples as 5 shards of 5, then as one shard of 1000 into the same
    folder, left 45 samples under a glob of that folder."""
    manifest = write_manifest(tmp_path, [f"{i / 25:.2f}" for i in range(25)])
    out = tmp_path / "out"
    first = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--output", str(out), "--shard-size", "5"])
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert len(before) == 5

    again = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--output", str(out)])
    assert again.exit_code != 0
    assert "split 'all'" in again.output and "shard_size 5" in again.output and "--overwrite" in again.output
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before          # nothing touched

    replaced = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--output", str(out), "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["all-000000.tar"]
    assert len(read_shards(sorted(out.glob("*.tar")))) == 25

    # another split beside 'all' would hold samples that 'all' holds too: refused, the first kept as it was
    other = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--output", str(out), "--split", "val"])
    assert other.exit_code != 0
    assert "splits all" in other.output and "two splits" in other.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["all-000000.tar"]


def test_shards_of_the_split_that_no_conversion_recorded_are_never_overwritten(tmp_path):
    manifest = write_manifest(tmp_path, ["0.1", "0.2", "0.3"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "all-000000.tar").write_bytes(b"someone else's shard")
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--output", str(out), *extra])
        assert result.exit_code != 0 and "all-000000.tar" in result.output
    assert (out / "all-000000.tar").read_bytes() == b"someone else's shard"


@pytest.mark.parametrize("output", [".", "pics", "pics/sub"])
def test_convert_refuses_an_output_that_holds_its_inputs_before_writing(tmp_path, output):
    manifest = write_manifest(tmp_path, ["0.1", "0.2", "0.3"])
    (tmp_path / "pics" / "sub").mkdir()
    write_image(tmp_path / "pics" / "sub" / "deep.jpg", 9)
    with open(manifest, "a", newline="") as f:
        csv.writer(f).writerow(["pics/sub/deep.jpg", "0.4"])
    files = sorted(str(p) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["convert", "manifest", str(manifest), "--output", str(tmp_path / output)])
    assert result.exit_code != 0 and "--output" in result.output and "apart" in result.output
    assert sorted(str(p) for p in tmp_path.rglob("*")) == files


def test_a_regression_manifest_reports_labels_that_are_not_finite_numbers(tmp_path):
    """Case 11: nan, inf and text in a manifest of numbers were written as class names."""
    manifest = write_manifest(tmp_path, ["0.5", "nan", "0.25", "inf", "notanumber", "-Infinity", "1"])
    report = convert("manifest", str(manifest), str(tmp_path / "out"))
    samples = read_shards(report.shards)
    assert report.written == 3 and sorted(samples) == ["p000", "p002", "p006"]
    assert [json.loads(samples[k]["json"])["label"] for k in ("p000", "p002", "p006")] == [0.5, 0.25, 1]
    assert [str(p).split(": ", 1)[0] for p in report.problems] == [f"{manifest}:{n}" for n in (3, 5, 6, 7)]
    messages = [p.message for p in report.problems]
    assert "'nan' is not a finite number" in messages[0] and "'inf' is not a finite number" in messages[1]
    assert "'notanumber' is not a number" in messages[2]


def test_a_class_manifest_reports_a_number_among_its_class_names(tmp_path):
    manifest = write_manifest(tmp_path, ["awe", "fear", "3", "sadness"])
    report = convert("manifest", str(manifest), str(tmp_path / "out"))
    samples = read_shards(report.shards)
    assert sorted(samples) == ["p000", "p001", "p003"] and json.loads(samples["p001"]["json"])["label"] == "fear"
    assert [str(p) for p in report.problems] == [
        f"{manifest}:4: label 3 is a number; the manifest's other labels are class names"]
