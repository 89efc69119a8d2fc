"""The fine-tuning-strength curve on the testbed base (finextract_jax/testbed/curve.py).

    python -m experiments.testbed_curve [--pretrained=testbed_work/base] --workdir=curve
        [--data=testbed_work/testbed_data.npz] [--style_data=WORKDIR/style_data.npz] [--sets=object,style]
        [--points="dreambooth:5e-4:50,200,800;lora:2e-3:50,200,800;dreambooth:5e-4:200:cutout"]
        [--seeds=0,1,2] [--sweep_points=dreambooth:5e-4:200] [--sweep=1:0,2:0,3:0,5:0,3:-0.02,3:-0.05]
        [--sweep_guidance_max_timestep=T] [--num_images=64] [--steps=25] [--features=pixel] [--rank=16]
        [--reuse_samples_from=OTHER_WORKDIR]

Private sets: `object` is Twemoji's nine cat faces, "twemoji sks cat face"; `style` is eight
OpenMoji images (a vendor the base never saw) of concepts it trained on, all "sks style"
(testbed/data.py; built with npm into --style_data, which a machine without npm needs carried).
For each set, point (FINETUNE:LR:STEPS[:AUGMENT], AUGMENT a defence) and seed: fine-tune,
extract with FineXtract / cfg / text2img (reference w, k; cfg s=3) from the same start noise,
cluster (`select=topk`) and score. Then FineXtract alone at each of --sweep_points for each W:K of
--sweep, on that point's fine-tunes (W 'fit': 1/λ fitted to each fine-tune on its private images). Writes WORKDIR/curve.csv (one row per seed), curve.md (mean
[min, max] over seeds), curve.png, sweep.csv and sweep.md; every run resumes per stage.
--reuse_samples_from scores another workdir's fine-tunes and samples again (e.g. with pixel features
what a run scored with SSCD) without fine-tuning or sampling.
"""
import csv
import functools
import io
import os

from absl import flags, logging

from experiments import _app
from finextract_jax.features import FeatureConfig

SETS = ("object", "style")
flags.DEFINE_string("pretrained", None, "The testbed base (SD layout); default: the one the repository carries, "
                    "finextract_jax/testbed/base_model.")
flags.DEFINE_string("workdir", None, "Output folder (one reproduce run per set, point and seed inside).",
                    required=True)
flags.DEFINE_string("data", None, "The testbed's images as .npz (testbed_base --data); default: from npm.")
flags.DEFINE_string("style_data", None, "The style set as .npz: read when it exists, else built from npm "
                    "(openmoji) and written there; default WORKDIR/style_data.npz.")
flags.DEFINE_list("sets", list(SETS), f"Private sets: {', '.join(SETS)}.")
flags.DEFINE_string("points", "dreambooth:5e-4:50,200,800;lora:2e-3:50,200,800",
                    "FINETUNE:LR:STEPS[,STEPS...][:AUGMENT] groups separated by ';' (AUGMENT: a defence, "
                    "cutout or randaugment; default none); '' runs only the sweep.")
flags.DEFINE_string("seeds", "0,1,2", "Seeds (of fine-tuning, start noise and clustering); one run each.")
flags.DEFINE_string("sweep_points", "dreambooth:5e-4:200", "The point(s) at which FineXtract's w and k are swept "
                    "(as --points), on the point's own fine-tunes (trained first where --points did not).")
flags.DEFINE_alias("sweep_point", "sweep_points")
flags.DEFINE_string("sweep", "1:0,2:0,3:0,5:0,3:-0.02,3:-0.05",
                    "W:K pairs (guidance scale, correction) for FineXtract at --sweep_points; W 'fit': each seed's "
                    "least-squares w = 1/λ read off its fine-tune and private images (guidance_fit.py; the point "
                    "must be in --points too); '' for none.")
flags.DEFINE_enum("sweep_method", "finextract", ["finextract", "finextract_caption"],
                  "The sweep's method: FineXtract, or its ablation with the base on the caption too (w then amplifies "
                  "only the fine-tune's own pull; guidance.py).")
flags.DEFINE_integer("sweep_guidance_max_timestep", None, "The sweep guides only at timesteps t <= this (extract "
                     "--guidance_max_timestep); default: every step.")
flags.DEFINE_integer("num_images", 64, "Images extracted per method, point and seed.")
flags.DEFINE_integer("steps", 25, "DDIM steps.")
_app.define_flags(FeatureConfig, only=("features",), defaults={"features": "pixel"}, helps={"features": "Scoring features."})
flags.DEFINE_integer("rank", 16, "LoRA rank.")
flags.DEFINE_string("reuse_samples_from", None, "Another curve workdir whose fine-tunes and samples (same points, "
                    "seeds and settings) this run reuses (hard links), so that only clustering and scoring run: "
                    "the same curve under other --features.")
FLAGS = flags.FLAGS
COLUMNS = ("set", "finetune", "finetune_steps", "learning_rate", "augment", "seed", "error_drop", "method", "AS",
           "A_ESR", "num_extracted", "num_train")
SWEEP_COLUMNS = COLUMNS[:6] + ("guidance_scale", "correction", "guidance_max_timestep", "fitted_w") + COLUMNS[7:]


def write_csv(path: str, rows: list, columns: tuple) -> None:
    from finextract_jax.fileio import atomic_write_bytes

    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, out.getvalue().encode())


