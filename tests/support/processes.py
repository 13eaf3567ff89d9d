"""Processes that a test, or Ray for it, started: a node's workers by role, the members of a process
session, and ending a session (what a test kills, it finds here)."""

from __future__ import annotations

import os
import signal
import subprocess

import psutil


def raylet_pid(node=None) -> int:
    """The raylet of ``node`` (a ``ray._private.node.Node``, as ``ray.cluster_utils.Cluster`` gives
    them); by default the node that this process's ``ray.init`` started."""
    if node is None:
        import ray

        node = ray._private.worker._global_node
    return node.all_processes["raylet"][0].process.pid


def worker_pids(raylet: int, role: str) -> list[int]:
    """The live worker processes of one raylet (one node) whose command line names ``role``
    (``ModelActor``, ``RayTrainWorker``). Only the raylet's own children: a process that a worker forks
    carries the worker's title for a while. A killed worker stays a zombie until the raylet reaps it:
    not counted."""
    pids = []
    for p in psutil.Process(raylet).children():
        try:
            if role in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.NoSuchProcess:        # gone, or a zombie (psutil.ZombieProcess is one)
            pass
    return pids


def session_pids(session: int) -> dict[int, str]:
    """The live processes of a process session, with their command lines."""
    found = {}
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if os.getsid(p.pid) == session and p.info["status"] != psutil.STATUS_ZOMBIE:
                found[p.pid] = " ".join(p.info["cmdline"] or [])
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return found


def kill_session(proc: subprocess.Popen) -> None:
    """End what a test started with ``start_new_session=True``: the process and every process still in
    its session (Ray's)."""
    for _ in range(3):      # a process may start another while the first ones are being killed
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    proc.wait()


def ray_tmpdir_left_by_a_dead_cluster() -> str:
    """A folder for ``RAY_TMPDIR`` as a killed ``ray start`` (or ``ray.cluster_utils.Cluster``) leaves
    Ray's: its address file names a cluster that is gone, which a bare ``ray.init()`` would try to join.
    Short, under /tmp: Ray's socket paths beneath it must stay within 107 bytes. The caller removes it."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="pc-ray-", dir="/tmp")
    os.makedirs(os.path.join(folder, "ray"))
    with open(os.path.join(folder, "ray", "ray_current_cluster"), "w") as f:
        f.write("127.0.0.1:9\n")        # the discard port: nothing of Ray's listens there
    return folder


# A driver script run by a test reports to it in lines "WORD {json}" on its stdout, where Ray may print
# lines of its own from another thread: each report is one write, on a line of its own, so Ray's output
# never lands inside it.

def report(word: str, value) -> None:
    """Print ``WORD {json}`` on a line of its own, in one write (for a driver script run by a test)."""
    import json
    import sys

    sys.stdout.write(f"\n{word} {json.dumps(value)}\n")
    sys.stdout.flush()


def reported(text: str, word: str):
    """The value of the first ``WORD {json}`` line of ``text`` (a driver script's stdout), or None."""
    import json

    lines = [line for line in text.splitlines() if line.startswith(word + " ")]
    return json.loads(lines[0].split(" ", 1)[1]) if lines else None
