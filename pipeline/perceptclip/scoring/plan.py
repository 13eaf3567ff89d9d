"""The scoring job's plan: which shards a run scores, decided on the driver before any shard is read.

    list      every shard the input names (``shards.expand_shards``), checked: the first of each kind but
              tars opens with the columns asked for; a folder, prefix or glob of image files: its files
    open      the output (``output.destination``): apart from every input (a table's images too), and
              made with the same models and input settings, or refused, before anything is written
    record    the virtual shards of image files, under the output (``files.virtual_shards``); no two
              shards may share a name
    sample    a dry run's seeded share of them (``sample_fraction``)
    skip      those already committed under the output (one listing of its markers)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from perceptclip.core.storage import check_protocols, filesystem, location, protocol
from perceptclip.inputs.files import FileSource, is_image_name, list_images, virtual_shards
from perceptclip.inputs.kinds import check_first_shard, input_kind
from perceptclip.inputs.shards import EmptyFolderError, expand_shards, has_glob, shard_name
from perceptclip.inputs.tables import TableReader
from perceptclip.output.destination import Destination, OutputRefused
from perceptclip.output.layout import committed_names, listings_dir, read_markers

if TYPE_CHECKING:
    from perceptclip.model.reference import ModelSpec
    from perceptclip.scoring.config import ScoreConfig


@dataclass
class Plan:
    todo: list[str]
    skipped: list[str]
    not_sampled: int = 0       # shards left out by sample_fraction

    @property
    def total(self) -> int:
        return len(self.todo) + len(self.skipped)


@dataclass
class Inputs:
    """What the input names: shard URLs, and sources of image files (virtual shards not yet recorded)."""

    urls: list[str] = field(default_factory=list)
    sources: list[FileSource] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)      # inputs named as a folder or prefix


def list_inputs(cfg: ScoreConfig, options: dict) -> Inputs:
    """Every shard and source of image files the input names; reads nothing but listings and the first
    shard of each kind's columns, writes nothing."""
    found = Inputs()
    for item in cfg.input:
        shards, sources = item_shards(item, cfg.input_kind, options)
        found.urls += shards
        found.sources += sources
        if not has_glob(item):
            found.folders.append(item.strip())
    found.urls = list(dict.fromkeys(found.urls))
    check_protocols([item.strip() for item in cfg.input])
    if found.urls and not found.sources and not any(protocol(u) != "file" or os.path.exists(u) for u in found.urls):
        # every input is a local path, and none is there: a typo, not shards that failed
        raise ValueError(f"input: nothing there: {', '.join(i.strip() for i in cfg.input)}")
    check_names(found.urls)
    if found.sources and cfg.carry_columns:
        raise ValueError("carry_columns: image files have no columns to carry")
    check_first_shard(found.urls, cfg.input_spec(), options)
    return found


def check_names(urls: list[str]) -> None:
    """Score tables are named after their shards, so users can join them: two shards cannot share a name."""
    by_name: dict[str, str] = {}
    for url in urls:
        other = by_name.setdefault(shard_name(url), url)
        if other != url:
            raise ValueError(f"input: {other} and {url} would both write {shard_name(url)}.parquet; "
                             f"score them into different outputs")


def open_output(cfg: ScoreConfig, found: Inputs, models: list[ModelSpec], options: dict) -> Destination:
    """The output, checked against the inputs and against what an earlier run into it was made with."""
    spec = cfg.input_spec()
    settings = score_settings(cfg, models)
    kinds = sorted({input_kind(u, spec) for u in found.urls} | ({"files"} if found.sources else set()))
    dest = Destination.open(
        cfg.output, "score", options, option="output", overwrite=cfg.overwrite, compare_inputs=False,
        settings=settings, earlier=lambda: legacy_settings(cfg.output, settings, options),
        made_from=[{"url": _as_given(item), "kind": cfg.input_kind if cfg.input_kind != "auto" else "/".join(kinds)}
                   for item in cfg.input],
        inputs={"input shards": found.urls, "input folders": [s.root for s in found.sources] + found.folders})
    tables = [u for u in found.urls if input_kind(u, spec) == "table"]
    check_table_images(cfg.output, tables, spec, options)
    check_own_columns(next((u for u in found.urls if input_kind(u, spec) == "parquet"), None), models, options)
    return dest


def check_own_columns(url: str | None, models: list[ModelSpec], options: dict) -> None:
    """Refuse a Parquet input (the first) that has a column of its own named like a score column: its
    curated rows (``filter``) would hold two columns of one name."""
    if url is None:
        return
    import pyarrow.parquet as pq

    try:
        fs, path = filesystem(url, options)
        with fs.open(path, "rb") as f:
            names = set(pq.read_schema(f).names)
    except Exception:
        return                          # an unreadable file is that shard's failure, reported with the others
    for model in models:
        for column in model.columns:
            if column in names:
                raise ValueError(f"input: {url} has a column of its own named {column!r}, as {model.name}'s scores "
                                 f"would be; name the model NAME=MODEL, e.g. --model {column}_score="
                                 f"{model.given or model.ref}")


