"""The canonical model call: how many crops every model call holds, padded, and on how many threads a
CPU runs it, so that an image's scores never depend on the batch it met or on the machine's cores
(docs/scoring.md, "One image, one score"). Torch-free: the driver records both for every model."""

from __future__ import annotations

# Crops per model call on an accelerator: enough rows (64 x 257 tokens for ViT-L/14) to keep it busy.
CANONICAL_BATCH_ACCELERATOR = 64
# On a CPU a call is sized by its arithmetic: crops up to about this many FLOPs, at least one. A cheap
# model (the debug ViT: 8 crops) keeps the calls' fixed costs shared; a ViT-B or ViT-L runs one crop a
# call, which costs a CPU little (its matrices already have a row per token) and keeps scoring one
# image as fast as before.
CPU_CALL_FLOPS = 32e6


def crop_flops(cfg) -> float:
    """About how many FLOPs the backbone spends on one crop: per block and token, 24 x width^2 for the
    projections and the MLP, 4 x tokens x width for attention."""
    vision = cfg.backbone.vision
    size, patch = cfg.backbone.image_size, vision.get("patch_size", 16)
    tokens = (size // patch) ** 2 + 1
    width, layers = vision.get("width", 768), vision.get("layers", 12)
    return float(layers * tokens * (24 * width * width + 4 * tokens * width))


def canonical_batch(device_type: str, cfg) -> int:
    """Crops per model call for a model of ``cfg`` (a ``ModelConfig``) on ``device_type``; a power of two."""
    if device_type != "cpu":
        return CANONICAL_BATCH_ACCELERATOR
    fits = max(1, int(CPU_CALL_FLOPS // crop_flops(cfg)))
    return min(CANONICAL_BATCH_ACCELERATOR, 1 << (fits.bit_length() - 1))


# Intra-op threads of every model call on a CPU. Matrix products split their sums by thread: on a ViT of
# width 256, 1 and 2 threads gave an image scores 4 float32 ulps apart, so a 1-CPU actor, ``predict`` on
# a 2-core machine and a 4-CPU actor disagreed. One thread a call; a machine's other cores score other
# images (more actors), not the same product (benchmarks/invariance.py measures what it costs).
CPU_THREADS = 1


def canonical_threads(device_type: str) -> int | None:
    """Intra-op threads of a model call on ``device_type``; None where the count does not change the bits
    (an accelerator's kernels do not split their sums by the host's threads)."""
    return CPU_THREADS if device_type == "cpu" else None
