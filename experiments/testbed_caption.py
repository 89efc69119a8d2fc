"""Caption recovery on trained fine-tunes of the testbed base (finextract_jax/testbed/caption_table.py).

    python -m experiments.testbed_caption [--pretrained=testbed_work/base] --workdir=captions
        [--data=testbed_work/testbed_data.npz] [--lengths=1,3,5,7] [--per_length=2] [--seed=0]
        [--point=dreambooth:5e-4:200] [--num_images=64] [--steps=25] [--features=pixel]
        [--search_images=samples|train] [--search_num_images=8] [--max_words=8] [--beam=1]
        [--score=gain|advantage] [--timesteps=300,500,700,900] [--min_gain --refine_sweeps]
        [--screen_pairs=8 --keep=64] [--candidate_windows]

For each caption length and --per_length captions of it (windows of the base's training captions
made of its tokenizer's whole words, drawn from --seed): fine-tune the private object set (Twemoji's
cat faces) under the caption at --point, recover the caption from the base and the fine-tune, and
run FineXtract (reference w, k) from one start noise with the true, the recovered and the empty
prompt, clustered and scored. Writes WORKDIR/caption_table.md (per length: word recall, exact-match
rate, seconds per search, AS and A-ESR per prompt; then one row per fine-tune), rewritten after each
fine-tune; a rerun reuses every finished fine-tune, search and extraction, and refuses changed settings.
"""
import os

from absl import flags, logging

from experiments import _app
from finextract_jax.caption import CaptionConfig
from finextract_jax.features import FeatureConfig
from finextract_jax.testbed.caption_table import LENGTHS, SEARCH_IMAGES

flags.DEFINE_string("pretrained", None, "The testbed base (SD layout); default: the one the repository carries, "
                    "finextract_jax/testbed/base_model.")
flags.DEFINE_string("workdir", None, "Output folder (a reproduce run per fine-tune and prompt inside).",
                    required=True)
flags.DEFINE_string("data", None, "The testbed's images as .npz (testbed_base --data); default: from npm.")
flags.DEFINE_list("lengths", [str(n) for n in LENGTHS], "Caption lengths in words.")
flags.DEFINE_integer("per_length", 2, "Captions (fine-tunes) per length.")
flags.DEFINE_integer("seed", 0, "Seed of the captions drawn, fine-tuning, start noise, search noise and clustering.")
flags.DEFINE_string("point", "dreambooth:5e-4:200", "The fine-tune: FINETUNE:LR:STEPS[:AUGMENT] (as testbed_curve).")
flags.DEFINE_integer("num_images", 64, "Images extracted per prompt.")
flags.DEFINE_integer("steps", 25, "DDIM steps of the extractions.")
_app.define_flags(FeatureConfig, only=("features",), defaults={"features": "pixel"},
                  helps={"features": "Scoring features."})
flags.DEFINE_enum("search_images", "samples", list(SEARCH_IMAGES), "What the caption search denoises: the "
                  "fine-tune's own samples (empty prompt, as an auditor has) or its training images.")
flags.DEFINE_integer("search_num_images", 8, "Samples the search draws (--search_images=samples).")
_app.define_flags(CaptionConfig, only=("max_words", "beam", "score", "timesteps", "min_gain", "refine_sweeps",
                                       "screen_pairs", "keep"), defaults={"screen_pairs": 8})
flags.DEFINE_bool("candidate_windows", False, "Rank every window of 1..--max_words words of the base's training "
                  "captions as a whole caption (WORKDIR/candidate_captions.txt) and refine from the best, "
                  "instead of growing the caption word by word.")
FLAGS = flags.FLAGS


def main(_):
    from finextract_jax import fileio
    from finextract_jax.errors import InputError
    from finextract_jax.testbed import base, caption_table, curve, data

    point = curve.parse_point(FLAGS.point, "point")
    lengths = caption_table.parse_lengths(FLAGS.lengths)
    search = _app.config_from_flags(CaptionConfig, num_images=FLAGS.search_num_images, seed=FLAGS.seed)
    pretrained, workdir = os.path.abspath(FLAGS.pretrained or base.COMMITTED_BASE_DIR), os.path.abspath(FLAGS.workdir)
    if not os.path.isdir(pretrained):
        raise InputError(f"--pretrained {FLAGS.pretrained!r} is not a folder; give the testbed base (SD layout)")
    if FLAGS.data and not os.path.isfile(FLAGS.data):
        raise InputError(f"--data {FLAGS.data!r} does not exist; give the testbed's .npz or leave the flag out (npm)")
    if FLAGS.per_length < 1:
        raise InputError(f"--per_length must be >= 1, got {FLAGS.per_length}")
    fileio.check_not_inside(workdir, "--workdir", {"--pretrained": pretrained, "--data": FLAGS.data},
                            both_ways=True)
    job = caption_table.Job(pretrained, workdir, point, FLAGS.seed, search=search, search_images=FLAGS.search_images,
                            candidate_windows=FLAGS.candidate_windows,
                            run=dict(num_images=FLAGS.num_images, steps=FLAGS.steps, features=FLAGS.features))
    splits = data.load_splits(FLAGS.data)[0]
    with fileio.claimed(workdir, "--workdir"):
        caption_table.caption_table(job, splits, lengths, FLAGS.per_length)
    path = os.path.join(workdir, caption_table.TABLE_FILE)
    logging.info("wrote %s", path)
    with open(path, encoding="utf-8") as f:
        print(f.read(), end="")


if __name__ == "__main__":
    _app.run(main)
