"""Fine-tuning throughput: our jitted DreamBooth and LoRA steps, against PyTorch and across XLA flag sets.

    python benchmarks/bench_finetune.py [--size=tiny|cpu|sd1|testbed] [--methods=dreambooth,lora]
        [--dtypes=float32] [--batch=1] [--steps=20] [--torch] [--torch_passive] [--flag_sets=default,ynn]
        [--rounds=1] [--baseline=DIR[,DIR]]

--size=tiny: make_tiny's pipeline (the test models: 8x8x4 latents, 16 px images).
--size=cpu / sd1: the UNets of bench_sampling.py (18M at 32x32 latents; SD 1.x's 860M at 64x64x4)
with the tiny VAE and text encoder (the UNet dominates a step). Random weights, no downloads.
--size=testbed: the testbed base's model (finextract_jax/testbed/base.py: a 32 px pixel-space UNet and a
3-layer CLIP text encoder, random init) trained as experiments/testbed_base.py trains it: DreamBooth with
the text encoder, AdamW 1e-3 without weight decay, clipping at 1, 10% caption dropout, here on random
uint8 images with random captions (default --methods: dreambooth).
--torch: the same DreamBooth step in PyTorch eager, read from the same folder (diffusers
UNet2DConditionModel, transformers CLIPTextModel; AdamW with the same hyperparameters, clip_grad_norm_,
torch's default threads): for the testbed UNet and text encoder on random token ids of length 77; for
the other sizes the UNet alone on fixed latents and a precomputed context, as our DreamBooth step trains it.
--torch_passive: that step again in a child process with OMP_WAIT_POLICY=PASSIVE (libgomp reads it at
start): its threads sleep at barriers instead of spinning. On a machine whose cores other processes
share, the default's spinning thread holds the core its partner needs to reach the barrier (testbed,
batch 4, load 5 on 2 vCPUs: 11.7 s / step with the default, 0.37 s passive, 0.30 s on 1 thread).
--flag_sets: named XLA flag sets (bench_sampling.FLAG_SETS; `default`: the library's, `ynn`: jaxlib's own),
each running the first method and dtype in its own process (XLA reads its flags once).
--baseline: other checkouts of the project (e.g. `git archive` of a commit, unpacked), each one more row in its
own process (its own benchmarks/bench_finetune.py): a change to the library timed against the code before it.
Every row is timed in --rounds round-robin passes of --steps optimizer steps (best of each), so a shared
machine's changing load falls on all rows alike. Prints one Markdown row per (method, dtype), flag set
and PyTorch: compile seconds (the first step), seconds per step and images/s after it, and each PyTorch
row's seconds per step over the row's (above 1: faster than that PyTorch row).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_sampling import FLAG_SETS, FlagSetChild, flag_set_env, interleaved_best  # noqa: E402

# experiments/testbed_base.py's optimizer (its defaults); everything else is FinetuneConfig's default.
TESTBED_CONFIG = dict(train_text_encoder=True, learning_rate=1e-3, weight_decay=0.0)
TESTBED_IMAGES = 128


def _images(folder: str, count: int = 4):
    import skimage.data
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in ("astronaut", "coffee", "chelsea", "rocket")[:count]:
        path = os.path.join(folder, f"{name}.png")
        if not os.path.exists(path):
            Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path)
    return folder


def make_model(root: str, size: str) -> str:
    """The pipeline folder under root (SD layout, PyTorch-named safetensors), reused when already there."""
    folder = os.path.join(root, "model")
    if os.path.isdir(folder):
        return folder
    if size == "testbed":
        from finextract_jax.testbed import base

        return base.make_init(folder, [])
    from benchmarks.bench_sampling import SIZES
    from finextract_jax.models.tiny import make_tiny

    return make_tiny(folder, unet_overrides=None if size == "tiny" else SIZES[size])


def finetune_config(args, method: str, dtype: str):
    from finextract_jax.finetune import FinetuneConfig

    extra = TESTBED_CONFIG if args.size == "testbed" else {}
    return FinetuneConfig(method=method, dtype=dtype, batch_size=args.batch, rank=args.rank, steps=args.steps + 1,
                          **extra)


def make_trainer(pipe, root: str, size: str, config):
    """The Trainer of a size: the testbed's DropoutTrainer on random images, else skimage photos."""
    if size == "testbed":
        from finextract_jax.models.tokenizer import WORDS
        from finextract_jax.testbed import base

        rng, side = np.random.default_rng(0), pipe.unet.module.sample_size
        images = rng.integers(0, 256, (TESTBED_IMAGES, side, side, 3), dtype=np.uint8)
        captions = [" ".join(rng.choice(WORDS, 4)) for _ in images]
        train_set = base.dropout_train_set(images, captions, [str(i) for i in range(len(images))])
        return base.DropoutTrainer(pipe, train_set, config)
    from finextract_jax.finetune import Trainer, load_train_set

    resolution = pipe.unet.module.sample_size * pipe.vae_scale_factor
    return Trainer(pipe, load_train_set(_images(os.path.join(root, "images")), resolution, "a photo of sks dog"),
                   config)


