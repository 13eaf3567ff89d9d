"""The Ray cluster a job of the command line runs on, for the time it runs (``ray_cluster``).

Ray already connected in this process (a caller's ``ray.init``): the job uses it as it is and leaves it
running. Else the job joins ``--address``, else ``RAY_ADDRESS``, else it starts a local cluster of its
own and stops it at the end. Never another one: a bare ``ray.init()`` would also join the cluster that
the last ``ray start`` on this machine named in Ray's address file, even one long dead whose file a
killed process left behind, and fail (or run this job on a cluster that is not the documented one).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from perceptclip.core.console import Console, ray_output


def cluster_address(address: str | None) -> str:
    """Where a job started here goes: ``address``, else ``RAY_ADDRESS``, else ``"local"`` (a new local
    cluster, as ``ray.init(address="local")`` starts one)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


@contextmanager
def ray_cluster(address: str | None, console: Console | None, **init: object) -> Iterator[bool]:
    """Ray, connected for the time of the ``with`` block (see the module); Ray's own output goes where
    ``ray_output`` sends it. ``init``: more ``ray.init`` settings (``num_cpus`` sizes a local cluster:
    the caller's config refuses it for a cluster joined). Yields whether the job runs on a local cluster
    that it started itself, one that cannot grow."""
    import ray

    target = cluster_address(address)
    started = not ray.is_initialized()
    with ray_output(console) as output:
        if started:
            ray.init(address=target, log_to_driver=output.shown, **init)
        output.keep_in_session()
        try:
            yield started and target == "local"
        finally:
            if started:
                ray.shutdown()
