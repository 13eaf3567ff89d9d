"""What a run prints for a person (perceptclip.core.console): the progress bar on a terminal, progress lines
in a log, messages always; Ray's own output kept off stderr; a built-in model on a machine that cannot
reach the hub failing at once. The console's logic runs on a fake stream and a fake clock; the commands
themselves run in subprocesses, their stderr captured as a log would be."""

import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from perceptclip.core.console import Console, ShardTally, Tally, clock_time
from perceptclip.output.commit import ShardResult
from perceptclip.output.runs import RunProgress, RunSummary
from support.images import image_bytes, make_image
from support.processes import ray_tmpdir_left_by_a_dead_cluster
from support.shards import write_labelled_shard

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-c", "from perceptclip.cli import main; main()"]


class Stream(io.StringIO):
    """stderr as a test sees it: a terminal or not."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def console(tty: bool, **kwargs) -> tuple[Console, Stream, Clock]:
    stream, clock = Stream(tty), Clock()
    return Console(stream, clock=clock, **kwargs), stream, clock


# --- the console's logic --------------------------------------------------------------------------------

def test_a_log_gets_a_line_at_the_first_shard_then_one_per_interval_and_the_last():
    con, out, clock = console(tty=False, interval=30)
    con.show(Tally(0, 4))
    clock.now += 10
    con.tick()
    assert out.getvalue() == ""                              # start-up: nothing to say yet
    clock.now += 20
    con.tick()
    assert out.getvalue() == "[0/4] shards, 0 images, 0:30 elapsed\n"     # still alive, at the interval
    clock.now += 10
    con.show(Tally(1, 4, items=100, errors=2))               # the first shard: printed at once
    last = out.getvalue().splitlines()[-1]
    assert last == "[1/4] shards, 100 images (2 errors), 2.5 images/s, 0:40 elapsed"     # no pace yet: no ETA
    clock.now += 5
    con.show(Tally(2, 4, items=300, errors=2))               # the second: not before the interval
    con.tick()
    assert len(out.getvalue().splitlines()) == 2
    clock.now += 25
    con.tick()                                              # 30 s after the last line
    # 200 images and 1 shard in the 30 s since the first shard: 6.7 images/s, 30 s a shard left
    last = out.getvalue().splitlines()[-1]
    assert last == "[2/4] shards, 300 images (2 errors), 6.7 images/s, 1:10 elapsed, ETA 1:00"
    con("[3/4] broken.tar: FAILED truncated: unexpected end of data")     # a message: always, whole
    con.show(Tally(4, 4, items=400, errors=2, failed=1))
    clock.now += 3                                          # shutting down: the clock stopped when all were done
    con.close()
    lines = out.getvalue().splitlines()
    assert lines[-2] == "[3/4] broken.tar: FAILED truncated: unexpected end of data"
    # the rate to the moment the last shard was done: 300 images in the 30 s after the first shard
    assert lines[-1] == "[4/4] shards, 400 images (2 errors), 1 failed, 10.0 images/s, 1:10 elapsed"
    assert len(lines) == 5


def test_the_last_line_is_not_repeated_and_nothing_is_printed_for_a_run_that_never_started():
    con, out, clock = console(tty=False)
    con.show(Tally(0, 2))
    clock.now += 9
    con.show(Tally(2, 2, items=32))                          # both shards at once: the first line is the last
    con.close()
    assert out.getvalue() == "[2/2] shards, 32 images, 3.6 images/s, 0:09 elapsed\n"
    con, out, _ = console(tty=False)
    con("model 'x' could not be fetched")                     # failed before any progress
    con.close()
    assert out.getvalue() == "model 'x' could not be fetched\n"


def test_a_terminal_gets_one_bar_redrawn_in_place_with_messages_above_it(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")        # the bar is cut to the terminal's width: one wide enough
    con, out, clock = console(tty=True)
    con.show(Tally(0, 4))
    clock.now += 10
    con.show(Tally(1, 4, items=64))
    con("[2/4] broken.tar: FAILED missing")
    clock.now += 10
    con.show(Tally(4, 4, items=256, failed=1))
    con.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 2       # the message and the bar's final state
    message, final = text.split("\n")[:2]
    assert message.endswith("\r\x1b[K[2/4] broken.tar: FAILED missing")  # the bar cleared, the line, ...
    frames = final.split("\r\x1b[K")                          # ... and the bar drawn again below it
    assert frames[-1].startswith("█" * 24 + " 4/4 shards, 256 images, 1 failed, ")
    assert frames[1].startswith("██████" + "░" * 18 + " 1/4 shards, 64 images, ")
    assert "ETA" not in frames[-1] and "0:20 elapsed" in frames[-1]


def test_verbose_prints_lines_even_on_a_terminal():
    con, out, clock = console(tty=True, verbose=True)
    con.show(Tally(1, 2, items=5))
    con.close()
    assert "\r" not in out.getvalue() and out.getvalue().startswith("[1/2] shards, 5 images")


def test_epochs_have_no_items_and_show_their_note():
    con, out, clock = console(tty=False, unit="epochs", item=None)
    con.show(Tally(0, 3))
    clock.now += 60
    con.show(Tally(1, 3, note="best srcc 0.5000 (epoch 0)"))
    assert out.getvalue() == "[1/3] epochs, best srcc 0.5000 (epoch 0), 1:00 elapsed\n"
    clock.now += 30
    con.tick()
    con.show(Tally(2, 3))
    con.tick()
    clock.now += 30
    con.tick()                                  # one epoch in the minute since the first: 1:00 for the last
    assert out.getvalue().splitlines()[-1] == "[2/3] epochs, 2:00 elapsed, ETA 1:00"
    assert clock_time(3725) == "1:02:05" and clock_time(59.9) == "0:59"
    resumed, out, clock = console(tty=False, unit="epochs", item=None)
    resumed.show(Tally(5, 15))                               # done by an earlier run: not this run's pace
    assert out.getvalue() == ""
    clock.now += 100
    resumed.show(Tally(6, 15))
    assert out.getvalue() == "[6/15] epochs, 1:40 elapsed\n"


def test_run_progress_says_every_shard_and_on_a_console_only_the_failed_ones():
    def summary():
        return RunSummary(run_id="r", output="o", started_at="t", models=[], storage={})

    results = [ShardResult(shard="/d/a.tar", rows=3, ok=2, errors=Counter(corrupt=1)),
               ShardResult(shard="/d/b.tar", failed="truncated: cut short")]
    said = []
    RunProgress(summary(), 2, time.perf_counter(), said.append)(results)
    assert [line.split(" (")[0] for line in said] == ["[1/2] a: 3 rows, 1 errors",
                                                      "[2/2] b: FAILED truncated: cut short"]

    con, out, clock = console(tty=False)
    tally = ShardTally(con, 2)
    report = RunProgress(summary(), 2, time.perf_counter(), tally.say, show=tally)
    clock.now += 3
    tally.block(["ok", "error", "ok", "shard"])                # a shard's control row is not an image
    clock.now += 3
    report(results)
    con.close()
    assert out.getvalue().splitlines() == [
        "[1/2] shards, 3 images (1 error), 0.5 images/s, 0:06 elapsed",
        "[2/2] b: FAILED truncated: cut short",
        "[2/2] shards, 3 images (1 error), 1 failed, 0.5 images/s, 0:06 elapsed"]


def test_ray_output_goes_to_a_file_and_ours_still_to_stderr(tmp_path):
    """While Ray runs in a process, what its C++ core and other libraries write on stderr goes to a file and
    our warnings and messages still to stderr; verbose, everything stays on stderr and there is no file."""
    script = textwrap.dedent("""
        import logging, os, sys
        from perceptclip.core.console import Console, ray_output
        logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(message)s")
        console = Console(sys.stderr, verbose=sys.argv[1] == "verbose")
        with console, ray_output(console) as output:
            os.write(2, b"core_worker.cc: as the C++ core writes it\\n")
            print("a library's line", file=sys.stderr)
            logging.getLogger("perceptclip.x").warning("our own warning")
            console("our own message")
        print(output.path)
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def start(mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", script, mode], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    quiet, verbose = start("quiet"), start("verbose")         # side by side: each spends a second importing Ray
    quiet_out, quiet_err = quiet.communicate(timeout=120)
    verbose_out, verbose_err = verbose.communicate(timeout=120)
    assert quiet.returncode == 0, quiet_err
    assert quiet_err.splitlines() == ["WARNING our own warning", "our own message"]
    captured = Path(quiet_out.strip()).read_text()
    assert "core_worker.cc: as the C++ core writes it" in captured and "a library's line" in captured

    assert verbose.returncode == 0, verbose_err
    assert "core_worker.cc" in verbose_err and "our own message" in verbose_err
    assert verbose_out.strip() == "None"


@pytest.mark.slow
def test_a_read_only_block_is_scored_without_a_warning(iqa_artifact):
    """Ray Data hands a block to the model actor as a read-only view of its object store: scoring it
    makes no "NumPy array is not writable" warning (PyTorch warns once a process: a process of its own,
    which imports torch and open_clip; hence slow)."""
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from perceptclip.model.clip_lora import import_open_clip_for_vision_towers
        import_open_clip_for_vision_towers()          # as the model actor starts: open_clip without transformers or timm
        sys.path.insert(0, {str(REPO / "tests")!r})
        from support.images import image_bytes, make_image
        from perceptclip.scoring.decode import decode_samples
        from perceptclip.model.reference import ModelSpec, distinct_preprocessing
        from perceptclip.scoring.actor import score_block
        from perceptclip.model.scorer import Scorer

        spec = ModelSpec.resolve({iqa_artifact!r})
        preprocessing, index = distinct_preprocessing([spec])
        samples = [{{"__key__": str(i), "jpg": image_bytes(make_image(i, (40, 48)))}} for i in range(3)]
        samples.insert(1, {{"__key__": "none", "json": b"{{}}"}})
        batch = decode_samples("s.tar", samples, 0, preprocessing)
        for column in batch.values():
            column.setflags(write=False)
        scorer = Scorer.load(spec.ref, device="cpu")
        table = score_block(batch, [scorer], index)
        expected = scorer.score(np.array(batch["crops_0"])[[0, 2, 3]])[:, 0]
        assert table["iqa"].to_pylist()[1] is None
        assert np.allclose([table["iqa"][i].as_py() for i in (0, 2, 3)], expected)
    """)
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", script], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- offline -----------------------------------------------------------------------------------------------

def test_a_builtin_model_on_a_machine_that_cannot_reach_the_hub_fails_at_once(tmp_path):
    with socket.socket() as s:            # a port nothing listens on: the hub "cannot be reached", no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=str(tmp_path / "hf"))
    (tmp_path / "x.tar").write_bytes(b"")       # an input that is there: the model is what fails
    started = time.monotonic()
    proc = subprocess.run([*CLI, "score", "--input", str(tmp_path / "x.tar"), "--output", str(tmp_path / "out"),
                           "--model", "perceptclip-iqa"], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 10
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr                       # the error and nothing else: no retry warnings
    assert lines[0].startswith("Error: model 'perceptclip-iqa' is the released checkpoint perceptCLIP_IQA.pth")
    assert "ConnectError" in lines[0] and "perceptclip import-official perceptCLIP_IQA.pth --task iqa" in lines[0]


# --- the commands, as a log sees them (slow: each starts a Ray cluster of its own) ---------------------------

def ray_lines_left(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if re.search(r"core_worker|logging_progress|Running Dataset|not writable|Warning|WARNING| INFO |"
                         r"\(\w+ pid=|Token authentication", line)]


@pytest.mark.slow
def test_a_scoring_run_prints_our_lines_only(iqa_artifact, tmp_path):
    """``perceptclip score`` with a local cluster of its own, on a machine where a dead cluster's address
    file is left in Ray's folder: the run starts its own (``num_cpus`` is a local cluster's setting)."""
    for shard in range(2):
        write_labelled_shard(tmp_path / f"in/s-{shard}.tar",
                             [(f"{shard}{i}", image_bytes(make_image(i, (48, 40))), {}) for i in range(5)])
    config = tmp_path / "score.yaml"
    config.write_text("num_cpus: 2\nreader_memory_mb: 256\nblock_rows: 2\n")
    ray_tmp = ray_tmpdir_left_by_a_dead_cluster()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp}
    try:
        with subprocess.Popen([*CLI, "score", "--config", str(config), "--input", str(tmp_path / "in/s-{0..1}.tar"),
                               "--output", str(tmp_path / "out"), "--model", iqa_artifact], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            stdout, stderr = proc.communicate(timeout=300)
        # what Ray printed on the driver's stderr is in the Ray session's logs
        kept = [p.read_text() for p in Path(ray_tmp, "ray").glob(f"session_*/logs/perceptclip-driver-{proc.pid}.err")]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["samples"]["total"] == 10
    lines = stderr.splitlines()
    assert not ray_lines_left(stderr), stderr[-3000:]
    assert lines[0] == "2 shards: 2 to score, 0 already committed"
    assert all(re.fullmatch(r"\[[0-2]/2\] shards, .* elapsed(, ETA .*)?", line) for line in lines[1:]), lines
    assert lines[-1].startswith("[2/2] shards, 10 images, ")
    assert kept and "core_worker.cc" in kept[0]


@pytest.mark.slow
def test_a_training_run_prints_one_line_an_epoch(smoke_training):
    """``perceptclip train`` with a local cluster of its own (the session's ``smoke_training``, 2 epochs):
    its summary on stdout, on stderr one line an epoch, the tally (also while the workers start, before
    any epoch: ``[0/2] epochs, 0:30 elapsed``) and none of Ray's own lines."""
    proc = smoke_training["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["epochs"] == 2
    assert not ray_lines_left(proc.stderr), proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert [line.split(":")[0] for line in lines if " epoch " in line] == ["[1/2] epoch 0", "[2/2] epoch 1"]
    assert all(re.fullmatch(r"\[[12]/2\] epoch \d: srcc .*|\[[012]/2\] epochs, .* elapsed.*", line) for line in lines), lines
