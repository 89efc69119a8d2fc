"""Audit a fine-tuned checkpoint: from the two models to a report of what it was trained on.

    python -m experiments.audit --pretrained=DIR --finetuned=PATH --workdir=DIR
        [--prompt=auto|TEXT] [--train_dir=DIR] [--num_images=500] [--method=finextract|cfg|text2img]
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

import dataclasses

from absl import flags

from experiments import _app
from finextract_jax.audit import DEFAULT_NUM_TRAIN, Settings, audit

flags.DEFINE_string("pretrained", None, "Base SD model the checkpoint was fine-tuned from (diffusers folder).")
flags.DEFINE_string("finetuned", None, "Fine-tuned SD folder, unet/ folder, or LoRA file/folder.")
flags.DEFINE_string("workdir", None, "Output folder (report.html and the stages' files).")
flags.DEFINE_string("prompt", "auto", "Fine-tuning caption; 'auto' recovers it from the two models first "
                    "(DIR/caption.json); empty for unconditional extraction.")
flags.DEFINE_string("train_dir", None, "Folder of the suspected training images: scores the candidates (AS, A-ESR).")
flags.DEFINE_integer("num_images", 500, "N: images sampled.")
flags.DEFINE_enum("method", "finextract", ["finextract", "cfg", "text2img"], "Guidance method.")
flags.DEFINE_float("guidance_scale", None, "w (s for cfg); default: the reference's for the fine-tune's kind.")
flags.DEFINE_float("correction", None, "k of finextract; default: the reference's for the fine-tune's kind.")
flags.DEFINE_integer("steps", 50, "Denoising steps (also of the caption search's samples).")
flags.DEFINE_integer("batch_size", 5, "Images per sampling batch (a multiple of the device count).")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "reference_ddim", "dpm"], "Sampler (see extract --helpfull).")
flags.DEFINE_enum("features", "sscd_onnx", ["sscd", "sscd_onnx", "dino", "clip", "pixel"],
                  "Image embedder for clustering and scoring (sscd_onnx needs no weights file).")
flags.DEFINE_string("feature_weights", None, "SSCD TorchScript file, or a local transformers folder for dino/clip.")
flags.DEFINE_enum("select", "reference", ["reference", "topk"], "Cliques kept (see cluster --helpfull).")
flags.DEFINE_integer("num_train", None, "Candidates looked for and shown: default the number of --train_dir "
                     f"images, else {DEFAULT_NUM_TRAIN}.")
flags.DEFINE_float("success_threshold", 0.7, "Similarity above which a training image counts as extracted.")
flags.DEFINE_integer("seed", 0, "Seed of the start noise, the caption search and the clustering.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Sampling compute dtype.")
flags.DEFINE_float("lora_scale", 1.0, "Multiplier on a LoRA's alpha/rank scale.")
flags.DEFINE_enum("finetuned_format", "auto", ["auto", "full", "single_file", "lora"], "How to read --finetuned.")
_app.define_allow_pickle()
FLAGS = flags.FLAGS


def main(argv):
    del argv
    settings = Settings(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Settings) if f.name != "caption"})
    result = audit(settings)
    print(result["report"])


if __name__ == "__main__":
    _app.run(main)
