"""Audit a fine-tuned checkpoint: from the two models to a report of what it was trained on.

    python -m experiments.audit --pretrained=DIR --finetuned=PATH --workdir=DIR
        [--prompt=auto|TEXT] [--train_dir=DIR] [--num_images=500] [--method=finextract|finextract_caption|cfg|text2img]
        [--guidance_scale --correction] [--steps=50] [--batch_size=5] [--sampler=ddim]
        [--features=sscd_onnx] [--feature_weights=PATH] [--select=reference] [--num_train]
        [--success_threshold=0.7] [--seed=0] [--dtype=float32] [--lora_scale=1.0]
        [--finetuned_format=auto|full|single_file|lora] [--allow_pickle]

Recovers the fine-tuning caption (unless --prompt gives one), extracts --num_images samples with
model guidance (w, k default to the reference's for the fine-tune's kind: DreamBooth or any full
fine-tune w=3, k=-0.02; LoRA w=5, k=0), clusters them into cliques of near-duplicates, scores the
candidates against --train_dir when given, and writes DIR/report.html: one self-contained page
(images embedded) with the candidates ranked by clique size and their cliques' members, each
training image beside its best match with AS and A-ESR, the recovered caption and its score, the
settings, and the provenance (sha256 of every checkpoint file, package versions, devices).

Resumable like `reproduce`: each stage leaves DIR/<stage>.done.json; a rerun skips finished stages
and refuses, naming the flag, settings that differ from theirs. Adding --train_dir to a finished
audit only scores it (keep --num_train as it was: it defaults to the number of training images).
"""
from __future__ import annotations

from absl import flags

from experiments import _app
from finextract_jax.audit import Settings, audit

_app.define_flags(Settings)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    settings = _app.config_from_flags(Settings)
    result = audit(settings)
    print(result["report"])


if __name__ == "__main__":
    _app.run(main)
