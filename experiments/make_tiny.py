"""Write a tiny, randomly initialised SD pipeline in the diffusers layout.

    python -m experiments.make_tiny --out=/tmp/tiny [--kind=latent|pixel|sdxl] [--format=pt|flax]
        [--seed=0] [--prediction_type=epsilon|v_prediction]

With --format=pt it loads in diffusers PyTorch (StableDiffusionPipeline.from_pretrained, or
StableDiffusionXLPipeline for --kind=sdxl) as well as in finextract_jax; no torch is needed to write it.
"""
import os

from absl import flags, logging

from experiments import _app

flags.DEFINE_string("out", None, "Output folder: new, empty, or an earlier make_tiny output (which it replaces).",
                    required=True)
flags.DEFINE_enum("kind", "latent", ["latent", "pixel", "sdxl"],
                  "Latent model with a tiny VAE, pixel-space UNet, or SDXL layout (two text encoders, "
                  "text_time UNet, EulerDiscrete scheduler).")
flags.DEFINE_enum("format", "pt", ["pt", "flax"], "PyTorch-named safetensors or Flax msgpack weights.")
flags.DEFINE_integer("seed", 0, "Initialisation seed.")
flags.DEFINE_enum("prediction_type", "epsilon", ["epsilon", "v_prediction"],
                  "epsilon: SD1-like (conv projections, PNDM); v_prediction: SD2-like (linear projections, DDIM).")
FLAGS = flags.FLAGS


def main(_):
    from finextract_jax import fileio
    from finextract_jax.models.tiny import make_tiny

    fileio.check_output_dir(FLAGS.out, "--out")  # make_tiny replaces --out as a whole
    logging.info("writing a tiny %s pipeline (%s weights) to %s", FLAGS.kind, FLAGS.format, FLAGS.out)
    out = make_tiny(FLAGS.out, kind=FLAGS.kind, fmt=FLAGS.format, seed=FLAGS.seed,
                    prediction_type=FLAGS.prediction_type)
    os.chmod(out, fileio.dir_mode())  # built in a mkdtemp folder (0700): give it the umask's mode
    fileio.mark_own(out)
    print(out)


if __name__ == "__main__":
    _app.run(main)
