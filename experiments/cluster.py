"""Find the generated images that are copies of training images (docs/method.md §4).

python -m experiments.cluster --workdir=DIR (--images=DIR | --similarity=FILE.npy |
  --features_file=FILE.npy) --num_train=N0 [--features=sscd|sscd_onnx|dino|clip|pixel]
  [--feature_weights=PATH] [--select=reference|topk] [--schedule=chance|reference]
  [--threshold=FLOAT] [--seed=0] [--edge_budget=50000000]
  [--coordinator_address=HOST:PORT --num_processes=P --process_id=I]

Writes DIR/clusters.json and, with --images, DIR/extracted/*.png (the representatives).
"""
import dataclasses
import os

import numpy as np
from absl import flags

from experiments import _app
from finextract_jax import cluster as clustering
from finextract_jax import stages
from finextract_jax.cluster import ClusterConfig
from finextract_jax.errors import InputError
from finextract_jax.features import FeatureConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder for clusters.json (and extracted/).", required=True)
flags.DEFINE_string("images", None, "Folder of generated images (e.g. the extract workdir's images/).")
flags.DEFINE_string("similarity", None, "An [N, N] similarity matrix (.npy).")
flags.DEFINE_string("features_file", None, "An [N, D] feature array (.npy); cosine similarity is computed from it "
                    "blockwise (the input for large N).")
_app.define_flags(ClusterConfig)
_app.define_flags(FeatureConfig, helps={"features": "Image embedder for --images."})
_app.define_distributed_flags("the similarity tiles are shared out; process 0 writes")


def _load_npy(path, what):
    if not os.path.isfile(path):
        raise InputError(f"--{what} {path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InputError(f"--{what} {path!r} is not a readable .npy array ({err})") from None


def main(argv):
    del argv
    given = [n for n in ("images", "similarity", "features_file") if getattr(FLAGS, n)]
    if len(given) != 1:
        raise InputError("give exactly one of --images, --similarity, --features_file"
                         + (f" (got {', '.join('--' + g for g in given)})" if given else ""))
    config = _app.config_from_flags(ClusterConfig)
    embedder = _app.config_from_flags(FeatureConfig)
    stages.check_cluster_output(FLAGS.workdir, FLAGS.images)
    options = dataclasses.asdict(config)
    num_train = options.pop("num_train")
    if _app.is_multi_process():
        if FLAGS.images:
            raise InputError("a multi-process cluster run takes --features_file or "
                             "--similarity (compute the features once, then share them)")
        from finextract_jax.sampling.run import initialize_distributed
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        import jax
        if jax.process_index() != 0:  # computes its share of the tiles; process 0 writes
            array = _load_npy(FLAGS.features_file or FLAGS.similarity,
                              "features_file" if FLAGS.features_file else "similarity")
            key = "features" if FLAGS.features_file else "similarity"
            clustering.cluster(num_train=num_train, **{key: array}, **options)
            return
    if FLAGS.images:
        stages.cluster_images(FLAGS.workdir, FLAGS.images, num_train, embedder.extractor(), embedder.batch_size,
                              **options)
    elif FLAGS.similarity:
        stages.cluster_to_workdir(FLAGS.workdir, num_train,
                                  similarity=_load_npy(FLAGS.similarity, "similarity"), **options)
    else:
        stages.cluster_to_workdir(FLAGS.workdir, num_train,
                                  features=_load_npy(FLAGS.features_file, "features_file"),
                                  **options)


if __name__ == "__main__":
    _app.run(main)
