"""The model and its references: CLIP with LoRA and heads, artifacts, the official checkpoints, the
debug model, preprocessing, ``Scorer``, device decoding, ``predict`` and model references."""
