"""Score an extraction against the fine-tuning images (docs/method.md §5): AS, A-ESR, pairs.png.

python -m experiments.evaluate --extracted=DIR --train_dir=DIR --workdir=DIR
  [--features=sscd|sscd_onnx|dino|clip|pixel] [--feature_weights=PATH] [--success_threshold=0.7]
"""
from absl import flags

from experiments import _app
from finextract_jax import stages
from finextract_jax.features import FeatureConfig
from finextract_jax.metrics import ScoreConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("extracted", None, "Folder of extracted images (cluster's extracted/).", required=True)
flags.DEFINE_string("train_dir", None, "Folder of the fine-tuning images.", required=True)
flags.DEFINE_string("workdir", None, "Output folder for metrics.json and pairs.png.", required=True)
_app.define_flags(FeatureConfig)
_app.define_flags(ScoreConfig)


def main(argv):
    del argv
    features = _app.config_from_flags(FeatureConfig)
    score = _app.config_from_flags(ScoreConfig)
    # Check the folders before loading the embedder.
    stages.check_evaluate_output(FLAGS.workdir, FLAGS.extracted, FLAGS.train_dir)
    result = stages.evaluate_to_workdir(FLAGS.extracted, FLAGS.train_dir, FLAGS.workdir, features.extractor(),
                                        features.features, score.success_threshold, features.batch_size)
    print(f"AS={result['AS']:.4f} A_ESR={result['A_ESR']:.4f}")


if __name__ == "__main__":
    _app.run(main)
