"""The whole job on real photos, with no downloads: the project's front door.

    python -m experiments.demo --workdir=DIR [--num_images=128] [--steps=25] [--quick]

1. DIR/base/: the embedded base model (finextract_jax/demo/base, a 32 px pixel-space SD-family
   model: diffusers UNet with cross-attention + CLIP text encoder + tokenizer, trained by
   `python -m experiments.demo_base` on scikit-image's bundled photos and procedural images).
2. DIR/private/: five scikit-image photos the base never saw, captioned "a photo of sks".
3. `reproduce` on that one dataset: DreamBooth and LoRA fine-tunes through the `finetune` code
   path, then FineXtract, cfg and text2img with the same seeds and sampler, clustering and
   evaluation with weight-free `pixel` features (DIR/runs/private/<finetune>/<method>/).
4. DIR/metrics.json ({"runs": [...]} as docs/cli.md gives), DIR/report.md (table, settings,
   stage times, grids) and the grids DIR/matches_<finetune>.png, DIR/samples_<finetune>.png.

Resumable like `reproduce`: a rerun skips finished stages.
"""
from __future__ import annotations

import os
import time

from absl import flags, logging

from experiments import _app

flags.DEFINE_string("workdir", None, "Output folder.", required=True)
flags.DEFINE_integer("num_images", 128, "N: images generated per (fine-tune, method).")
flags.DEFINE_integer("steps", 25, "DDIM steps.")
flags.DEFINE_bool("quick", False, "A much smaller run (fewer images, steps and fine-tuning steps): checks the "
                  "pipeline in about a minute; its numbers mean little.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    _app.quiet_orbax()
    from finextract_jax.demo.run import DemoSettings, run_demo

    settings = DemoSettings.quick() if FLAGS.quick else DemoSettings(num_images=FLAGS.num_images, steps=FLAGS.steps)
    start = time.perf_counter()
    report = run_demo(FLAGS.workdir, settings)
    logging.info("demo finished in %.0f s", time.perf_counter() - start)
    print(open(report).read(), end="")
    print(f"\nreport: {os.path.abspath(report)}")


if __name__ == "__main__":
    _app.run(main)
