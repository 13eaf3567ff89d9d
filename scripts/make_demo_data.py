"""Writes demo images (generated, no download) for the README's first command."""

import sys
from pathlib import Path

from pipeline.testing import make_image

out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output/images")
out.mkdir(parents=True, exist_ok=True)
for i in range(8):
    make_image(i, (512, 384)).save(out / f"demo-{i:02d}.jpg", quality=90)
print(out)
