"""perceptclip: perceptual scores for images at scale (PerceptCLIP on open_clip, Ray Data, Ray Train).

    perceptclip.score(input=..., output=..., models=[...])     the scoring job from Python
    perceptclip.add_scores(ds, models, image_column="image")   score columns for a ray.data.Dataset
    perceptclip.Scorer.load(model)                              a few images in memory

Importing this package starts nothing: no Ray, no CUDA, no downloads (the names above load on first use).
"""

from perceptclip.core.version import __version__ as __version__

__all__ = ["Scorer", "add_scores", "score"]


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


def __getattr__(name: str):
    if name in ("score", "add_scores"):
        from perceptclip import api

        return getattr(api, name)
    if name == "Scorer":
        from perceptclip.model.scorer import Scorer

        return Scorer
    raise AttributeError(f"module 'perceptclip' has no attribute {name!r}")
