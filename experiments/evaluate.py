"""Score an extraction against the fine-tuning images (METHOD.md §5): AS, A-ESR, pairs.png.

python -m experiments.evaluate --extracted=DIR --train_dir=DIR --workdir=DIR
  [--features=sscd|dino|clip|pixel] [--feature_weights=PATH] [--success_threshold=0.7]
"""
import json
import os
import tempfile

from absl import flags, logging

from experiments import _app
from finextract_jax import features as feats_lib
from finextract_jax import imageio, metrics
from finextract_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("extracted", None, "Folder of extracted images (cluster's extracted/).")
flags.DEFINE_string("train_dir", None, "Folder of the fine-tuning images.")
flags.DEFINE_string("workdir", None, "Output folder for metrics.json and pairs.png.")
flags.DEFINE_enum("features", "sscd", ["sscd", "dino", "clip", "pixel"], "Image embedder.")
flags.DEFINE_string("feature_weights", None, "SSCD TorchScript file, or a local "
                    "transformers folder for dino/clip.")
flags.DEFINE_enum("sscd_preprocessing", "reference", ["reference", "sscd"],
                  "SSCD input transform (see cluster --helpfull).")
flags.DEFINE_float("success_threshold", metrics.DEFAULT_SUCCESS_THRESHOLD,
                   "A training image counts as extracted when its best similarity exceeds "
                   "this.")
flags.DEFINE_integer("batch_size", 16, "Feature extraction batch size.")


def _atomic(path, write):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-",
                               suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv):
    del argv
    for name in ("extracted", "train_dir", "workdir"):
        if not getattr(FLAGS, name):
            raise InputError(f"--{name} is required")
    # Check both folders before any expensive work.
    imageio.list_images(FLAGS.extracted, "--extracted folder")
    imageio.list_images(FLAGS.train_dir, "--train_dir folder")
    extractor = feats_lib.get_extractor(FLAGS.features, FLAGS.feature_weights,
                                        sscd_preprocessing=FLAGS.sscd_preprocessing)
    ext_names, ext_feats = feats_lib.compute_features(
        FLAGS.extracted, extractor, FLAGS.batch_size, progress=True, what="--extracted folder")
    train_names, train_feats = feats_lib.compute_features(
        FLAGS.train_dir, extractor, FLAGS.batch_size, progress=True, what="--train_dir folder")
    result = metrics.extraction_scores(train_feats, ext_feats, train_names, ext_names,
                                       FLAGS.success_threshold, features=FLAGS.features)
    grid = metrics.pairs_grid(
        imageio.load_images(FLAGS.train_dir, train_names),
        [imageio.load_rgb(os.path.join(FLAGS.extracted, p["match"]))
         for p in result["per_image"]],
        [p["similarity"] for p in result["per_image"]],
        success_threshold=FLAGS.success_threshold,
        labels=[f"{p['train']} -> {p['match']}" for p in result["per_image"]])
    os.makedirs(FLAGS.workdir, exist_ok=True)
    _atomic(os.path.join(FLAGS.workdir, "pairs.png"), lambda p: grid.save(p, format="PNG"))

    def write_json(p):
        with open(p, "w") as f:
            json.dump(result, f, indent=1)
    _atomic(os.path.join(FLAGS.workdir, "metrics.json"), write_json)
    logging.info("AS %.4f, A-ESR %.4f (%d training images, %d extracted, %s features)",
                 result["AS"], result["A_ESR"], len(train_names), len(ext_names),
                 FLAGS.features)
    print(f"AS={result['AS']:.4f} A_ESR={result['A_ESR']:.4f}")


if __name__ == "__main__":
    _app.run(main)
