#!/usr/bin/env python
"""Generate the synthetic shapes data set of the CPU demo ahead of time (it is otherwise made on
first use, under ``$CMRCNN_DATA`` or ``datasets/cmrcnn_shapes``).

    python tools/generate_shapes.py --out datasets/cmrcnn_shapes --num-train 600
"""

import argparse
import logging
import time

from cmrcnn_ext.data.synthetic import ensure_synthetic_dataset


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="output folder (default: $CMRCNN_DATA)")
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    splits = ensure_synthetic_dataset(
        args.out, args.num_train, args.num_val, args.seed, args.image_size
    )
    for split, (json_path, image_root) in splits.items():
        print(f"{split}: json={json_path} images={image_root}")
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
