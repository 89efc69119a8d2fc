"""Train the testbed's base model on emoji art (finextract_jax/testbed/), resumably.

    python -m experiments.testbed_base --workdir=testbed_work [--steps=20000] [--batch_size=32]
        [--ema_decay=0.999] [--out=DIR] [--checkpoint_every=100] [--export_every=250] [--init=DIR]
        [--size=small|medium|large] [--caption_dropout=0.1]

Installs the emoji packages with npm on first use (finextract_jax/testbed/data.py), builds the
random initial pipeline in WORKDIR/init, trains UNet and text encoder together with 10% caption
dropout, checkpoints (orbax) into WORKDIR/checkpoints every --checkpoint_every steps, exports a
loadable snapshot to WORKDIR/snapshot every --export_every steps (look at it with
`python -m experiments.testbed_samples --model=WORKDIR/snapshot`), and the final model to --out
(default WORKDIR/base); both hold the running average of the weights (--ema_decay). Rerun the
same command to continue after an interruption, on any number of devices; raise --steps to train
further. --init starts from a trained pipeline instead (a committed base, or a snapshot of a run whose
checkpoints are gone): a new run in a new --workdir, with fresh optimizer moments and a weight average
that starts at --init's weights; pass another --seed so that it does not replay the first run's data
order and noise.
"""
import os

from absl import flags, logging

from experiments import _app

flags.DEFINE_string("workdir", "testbed_work", "Folder for the initial model, checkpoints and snapshots.")
flags.DEFINE_string("data", None, "The testbed's images as .npz: read when it exists, else built from the npm "
                    "packages and written there (carry it to a machine without npm); default: npm, not saved.")
flags.DEFINE_string("init", None, "Pipeline to start from (SD layout, the testbed's architecture); default: "
                    "WORKDIR/init, random weights built on first use.")
flags.DEFINE_string("out", None, "Where to export the trained base (SD layout); default WORKDIR/base.")
flags.DEFINE_integer("steps", 20000, "Total optimizer steps.")
flags.DEFINE_integer("batch_size", 32, "Images per step.")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate (constant, after global-norm clipping at 1).")
flags.DEFINE_float("ema_decay", 0.999, "Decay of the running average of the weights that snapshots and the "
                   "final model export (diffusers' warm-up: min(decay, (1 + t) / (10 + t))); 0: the last weights.")
flags.DEFINE_float("caption_dropout", 0.1, "Probability that a sample is trained with the empty caption.")
flags.DEFINE_integer("checkpoint_every", 100, "Steps between orbax checkpoints.")
flags.DEFINE_integer("export_every", 250, "Steps between snapshots in WORKDIR/snapshot (0: none).")
flags.DEFINE_enum("size", "small", ["small", "medium", "large"], "UNet size of a new run's random initial "
                  "weights (finextract_jax/testbed/base.py TESTBED_UNETS); ignored with --init or an existing WORKDIR/init.")
flags.DEFINE_integer("seed", 0, "Seed of the initial weights, data order, noise and caption dropout.")
FLAGS = flags.FLAGS


def train(workdir: str, data_file: str | None, init: str | None, out: str, steps: int, batch_size: int, learning_rate: float,
          ema_decay: float, caption_dropout: float, checkpoint_every: int, export_every: int, seed: int, size: str = "small") -> str:
    from finextract_jax.finetune.train import FinetuneConfig
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.testbed import base, data

    splits, words = data.load_splits(data_file)
    images, captions, keys = splits["train"]
    if init is None:
        init = os.path.join(workdir, "init")
        if not os.path.isdir(init):
            base.make_init(init, words, seed, size)
    config = FinetuneConfig(method="dreambooth", steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                            train_text_encoder=True, seed=seed, weight_decay=0.0, ema_decay=ema_decay)
    trainer = base.DropoutTrainer(load_pipeline(init), base.dropout_train_set(images, captions, keys), config,
                                  caption_dropout=caption_dropout)
    logging.info("training the testbed base on %d images (%d distinct captions) for %d steps at batch %d",
                 len(images), len(set(captions)), steps, batch_size)

    def snapshot(state, _metrics):
        if export_every and state.step % export_every == 0:
            trainer.export(state, os.path.join(workdir, "snapshot"))
            logging.info("snapshot of step %d in %s", state.step, os.path.join(workdir, "snapshot"))

    state = trainer.fit(checkpoint_dir=os.path.join(workdir, "checkpoints"), checkpoint_every=checkpoint_every,
                        log_every=50, progress=False, callback=snapshot)
    return trainer.export(state, out)


def main(_):
    out = train(FLAGS.workdir, FLAGS.data, FLAGS.init, FLAGS.out or os.path.join(FLAGS.workdir, "base"), FLAGS.steps,
                FLAGS.batch_size, FLAGS.learning_rate, FLAGS.ema_decay, FLAGS.caption_dropout, FLAGS.checkpoint_every,
                FLAGS.export_every, FLAGS.seed, FLAGS.size)
    logging.info("wrote the testbed base model to %s", out)


if __name__ == "__main__":
    _app.run(main)
