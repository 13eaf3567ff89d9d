"""Models as the driver sees them: a reference a user typed (a built-in name, a folder, a URI,
``MODEL#HEAD``, ``NAME=MODEL``) resolved once to what every actor loads, with the artifact's metadata.
The driver reads only ``config.json``; the weights are loaded by the actors, once each."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from perceptclip.core.schema import BASE_COLUMNS
from perceptclip.model.batching import canonical_batch, canonical_threads
from perceptclip.model.preprocess import PreprocessConfig
from perceptclip.model.releases import BUILTIN_MODELS, DEBUG_MODEL

if TYPE_CHECKING:   # annotations only: the driver resolves models without loading torch or the model code
    from perceptclip.model.artifact import ArtifactMeta


def parse_model_ref(text: str) -> tuple[str | None, str, str | None]:
    """``[NAME=]REF[#HEAD]`` -> (name, ref, head). NAME renames a model's output columns; HEAD picks a
    head of a multi-dataset model. An ``=`` after a ``/`` belongs to the path, not to a name."""
    name = None
    if "=" in text and "/" not in text.split("=", 1)[0]:
        name, text = text.split("=", 1)
    ref, head = text.rsplit("#", 1) if "#" in text else (text, None)
    return name, ref, head


def resolve_model(ref: str) -> str:
    """A built-in name -> a local artifact directory (fetched and converted once, then cached); a local
    path -> the same path, absolute; a URI is returned unchanged."""
    if ref in BUILTIN_MODELS:
        from perceptclip.model.official import release_artifact

        return release_artifact(ref)
    if ref == DEBUG_MODEL:
        from perceptclip.model.debug import debug_artifact

        return debug_artifact()
    if ref.startswith("perceptclip-") and not Path(ref).exists():
        from perceptclip.model.errors import ArtifactError

        raise ArtifactError(f"unknown built-in model {ref!r}; built-in names: {', '.join([*BUILTIN_MODELS, DEBUG_MODEL])}")
    # a local path is made absolute here, so workers with another working directory find it too
    return ref if "://" in ref else str(Path(ref).absolute())


@dataclass
class ModelSpec:
    """A model named on the command line: its output name, the reference the actors load, its metadata.
    The driver reads only ``config.json``; weights are loaded by the actors, once each."""

    name: str
    ref: str                  # resolved: an absolute path, a cache directory or a URI (what actors load)
    meta: ArtifactMeta
    given: str = ""           # as the user wrote it, for provenance
    batch: int | None = None  # crops per model call (ScoreConfig.model_batch); None: the canonical size

    @classmethod
    def resolve(cls, text: str, options: dict | None = None, batch: int | None = None) -> ModelSpec:
        from perceptclip.model.artifact import read_meta

        name, base, head = parse_model_ref(text)
        resolved = resolve_model(base)             # the actors load exactly what the driver resolved
        meta = read_meta(resolved, options)
        return cls(name=meta.scored_heads(head, name)[0][1], ref=resolved + (f"#{head}" if head else ""), meta=meta,
                   given=base + (f"#{head}" if head else ""), batch=batch)

    def actor_args(self) -> tuple[str, str, int | None]:
        """What a model actor needs to load this model: its name, the reference resolved, its model batch."""
        return self.name, self.ref, self.batch

    @property
    def head(self) -> str | None:
        """The head picked with ``MODEL#HEAD``; None: the model's own choice (``ArtifactMeta.scored_heads``)."""
        return self.ref.rsplit("#", 1)[1] if "#" in self.ref else None

    @property
    def scored_heads(self) -> list[tuple]:
        """(head, name, task) of each head this model scores: one, or every head of a model of several tasks."""
        return self.meta.scored_heads(self.head, self.name if self.name != self.meta.task.name else None)

    @property
    def columns(self) -> list[str]:
        return [c for _, name, task in self.scored_heads for c in task.columns(name)]

    def describe(self) -> dict:
        """The model in the run summary and every table's metadata: task, labels and direction those of the
        head it scores. A model of several tasks lists every column and adds ``heads``, each head's entry."""
        from perceptclip.model.artifact import describe

        base = {"ref": self.given or self.ref, "resolved": self.ref, "model_batch": self.model_batch(),
                "model_threads": {"cpu": canonical_threads("cpu")}}
        heads = [{"name": name, **base, "head": head if self.head or len(self.scored_heads) > 1 else None,
                  "columns": task.columns(name), **describe(self.meta, task)} for head, name, task in self.scored_heads]
        return heads[0] if len(heads) == 1 else {**heads[0], "head": None, "columns": self.columns, "heads": heads}

    def model_batch(self) -> int | dict[str, int]:
        """Crops per model call: as configured, else the canonical size for each device type."""
        if self.batch is not None:
            return self.batch
        return {device: canonical_batch(device, self.meta.model) for device in ("cpu", "cuda")}



def distinct_preprocessing(models: list[ModelSpec]) -> tuple[list[PreprocessConfig], list[int]]:
    """Each preprocessing once (decode once, crop once per distinct recipe) and which one each model uses."""
    configs: list[PreprocessConfig] = []
    index: list[int] = []
    for model in models:
        if model.meta.preprocess not in configs:
            configs.append(model.meta.preprocess)
        index.append(configs.index(model.meta.preprocess))
    return configs, index


def check_columns(models: list[ModelSpec], carried: list[str] = ()) -> None:
    """Refuse, before any work, two score columns of one name, or one named as a base or carried column."""
    seen = set(BASE_COLUMNS)
    for model in models:
        for column in model.columns:
            if column in seen or column in carried:
                what = "a carried column" if column in carried else "two outputs"
                fix = (f"name the model NAME=MODEL, e.g. --model {model.name}_2={model.given or model.ref}" if
                       len(model.scored_heads) == 1 else f"score its heads apart: NAME=MODEL#HEAD ({model.meta.model.heads})")
                raise ValueError(f"models: {what} would be called {column!r}; {fix}")
            seen.add(column)

