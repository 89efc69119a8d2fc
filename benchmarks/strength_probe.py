"""How far fine-tunes move, before any extraction score exists: fine-tune the curve's points and print
each one's error drop (testbed/curve.py), without sampling, clustering or scoring.

    python benchmarks/strength_probe.py --workdir=testbed_work/curve --sets=style \
        --points="dreambooth:1e-3:1600,3200" --seeds=0 [--data=...] [--style_data=...]

The fine-tunes land where `experiments.testbed_curve` with the same --workdir looks for them (same folders,
same stage settings), so a curve run afterwards reuses them. The point of a separate step: pick the point
to extract at by how far the fine-tune moved (error drop), then run extraction there, so that the choice
cannot lean on the score the methods are judged by.
"""
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("workdir", None, "A testbed_curve workdir (created when missing).", required=True)
flags.DEFINE_string("pretrained", None, "The base (default: the committed testbed base).")
flags.DEFINE_string("data", None, "testbed_data.npz (default: from npm).")
flags.DEFINE_string("style_data", None, "style_data.npz (default WORKDIR/style_data.npz).")
flags.DEFINE_list("sets", ["object", "style"], "Private sets.")
flags.DEFINE_string("points", None, "As testbed_curve --points.", required=True)
flags.DEFINE_string("seeds", "0", "Seeds.")
flags.DEFINE_integer("rank", 16, "LoRA rank (as testbed_curve --rank).")
FLAGS = flags.FLAGS


def main(_):
    import functools

    from finextract_jax.fileio import claimed
    from finextract_jax.reproduce import model_path, plan, run_recorded, select_devices
    from finextract_jax.models.pipeline import load_pipeline
    from finextract_jax.testbed import base, curve, data

    pretrained = os.path.abspath(FLAGS.pretrained or base.COMMITTED_BASE_DIR)
    workdir = os.path.abspath(FLAGS.workdir)
    splits = functools.cache(lambda: data.load_splits(FLAGS.data)[0])
    # No methods: only the fine-tune stage is planned, whose settings depend on no other curve flag (so the
    # extraction stages a curve run left in the same folders are not checked against these defaults).
    run = dict(rank=FLAGS.rank, methods=())
    with claimed(workdir, "--workdir"):
        style_file = FLAGS.style_data or os.path.join(workdir, "style_data.npz")
        datasets = {name: curve.private_set(name, workdir, splits, style_file) for name in FLAGS.sets}
    tools = {"devices": select_devices(0), "pipeline": functools.cache(lambda: load_pipeline(pretrained))}
    print("set,point,seed,error_drop,finetune_s", flush=True)
    for seed in curve.parse_seeds(FLAGS.seeds):
        for name, dataset in datasets.items():
            for point in curve.parse_points(FLAGS.points):
                settings = curve.point_settings(point, seed, name, dataset, pretrained, workdir, run)
                (stage,) = plan(settings)
                start = time.perf_counter()
                if stage.record is None:
                    run_recorded(settings, stage, tools)
                drop = curve.error_drop(pretrained, model_path(settings, dataset, point.finetune), dataset)
                print(f"{name},{point.name},{seed},{drop:.3f},{time.perf_counter() - start:.0f}", flush=True)


if __name__ == "__main__":
    app.run(main)
