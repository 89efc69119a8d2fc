"""Which private images a method's samples land on: mode coverage of a run, before any clustering.

    python benchmarks/sample_coverage.py --private=testbed_work/style_far/private/style \
        --samples="testbed_work/style_far/style/*/seed*/style/dreambooth/*/images" [--features=sscd_onnx]

AS averages, over the private images, each one's best match among the extracted images: a method whose
samples pile onto a few private images scores low on the others however good those copies are. For each
folder of samples this prints how many private images are the nearest private image of at least one
sample ("covered"), the share of samples on the most visited one, and the mean over private images of
their best sample's similarity (the most any clustering of these samples could score).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def coverage(private: np.ndarray, samples: np.ndarray) -> dict:
    """private [P, D], samples [S, D] embeddings -> covered count, top share, mean best similarity (the
    AS of metrics.extraction_scores with every sample handed in as extracted)."""
    from finextract_jax.metrics import extraction_scores

    names = lambda rows: [str(i) for i in range(len(rows))]
    nearest = extraction_scores(samples, private, names(samples), names(private))["per_image"]
    visits = np.bincount([int(row["match"]) for row in nearest], minlength=len(private))
    return {"covered": int(np.count_nonzero(visits)), "top_share": float(visits.max() / len(samples)),
            "best_mean": extraction_scores(private, samples, names(private), names(samples))["AS"]}


def main(argv=None) -> int:
    from finextract_jax.features import embed_images, get_extractor
    from finextract_jax.finetune.data import read_metadata
    from finextract_jax.imageio import list_images, load_rgb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private", required=True, help="A fine-tuning folder (images + metadata.csv).")
    parser.add_argument("--samples", required=True, help="Comma-separated folders (or globs) of sampled images.")
    parser.add_argument("--features", default="sscd_onnx")
    args = parser.parse_args(argv)

    extractor = get_extractor(args.features)
    embed = lambda paths: embed_images([load_rgb(p) for p in paths], extractor, batch_size=64)
    private = embed([os.path.join(args.private, n) for n in sorted(read_metadata(args.private))])
    folders = sorted(f for pattern in args.samples.split(",") for f in glob.glob(pattern))
    print(f"| samples ({args.features}, {len(private)} private images) | samples | covered | top share | best mean |")
    print("|---|---:|---:|---:|---:|")
    for folder in folders:
        paths = [os.path.join(folder, n) for n in list_images(folder, "--samples folder")]
        c = coverage(private, embed(paths))
        print(f"| {folder} | {len(paths)} | {c['covered']} | {c['top_share']:.2f} | {c['best_mean']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