def write_outputs(workdir: str, rows: list, sweep_rows: list, floors: dict) -> None:
    """The tables and the plot of everything run so far (rewritten after each run); floors: {set: (AS,
    A-ESR)} of the base's nearest training images (curve.copy_floor)."""
    import numpy as np

    from finextract_jax.fileio import atomic_write_bytes, atomic_write_png
    from finextract_jax.reproduce import REFERENCE_CFG_SCALE, REFERENCE_GUIDANCE
    from finextract_jax.testbed import curve

    setup = (f"{FLAGS.features} features, N={FLAGS.num_images}, {FLAGS.steps} DDIM steps, seeds {FLAGS.seeds}; "
             f"FineXtract (w, k) = {REFERENCE_GUIDANCE}, DreamBooth's k scaled to the base's noise schedule "
             f"(reproduce --match_correction), cfg s = {REFERENCE_CFG_SCALE:g}")
    if rows:
        summary = curve.aggregate(rows, curve.POINT_KEYS)
        write_csv(os.path.join(workdir, "curve.csv"), rows, COLUMNS)
        floor_text = "".join(f"\nFloor, {name}: the base's own nearest training images (no fine-tune, no sampling) score "
                             f"AS {a:.3f}, A-ESR {e:.2f}.\n" for name, (a, e) in floors.items())
        atomic_write_bytes(os.path.join(workdir, "curve.md"),
                           (curve.markdown(summary, curve.POINT_KEYS, f"AS and A-ESR over seeds ({setup}).")
                            + floor_text).encode())
        title = f"AS vs fine-tuning strength ({FLAGS.features}, N={FLAGS.num_images}, seeds {FLAGS.seeds})"
        atomic_write_png(os.path.join(workdir, "curve.png"),
                         np.asarray(curve.plot(summary, title, floors={k: a for k, (a, _) in floors.items()})))
    if sweep_rows:
        write_csv(os.path.join(workdir, "sweep.csv"), sweep_rows, SWEEP_COLUMNS)
        interval = FLAGS.sweep_guidance_max_timestep
        guided = "" if interval is None else f", guided at t <= {interval}"
        text = curve.markdown(curve.aggregate(sweep_rows, curve.SWEEP_KEYS), curve.SWEEP_KEYS,
                              f"{FLAGS.sweep_method}'s w and k at {FLAGS.sweep_points} ({setup.split(';')[0]}){guided}.")
        atomic_write_bytes(os.path.join(workdir, "sweep.md"), text.encode())


def main(_):
    from finextract_jax.errors import InputError
    from finextract_jax.fileio import claimed
    from finextract_jax.reproduce import parse_choices
    from finextract_jax.testbed import base, curve, data

    points = curve.parse_points(FLAGS.points, allow_empty=True)
    seeds = curve.parse_seeds(FLAGS.seeds)
    sweep_points, sweep = curve.parse_points(FLAGS.sweep_points, "sweep_points"), curve.parse_sweep(FLAGS.sweep)
    if not points and not sweep:
        raise InputError("--points and --sweep are both empty: nothing to run")
    sets = parse_choices(FLAGS.sets, SETS, "sets")
    pretrained, workdir = os.path.abspath(FLAGS.pretrained or base.COMMITTED_BASE_DIR), os.path.abspath(FLAGS.workdir)
    run = dict(num_images=FLAGS.num_images, steps=FLAGS.steps, features=FLAGS.features, rank=FLAGS.rank)
    splits = functools.cache(lambda: data.load_splits(FLAGS.data)[0])  # read once, for the sets and their floors
    rows, sweep_rows = [], []
    # Reused runs recorded their private sets' paths: a rescoring run reads the source's sets (it does not
    # write there: they must exist), so that the reused stages' settings match.
    sets_root = workdir
    if FLAGS.reuse_samples_from:
        sets_root = os.path.abspath(FLAGS.reuse_samples_from)
        missing = [n for n in sets if not os.path.isfile(os.path.join(sets_root, "private", n, "metadata.csv"))]
        if missing:
            raise InputError(f"--reuse_samples_from={FLAGS.reuse_samples_from} holds no private set {missing[0]!r}")
    with claimed(workdir, "--workdir"):
        if FLAGS.reuse_samples_from:
            logging.info("reused %d files of %s", curve.reuse_samples(sets_root, workdir), FLAGS.reuse_samples_from)
        style_file = FLAGS.style_data or os.path.join(workdir, "style_data.npz")
        datasets = {name: curve.private_set(name, sets_root, splits, style_file) for name in sets}
    floors = {name: curve.copy_floor(d.train_dir, splits()["train"][0], FLAGS.features) for name, d in datasets.items()}
    floors = {name: (f["AS"], f["A_ESR"]) for name, f in floors.items()}
    for seed in seeds:  # seed-major: a run cut short still has whole curves for its first seeds
        for name, dataset in datasets.items():
            for point in points:
                logging.info("%s: point %s, seed %d", name, point.name, seed)
                rows += curve.run_point(point, seed, name, dataset, pretrained, workdir, run)
                write_outputs(workdir, rows, sweep_rows, floors)
            for sweep_point in sweep_points:
                for w, k in sweep:
                    logging.info("%s: %s sweep at %s, w=%s k=%g, seed %d", name, FLAGS.sweep_method,
                                 sweep_point.name, w, k, seed)
                    sweep_rows += curve.run_sweep(sweep_point, seed, w, k, name, dataset, pretrained, workdir, run,
                                                  FLAGS.sweep_method, FLAGS.sweep_guidance_max_timestep)
                    write_outputs(workdir, rows, sweep_rows, floors)
    logging.info("wrote %s", ", ".join(os.path.join(workdir, f) for f in ("curve.md", "curve.png", "sweep.md")))


if __name__ == "__main__":
    _app.run(main)
