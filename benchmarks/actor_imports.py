"""What a scoring model actor's imports cost: a fresh interpreter that imports torch and
open_clip, builds the debug model and scores one crop, three ways: open_clip imported as usual; by
``import_open_clip_for_vision_towers`` after torch's compiler was imported (transformers and timm
skipped, the compiler as before); by the helper alone (torch's compiler deferred too).

Prints the CPU seconds of each interpreter (its own ``time.process_time``, from its first line to the
score) per round, alternating the ways, then the medians.

    .venv/bin/python benchmarks/actor_imports.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

CODE = """
import time
start = time.process_time()
import sys, json
import torch
from perceptclip.model.clip_lora import import_open_clip_for_vision_towers
if {way!r} == "compiler imported":
    import torch._dynamo
if {way!r} == "as usual":
    import open_clip
else:
    import_open_clip_for_vision_towers()
import numpy as np
from perceptclip.model.scorer import Scorer
scorer = Scorer.load({model!r}, device="cpu")
scorer.score([np.zeros((1, 3, 32, 32), np.uint8)])
print(json.dumps({{"cpu_s": time.process_time() - start,
                  "loaded": [m for m in ("transformers", "timm", "torch._dynamo") if m in sys.modules]}}))
"""


WAYS = ("as usual", "compiler imported", "helper")


def run(way: str, model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CODE.format(way=way, model=model)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from perceptclip.model.debug import make_tiny_artifact

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_artifact(f"{tmp}/iqa", task="iqa")
        run("as usual", model)                             # warm the page cache
        figures: dict[str, list[float]] = {way: [] for way in WAYS}
        for i in range(args.rounds):
            for way in WAYS:
                result = run(way, model)
                figures[way].append(result["cpu_s"])
                print(f"round {i + 1}: {way}: {result['cpu_s']:.2f} CPU-s, "
                      f"imported {', '.join(result['loaded']) or 'none of transformers, timm, torch._dynamo'}")
    medians = {way: statistics.median(figures[way]) for way in WAYS}
    print("median: " + ", ".join(f"{way} {cpu:.2f} CPU-s" for way, cpu in medians.items())
          + f"; the helper saves {medians['as usual'] - medians['helper']:.2f} CPU-s a process, "
          f"{medians['compiler imported'] - medians['helper']:.2f} of them by deferring torch's compiler")


if __name__ == "__main__":
    main()
