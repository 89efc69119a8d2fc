"""Train the demo's base model and write it into the package (finextract_jax/demo/base/).

    python -m experiments.demo_base [--out=finextract_jax/demo/base] [--steps=2000] [--seed=0] [--noise_schedule=sd]

A pixel-space SD-family model (diffusers UNet with cross-attention + CLIP text encoder +
tokenizer; no VAE, so the demo needs no VAE training) at 32x32, trained from random
initialisation through the same `finetune` code path (full-UNet training) on random crops of
scikit-image's bundled photos and procedural images. The private photos the demo later
fine-tunes on are excluded. The result is committed (a few MB) so the demo runs in minutes;
this script reproduces it (--noise_schedule=sd, SD 1.4's schedule, the default).
--noise_schedule=pixel trains with DDPM's pixel-space schedule (models/tiny.SCHEDULER_PIXEL) instead; at
these 2000 steps that base drew grey, low-contrast samples from pure noise (the spread of their mean pixels
0.013 against the data's 0.28 and the SD-schedule base's 0.18), so the demo keeps the SD schedule.
"""
import os
import shutil
import tempfile

from absl import flags, logging

from experiments import _app

# 1.4M parameters: cross-attention only at 8x8 (and the mid block), where it is cheap; on 2 CPU
# cores a forward at batch 64 takes ~0.3 s, so the whole demo's sampling fits in a minute or two.
DEMO_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=[32, 64, 64],
                 layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                 down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"])
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "finextract_jax", "demo",
                           "base")

flags.DEFINE_string("out", DEFAULT_OUT, "Where to write the base model (SD layout).")
flags.DEFINE_integer("steps", 2000, "Training steps.")
flags.DEFINE_integer("batch_size", 16, "Images per step.")
flags.DEFINE_integer("num_images", 2048, "Size of the generated training set.")
flags.DEFINE_float("learning_rate", 5e-4, "AdamW learning rate.")
flags.DEFINE_float("caption_dropout", 0.1, "Fraction of training images captioned \"\" (the unconditional model).")
flags.DEFINE_enum("noise_schedule", "sd", ["sd", "pixel"],
                  "Noise schedule: sd (SD 1.4's scaled_linear) or pixel (DDPM's, models/tiny.SCHEDULER_PIXEL).")
flags.DEFINE_integer("seed", 0, "Seed for the model, the training set and training.")
FLAGS = flags.FLAGS


def train_base(out: str, steps: int, batch_size: int, num_images: int, learning_rate: float, seed: int,
               caption_dropout: float, noise_schedule: str = "sd") -> str:
    from finextract_jax.demo.data import write_base_training_set
    from finextract_jax.finetune import FinetuneConfig, finetune
    from finextract_jax.models.tiny import SCHEDULER_PIXEL, make_tiny

    work = tempfile.mkdtemp(prefix="demo_base.")
    try:
        init = make_tiny(os.path.join(work, "init"), kind="pixel", seed=seed, unet_overrides=DEMO_UNET,
                         scheduler_overrides=SCHEDULER_PIXEL if noise_schedule == "pixel" else None)
        train_dir = os.path.join(work, "train")
        write_base_training_set(train_dir, num_images, DEMO_UNET["sample_size"], seed, caption_dropout)
        config = FinetuneConfig(method="dreambooth", steps=steps, learning_rate=learning_rate,
                                batch_size=batch_size, seed=seed, weight_decay=0.0)
        trained = finetune(init, train_dir, os.path.join(work, "trained"), config, log_every=100)
        staging = out + ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(trained, staging)  # copies, not hard links, of the untouched parts
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staging, out)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(_):
    out = train_base(FLAGS.out, FLAGS.steps, FLAGS.batch_size, FLAGS.num_images, FLAGS.learning_rate, FLAGS.seed,
                     FLAGS.caption_dropout, FLAGS.noise_schedule)
    logging.info("wrote the demo base model to %s", out)


if __name__ == "__main__":
    _app.run(main)
