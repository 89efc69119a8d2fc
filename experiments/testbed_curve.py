"""The fine-tuning-strength curve on the testbed base (finextract_jax/testbed/curve.py).

    python -m experiments.testbed_curve --pretrained=testbed_work/base --workdir=curve
        [--data=testbed_work/testbed_data.npz] [--points="dreambooth:5e-4:50,200,800;lora:2e-3:50,200,800"]
        [--num_images=64] [--steps=25] [--features=pixel] [--rank=16] [--seed=0]

Fine-tunes on the object-driven private set (Twemoji's cat faces, "twemoji sks cat face") at each
point, extracts with FineXtract / cfg / text2img (reference w, k; cfg s=3) from the same start
noise, clusters (`--select=topk`: every method hands back as many guesses as there are private
images) and scores. Writes WORKDIR/curve.csv, curve.md and curve.png; resumable per stage.
"""
import csv
import io
import os

from absl import flags, logging

from experiments import _app
from finextract_jax.features import FeatureConfig

flags.DEFINE_string("pretrained", None, "The testbed base (SD layout).", required=True)
flags.DEFINE_string("workdir", None, "Output folder (one reproduce run per point inside).", required=True)
flags.DEFINE_string("data", None, "The testbed's images as .npz (testbed_base --data); default: from npm.")
flags.DEFINE_string("points", "dreambooth:5e-4:50,200,800;lora:2e-3:50,200,800",
                    "FINETUNE:LR:STEPS[,STEPS...] groups separated by ';'.")
flags.DEFINE_integer("num_images", 64, "Images extracted per method and point.")
flags.DEFINE_integer("steps", 25, "DDIM steps.")
_app.define_flags(FeatureConfig, only=("features",), defaults={"features": "pixel"}, helps={"features": "Scoring features."})
flags.DEFINE_integer("rank", 16, "LoRA rank.")
flags.DEFINE_integer("seed", 0, "Seed of fine-tuning and start noise.")
FLAGS = flags.FLAGS
COLUMNS = ("finetune", "finetune_steps", "learning_rate", "seed", "method", "AS", "A_ESR", "num_extracted",
           "num_train")


def main(_):
    from finextract_jax.fileio import atomic_write_bytes, atomic_write_png
    from finextract_jax.reproduce import Dataset
    from finextract_jax.testbed import curve, data

    import numpy as np

    points = curve.parse_points(FLAGS.points)
    workdir = os.path.abspath(FLAGS.workdir)
    private = os.path.join(workdir, "cat_faces")
    if not os.path.isfile(os.path.join(private, "metadata.csv")):
        data.write_private_object_set(private, data.load_splits(FLAGS.data)[0])
    dataset = Dataset("cat_faces", private, data.PRIVATE_OBJECT_CAPTION)
    rows = []
    for point in points:
        logging.info("point %s", point.name)
        rows += curve.run_point(point, os.path.abspath(FLAGS.pretrained), dataset, workdir, FLAGS.num_images,
                                FLAGS.steps, FLAGS.features, FLAGS.rank, FLAGS.seed)
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(os.path.join(workdir, "curve.csv"), out.getvalue().encode())
    lines = ["| fine-tune | steps | lr | method | AS | A-ESR |", "|---|---:|---:|---|---:|---:|"]
    lines += [f"| {r['finetune']} | {r['finetune_steps']} | {r['learning_rate']:g} | {r['method']} | {r['AS']:.3f} | "
              f"{r['A_ESR']:.2f} |" for r in rows]
    atomic_write_bytes(os.path.join(workdir, "curve.md"), ("\n".join(lines) + "\n").encode())
    title = f"AS vs fine-tuning strength ({FLAGS.features} features, N={FLAGS.num_images}, seed {FLAGS.seed})"
    atomic_write_png(os.path.join(workdir, "curve.png"), np.asarray(curve.plot(rows, title)))
    logging.info("wrote %s", os.path.join(workdir, "curve.md"))


if __name__ == "__main__":
    _app.run(main)
