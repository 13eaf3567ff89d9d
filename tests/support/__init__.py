"""What the tests share, and nothing the product needs (the debug model is product:
``perceptclip.model.debug``):

- ``images``: generated photo-like images (``make_image``, ``image_bytes``), also for the demo data and
  the benchmarks;
- ``hostile``: hostile input for the scoring job, each case with its promised outcome (also printed by
  ``scripts/hostile_input_table.py`` into docs/reliability.md);
- ``shards``: labelled shards, the layout ``evaluate`` and ``train`` read;
- ``scoring``: a score output written by the scoring job's stages in this process, without Ray;
- ``processes``: Ray's worker processes by role, process sessions, and ending them;
- ``store_proxy``: an S3 endpoint in front of the moto server that injects faults and latency;
- ``wide_model``: a model wide enough that batching changes its scores' bits (the batch-invariance tests);
- ``waiting``: polling for a condition with a deadline that fails naming what it waited for.

Pytest puts this folder on ``sys.path`` (``pythonpath`` in pyproject.toml); scripts and benchmarks
that need generated images put the repository's ``tests`` folder there themselves.
"""
