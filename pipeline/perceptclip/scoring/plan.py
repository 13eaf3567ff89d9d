"""The scoring job's plan: which shards a run scores, decided on the driver before any shard is read.

    list      every shard the input names (``shards.expand_shards``), checked: no two share a name, the
              output holds none of them, the first of each kind but tars opens with the columns asked for;
              a folder, prefix or glob of image files: its virtual shards, recorded under the output
              first (``files.virtual_shards``)
    sample    a dry run's seeded share of them (``sample_fraction``)
    skip      those already committed under the output (one listing of its markers)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from perceptclip.core.storage import check_apart, holds, location
from perceptclip.inputs.files import FileSource, is_image_name, list_images, virtual_shards
from perceptclip.inputs.kinds import check_first_shard
from perceptclip.inputs.shards import EmptyFolderError, expand_shards, shard_name
from perceptclip.output.layout import committed_names

if TYPE_CHECKING:
    from perceptclip.scoring.config import ScoreConfig


@dataclass
class Plan:
    todo: list[str]
    skipped: list[str]
    not_sampled: int = 0       # shards left out by sample_fraction

    @property
    def total(self) -> int:
        return len(self.todo) + len(self.skipped)


def input_shards(cfg: ScoreConfig, options: dict) -> list[str]:
    """Every shard the input names, checked: no two share a name, and the output holds none of them.
    A folder, prefix or glob of image files becomes virtual shards, recorded under the output first."""
    urls, sources = [], []
    for item in cfg.input:
        shards, found = item_shards(item, cfg.input_format, options)
        urls += shards
        sources += found
    urls = list(dict.fromkeys(urls))
    # a folder holding its inputs would mix score tables with them (a later run over the folder reads both)
    check_apart("output", cfg.output, {"input shards": urls, "input folders": [s.root for s in sources]})
    check_outside(cfg.output, [i.strip() for i in cfg.input if not _has_glob(i)] + [s.root for s in sources])
    if sources and cfg.carry_columns:
        raise ValueError("carry_columns: image files have no columns to carry")
    for src in sources:
        urls += virtual_shards(src, cfg.output, cfg.files_per_shard, options)
    by_name: dict[str, str] = {}
    for url in urls:
        other = by_name.setdefault(shard_name(url), url)
        if other != url:
            # outputs are named after shards so users can join them; two shards cannot share one
            raise ValueError(f"input: {other} and {url} would both write {shard_name(url)}.parquet; "
                             f"score them into different outputs")
    check_first_shard(urls, cfg.input_spec(), options)
    return urls


def item_shards(item: str, input_format: str, options: dict) -> tuple[list[str], list[FileSource]]:
    """The shards one input names, or the image files it names (``files``; under ``auto``: a folder or prefix
    that holds image files but no shards, or a glob that matches only image files)."""
    if input_format == "files":
        return [], [list_images(item, options)]
    try:
        urls = expand_shards(item, options)
    except EmptyFolderError as e:
        if input_format != "auto" or location(e.url) != location(item.strip()):
            raise
        try:
            return [], [list_images(item, options)]
        except ValueError:
            raise ValueError(f"{e}, nor image files") from None
    if input_format == "auto" and _has_glob(item) and all(is_image_name(u) for u in urls):
        return [], [list_images(item, options)]
    return urls, []


def check_outside(output: str, folders: list[str]) -> None:
    """Refuse an output inside a folder named as input: the next run over that folder would take the
    score tables written there for input (Parquet files are shards too)."""
    for folder in folders:
        if holds(folder, output):
            raise ValueError(f"output: {output} lies inside the input folder {folder}; a later run over the folder "
                             f"would read the score tables as input: write the output to a folder apart")


def _has_glob(item: str) -> bool:
    return any(c in item.split("://", 1)[-1] for c in "*?[")


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
