"""perceptclip: perceptual scores for images at scale (PerceptCLIP on open_clip, Ray Data, Ray Train).

Importing this package starts nothing: no Ray, no CUDA, no downloads.
"""

__version__ = "0.1.0"
