"""``perceptclip predict``: score a handful of image files with one or more models, one JSON row each."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from perceptclip.core.storage import filesystem
from perceptclip.model.preprocess import ImageError, decode_image
from perceptclip.model.scorer import Scorer


def read_bytes(path: str) -> bytes:
    try:
        fs, where = filesystem(path, {})
        with fs.open(where, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError("missing", "no such file") from None
    except IsADirectoryError:
        raise ImageError("missing", "is a directory, not an image file") from None
    except OSError as e:
        raise ImageError("unreadable", str(e)) from None


def load_scorers(refs: Iterable[str], device: str | None = None) -> list[Scorer]:
    scorers = [Scorer.load(ref, device=device) for ref in refs]
    names = [name for s in scorers for name in s.names]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"two models would write the same key {clash[0]!r}; name them NAME=MODEL, "
                         f"e.g. --model {clash[0]}_a=PATH")
    return scorers


def predict(paths: Iterable[str], scorers: list[Scorer], batch_size: int = 16) -> Iterator[dict]:
    """Rows in input order: ``{"path", <each model's keys>}``, or ``{"path", "error"}`` for a bad image."""
    paths = list(paths)
    for start in range(0, len(paths), batch_size):
        rows: list[dict] = []
        images = []
        for path in paths[start:start + batch_size]:
            row: dict = {"path": path}
            try:
                images.append((row, decode_image(read_bytes(path))))
            except ImageError as e:
                row["error"] = str(e)
            rows.append(row)
        for scorer in scorers:
            outputs = scorer.score([scorer.preprocess(img) for _, img in images])
            for (row, _), output in zip(images, outputs):
                row.update(scorer.record(output))
        yield from rows
