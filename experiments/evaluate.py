"""Score an extraction against the fine-tuning images (docs/method.md §5): AS, A-ESR, pairs.png.

python -m experiments.evaluate --extracted=DIR --train_dir=DIR --workdir=DIR
  [--features=sscd|dino|clip|pixel] [--feature_weights=PATH] [--success_threshold=0.7]
"""
from absl import flags

from experiments import _app
from finextract_jax import features as feats_lib
from finextract_jax import metrics, stages
from finextract_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("extracted", None, "Folder of extracted images (cluster's extracted/).")
flags.DEFINE_string("train_dir", None, "Folder of the fine-tuning images.")
flags.DEFINE_string("workdir", None, "Output folder for metrics.json and pairs.png.")
flags.DEFINE_enum("features", "sscd", ["sscd", "sscd_onnx", "dino", "clip", "pixel"], "Image embedder.")
flags.DEFINE_string("feature_weights", None, "SSCD TorchScript file, or a local "
                    "transformers folder for dino/clip.")
flags.DEFINE_enum("sscd_preprocessing", "reference", ["reference", "sscd"],
                  "SSCD input transform (see cluster --helpfull).")
flags.DEFINE_float("success_threshold", metrics.DEFAULT_SUCCESS_THRESHOLD,
                   "A training image counts as extracted when its best similarity exceeds "
                   "this.")
flags.DEFINE_integer("batch_size", 16, "Feature extraction batch size.")


def main(argv):
    del argv
    for name in ("extracted", "train_dir", "workdir"):
        if not getattr(FLAGS, name):
            raise InputError(f"--{name} is required")
    if not -1.0 <= FLAGS.success_threshold <= 1.0:
        raise InputError(f"--success_threshold is a cosine similarity in [-1, 1], got {FLAGS.success_threshold}")
    if FLAGS.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    # Check the folders before loading the embedder.
    stages.check_evaluate_output(FLAGS.workdir, FLAGS.extracted, FLAGS.train_dir)
    extractor = feats_lib.get_extractor(FLAGS.features, FLAGS.feature_weights,
                                        sscd_preprocessing=FLAGS.sscd_preprocessing)
    result = stages.evaluate_to_workdir(FLAGS.extracted, FLAGS.train_dir, FLAGS.workdir, extractor,
                                        FLAGS.features, FLAGS.success_threshold, FLAGS.batch_size)
    print(f"AS={result['AS']:.4f} A_ESR={result['A_ESR']:.4f}")


if __name__ == "__main__":
    _app.run(main)
