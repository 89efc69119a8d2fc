"""What a copy scores: similarity of each private image to altered copies of itself, to its set's other
images and to the base's nearest training image, under the features the testbed curve scores with.

    python benchmarks/copy_score_control.py --private=testbed_work/curve_k/private/object \
        --data=testbed_work/testbed_data.npz [--features=sscd_onnx,pixel] [--samples=DIR,DIR ...]

A-ESR counts a private image as extracted when some extracted image scores above 0.7 against it
(metrics.DEFAULT_SUCCESS_THRESHOLD, the paper's SSCD threshold, set for 512 px photographs). The
testbed's images are 32 px emoji, upscaled to SSCD's 224 crop: this control says which alterations of
a true copy still pass 0.7 there, and how far a different image of the same set or a similar emoji
already scores, so that "A-ESR 0" can be read as "no copies" or as "the threshold cannot see them".
The altered copies are made from the private images themselves; --samples adds, per folder of
sampled images (a run's METHOD/images), each private image's best match among *all* its samples: the
most any clustering of those samples could find.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def alterations(seed: int = 0) -> dict:
    """name -> f(uint8 [H, W, 3]) -> uint8 [H, W, 3]: copies a sampler could plausibly return."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)

    def noise(sigma):
        return lambda a: np.clip(a + rng.normal(0.0, sigma, a.shape), 0, 255).astype(np.uint8)

    def blur(radius):
        return lambda a: np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(radius)))

    def shift(px):
        return lambda a: np.asarray(Image.fromarray(a).transform(a.shape[1::-1], Image.AFFINE, (1, 0, -px, 0, 1, -px),
                                                                 fillcolor=tuple(int(v) for v in a[0, 0])))

    def down_up(size):
        return lambda a: np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)
                                    .resize(a.shape[1::-1], Image.BILINEAR))

    def contrast(gain):
        return lambda a: np.clip((a.astype(np.float32) - 127.5) * gain + 127.5, 0, 255).astype(np.uint8)

    return {"identical": lambda a: a.copy(),
            "noise sigma 4/255": noise(4), "noise sigma 16/255": noise(16), "noise sigma 32/255": noise(32),
            "blur radius 0.5 px": blur(0.5), "blur radius 1 px": blur(1.0),
            "shift 1 px": shift(1), "shift 2 px": shift(2),
            "down to 16 px and up": down_up(16), "contrast x1.5 (saturated)": contrast(1.5)}


def score_table(private: list, base: np.ndarray, features: str, threshold: float, samples: dict) -> list:
    """Rows (what, mean, min, fraction > threshold) of cosine similarities to each private image
    (uint8 arrays); `samples` maps a name to PIL images."""
    from PIL import Image

    from finextract_jax.features import embed_images, get_extractor
    from finextract_jax.metrics import extraction_scores

    extractor = get_extractor(features)
    embed = lambda images: embed_images(images, extractor, batch_size=64)
    as_images = lambda arrays: [Image.fromarray(a) for a in arrays]
    ref = embed(as_images(private))

    def best_match(candidates) -> np.ndarray:  # each private image's best match, as the scoring takes it
        scores = extraction_scores(ref, embed(candidates), [str(i) for i in range(len(ref))],
                                   [str(j) for j in range(len(candidates))])
        return np.array([row["similarity"] for row in scores["per_image"]])

    unit = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    rows = []
    for name, alter in alterations().items():
        altered = embed(as_images([alter(a) for a in private]))
        rows.append((name, np.sum(unit * altered / np.linalg.norm(altered, axis=1, keepdims=True), axis=1)))
    within = unit @ unit.T
    np.fill_diagonal(within, -np.inf)
    rows.append(("nearest other image of the private set", within.max(axis=1)))
    rows.append(("nearest image of the base's training set", best_match(as_images(base))))
    for name, images in samples.items():
        rows.append((f"best of the {len(images)} samples in {name}", best_match(images)))
    return [(name, float(s.mean()), float(s.min()), float(np.mean(s > threshold))) for name, s in rows]


def main(argv=None) -> int:
    from finextract_jax.finetune.data import read_metadata
    from finextract_jax.imageio import load_rgb
    from finextract_jax.metrics import DEFAULT_SUCCESS_THRESHOLD
    from finextract_jax.testbed import data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private", required=True, help="A fine-tuning folder (images + metadata.csv).")
    parser.add_argument("--data", required=True, help="The testbed's images as .npz (testbed_base --data).")
    parser.add_argument("--features", default="sscd_onnx,pixel")
    parser.add_argument("--samples", default="", help="Comma-separated folders of sampled images.")
    parser.add_argument("--threshold", type=float, default=DEFAULT_SUCCESS_THRESHOLD)
    args = parser.parse_args(argv)

    names = sorted(read_metadata(args.private))
    private = [np.asarray(load_rgb(os.path.join(args.private, n))) for n in names]
    base = data.load_splits(args.data)[0]["train"][0]
    samples = {d: [load_rgb(os.path.join(d, n)) for n in sorted(os.listdir(d)) if n.endswith(".png")]
               for d in filter(None, args.samples.split(","))}
    features = args.features.split(",")
    tables = {f: score_table(private, base, f, args.threshold, samples) for f in features}
    print(f"{len(private)} private images ({args.private}), {len(base)} base training images, threshold "
          f"{args.threshold}\n")
    print("| copy of the private image | " + " | ".join(f"{f}: mean [min], > {args.threshold}" for f in features)
          + " |")
    print("|---|" + "---:|" * len(features))
    for i, (name, *_) in enumerate(tables[features[0]]):
        cells = [f"{t[i][1]:.3f} [{t[i][2]:.3f}], {t[i][3]:.2f}" for t in (tables[f] for f in features)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
