"""Find the generated images that are copies of training images (docs/method.md §4).

python -m experiments.cluster --workdir=DIR (--images=DIR | --similarity=FILE.npy |
  --features_file=FILE.npy) --num_train=N0 [--features=sscd|dino|clip|pixel]
  [--feature_weights=PATH] [--select=reference|topk] [--schedule=chance|reference]
  [--threshold=FLOAT] [--seed=0] [--edge_budget=50000000]
  [--coordinator_address=HOST:PORT --num_processes=P --process_id=I]

Writes DIR/clusters.json and, with --images, DIR/extracted/*.png (the representatives).
"""
import os

import numpy as np
from absl import flags

from experiments import _app
from finextract_jax import cluster as clustering
from finextract_jax import stages
from finextract_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder for clusters.json (and extracted/).")
flags.DEFINE_string("images", None, "Folder of generated images (e.g. the extract workdir's "
                    "images/).")
flags.DEFINE_string("similarity", None, "An [N, N] similarity matrix (.npy).")
flags.DEFINE_string("features_file", None, "An [N, D] feature array (.npy); cosine "
                    "similarity is computed from it blockwise (the input for large N).")
flags.DEFINE_integer("num_train", None, "N0: the number of fine-tuning images sought.")
flags.DEFINE_enum("features", "sscd", ["sscd", "sscd_onnx", "dino", "clip", "pixel"],
                  "Image embedder for --images.")
flags.DEFINE_string("feature_weights", None, "SSCD TorchScript file, or a local "
                    "transformers folder for dino/clip.")
flags.DEFINE_enum("sscd_preprocessing", "reference", ["reference", "sscd"],
                  "SSCD input transform: the reference's (Resize 256, CenterCrop 224, "
                  "mean/std 0.5) or SSCD's recommended one (320x320, ImageNet mean/std).")
flags.DEFINE_enum("select", "reference", ["reference", "topk"],
                  "reference: keep every clique at the final threshold; topk: the N0 largest.")
flags.DEFINE_float("threshold", None, "Use this similarity threshold instead of the schedule.")
flags.DEFINE_integer("seed", 0, "Seed of the 1000 sampled entries for the start threshold.")
flags.DEFINE_integer("batch_size", 16, "Feature extraction batch size.")
flags.DEFINE_integer("subproblem_budget", clustering.DEFAULT_SUBPROBLEM_BUDGET,
                     "Deterministic work budget of one maximum-clique subproblem.")
flags.DEFINE_integer("threshold_budget", clustering.DEFAULT_THRESHOLD_BUDGET,
                     "Deterministic work budget of one threshold.")
flags.DEFINE_integer("edge_budget", clustering.DEFAULT_EDGE_BUDGET,
                     "Most edges a threshold's graph may have (about 10 bytes each in memory); "
                     "denser thresholds are skipped by the schedule.")
flags.DEFINE_enum("schedule", clustering.DEFAULT_SCHEDULE, list(clustering.SCHEDULES),
                  "chance: stop where the cliques larger than chance at the threshold's edge "
                  "density persist over 3 grid steps, keep those; reference: stop at the first "
                  "threshold with >= N0 cliques, keep all (the reference implementation).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process "
                    "run (the similarity tiles are shared out; process 0 writes).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


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
    if not FLAGS.workdir:
        raise InputError("--workdir is required")
    if FLAGS.num_train is None:
        raise InputError("--num_train=N0 is required (the number of fine-tuning images)")
    if FLAGS.num_train < 1:
        raise InputError(f"--num_train must be >= 1, got {FLAGS.num_train}")
    if FLAGS.threshold is not None and not -1.0 <= FLAGS.threshold <= 1.0:
        raise InputError(f"--threshold is a cosine similarity in [-1, 1], got {FLAGS.threshold}")
    if FLAGS.batch_size < 1:
        raise InputError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.edge_budget < 0:
        raise InputError(f"--edge_budget must be >= 0, got {FLAGS.edge_budget}")
    stages.check_cluster_output(FLAGS.workdir, FLAGS.images)
    options = dict(select=FLAGS.select, threshold=FLAGS.threshold, seed=FLAGS.seed,
                   subproblem_budget=FLAGS.subproblem_budget,
                   threshold_budget=FLAGS.threshold_budget, edge_budget=FLAGS.edge_budget,
                   schedule=FLAGS.schedule)
    if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None:
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
            clustering.cluster(num_train=FLAGS.num_train, **{key: array}, **options)
            return
    if FLAGS.images:
        from finextract_jax import features as feats_lib
        extractor = feats_lib.get_extractor(FLAGS.features, FLAGS.feature_weights,
                                            sscd_preprocessing=FLAGS.sscd_preprocessing)
        stages.cluster_images(FLAGS.workdir, FLAGS.images, FLAGS.num_train, extractor,
                              FLAGS.batch_size, **options)
    elif FLAGS.similarity:
        stages.cluster_to_workdir(FLAGS.workdir, FLAGS.num_train,
                                  similarity=_load_npy(FLAGS.similarity, "similarity"), **options)
    else:
        stages.cluster_to_workdir(FLAGS.workdir, FLAGS.num_train,
                                  features=_load_npy(FLAGS.features_file, "features_file"),
                                  **options)


if __name__ == "__main__":
    _app.run(main)
