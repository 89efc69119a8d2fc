"""Fine-tune a Stable Diffusion model (DreamBooth or LoRA) into an ordinary diffusers checkpoint.

    python -m experiments.finetune --pretrained=DIR --train_dir=DIR --caption="a photo of sks dog" \
        --method=dreambooth|lora --out=PATH [--steps --learning_rate --batch_size --resolution --rank
        --lora_alpha --train_text_encoder --augment=none|cutout|randaugment --seed --dtype]

DreamBooth writes an SD-layout folder (new unet/ [+ text_encoder/] as .safetensors, the rest of
the pretrained folder alongside); LoRA writes pytorch_lora_weights.safetensors (into --out, or to
--out itself when it ends in .safetensors). Checkpoints go to <out>.checkpoints every
--checkpoint_every steps; rerunning the same command after an interruption resumes from them and
ends with the same parameters as an uninterrupted run.
"""
from absl import flags, logging

from experiments import _app

from finextract_jax.finetune.config import FinetuneConfig  # noqa: E402 - its fields are flags

flags.DEFINE_string("pretrained", None, "Pretrained SD model: a diffusers folder, or a single-file checkpoint "
                    "(with --method=lora).", required=True)
flags.DEFINE_string("train_dir", None, "Folder of training images, optionally with metadata.csv "
                    "(file_name,caption), whose captions win over --caption.", required=True)
flags.DEFINE_string("caption", None, "Caption of every image not listed in metadata.csv.")
flags.DEFINE_string("out", None, "Output: SD folder (dreambooth) or LoRA folder / .safetensors file; "
                    "must be new, empty, or an earlier output of finetune (which it replaces).",
                    required=True)
_app.define_flags(FinetuneConfig)
flags.DEFINE_integer("resolution", None, "Training resolution in pixels (default: the UNet's sample size times "
                     "the VAE factor); images are resized and centre-cropped to it.")
flags.DEFINE_integer("checkpoint_every", 100, "Save a resumable checkpoint every K steps (0: only at the end).")
flags.DEFINE_string("checkpoint_dir", None, "Checkpoint folder (default <out>.checkpoints): new, empty, or this "
                    "run's; after the export only what finetune wrote there is deleted.")
flags.DEFINE_boolean("keep_checkpoints", False, "Keep the checkpoints after a successful export.")
flags.DEFINE_integer("log_every", 10, "Log the training loss every N steps.")
_app.define_allow_pickle()
FLAGS = flags.FLAGS


def _warn_long_captions(tokenizer):
    from finextract_jax.finetune.data import read_metadata
    from finextract_jax.sampling.run import warn_if_truncated

    named = {"--caption": FLAGS.caption, **{f"the metadata.csv caption of {name}": text
                                            for name, text in read_metadata(FLAGS.train_dir).items()}}
    for what, text in named.items():
        if text:
            warn_if_truncated(tokenizer, text, what)


def main(_):
    import os

    from finextract_jax.finetune import finetune
    from finextract_jax.finetune.train import check_outputs, default_checkpoint_dir

    from finextract_jax.models.pipeline import load_pipeline

    config = _app.config_from_flags(FinetuneConfig)
    if FLAGS.checkpoint_every < 0:
        _app.fail(f"--checkpoint_every must be >= 0, got {FLAGS.checkpoint_every}")
    if FLAGS.method == "dreambooth" and os.path.isfile(FLAGS.pretrained):
        _app.fail(f"--pretrained={FLAGS.pretrained}: DreamBooth writes a diffusers folder completed from the pretrained "
                  "folder; pass the model as a diffusers folder (a single file works with --method=lora)")
    checkpoint_dir = FLAGS.checkpoint_dir or default_checkpoint_dir(FLAGS.out)
    check_outputs(FLAGS.out, FLAGS.method, checkpoint_dir, FLAGS.train_dir, FLAGS.pretrained)
    pipe = load_pipeline(FLAGS.pretrained, allow_pickle=FLAGS.allow_pickle)
    _warn_long_captions(pipe.tokenizer)
    out = finetune(pipe, FLAGS.train_dir, FLAGS.out, config, caption=FLAGS.caption, resolution=FLAGS.resolution,
                   checkpoint_dir=checkpoint_dir, checkpoint_every=FLAGS.checkpoint_every,
                   keep_checkpoints=FLAGS.keep_checkpoints, log_every=FLAGS.log_every)
    logging.info("wrote %s", out)
    print(out)


if __name__ == "__main__":
    _app.run(main)
