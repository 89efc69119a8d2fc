"""The whole job on a trained base and images it never saw, with no downloads: the project's front door.

    python -m experiments.demo --workdir=DIR [--num_images=64] [--steps=25] [--quick]

1. DIR/base/: the testbed base (finextract_jax/testbed/base_model, CARD.md there: a 32 px pixel-space
   SD-family model, diffusers UNet with cross-attention + CLIP text encoder + tokenizer, trained by
   `python -m experiments.testbed_base` on 3,017 Twemoji / Noto emoji captioned with their names).
2. DIR/private/: Twemoji's nine cat faces, which the base never saw, captioned "twemoji sks cat face".
3. `reproduce` on that one dataset: DreamBooth and LoRA fine-tunes through the `finetune` code path at
   the point of the testbed curve an error-drop rule chooses (finextract_jax/demo/run.py
   DemoSettings), then FineXtract, cfg and text2img with the same seeds and sampler, clustering and
   evaluation with weight-free `pixel` features (DIR/runs/private/<finetune>/<method>/).
4. DIR/metrics.json ({"runs": [...]} as docs/cli.md gives), DIR/report.md (table, settings,
   stage times, grids) and the grids DIR/matches_<finetune>.png, DIR/samples_<finetune>.png.

Resumable like `reproduce`: a rerun skips finished stages.
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from experiments import _app

flags.DEFINE_string("workdir", None, "Output folder.", required=True)
flags.DEFINE_integer("num_images", 64, "N: images generated per (fine-tune, method).")
flags.DEFINE_integer("steps", 25, "DDIM steps.")
flags.DEFINE_bool("quick", False, "A much smaller run (fewer images, steps and fine-tuning steps): checks the "
                  "pipeline in a few minutes; its numbers mean nothing.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from finextract_jax import fileio
    from finextract_jax.demo.run import DemoSettings, run_demo

    settings = DemoSettings.quick() if FLAGS.quick else DemoSettings(num_images=FLAGS.num_images, steps=FLAGS.steps)
    start = time.perf_counter()
    with fileio.claimed(FLAGS.workdir, "--workdir"):
        report = run_demo(FLAGS.workdir, settings)
    print(summary(os.path.join(FLAGS.workdir, "metrics.json"), time.perf_counter() - start, report))


def summary(metrics_path: str, seconds: float, report: str) -> str:
    """A few lines to read at the end of the run; the whole story is in the report."""
    with open(metrics_path) as f:
        runs = json.load(f)["runs"]
    lines = [f"demo finished in {seconds:.0f} s"]
    lines += [f"  {r['finetune']:<10} {r['method']:<10} AS {r['AS']:.3f}  A-ESR {r['A_ESR']:.2f}  "
              f"({r['num_extracted']} extracted, {r['num_guesses']} guesses)" for r in runs]
    lines.append(f"report: {os.path.abspath(report)}")
    return "\n".join(lines)


if __name__ == "__main__":
    _app.run(main)
