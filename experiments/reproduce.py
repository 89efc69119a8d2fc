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

from absl import flags

from experiments import _app
from finextract_jax import fileio
from finextract_jax.reproduce import (FINETUNES, METHODS, Settings, parse_choices, parse_dataset, read_datasets_file,
                                      reproduce, table_markdown)

flags.DEFINE_list("datasets", [], "Comma-separated TRAIN_DIR:CAPTION entries (CSV quoting for a caption with "
                  "a comma: '\"dir:a rocket, at night\"'); the folder's name names the dataset. "
                  "TRAIN_DIR alone: captions from its metadata.csv.")
flags.DEFINE_string("datasets_file", None, "CSV with columns train_dir,caption[,name] (paths relative to the "
                    "file's folder); adds to --datasets.")
_app.define_flags(Settings)
FLAGS = flags.FLAGS


def settings_from_flags() -> Settings:
    datasets = [parse_dataset(entry) for entry in FLAGS.datasets]
    if FLAGS.datasets_file:
        datasets += read_datasets_file(FLAGS.datasets_file)
    values = _app.values_from_flags(Settings)
    return Settings(datasets=tuple(datasets),
                    finetunes=parse_choices(values.pop("finetunes"), FINETUNES, "finetunes"),
                    methods=parse_choices(values.pop("methods"), METHODS, "methods"), **values)


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