def score_settings(cfg: ScoreConfig, models: list[ModelSpec]) -> dict:
    """What decides a score table's columns and values: each model's weights and head, and how the input
    is read. A rerun into the output must match them (or ``--overwrite``)."""
    return {"models": {m.name: {"weights": m.meta.weights_sha256, "head": m.head} for m in models},
            "input": {"kind": cfg.input_kind, "image_column": cfg.image_column, "key_column": cfg.key_column,
                      "carry_columns": list(cfg.carry_columns)}}


def legacy_settings(output: str, settings: dict, options: dict) -> dict | None:
    """An output scored before outputs had records: the models its markers name, the rest as now."""
    models: dict[str, dict] = {}
    for marker in read_markers(output, options):
        for m in marker.get("models", []):
            name = m.get("name")
            models.setdefault(name, {"weights": m.get("weights_sha256"),
                                     "head": settings["models"].get(name, {}).get("head")})
    return {**settings, "models": models} if models else None


def check_table_images(output: str, tables: list[str], spec, options: dict) -> None:
    """Refuse an output that holds images a table of locations names (scores and images would mix), and
    images on a store whose filesystem library is not installed."""
    if not tables:
        return
    outer = location(output).rstrip("/") + "/"
    seen: dict[str, bool] = {}
    protocols: dict[str, str] = {}
    for url in tables:
        try:
            reader = TableReader(url, spec, options)
        except Exception:
            continue                    # an unreadable table is that shard's failure, reported with the others
        with reader:
            for loc in reader.locations():
                folder = loc.rsplit("/", 1)[0] if "/" in loc else os.getcwd()
                if folder not in seen:
                    seen[folder] = (location(folder).rstrip("/") + "/").startswith(outer)
                    protocols.setdefault(protocol(folder), loc)
                if seen[folder]:
                    raise OutputRefused(f"output: {output} holds images that the table {url} names ({loc}); "
                                        f"write the output to a folder apart from its inputs")
    check_protocols(protocols.values())       # the images' stores, not only the tables'



def plan_shards(cfg: ScoreConfig, options: dict, found: Inputs | None = None) -> Plan:
    """The shards to score and those already committed under the output, which are skipped unread. The
    virtual shards of image files are recorded under the output first: the job calls this once the
    output is open (``open_output``). ``found``: the inputs listed then (default: listed now)."""
    found = found if found is not None else list_inputs(cfg, options)
    urls = list(found.urls)
    for src in found.sources:
        urls += virtual_shards(src, listings_dir(cfg.output), cfg.files_per_shard, options)
    check_names(urls)
    listed = len(urls)
    if cfg.sample_fraction is not None:
        urls = sample_shards(urls, cfg.sample_fraction, cfg.sample_seed)
    done = set() if cfg.overwrite else committed_names(cfg.output, options)
    return Plan(todo=[u for u in urls if shard_name(u) not in done],
                skipped=[u for u in urls if shard_name(u) in done], not_sampled=listed - len(urls))


def item_shards(item: str, input_kind: str, options: dict) -> tuple[list[str], list[FileSource]]:
    """The shards one input names, or the image files it names (``files``; under ``auto``: a folder or prefix
    that holds image files but no shards, or a glob that matches only image files)."""
    if input_kind == "files":
        return [], [list_images(item, options)]
    try:
        urls = expand_shards(item, options)
    except EmptyFolderError as e:
        if input_kind != "auto" or location(e.url) != location(item.strip()):
            raise
        try:
            return [], [list_images(item, options)]
        except ValueError:
            raise ValueError(f"{e}, nor image files") from None
    if input_kind == "auto" and has_glob(item) and all(is_image_name(u) for u in urls):
        return [], [list_images(item, options)]
    return urls, []


def _as_given(item: str) -> str:
    """An input as the record keeps it: a local path made absolute, so it names the same place from anywhere."""
    item = item.strip()
    return item if "://" in item or has_glob(item) else os.path.abspath(item)


def sample_shards(urls: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded random share of ``urls`` (at least one), in listing order. Drawn by shard name, so the
    same listing and seed give the same sample wherever the shards live and whatever ran before."""
    import random

    count = max(1, round(fraction * len(urls)))
    chosen = set(random.Random(seed).sample(sorted(shard_name(u) for u in urls), count))
    return [u for u in urls if shard_name(u) in chosen]
