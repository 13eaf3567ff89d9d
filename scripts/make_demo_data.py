"""Writes demo WebDataset shards of generated photos-like images (nothing is downloaded), in the
img2dataset layout (key.jpg, key.json with url and caption), for the README's first command."""

import json
import sys
from pathlib import Path

from perceptclip.inputs.shards import write_shard

# the generated images are the tests' (tests/support/images.py): fixtures stay out of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.images import image_bytes, make_image  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "demo-output/shards"
for shard in range(2):
    samples = []
    for i in range(16):
        key = f"{shard:02d}{i:04d}"
        samples.append({
            "__key__": key,
            "jpg": image_bytes(make_image(shard * 100 + i, (512, 384)), quality=90),
            "json": json.dumps({"url": f"https://example.com/{key}.jpg", "caption": f"demo image {key}"}).encode(),
        })
    write_shard(f"{out}/demo-{shard:06d}.tar", samples)
print(f"{out}/demo-{{000000..000001}}.tar")
