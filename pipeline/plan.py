"""The scoring job's plan: which shards a run scores, decided on the driver before any shard is read.

    list      every shard the input names (``shards.expand_shards``), checked: no two share a name, the
              output holds none of them, the first of each kind but tars opens with the columns asked for
    sample    a dry run's seeded share of them (``sample_fraction``)
    skip      those already committed under the output (one listing of its markers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from perceptclip.commit import committed_names
from perceptclip.inputs import check_first_shard
from perceptclip.shards import expand_shards, shard_name
from perceptclip.storage import check_apart

if TYPE_CHECKING:
    from perceptclip.score import ScoreConfig


@dataclass
class Plan:
    todo: list[str]
    skipped: list[str]
    not_sampled: int = 0       # shards left out by sample_fraction

    @property
    def total(self) -> int:
        return len(self.todo) + len(self.skipped)


def input_shards(cfg: ScoreConfig, options: dict) -> list[str]:
    """Every shard the input names, checked: no two share a name, and the output holds none of them."""
    urls = expand_shards(cfg.input, options)
    by_name: dict[str, str] = {}
    for url in urls:
        other = by_name.setdefault(shard_name(url), url)
        if other != url:
            # outputs are named after shards so users can join them; two shards cannot share one
            raise ValueError(f"input: {other} and {url} would both write {shard_name(url)}.parquet; "
                             f"score them into different outputs")
    # a folder holding its inputs would mix score tables with them (a later run over the folder reads both)
    check_apart("output", cfg.output, {"input shards": urls})
    check_first_shard(urls, cfg.input_spec(), options)
    return urls


def plan_shards(cfg: ScoreConfig, options: dict) -> Plan:
    """The shards to score and those already committed under the output, which are skipped unread."""
    urls = input_shards(cfg, options)
    listed = len(urls)
    if cfg.sample_fraction is not None:
        urls = sample_shards(urls, cfg.sample_fraction, cfg.sample_seed)
    done = set() if cfg.overwrite else committed_names(cfg.output, options)
    return Plan(todo=[u for u in urls if shard_name(u) not in done],
                skipped=[u for u in urls if shard_name(u) in done], not_sampled=listed - len(urls))


def sample_shards(urls: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded random share of ``urls`` (at least one), in listing order. Drawn by shard name, so the
    same listing and seed give the same sample wherever the shards live and whatever ran before."""
    import random

    count = max(1, round(fraction * len(urls)))
    chosen = set(random.Random(seed).sample(sorted(shard_name(u) for u in urls), count))
    return [u for u in urls if shard_name(u) in chosen]
