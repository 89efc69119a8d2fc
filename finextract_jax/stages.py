"""The cluster and evaluate steps as functions from folders to their docs/cli.md output files.

Why a module: the `cluster` and `evaluate` binaries and the `reproduce` runner write the same
files (clusters.json + extracted/, metrics.json + pairs.png), and a binary's module cannot be
imported by another binary (absl flags are global, and they share names like --workdir).
The binaries keep only flag handling; everything written lives here, written atomically so
that a reader or a resumed run never sees half a file.
"""
from __future__ import annotations

import json
import os
import shutil

from absl import logging

from finextract_jax import cluster as clustering
from finextract_jax import features as feats_lib
from finextract_jax import fileio, imageio, metrics
from finextract_jax.errors import InputError
from finextract_jax.fileio import atomic_write_bytes

EXTRACTED = "extracted"


def _write_json(path, obj, indent=None):
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


def _extracted_name(name: str) -> str:
    return os.path.splitext(name)[0] + ".png"


def _written_extracted(workdir: str) -> set:
    """Names of the files an earlier cluster run put in workdir/extracted/ (from its clusters.json)."""
    path = os.path.join(workdir, "clusters.json")
    if not os.path.isfile(path):
        return set()
    record = fileio.read_record(path, "use another --workdir")
    if "extracted" in record:
        return set(record["extracted"])
    names = record.get("images") or []
    return {_extracted_name(names[i]) for i in record.get("representatives", []) if i < len(names)}


def check_cluster_output(workdir: str, images_dir: str | None = None):
    """Refuse, before any work, a --workdir cluster may not write: not ours, inside --images, or
    whose extracted/ holds files cluster did not write (they would be replaced)."""
    fileio.check_output_dir(workdir, "--workdir")
    fileio.check_not_inside(workdir, "--workdir", {"--images": images_dir})
    extracted = os.path.join(workdir, EXTRACTED)
    if os.path.lexists(extracted):
        if not os.path.isdir(extracted) or os.path.islink(extracted):
            raise InputError(f"{extracted} exists and is not a folder; move it or use another --workdir")
        ours = _written_extracted(workdir)
        foreign = sorted(set(os.listdir(extracted)) - ours)
        if foreign:
            raise InputError(f"{extracted} holds files cluster did not write (e.g. {', '.join(foreign[:3])}); "
                             "move them out or use another --workdir")


def _write_extracted(workdir, images_dir, names, reps) -> list:
    """Copy the representatives to workdir/extracted/ (replaced as a whole: check_cluster_output made
    sure it holds nothing else). Returns the file names written."""
    written = []
    with fileio.atomic_dir(os.path.join(workdir, EXTRACTED), "extracted folder", verified=True,
                           marker=False) as tmp:
        for idx in reps:
            src = os.path.join(images_dir, names[idx])
            written.append(_extracted_name(names[idx]))
            if names[idx].lower().endswith(".png"):
                shutil.copyfile(src, os.path.join(tmp, names[idx]))
            else:
                imageio.load_rgb(src).save(os.path.join(tmp, written[-1]))
    return written


