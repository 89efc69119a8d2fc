"""Recover the caption a checkpoint was fine-tuned with, word by word (docs/method.md §6).

    python -m experiments.caption --pretrained=DIR --finetuned=PATH --workdir=DIR [--images=DIR]
        [--num_images=8] [--max_words=8] [--beam=1] [--score=gain|advantage] [--timesteps=300,500,700,900]
        [--noise_draws=1] [--min_gain=0.002] [--refine_sweeps=2] [--screen_pairs=0 --keep=64]
        [--max_candidates=0] [--words=sks,ohwx] [--seed=0] [--dtype=float32]

Writes DIR/caption.json: {"caption": str, "steps": [{"word", "score", "heldout_gain", ...}], ...}
and prints the caption. --images: extracted or generated images of the fine-tuned model; without
it, --num_images samples of the fine-tuned model with the empty prompt are drawn first. For a
real 49k-token vocabulary use screening, e.g. --screen_pairs=4 --keep=64 --max_candidates=10000.
"""
from absl import flags, logging

from experiments import _app

flags.DEFINE_string("pretrained", None, "Pretrained SD folder (diffusers layout).", required=True)
flags.DEFINE_string("finetuned", None, "Fine-tuned SD folder, unet/ folder, or LoRA file/folder.", required=True)
flags.DEFINE_string("workdir", None, "Output folder (caption.json).", required=True)
flags.DEFINE_string("images", None, "Folder of the fine-tuned model's images (default: sample them).")
flags.DEFINE_integer("num_images", 8, "Images sampled when --images is not given.")
flags.DEFINE_integer("max_words", 8, "Longest caption searched.")
flags.DEFINE_integer("beam", 1, "Beam width (1: greedy).")
flags.DEFINE_enum("score", "gain", ["gain", "advantage"],
                  "gain: fine-tuned error only; advantage: fine-tuned vs pretrained error (docs/method.md §6).")
flags.DEFINE_list("timesteps", ["300", "500", "700", "900"], "Noise levels the errors are measured at.")
flags.DEFINE_integer("noise_draws", 1, "Noise samples per (image, timestep).")
flags.DEFINE_float("min_gain", 0.002, "Relative error reduction a word must bring on held-out noise.")
flags.DEFINE_integer("refine_sweeps", 2, "Passes retrying each position with every candidate or none.")
flags.DEFINE_integer("screen_pairs", 0, "Score all candidates on this many pairs first (0: off) ...")
flags.DEFINE_integer("keep", 64, "... and keep this many for the full set of pairs.")
flags.DEFINE_integer("max_candidates", 0, "Keep the N most frequent vocabulary words (0: all).")
flags.DEFINE_list("words", None, "Extra candidate words (default: common DreamBooth identifiers such as sks).")
flags.DEFINE_integer("batch_size", 512, "UNet evaluations per jitted call.")
flags.DEFINE_integer("seed", 0, "Seed of the noise (and of the sampled images).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter/activation dtype.")
flags.DEFINE_float("lora_scale", 1.0, "Multiplier on a LoRA's alpha/rank scale.")
flags.DEFINE_enum("finetuned_format", "auto", ["auto", "full", "single_file", "lora"], "How to read --finetuned.")
_app.define_allow_pickle()
FLAGS = flags.FLAGS


def main(_):
    import os

    from finextract_jax import caption, fileio
    from finextract_jax.errors import InputError
    from finextract_jax.models.pipeline import load_finetuned, load_pipeline

    try:
        timesteps = tuple(int(t) for t in FLAGS.timesteps)
    except ValueError:
        raise InputError(f"--timesteps must be integers, got {FLAGS.timesteps}") from None
    extra = dict(extra_words=tuple(FLAGS.words)) if FLAGS.words is not None else {}
    config = caption.CaptionConfig(
        max_words=FLAGS.max_words, beam=FLAGS.beam, score=FLAGS.score, timesteps=timesteps,
        noise_draws=FLAGS.noise_draws, min_gain=FLAGS.min_gain, refine_sweeps=FLAGS.refine_sweeps,
        screen_pairs=FLAGS.screen_pairs, keep=FLAGS.keep, max_candidates=FLAGS.max_candidates,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, num_images=FLAGS.num_images, **extra)
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
    caption.write_caption(path, result, {"pretrained": os.path.abspath(FLAGS.pretrained),
                                         "finetuned": os.path.abspath(FLAGS.finetuned),
                                         "images": os.path.abspath(FLAGS.images) if FLAGS.images else None})
    logging.info("caption %r (%d candidates, %.1f s) -> %s", result.caption, result.num_candidates, result.seconds,
                 path)
    print(result.caption)


if __name__ == "__main__":
    _app.run(main)
