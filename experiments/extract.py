"""Sample images from a (pretrained, fine-tuned) pair with model guidance (FineXtract) or a baseline.

    python -m experiments.extract --pretrained=DIR --finetuned=PATH --workdir=DIR [--prompt=TEXT]
        [--method=finextract|cfg|text2img] [--guidance_scale=3.0] [--correction=-0.02]
        [--num_images=500] [--batch_size=5] [--steps=50] [--sampler=ddim|reference_ddim|dpm]
        [--seed=0] [--init_latents=FILE.npy] [--dtype=float32|bfloat16] [--lora_scale=1.0]
        [--finetuned_format=auto|full|single_file|lora] [--fusion=auto|two_applies|vmap|lora_batch] [--allow_pickle]

Writes DIR/images/NNNNN.png as batches finish and DIR/run.json. Rerunning the same command
resumes; rerunning with other settings into the same workdir is refused.
Reference settings: DreamBooth w=3.0, k=-0.02; LoRA w=5.0, k=0.0.
"""
from absl import flags, logging

from experiments import _app

flags.DEFINE_string("pretrained", None, "Pretrained SD folder (diffusers layout) or single-file checkpoint.",
                    required=True)
flags.DEFINE_string("finetuned", None, "Fine-tuned SD folder, unet/ folder, single-file checkpoint, or LoRA "
                    "file/folder.", required=True)
flags.DEFINE_string("workdir", None, "Output folder (images/ and run.json).", required=True)
flags.DEFINE_string("prompt", "", "Fine-tuning caption; empty for unconditional extraction; 'auto' recovers it "
                    "from the two models first (kept in workdir/caption.json, as the caption binary writes).")
flags.DEFINE_enum("method", "finextract", ["finextract", "cfg", "text2img"], "Guidance method.")
flags.DEFINE_float("guidance_scale", 3.0, "w for finextract, s for cfg (unused by text2img).")
flags.DEFINE_float("correction", -0.02, "k for finextract (the eps_pre correction term).")
flags.DEFINE_integer("num_images", 500, "Number of images N.")
flags.DEFINE_integer("batch_size", 5, "Images per batch (a multiple of the device count).")
flags.DEFINE_integer("steps", 50, "Denoising steps.")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "reference_ddim", "dpm"],
                  "ddim: clean DDIM to abar=1; reference_ddim: the reference implementation's schedule; "
                  "dpm: DPM-Solver++(2M) for fewer steps.")
flags.DEFINE_integer("seed", 0, "Image i's start noise depends only on (seed, i).")
flags.DEFINE_string("init_latents", None, "Optional .npy [num_images, C, H, W] of start noise.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter/activation dtype.")
flags.DEFINE_float("lora_scale", 1.0, "Multiplier on a LoRA's alpha/rank scale.")
flags.DEFINE_enum("finetuned_format", "auto", ["auto", "full", "single_file", "lora"], "How to read --finetuned.")
flags.DEFINE_enum("fusion", "auto", ["auto", "two_applies", "vmap", "lora_batch"],
                  "How the two UNet evaluations of a step are fused in the compiled loop.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run "
                    "(automatic on multi-host TPU slices).")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_app.define_allow_pickle()
FLAGS = flags.FLAGS


def main(_):
    import jax

    from finextract_jax.sampling.run import AUTO_PROMPT, ExtractConfig, extract, initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)

    config = ExtractConfig(
        pretrained=FLAGS.pretrained, finetuned=FLAGS.finetuned, prompt=FLAGS.prompt, method=FLAGS.method,
        guidance_scale=FLAGS.guidance_scale, correction=FLAGS.correction, num_images=FLAGS.num_images,
        batch_size=FLAGS.batch_size, steps=FLAGS.steps, sampler=FLAGS.sampler, seed=FLAGS.seed,
        init_latents=FLAGS.init_latents, dtype=FLAGS.dtype, lora_scale=FLAGS.lora_scale,
        finetuned_format=FLAGS.finetuned_format, fusion=FLAGS.fusion)
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
