"""The README's first command, ``scripts/demo.sh``, as a newcomer runs it: online, the built-in name is
downloaded from the hub (here a server on loopback that speaks the hub's download protocol, through
``HF_ENDPOINT``, serving a release-layout checkpoint made by the test), converted once, and scores the
demo shards; offline, it says so in one line and shows the job with the built-in debug model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from support.release import write_release

pytestmark = pytest.mark.slow          # each run of the demo scores on a Ray cluster

ROOT = Path(__file__).resolve().parents[1]
REPO, FILE = "PerceptCLIP/PerceptCLIP_IQA", "perceptCLIP_IQA.pth"


class HubServer:
    """The hub's file download protocol for one file: ``HEAD``/``GET /{repo}/resolve/{revision}/{file}``
    answered with the commit, the ETag and the size; every request is logged."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, body: bool):
                server.requests.append(f"{self.command} {self.path}")
                data = server.files.get(self.path.split("?", 1)[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", "1" * 40)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def demo(tmp_path, ray_local):
    """A folder laid out as the repository for ``scripts/demo.sh`` (its scripts and the environment
    linked), and the environment a newcomer's shell has: no offline switch, the test's Ray cluster."""
    (tmp_path / "scripts").mkdir()
    for name in ("demo.sh", "make_demo_data.py"):
        os.symlink(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    os.symlink(ROOT / ".venv", tmp_path / ".venv")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf"), PERCEPTCLIP_CACHE=str(tmp_path / "pc"),
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    return tmp_path, env


def run_demo(folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(folder / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                          timeout=600)


def table_models(folder: Path) -> list[dict]:
    table = next((folder / "demo-output").glob("scores-*/demo-000000.parquet"))
    return json.loads(pq.read_schema(table).metadata[b"perceptclip"])["models"]


def test_online_the_builtin_model_is_downloaded_converted_once_and_scores_the_demo(demo, tmp_path):
    folder, env = demo
    _, _, release = write_release("iqa", 1, tmp_path)
    hub = HubServer({f"/{REPO}/resolve/main/{FILE}": release.read_bytes()})
    try:
        env["HF_ENDPOINT"] = hub.url
        first = run_demo(folder, env)
        assert first.returncode == 0, first.stderr[-3000:]
        assert "iqa" in first.stdout and "debug" not in first.stderr
        models = table_models(folder)
        assert [m["ref"] for m in models] == ["perceptclip-iqa"]
        assert models[0]["provenance"]["source"] == f"huggingface.co/{REPO}/{FILE}"
        assert any(r.startswith(f"GET /{REPO}/resolve/main/{FILE}") for r in hub.requests)

        hub.requests.clear()                            # converted once: the next run resolves from the cache
        again = subprocess.run([sys.executable, "-c", "from perceptclip.model.reference import resolve_model; "
                                "print(resolve_model('perceptclip-iqa'))"], env=env, capture_output=True, text=True)
        assert again.returncode == 0 and again.stdout.startswith(str(folder / "pc")), again.stderr[-2000:]
        assert not any(r.startswith("GET") for r in hub.requests)
    finally:
        hub.close()


def test_offline_the_demo_says_so_in_one_line_and_runs_with_the_debug_model(demo):
    folder, env = demo
    env["HF_HUB_OFFLINE"] = "1"
    result = run_demo(folder, env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("demo: ")]
    assert result.stderr.startswith("demo: the released weights cannot be fetched here")
    assert "debug model" in lines[0] and "perceptclip import-official" in lines[0]
    assert result.stderr.rstrip().splitlines()[-1].startswith("demo: scored with the debug model")
    assert "iqa" in result.stdout                                       # the quantiles
    models = table_models(folder)
    assert models[0]["ref"] == "perceptclip-debug"
    assert models[0]["provenance"]["note"] == "random weights: its scores mean nothing"

    env["MODEL"] = "perceptclip-iqa"                    # named: it fails offline, as the command itself does
    named = run_demo(folder, env)
    assert named.returncode != 0 and "could not be fetched" in named.stderr
