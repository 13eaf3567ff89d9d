"""Decode + preprocess throughput: the CPU path (PIL: ``decode_image`` + ``preprocess``, one image at a
time in this process) against ``decode_on_device`` (torchvision's JPEG decoder and tensor resize on
``--device``, in batches), on generated 512 px JPEGs, and how far apart their crops are.

    python benchmarks/decode_throughput.py                          # on CUDA (nvjpeg) if present
    python benchmarks/decode_throughput.py --device cpu --torch-threads 1   # libjpeg-turbo through torchvision

Each path is warmed up, then timed over whole passes through the images for at least ``--seconds``,
the device synchronised before the clock stops. Both paths use this one process: torch's own thread
count applies to the tensor resize, PIL's decode and resize run on one thread. The CPU path's crops
stay on the CPU: their copy to a GPU is not counted. The last lines are
``cpu path: X images/s``, ``decode_on_device: Y images/s`` and ``ratio: Y/X``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from perceptclip.model.device_decode import decode_on_device
from perceptclip.model.preprocess import PreprocessConfig, decode_image, preprocess

# the generated images are the tests' (tests/support/images.py): fixtures stay out of the installed package
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.images import image_bytes, make_image  # noqa: E402


def generate(count: int) -> list[bytes]:
    """512 px on the long side, landscape and portrait, as a photo set would hold."""
    return [image_bytes(make_image(seed, (512, 384) if seed % 2 else (384, 512)), quality=90)
            for seed in range(count)]


def timed(step, datas: list[bytes], batch_size: int, seconds: float, sync) -> float:
    batches = [datas[i:i + batch_size] for i in range(0, len(datas), batch_size)]
    step(batches[0])                                  # warm-up: CUDA context, decoder handles, imports
    sync()
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in batches:
            step(batch)
            images += len(batch)
        sync()
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kind", default="resize_center_crop", choices=["resize_center_crop", "multi_crop"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="threads for torch's CPU ops (default: torch's own); a busy machine runs faster on 1")
    args = parser.parse_args()

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = torch.device(args.device)
    cfg = PreprocessConfig(kind=args.kind, size=args.size)
    datas = generate(args.images)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu (torch threads: {torch.get_num_threads()})")
    print(f"{args.images} JPEGs of 512x384 / 384x512, {cfg.kind} at {cfg.size}, device {name}", flush=True)

    def on_cpu(batch: list[bytes]) -> None:
        for data in batch:
            preprocess(decode_image(data), cfg)

    def on_device(batch: list[bytes]) -> None:
        decode_on_device(batch, [cfg], device)

    device_batch = decode_on_device(datas, [cfg], device)
    if device_batch.decoded_on != ["device"] * len(datas):
        raise SystemExit(f"only {device_batch.decoded_on.count('device')} of {len(datas)} JPEGs decoded on the device")
    reference = torch.stack([torch.from_numpy(preprocess(decode_image(data), cfg)) for data in datas])
    diff = (device_batch.crops[0].cpu().int() - reference.int()).abs()
    print(f"crops against the cpu path: max {int(diff.max())}, mean {float(diff.float().mean()):.3f} "
          f"absolute difference in uint8 levels", flush=True)

    cpu_rate = timed(on_cpu, datas, args.batch_size, args.seconds, lambda: None)
    print(f"cpu path: {cpu_rate:.1f} images/s", flush=True)
    device_rate = timed(on_device, datas, args.batch_size, args.seconds, sync)
    print(f"decode_on_device: {device_rate:.1f} images/s")
    print(f"ratio: {device_rate / cpu_rate:.2f}")


if __name__ == "__main__":
    main()
