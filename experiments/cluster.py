"""Find the generated images that are copies of training images (METHOD.md §4).

python -m experiments.cluster --workdir=DIR (--images=DIR | --similarity=FILE.npy |
  --features_file=FILE.npy) --num_train=N0 [--features=sscd|dino|clip|pixel]
  [--feature_weights=PATH] [--select=reference|topk] [--threshold=FLOAT] [--seed=0]

Writes DIR/clusters.json and, with --images, DIR/extracted/*.png (the representatives).
"""
import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import flags, logging

from experiments import _app
from finextract_jax import cluster as clustering
from finextract_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Output folder for clusters.json (and extracted/).")
flags.DEFINE_string("images", None, "Folder of generated images (e.g. the extract workdir's "
                    "images/).")
flags.DEFINE_string("similarity", None, "An [N, N] similarity matrix (.npy).")
flags.DEFINE_string("features_file", None, "An [N, D] feature array (.npy); cosine "
                    "similarity is computed from it blockwise (the input for large N).")
flags.DEFINE_integer("num_train", None, "N0: the number of fine-tuning images sought.")
flags.DEFINE_enum("features", "sscd", ["sscd", "dino", "clip", "pixel"],
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


def _load_npy(path, what):
    if not os.path.isfile(path):
        raise InputError(f"--{what} {path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise InputError(f"--{what} {path!r} is not a readable .npy array ({err})") from None


def _write_json_atomic(path, obj):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_extracted(workdir, images_dir, names, reps):
    """Copy the representatives to workdir/extracted/ (replaced as a whole)."""
    final = os.path.join(workdir, "extracted")
    tmp = tempfile.mkdtemp(dir=workdir, prefix=".extracted-")
    try:
        for idx in reps:
            stem, ext = os.path.splitext(names[idx])
            src = os.path.join(images_dir, names[idx])
            if ext.lower() == ".png":
                shutil.copyfile(src, os.path.join(tmp, names[idx]))
            else:
                from finextract_jax.imageio import load_rgb
                load_rgb(src).save(os.path.join(tmp, stem + ".png"))
        old = None
        if os.path.exists(final):
            old = final + f".old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    names = None
    t0 = time.perf_counter()
    if FLAGS.images:
        from finextract_jax import features as feats_lib
        extractor = feats_lib.get_extractor(FLAGS.features, FLAGS.feature_weights,
                                            sscd_preprocessing=FLAGS.sscd_preprocessing)
        names, feats = feats_lib.compute_features(FLAGS.images, extractor, FLAGS.batch_size,
                                                  progress=True, what="--images folder")
        inputs = {"features": feats}
    elif FLAGS.similarity:
        inputs = {"similarity": _load_npy(FLAGS.similarity, "similarity")}
    else:
        inputs = {"features": _load_npy(FLAGS.features_file, "features_file")}
    features_s = time.perf_counter() - t0
    array = next(iter(inputs.values()))
    n = array.shape[0] if array.ndim >= 1 else 0
    if n and FLAGS.num_train > n:
        raise InputError(f"--num_train={FLAGS.num_train} is larger than the number of images "
                         f"({n}); generate more images or lower --num_train")
    from tqdm import tqdm
    bars = []  # created on the first threshold, after the inputs were validated

    def progress(thr, count):
        if not bars:
            bars.append(tqdm(desc="thresholds", unit="thr"))
        bars[0].update(1)
        bars[0].set_postfix_str(f"{thr:.2f}: " + ("over budget, skipped" if count is None
                                                  else f"{count} cliques"))

    try:
        res = clustering.cluster(num_train=FLAGS.num_train, select=FLAGS.select,
                                 threshold=FLAGS.threshold, seed=FLAGS.seed,
                                 subproblem_budget=FLAGS.subproblem_budget,
                                 threshold_budget=FLAGS.threshold_budget, progress=progress,
                                 **inputs)
    finally:
        for bar in bars:
            bar.close()
    out = {"threshold": res.threshold,
           "cliques": res.cliques,
           "representatives": res.representatives,
           "timing": {"similarity_s": round(res.similarity_s + features_s, 4),
                      "cliques_s": round(res.cliques_s, 4)},
           "select": FLAGS.select,
           "num_train": FLAGS.num_train,
           "skipped_thresholds": res.skipped_thresholds,
           "exact": res.exact}
    os.makedirs(FLAGS.workdir, exist_ok=True)
    if names is not None:
        out["images"] = names
        _write_extracted(FLAGS.workdir, FLAGS.images, names, res.representatives)
    _write_json_atomic(os.path.join(FLAGS.workdir, "clusters.json"), out)
    logging.info("threshold %.2f: %d cliques (largest %d), %d representatives -> %s",
                 res.threshold, len(res.cliques), len(res.cliques[0]),
                 len(res.representatives), FLAGS.workdir)


if __name__ == "__main__":
    _app.run(main)
