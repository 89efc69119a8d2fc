"""Recover the caption a checkpoint was fine-tuned with, word by word (docs/method.md §6).

    python -m experiments.caption --pretrained=DIR --finetuned=PATH --workdir=DIR [--images=DIR]
        [--num_images=8] [--max_words=8] [--beam=1] [--score=gain|advantage] [--timesteps=300,500,700,900]
        [--noise_draws=1] [--min_gain=0.002] [--refine_sweeps=2] [--screen_pairs=0 --keep=64]
        [--max_candidates=0] [--words=sks,ohwx] [--candidates=FILE] [--seed=0] [--dtype=float32]

Writes DIR/caption.json: {"caption": str, "steps": [{"word", "score", "heldout_gain", ...}], ...}
and prints the caption. --images: extracted or generated images of the fine-tuned model; without
it, --num_images samples of the fine-tuned model with the empty prompt are drawn first. For a
real 49k-token vocabulary use screening, e.g. --screen_pairs=4 --keep=64 --max_candidates=10000.
--candidates=FILE (one caption per line, '#' comments): rank those whole captions against the empty
prompt and refine from the best one instead of growing word by word; caption.json then lists the
best 20 as "ranking".
"""
from absl import flags, logging

from experiments import _app

from finextract_jax.caption import CaptionConfig  # noqa: E402 - its fields are flags
from finextract_jax.sampling.run import ExtractConfig  # noqa: E402 - the checkpoint pair's flags

_app.define_flags(ExtractConfig, only=("pretrained", "finetuned", "dtype", "lora_scale", "finetuned_format"))
flags.DEFINE_string("workdir", None, "Output folder (caption.json).", required=True)
flags.DEFINE_string("images", None, "Folder of the fine-tuned model's images (default: sample them).")
_app.define_flags(CaptionConfig)
_app.define_allow_pickle()
FLAGS = flags.FLAGS


def main(_):
    import os

    from finextract_jax import caption, fileio
    from finextract_jax.models.hub import as_recorded
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    config = _app.config_from_flags(CaptionConfig)
    fileio.check_output_dir(FLAGS.workdir, "--workdir")
    fileio.check_not_inside(FLAGS.workdir, "--workdir", {"--pretrained": FLAGS.pretrained,
                                                         "--finetuned": FLAGS.finetuned, "--images": FLAGS.images},
                            both_ways=True)
    logging.info("recovering the caption of %s (base %s)", FLAGS.finetuned, FLAGS.pretrained)
    pretrained = load_pipeline(FLAGS.pretrained, dtype=FLAGS.dtype, allow_pickle=FLAGS.allow_pickle)
    finetuned = load_finetuned(pretrained, FLAGS.finetuned, FLAGS.finetuned_format, "unmerged", FLAGS.lora_scale,
                               dtype=FLAGS.dtype, allow_pickle=FLAGS.allow_pickle)
    images = caption.load_image_folder(FLAGS.images, pretrained) if FLAGS.images else None
    result = caption.recover_caption(pretrained, finetuned, images=images, config=config, progress=True)
    path = os.path.join(fileio.claim_dir(FLAGS.workdir, "--workdir"), caption.CAPTION_FILE)
    caption.write_caption(path, result, {"pretrained": as_recorded(FLAGS.pretrained),
                                         "finetuned": as_recorded(FLAGS.finetuned),
                                         "images": os.path.abspath(FLAGS.images) if FLAGS.images else None})
    logging.info("caption %r (%d candidates, %.1f s) -> %s", result.caption, result.num_candidates, result.seconds,
                 path)
    print(result.caption)


if __name__ == "__main__":
    _app.run(main)
