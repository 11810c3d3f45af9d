"""``python -m coorkern.data``: write PNG previews of a dataset's items with their landmarks."""

from __future__ import annotations

import argparse
import os

from ..engine.overlays import save_overlay
from .loading import DATASETS, load_dataset


def main(argv=None) -> None:  # pragma: no cover - manual inspection helper
    parser = argparse.ArgumentParser(prog="python -m coorkern.data", description="Write a PNG preview of a dataset.")
    parser.add_argument("--data", default="synthetic", choices=DATASETS)
    parser.add_argument("--root")
    parser.add_argument("--split", default="train")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--out", default="preview.png")
    args = parser.parse_args(argv)
    ds = load_dataset(args.data, args.root, args.split)
    stem, ext = os.path.splitext(args.out)
    for i in range(min(args.count, len(ds))):
        item = ds[i]
        save_overlay(f"{stem}_{i}{ext or '.png'}", item["image"], item["landmarks"])


if __name__ == "__main__":  # pragma: no cover
    main()