class StepTimer:
    """A row: each call times `steps` optimizer steps; `compile_s` is its first call, of one step."""

    def _first_step(self, steps: int):
        self.steps = 1
        self.compile_s = self()
        self.steps = steps

    def sync(self):
        pass

    def __call__(self) -> float:
        start = time.perf_counter()
        for _ in range(self.steps):
            self.step()
        self.sync()
        return time.perf_counter() - start


class JaxRow(StepTimer):
    """Our step (`Trainer.step`); its first step compiles it."""

    def __init__(self, trainer, steps: int):
        import jax

        self.trainer, self.block = trainer, jax.block_until_ready
        self.state = trainer.init_state()
        trainer.data(), trainer.frozen()
        self._first_step(steps)

    def step(self):
        self.state, self.metrics = self.trainer.step(self.state)

    def sync(self):
        self.block((self.state.trainable, self.metrics["loss"]))


class TorchRow(StepTimer):
    """The reference step in PyTorch eager: diffusers' UNet (and transformers' CLIP text encoder when the
    config trains it) read from `folder`, MSE on eps at random timesteps, AdamW and clipping as `config` says."""

    def __init__(self, folder: str, config, steps: int):
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        torch.manual_seed(0)
        self.torch, self.config, train_text = torch, config, config.train_text_encoder
        self.unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).train()
        text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).train(train_text)
        self.alphas = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler")).alphas_cumprod
        batch, side = config.batch_size, self.unet.config.sample_size
        self.x0 = torch.rand(batch, self.unet.config.in_channels, side, side) * 2 - 1
        ids = torch.randint(0, text.config.vocab_size, (batch, 77))
        if train_text:
            self.context = lambda: text(ids)[0]
        else:
            with torch.no_grad():
                context = text(ids)[0]
            self.context = lambda: context
        self.params = list(self.unet.parameters()) + (list(text.parameters()) if train_text else [])
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_epsilon, weight_decay=config.weight_decay)
        self._first_step(steps)

    def step(self):
        torch = self.torch
        noise = torch.randn_like(self.x0)
        t = torch.randint(0, len(self.alphas), (len(self.x0),))
        alpha_bar = self.alphas[t].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * self.x0 + (1 - alpha_bar).sqrt() * noise
        loss = torch.nn.functional.mse_loss(self.unet(noisy, t, self.context()).sample, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()


class FinetuneChild(FlagSetChild):
    """One row in a child process under its own environment (XLA and libgomp read theirs once, at start):
    our step (first method and dtype), or with `torch` the PyTorch step; with `tree`, our step as another
    checkout of the project computes it (its own benchmarks/bench_finetune.py). It serves timings by
    bench_sampling's FlagSetChild protocol: a line in, the seconds of one call out."""

    def __init__(self, args, root: str, env: dict, torch: bool = False, tree: str = ""):
        script = os.path.join(os.path.abspath(tree), "benchmarks", "bench_finetune.py") if tree else __file__
        command = [sys.executable, os.path.abspath(script), f"--size={args.size}", f"--batch={args.batch}",
                   f"--steps={args.steps}", f"--methods={args.methods.split(',')[0]}",
                   f"--dtypes={args.dtypes.split(',')[0]}", f"--rank={args.rank}", f"--models_dir={root}", "--serve"]
        self.torch = torch
        self.process = subprocess.Popen(command + ["--torch"] * torch, env=dict(os.environ, **env),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready, _, compile_s = self.process.stdout.readline().strip().partition(" ")
        self.ready = ready == "ready"
        self.compile_s = float(compile_s) if self.ready else None


def serve(row):
    """--serve: announce the compile seconds, then answer each line on stdin with one timed call."""
    print(f"ready {row.compile_s}", flush=True)
    for _ in sys.stdin:
        print(row(), flush=True)


def machine() -> str:
    """The CPU's model name and vector extensions (lscpu), the load average, and the libraries' versions."""
    import importlib.metadata

    lscpu = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                 .stdout.splitlines() if ":" in line)
    flags = lscpu.get("Flags", "").split()
    vectors = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags) or "no AVX2"
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("jax", "jaxlib", "torch"))
    return (f"cpu: {lscpu.get('Model name', '?').strip()} x{os.cpu_count()} ({vectors}); "
            f"load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}; {versions}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "cpu", "sd1", "testbed"])
    parser.add_argument("--methods", default="", help="default: dreambooth,lora (testbed: dreambooth)")
    parser.add_argument("--dtypes", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed call")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch eager DreamBooth step")
    parser.add_argument("--torch_passive", action="store_true", help="and again with OMP_WAIT_POLICY=PASSIVE")
    parser.add_argument("--flag_sets", default="", help="named XLA flag sets (FLAG_SETS), each in a child process")
    parser.add_argument("--baseline", default="", help="other checkouts of the project (DIR[,DIR]): a row each")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing passes over all rows")
    parser.add_argument("--models_dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = args.methods or ("dreambooth" if args.size == "testbed" else "dreambooth,lora")
    os.environ.setdefault("FINEXTRACT_CACHE", "")

    import jax

    from finextract_jax.models.pipeline import load_pipeline

    root = args.models_dir or tempfile.mkdtemp(prefix="bench_finetune.")
    folder = make_model(root, args.size)
    torch_config = finetune_config(args, "dreambooth", "float32")
    if args.serve and args.torch:
        return serve(TorchRow(folder, torch_config, args.steps))
    pipe = load_pipeline(folder, cache_dir=None)
    ours = lambda method, dtype: JaxRow(make_trainer(pipe, root, args.size, finetune_config(args, method, dtype)),
                                        args.steps)
    method, dtype = args.methods.split(",")[0], args.dtypes.split(",")[0]
    if args.serve:
        return serve(ours(method, dtype))
    device = jax.devices()[0]
    print(f"size={args.size} batch={args.batch} steps={args.steps} rounds={args.rounds} devices={jax.device_count()} "
          f"({device.platform}: {getattr(device, 'device_kind', '')}) XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n"
          f"{machine()}", flush=True)
    names, rows, references = [], [], []  # references: (column title, row index) of the PyTorch rows
    if args.torch:
        import torch

        references.append(("vs PyTorch", len(rows)))
        rows.append(TorchRow(folder, torch_config, args.steps))
        names.append(f"pytorch eager, dreambooth float32, {torch.get_num_threads()} threads (reference)")
    for m in args.methods.split(","):
        for d in args.dtypes.split(","):
            rows.append(ours(m, d))
            names.append(f"{m} {d}")
    children = [(FinetuneChild(args, root, {"OMP_WAIT_POLICY": "PASSIVE"}, torch=True),
                 "pytorch eager, dreambooth float32, OMP_WAIT_POLICY=PASSIVE")] if args.torch_passive else []
    children += [(FinetuneChild(args, root, flag_set_env(name)),
                  f"{method} {dtype} [{name}: {FLAG_SETS[name] or 'no flags'}]")
                 for name in args.flag_sets.split(",") if name]
    children += [(FinetuneChild(args, root, {}, tree=tree), f"{method} {dtype} [{tree}]")
                 for tree in args.baseline.split(",") if tree]
    for child, name in children:
        if not child.ready:
            print(f"  {name}: failed to start", flush=True)
            continue
        if child.torch:
            references.append(("vs PyTorch passive", len(rows)))
        rows.append(child)
        names.append(name)
    print(f"  {len(rows)} rows ready", flush=True)
    report = lambda r, best: print(f"  round {r + 1}: " + "; ".join(
        f"{n} {s / args.steps:.3f} s" for n, s in zip(names, best)), flush=True)
    best = [s / args.steps for s in interleaved_best(rows, args.rounds, report)]
    for child, _ in children:
        child.close()
    print(f"\nload average after: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| row | compile s | s / step | images/s |" + "".join(f" {title} |" for title, _ in references))
    print("|---|---|---|---|" + "---|" * len(references))
    for i, (name, row, step) in enumerate(zip(names, rows, best)):
        compile_s = "-" if (i in [r for _, r in references]) else f"{row.compile_s:.1f}"
        ratios = "".join(f" {best[r] / step:.2f}x |" for _, r in references)
        print(f"| {name} | {compile_s} | {step:.3f} | {args.batch / step:.2f} |{ratios}")


if __name__ == "__main__":
    main()
