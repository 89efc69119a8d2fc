"""How far past each fine-tune extrapolation pays, read off the models on the private images
(finextract_jax/guidance_fit.py): λ and its w = 1/λ for FineXtract's whole pull, and the least-squares
scales a (the caption's pull on the base) and b (the fine-tune's own pull) when the two are fitted apart.

    python benchmarks/guidance_terms.py --curve=testbed_work/curve_k --set=object \
        --points=dreambooth_s800_lr5e-06,dreambooth_s200_lr5e-06 [--seeds=0,1,2] [--pretrained=DIR]

Each point/seed is the fine-tune a testbed_curve run left in CURVE/SET/POINT/seedN; the private set is
CURVE/private/SET with the set's caption. Prints one markdown row per point: mean [min, max] over seeds.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def spread(values) -> str:
    return f"{np.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve", required=True, help="A testbed_curve workdir.")
    parser.add_argument("--set", default="object", choices=("object", "style"))
    parser.add_argument("--points", required=True, help="Comma list of point folder names (e.g. dreambooth_s800_lr5e-06).")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pretrained", default=None, help="The testbed base; default: the committed one.")
    args = parser.parse_args(argv)

    from finextract_jax.guidance_fit import fit_guidance
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline
    from finextract_jax.reproduce import Dataset
    from finextract_jax.testbed import base, curve, data

    pre = load_pipeline(args.pretrained or base.COMMITTED_BASE_DIR)
    caption = data.PRIVATE_OBJECT_CAPTION if args.set == "object" else data.PRIVATE_STYLE_CAPTION
    dataset = Dataset(args.set, os.path.join(args.curve, "private", args.set), caption)
    x0 = curve.private_images(pre, dataset)
    print(f"| set | point | λ | w = 1/λ | a (caption) | b (fine-tune) | seeds |\n|---|---|---:|---:|---:|---:|---:|")
    for point in args.points.split(","):
        fits = []
        for seed in (int(s) for s in args.seeds.split(",")):
            finetune = point.split("_")[0]
            model = os.path.join(args.curve, args.set, point, f"seed{seed}", args.set, finetune, "model")
            fits.append(fit_guidance(pre, load_finetuned(pre, model), x0, caption, split_caption=True))
        print(f"| {args.set} | {point} | {spread([f.fraction for f in fits])} | "
              f"{spread([1 / f.fraction for f in fits])} | {spread([f.caption_scale for f in fits])} | "
              f"{spread([f.finetune_scale for f in fits])} | {len(fits)} |", flush=True)


if __name__ == "__main__":
    main()
