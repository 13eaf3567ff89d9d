"""The scoring job's configuration: what ``perceptclip score``, ``configs/score.yaml`` and
``perceptclip.score(...)`` set, checked once when a run starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from perceptclip.core.cluster import cluster_address
from perceptclip.core.config import Config, require, setting
from perceptclip.core.schema import FILLED_BY_INPUT, RESERVED_COLUMNS
from perceptclip.core.storage import StorageConfig
from perceptclip.inputs.base import InputSpec
from perceptclip.inputs.kinds import INPUT_KINDS
from perceptclip.model.preprocess import DEFAULT_MAX_PIXELS

DECODE_MODES = ("cpu", "device")


@dataclass
class ScoreConfig(Config):
    """Everything the scoring job reads; ``configs/score.yaml`` documents each field."""

    input: list[str] = field(default_factory=list)
    output: str = ""
    models: list[str] = field(default_factory=list)
    address: str | None = None           # None: RAY_ADDRESS if set, else a local cluster
    overwrite: bool = False
    batch_size: int = setting(64, minimum=1)          # images per actor call; model calls: model_batch
    block_rows: int = setting(64, minimum=1)          # decoded images per block sent to the model actors
    batches_in_flight: int = setting(4, minimum=1)    # blocks sent to each model actor at a time
    decode: str = setting("cpu", choices=DECODE_MODES)  # "cpu": PIL in the read tasks; "device": on the model actors' device
    actors: int | None = setting(None, minimum=1)     # model actor pool size; None: one per GPU, else 1
    gpus_per_actor: float | None = setting(None, minimum=0)   # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = setting(1.0, minimum=0)
    cpus_per_reader: float = setting(1.0, minimum=0.01)       # CPUs reserved by each read + decode task
    reader_memory_mb: int = setting(1024, minimum=1)  # memory reserved by each read + decode task (it holds a shard)
    torch_threads: int | None = setting(None, minimum=1)      # None: the actor's CPU share, at least 1
    num_cpus: int | None = setting(None, minimum=1)   # local cluster only
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, minimum=1)  # larger images become error rows (too_large)
    sample_fraction: float | None = setting(None, above=0, maximum=1)   # dry run: score this seeded share of the shards
    sample_seed: int = setting(0, minimum=0)
    model_batch: int | None = setting(None, minimum=0)   # crops per model call; None: canonical; 0: unpadded
    input_kind: str = setting("auto", choices=INPUT_KINDS)   # auto: told by each shard's name and content
    image_column: str | None = None      # the column of images (Parquet) or of their locations (tables)
    key_column: str | None = None        # Parquet: the key; None: __key__, key or id when present, else the row number
    carry_columns: list[str] = field(default_factory=list)    # input columns copied into the score table
    fetch_workers: int = setting(32, minimum=1)       # tables, files: image requests in flight per read task
    fetch_timeout_s: float = setting(30.0, above=0)   # tables, files: a request unanswered by then is an error row
    files_per_shard: int = setting(1000, minimum=1)   # files: image files per virtual shard (new ones only)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def check(self):
        clash = sorted(set(self.carry_columns) & (RESERVED_COLUMNS - set(FILLED_BY_INPUT)))
        require(not clash, "carry_columns", f"{', '.join(clash)}: already a column of the score table "
                f"(only {' and '.join(FILLED_BY_INPUT)} are filled from the input's own columns)")
        require(len(set(self.carry_columns)) == len(self.carry_columns), "carry_columns", "a column named twice")

    def input_spec(self) -> InputSpec:       # what the read tasks need of this config
        return InputSpec(kind=self.input_kind, image_column=self.image_column, key_column=self.key_column,
                         carry_columns=tuple(self.carry_columns), fetch_workers=self.fetch_workers,
                         fetch_timeout_s=self.fetch_timeout_s)

    def validate(self) -> ScoreConfig:
        """What a run needs beyond well-formed values; checked when a run starts."""
        require(bool(self.input), "input", "give at least one shard path, URL, pattern or URL list")
        require(bool(self.output), "output", "give a destination folder or object-store prefix")
        require(bool(self.models), "models", "give at least one model")
        joins = cluster_address(self.address)
        require(self.num_cpus is None or joins == "local", "num_cpus",
                f"only for a local cluster; this job joins {joins} (address or RAY_ADDRESS), which has its own")
        return self


def load_score_config(path: str | None = None, **overrides) -> ScoreConfig:
    """The config in YAML file ``path`` (if any) with ``overrides`` (the command line) on top."""
    import yaml

    data: dict = {}
    if path:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a score config is a mapping of options")
        try:
            ScoreConfig.from_mapping(loaded)        # the file alone: its own mistakes name the file
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        data = loaded
    data.update({k: v for k, v in overrides.items() if v is not None})
    return ScoreConfig.from_mapping(data).validate()

