"""The paper's main table: fine-tune, extract with each method, cluster, evaluate, tabulate.

    python -m experiments.reproduce --pretrained=DIR --workdir=DIR \\
        --datasets=TRAIN_DIR:CAPTION[,TRAIN_DIR:CAPTION...] [--datasets_file=FILE.csv]
        [--finetunes=dreambooth,lora] [--methods=finextract,cfg,text2img] [--num_images=500]
        [--guidance_scale --correction --cfg_scale=3.0] [--steps=50] [--batch_size=5] [--sampler=ddim]
        [--features=sscd --feature_weights=PATH] [--select=reference] [--schedule=reference] [--success_threshold=0.7]
        [--finetune_steps=0] [--dreambooth_learning_rate --lora_learning_rate] [--rank=64] [--seed=0] [--dtype=float32] [--devices=0]

For every dataset x fine-tuning method x extraction method it writes

    WORKDIR/<dataset>/<finetune>/model               the fine-tune (finetune's output)
    WORKDIR/<dataset>/<finetune>/<method>/           extract's images/ + run.json, cluster's
                                                     clusters.json + extracted/, evaluate's
                                                     metrics.json + pairs.png
    WORKDIR/table.md, WORKDIR/table.csv              AS, A-ESR, number extracted, seconds per stage

Resumable stage by stage: each stage ends by writing `<stage>.done.json` (its settings and
seconds) atomically beside its outputs, and a rerun skips the stages that have one. A finished
stage is never silently mixed with other settings: a rerun with a changed flag that it depends
on is refused, naming the flag. To redo something, delete its folder. An interrupted fine-tune
resumes from its checkpoints and an interrupted extraction from its images.

Reference settings (docs/method.md §1): DreamBooth lr 2e-6, LoRA lr 1e-4 rank 64 alpha 64, 200 steps per
training image; FineXtract w=3, k=-0.02 for DreamBooth and w=5, k=0 for LoRA; CFG s=3; DDIM 50
steps; N=500; SSCD features. A dataset is a folder of images (optionally with metadata.csv,
whose captions win) and the caption it is fine-tuned with, which is also the extraction prompt.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from experiments import _app
from finextract_jax import fileio
from finextract_jax.errors import InputError
from finextract_jax.reproduce import (FINETUNES, METHODS, REFERENCE_CFG_SCALE, Settings, parse_choices, parse_dataset,
                                      read_datasets_file, reproduce, table_markdown)

flags.DEFINE_string("pretrained", None, "Base SD folder (diffusers layout) that every dataset is fine-tuned from.")
flags.DEFINE_string("workdir", None, "Output folder (see the layout above).")
flags.DEFINE_list("datasets", [], "Comma-separated TRAIN_DIR:CAPTION entries (CSV quoting for a caption with "
                  "a comma: '\"dir:a rocket, at night\"'); the folder's name names the dataset. "
                  "TRAIN_DIR alone: captions from its metadata.csv.")
flags.DEFINE_string("datasets_file", None, "CSV with columns train_dir,caption[,name] (paths relative to the "
                    "file's folder); adds to --datasets.")
flags.DEFINE_list("finetunes", list(FINETUNES), f"Fine-tuning methods, from {', '.join(FINETUNES)}.")
flags.DEFINE_list("methods", list(METHODS), f"Extraction methods, from {', '.join(METHODS)}.")
flags.DEFINE_integer("num_images", 500, "N: images generated per (fine-tune, method).")
flags.DEFINE_float("guidance_scale", None, "w of finextract (default: the reference's, 3.0 DreamBooth, 5.0 LoRA).")
flags.DEFINE_float("correction", None, "k of finextract (default: the reference's, -0.02 DreamBooth, 0.0 LoRA).")
flags.DEFINE_float("cfg_scale", REFERENCE_CFG_SCALE, "s of the cfg baseline.")
flags.DEFINE_integer("steps", 50, "Denoising steps.")
flags.DEFINE_integer("batch_size", 5, "Images per sampling batch (a multiple of the device count).")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "reference_ddim", "dpm"], "Sampler (see extract --helpfull).")
flags.DEFINE_enum("features", "sscd", ["sscd", "sscd_onnx", "dino", "clip", "pixel"], "Image embedder for cluster and evaluate.")
flags.DEFINE_string("feature_weights", None, "SSCD TorchScript file, or a local transformers folder for dino/clip.")
flags.DEFINE_enum("select", "reference", ["reference", "topk"], "Cliques kept (see cluster --helpfull).")
flags.DEFINE_enum("schedule", "reference", ["reference", "chance"], "Threshold stopping rule (see cluster "
                  "--helpfull); reference: the paper's.")
flags.DEFINE_float("success_threshold", 0.7, "Similarity above which a training image counts as extracted.")
flags.DEFINE_integer("finetune_steps", 0, "Fine-tuning steps; 0 = 200 per training image (the reference).")
flags.DEFINE_float("dreambooth_learning_rate", None, "DreamBooth learning rate (default: the reference's 2e-6).")
flags.DEFINE_float("lora_learning_rate", None, "LoRA learning rate (default: the reference's 1e-4).")
flags.DEFINE_integer("rank", 64, "LoRA rank.")
flags.DEFINE_float("lora_alpha", None, "LoRA alpha (default: = rank).")
flags.DEFINE_integer("finetune_batch_size", 1, "Fine-tuning images per step.")
flags.DEFINE_integer("resolution", None, "Fine-tuning resolution (default: the model's).")
flags.DEFINE_enum("augment", "none", ["none", "cutout", "randaugment"], "Defence applied to the training images.")
flags.DEFINE_integer("checkpoint_every", 100, "Fine-tuning checkpoint interval in steps (0: none).")
flags.DEFINE_integer("seed", 0, "Seed of fine-tuning, start noise and the clustering threshold sample.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Fine-tuning and sampling compute dtype.")
flags.DEFINE_integer("devices", 0, "Use the first N devices (0: all).")
_app.define_allow_pickle()
FLAGS = flags.FLAGS


def settings_from_flags() -> Settings:
    datasets = [parse_dataset(entry) for entry in FLAGS.datasets]
    if FLAGS.datasets_file:
        datasets += read_datasets_file(FLAGS.datasets_file)
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(Settings)
              if f.name not in ("datasets", "finetunes", "methods")}
    for name in ("pretrained", "workdir"):
        if not values[name]:
            raise InputError(f"--{name} is required")
    return Settings(datasets=tuple(datasets), finetunes=parse_choices(FLAGS.finetunes, FINETUNES, "finetunes"),
                    methods=parse_choices(FLAGS.methods, METHODS, "methods"), **values)


def main(argv):
    del argv
    settings = settings_from_flags()
    fileio.check_not_inside(settings.workdir, "--workdir", {
        "--pretrained": settings.pretrained, **{f"--datasets {ds.name}": ds.train_dir for ds in settings.datasets}},
        both_ways=True)
    with fileio.claimed(settings.workdir, "--workdir"):
        rows = reproduce(settings)
    print(table_markdown(settings, rows), end="")


if __name__ == "__main__":
    _app.run(main)