def cluster_to_workdir(workdir: str, num_train: int, *, features=None, similarity=None,
                       images_dir: str | None = None, names=None, features_s: float = 0.0,
                       select: str = "reference", threshold: float | None = None, seed: int = 0,
                       subproblem_budget: int = clustering.DEFAULT_SUBPROBLEM_BUDGET,
                       threshold_budget: int = clustering.DEFAULT_THRESHOLD_BUDGET,
                       edge_budget: int = clustering.DEFAULT_EDGE_BUDGET,
                       schedule: str = clustering.DEFAULT_SCHEDULE,
                       progress: bool = True) -> dict:
    """Cluster [N, D] features or an [N, N] similarity; write workdir/clusters.json (and, given
    the `names` of the images in `images_dir`, workdir/extracted/). Returns the clusters.json dict."""
    check_cluster_output(workdir, images_dir)
    array = features if features is not None else similarity
    n = array.shape[0] if getattr(array, "ndim", 0) >= 1 else 0
    if n and num_train > n:
        raise InputError(f"--num_train={num_train} is larger than the number of images "
                         f"({n}); generate more images or lower --num_train")
    from tqdm import tqdm
    bars = []  # created on the first threshold, after the inputs were validated

    def on_threshold(thr, count):
        if not bars:
            bars.append(tqdm(desc="thresholds", unit="thr", disable=not progress))
        bars[0].update(1)
        bars[0].set_postfix_str(f"{thr:.2f}: " + ("over budget, skipped" if count is None
                                                  else f"{count} cliques"))

    try:
        res = clustering.cluster(num_train=num_train, features=features, similarity=similarity,
                                 select=select, threshold=threshold, seed=seed,
                                 subproblem_budget=subproblem_budget,
                                 threshold_budget=threshold_budget, edge_budget=edge_budget,
                                 schedule=schedule, progress=on_threshold)
    finally:
        for bar in bars:
            bar.close()
    out = {"threshold": res.threshold,
           "cliques": res.cliques,
           "representatives": res.representatives,
           "timing": {"similarity_s": round(res.similarity_s + features_s, 4),
                      "cliques_s": round(res.cliques_s, 4)},
           "select": select,
           "schedule": res.schedule,
           "num_train": num_train,
           "skipped_thresholds": res.skipped_thresholds,
           "exact": res.exact}
    fileio.claim_dir(workdir, "--workdir")
    if names is not None:
        out["images"] = names
        out["extracted"] = _write_extracted(workdir, images_dir, names, res.representatives)
    _write_json(os.path.join(workdir, "clusters.json"), out)
    logging.info("threshold %.2f: %d cliques (largest %d), %d representatives -> %s",
                 res.threshold, len(res.cliques), len(res.cliques[0]),
                 len(res.representatives), workdir)
    return out


def cluster_images(workdir: str, images_dir: str, num_train: int, extractor, batch_size: int = 16,
                   progress: bool = True, **options) -> dict:
    """Embed the images of `images_dir` with `extractor`, then `cluster_to_workdir` (options)."""
    import time

    t0 = time.perf_counter()
    names, feats = feats_lib.compute_features(images_dir, extractor, batch_size,
                                              progress=progress, what="--images folder")
    return cluster_to_workdir(workdir, num_train, features=feats, images_dir=images_dir,
                              names=names, features_s=time.perf_counter() - t0,
                              progress=progress, **options)


def check_evaluate_output(workdir: str, extracted: str, train_dir: str):
    """Both input folders hold images, and --workdir is ours and outside them (pairs.png in a
    training folder would be read as a training image next time). Writes nothing."""
    imageio.list_images(extracted, "--extracted folder")
    imageio.list_images(train_dir, "--train_dir folder")
    fileio.check_output_dir(workdir, "--workdir")
    fileio.check_not_inside(workdir, "--workdir", {"--extracted": extracted, "--train_dir": train_dir})


def evaluate_to_workdir(extracted: str, train_dir: str, workdir: str, extractor, features: str,
                        success_threshold: float = metrics.DEFAULT_SUCCESS_THRESHOLD,
                        batch_size: int = 16, progress: bool = True) -> dict:
    """Score `extracted` against `train_dir` with `extractor` (whose name `features` goes into the
    result); write workdir/metrics.json and pairs.png. Returns the metrics.json dict."""
    check_evaluate_output(workdir, extracted, train_dir)
    # No feature caches here: both folders are small (N0-sized), and writing into them would put a
    # hidden folder among extracted/ images and into users' training folders (maybe read-only).
    ext_names, ext_feats = feats_lib.compute_features(
        extracted, extractor, batch_size, cache=False, progress=progress, what="--extracted folder")
    train_names, train_feats = feats_lib.compute_features(
        train_dir, extractor, batch_size, cache=False, progress=progress, what="--train_dir folder")
    result = metrics.extraction_scores(train_feats, ext_feats, train_names, ext_names,
                                       success_threshold, features=features)
    grid = metrics.pairs_grid(
        imageio.load_images(train_dir, train_names),
        [imageio.load_rgb(os.path.join(extracted, p["match"])) for p in result["per_image"]],
        [p["similarity"] for p in result["per_image"]],
        success_threshold=success_threshold,
        labels=[f"{p['train']} -> {p['match']}" for p in result["per_image"]])
    fileio.claim_dir(workdir, "--workdir")
    fileio.atomic_write_png(os.path.join(workdir, "pairs.png"), grid)
    _write_json(os.path.join(workdir, "metrics.json"), result, indent=1)
    logging.info("AS %.4f, A-ESR %.4f (%d training images, %d extracted, %s features)",
                 result["AS"], result["A_ESR"], len(train_names), len(ext_names), features)
    return result
