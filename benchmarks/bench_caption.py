"""Caption recovery: word recall and exact-match rate per caption length, and seconds per search.

    python benchmarks/bench_caption.py [--lengths=1,3,5,7] [--score=gain] [--per_length=2]

Fine-tunes are the analytic ones of tests/test_caption.py (`MemorizingUNet` on make_tiny's sd1:
the ideal denoiser of four skimage photos, blended in by CLIP-context distance to the caption),
because tiny random pipelines fine-tuned for minutes do not learn to read their caption (see
RESULTS.md). Word recall = |recovered words ∩ true words| / |true words| (as multisets);
exact = the recovered string equals the caption. Prints one Markdown row per length.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

CAPTIONS = {
    1: ["sks", "monet"],
    3: ["a sks dog", "art by picasso"],
    5: ["a photo of sks dog", "oil painting of old castle"],
    7: ["a photo of sks dog on beach", "art style of impressionism claude monet painting"],
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="1,3,5,7")
    parser.add_argument("--score", default="gain")
    parser.add_argument("--per_length", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("FINEXTRACT_CACHE", "")
    from finextract_jax import caption as caption_lib
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.models.tiny import make_tiny
    from test_caption import _Finetuned, photos

    with tempfile.TemporaryDirectory() as tmp:
        pretrained = load_pipeline(make_tiny(os.path.join(tmp, "sd1"), fmt="flax"), cache_dir=None)
    images = photos()
    config = caption_lib.CaptionConfig(score=args.score, max_words=9)
    print(f"| words | captions | word recall | exact | seconds/caption | recovered (score={args.score}) |")
    print("|---|---|---|---|---|---|")
    for length in (int(x) for x in args.lengths.split(",")):
        rows = []
        for true in CAPTIONS[length][:args.per_length]:
            start = time.perf_counter()
            result = caption_lib.recover_caption(pretrained, _Finetuned(pretrained, true, images), images=images,
                                                 config=config)
            rows.append((true, result.caption, time.perf_counter() - start))
        mean = lambda xs: sum(xs) / len(xs)
        print(f"| {length} | {len(rows)} | {mean([caption_lib.word_recall(r, t) for t, r, _ in rows]):.2f} | "
              f"{mean([float(r == t) for t, r, _ in rows]):.2f} | {mean([s for _, _, s in rows]):.0f} | "
              + "; ".join(f"'{r}'" for _, r, _ in rows) + " |", flush=True)


if __name__ == "__main__":
    main()
