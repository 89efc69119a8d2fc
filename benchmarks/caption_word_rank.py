"""Where the true caption's words rank under each caption-search score, on trained testbed fine-tunes.

    python benchmarks/caption_word_rank.py --workdir=testbed_work/captions_rank --data=testbed_work/testbed_data.npz
        [--point=dreambooth:5e-6:800] [--lengths=1,3,5,7] [--per_length=2] [--pairs=16] [--seed=0]

A diagnostic of `caption.recover_caption`'s first step, not a search: for each case of
testbed/caption_table.py (the same captions, fine-tunes and search images: the fine-tune's own
samples with the empty prompt, CaptionConfig's defaults), every candidate word of the base's
tokenizer is scored as a one-word prompt on the first --pairs (image, timestep, noise) pairs, under

    gain       mean_r [E_ft("") - E_ft(w)] / E_ft("")                  (the search's default)
    advantage  mean_r [E_pre(w) - E_ft(w)] / E_ft("")                  (docs/method.md §6's wording)
    specific   gain_ft(w) - max(0, gain_pre(w)), gain_pre(w) = mean_r [E_pre("") - E_pre(w)] / E_pre("")
               (what the prompt does for the fine-tune beyond what it does for the base, with no credit
               for prompts that make the base worse)

and the table gives the best rank among the true caption's words (1 = the search's first pick), the
top word, and the true caption's own score against that word's. The fine-tunes are the caption
table's 'true' runs in --workdir (trained there when missing; `experiments.testbed_caption` with the
same --workdir and flags reuses them).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RULES = ("gain", "advantage", "specific")


def rule_scores(e_ft, e_pre, ref_ft, ref_pre):
    """{rule: [n]} for errors [n, R] of n prompts and the empty prompt's [R] of both models."""
    import numpy as np

    gain_ft = np.mean((ref_ft - e_ft) / ref_ft, axis=1)
    gain_pre = np.mean((ref_pre - e_pre) / ref_pre, axis=1)
    return {"gain": gain_ft, "advantage": np.mean((e_pre - e_ft) / ref_ft, axis=1),
            "specific": gain_ft - np.maximum(0.0, gain_pre)}


def case_ranks(base, finetuned, case_caption: str, config, num_pairs: int) -> dict:
    """{rule: (best rank of a true word, top word, true caption's score, top word's score)}."""
    import numpy as np

    from finextract_jax import caption as caption_lib

    x0 = caption_lib.sample_images(base, finetuned, config)
    pairs = caption_lib.make_pairs(x0, config.timesteps, config.noise_draws, config.seed,
                                   caption_lib.alphas_cumprod(base), finetuned.prediction_type)
    pairs = tuple(p[:num_pairs] for p in pairs)
    scorer = caption_lib.PromptScorer(base, finetuned, pairs, config.batch_size, True)
    tokenizer = finetuned.tokenizer
    candidates = caption_lib.candidate_words(tokenizer, config.max_candidates, config.words)
    true_ids = tuple(tokenizer(case_caption, add_special_tokens=False)["input_ids"])
    rows = caption_lib.token_rows(tokenizer, [()] + [ids for _, ids in candidates] + [true_ids])
    e_ft, e_pre = scorer.errors(rows)
    scores = rule_scores(e_ft[1:], e_pre[1:], e_ft[0], e_pre[0])
    words = [w for w, _ in candidates]
    true_words = set(case_caption.split())
    out = {}
    for rule, s in scores.items():
        word_scores, true_score = s[:-1], float(s[-1])
        order = np.argsort(-word_scores, kind="stable")
        rank = {words[j]: r + 1 for r, j in enumerate(order)}
        best = min((rank[w] for w in true_words if w in rank), default=None)
        out[rule] = (best, words[order[0]], true_score, float(word_scores[order[0]]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", default=None)
    parser.add_argument("--point", default="dreambooth:5e-6:800")
    parser.add_argument("--lengths", default="1,3,5,7")
    parser.add_argument("--per_length", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default="sscd_onnx")
    args = parser.parse_args()
    from finextract_jax import caption as caption_lib
    from finextract_jax.fileio import claimed
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline
    from finextract_jax.reproduce import model_path
    from finextract_jax.testbed import base as testbed_base, caption_table, curve, data

    workdir = os.path.abspath(args.workdir)
    config = caption_lib.CaptionConfig(seed=args.seed, screen_pairs=8)
    job = caption_table.Job(testbed_base.COMMITTED_BASE_DIR, workdir, curve.parse_point(args.point, "point"), args.seed,
                            run=dict(num_images=64, steps=25, features=args.features), search=config)
    splits = data.load_splits(args.data)[0]
    base = load_pipeline(job.pretrained)
    cases = caption_table.pick_cases(splits["train"][1], caption_table.vocabulary(base.tokenizer),
                                     caption_table.parse_lengths(args.lengths.split(",")), args.per_length, args.seed)
    print(f"| case | caption | {' | '.join(f'{r}: true rank / top word / true caption vs top' for r in RULES)} |")
    print("|---|---|" + "---|" * len(RULES), flush=True)
    with claimed(workdir, "--workdir"):
        for case in cases:
            dataset = caption_table.case_dataset(job, case, splits)
            caption_table.extraction(job, case, dataset, "true")  # the fine-tune (and its true-caption row)
            model = model_path(caption_table.run_settings(job, case, dataset, "true"), dataset, job.point.finetune)
            finetuned = load_finetuned(base, model, lora_mode="unmerged")
            ranks = case_ranks(base, finetuned, case.caption, config, args.pairs)
            cells = [f"{r} / {w!r} / {t:+.3f} vs {s:+.3f}" for r, w, t, s in (ranks[rule] for rule in RULES)]
            print(f"| {case.name} | {case.caption!r} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
