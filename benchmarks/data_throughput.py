"""Data throughput: SynthRef samples generated per second, and the training loader with augmentation.

    .venv/bin/python benchmarks/data_throughput.py [--n 1000] [--image-size 128] [--out runs/bench/data.json]

Prints a Markdown table and writes JSON (machine, versions, figures). Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vgstudy.data import GroundingTransform, SynthRef, TransformConfig, TransformedDataset, collate


def samples_per_second(fn, n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/data.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one core per process, as a DataLoader worker has

    data = SynthRef("train", args.n, seed=0, image_size=args.image_size)
    rows = {}
    rows["SynthRef generation, 1 process"] = samples_per_second(lambda: [data[i] for i in range(args.n)], args.n)
    rows["SynthRef symbolic scenes + expressions only"] = samples_per_second(
        lambda: [data.expression(i) for i in range(args.n)], args.n
    )
    train_set = TransformedDataset(data, GroundingTransform(TransformConfig(image_size=args.image_size, train=True)))
    for workers in (0, 2):
        loader = DataLoader(train_set, batch_size=args.batch_size, num_workers=workers, collate_fn=collate)
        rows[f"loader with augmentation, {workers} workers"] = samples_per_second(
            lambda loader=loader: list(loader), args.n
        )

    machine = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "n": args.n,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
    }
    print(f"| measurement ({args.n} samples, {args.image_size} px) | samples/s |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value:,.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "samples_per_s": rows}, indent=2))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
