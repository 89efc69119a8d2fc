"""Sample images from a (pretrained, fine-tuned) pair with model guidance (FineXtract) or a baseline.

    python -m experiments.extract --pretrained=DIR|ORG/NAME --finetuned=PATH|ORG/NAME --workdir=DIR [--prompt=TEXT|auto]
        [--method=finextract|finextract_caption|cfg|text2img] [--guidance_scale=3.0] [--correction=-0.02]
        [--num_images=500] [--batch_size=5] [--steps=50] [--sampler=ddim|reference_ddim|dpm]
        [--seed=0] [--init_latents=FILE.npy] [--dtype=float32|bfloat16] [--lora_scale=1.0]
        [--finetuned_format=auto|full|single_file|lora] [--fusion=auto|two_applies|vmap|lora_batch] [--allow_pickle]

Writes DIR/images/NNNNN.png as batches finish and DIR/run.json. Rerunning the same command
resumes; rerunning with other settings into the same workdir is refused.
Reference settings: DreamBooth w=3.0, k=-0.02; LoRA w=5.0, k=0.0.
"""
from absl import flags, logging

from experiments import _app

from finextract_jax.sampling.run import ExtractConfig  # noqa: E402 - its fields are the flags

_app.define_flags(ExtractConfig)
flags.DEFINE_string("workdir", None, "Output folder (images/ and run.json).", required=True)
_app.define_distributed_flags("automatic on multi-host TPU slices")
_app.define_allow_pickle()
FLAGS = flags.FLAGS


def main(_):
    import jax

    from finextract_jax.sampling.run import AUTO_PROMPT, extract, initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    config = _app.config_from_flags(ExtractConfig)
    logging.info("%s: %d images of %s into %s", config.method, config.num_images, config.finetuned, FLAGS.workdir)
    recover_caption = None
    if config.prompt == AUTO_PROMPT:
        from finextract_jax.caption import auto_prompt_resolver

        recover_caption = auto_prompt_resolver(FLAGS.workdir, progress=jax.process_index() == 0)
    record = extract(config, FLAGS.workdir, recover_caption=recover_caption, allow_pickle=FLAGS.allow_pickle)
    logging.info("%s: %d images in %s/images (fusion %s)", record["status"], config.num_images, FLAGS.workdir,
                 record.get("fusion"))


if __name__ == "__main__":
    _app.run(main)
