"""Fine-tuning on tiny random pipelines: loss goes down, exports load in diffusers PyTorch and match,
augmentations are seeded, a resumed run equals an uninterrupted one, bad inputs fail clearly.

Compilations dominate the runtime, so tests that can share one reuse the same Trainer config
(equal configs on the same pipeline object share one compiled step).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict

from finextract_jax.errors import InputError
from finextract_jax.finetune import FinetuneConfig, Trainer, augment, load_train_set
from finextract_jax.finetune import lora as ft_lora
from finextract_jax.finetune.inputs import check_resolution
from finextract_jax.noise_schedule import add_noise, training_target

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "a photo of sks dog"
# One config per compiled step: DreamBooth on sd1 (loss, export, resume, the binary), LoRA with
# the text encoder and RandAugment (latents encoded inside the step) on sd2 (v-prediction).
DREAMBOOTH = FinetuneConfig(method="dreambooth", steps=12, learning_rate=3e-4, batch_size=2, grad_accum=2, seed=3)
LORA = FinetuneConfig(method="lora", steps=2, learning_rate=1e-3, rank=4, lora_alpha=8, train_text_encoder=True,
                      augment="randaugment", seed=5)


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """Four real photos (non-square ones too), one captioned in metadata.csv."""
    import skimage.data
    from PIL import Image

    folder = tmp_path_factory.mktemp("train")
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((48, 40)).save(folder / f"{name}.png")
    (folder / "metadata.csv").write_text('file_name,caption\nrocket.png,"a rocket, at night"\n')
    return str(folder)


@pytest.fixture(scope="module")
def sd1_trainer(tiny_pipe, train_dir):
    return Trainer(tiny_pipe("sd1"), load_train_set(train_dir, 16, CAPTION), DREAMBOOTH)


@pytest.fixture(scope="module")
def dreambooth_run(sd1_trainer):
    """(initial eval loss, trained state, final eval loss) of an uninterrupted run."""
    before = sd1_trainer.eval_loss(sd1_trainer.init_state())
    state = sd1_trainer.fit(progress=False)
    return before, state, sd1_trainer.eval_loss(state)


# ---- data and inputs ------------------------------------------------------------------------


def test_train_set_captions_and_center_crop(train_dir):
    train_set = load_train_set(train_dir, 16, CAPTION)
    assert train_set.files == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]
    assert train_set.captions == [CAPTION, CAPTION, CAPTION, "a rocket, at night"]
    assert train_set.pixels.shape == (4, 3, 16, 16) and train_set.pixels.dtype == np.float32
    assert -1.0 <= train_set.pixels.min() < train_set.pixels.max() <= 1.0
    # shorter side (40) to 16 -> 19x16, then the centre 16 columns (torchvision's rounding).
    from PIL import Image

    with Image.open(os.path.join(train_dir, "coffee.png")) as image:
        resized = np.asarray(image.convert("RGB").resize((19, 16), Image.BILINEAR), np.float32)
    np.testing.assert_allclose(train_set.pixels[2], resized[:, 2:18].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)


def test_bad_inputs_give_clear_errors(tmp_path, train_dir, tiny_pipe):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        load_train_set(str(empty), 16, CAPTION)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ok.png").write_bytes(open(os.path.join(train_dir, "coffee.png"), "rb").read())
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="cannot read image .*bad.jpg"):
        load_train_set(str(broken), 16, CAPTION)
    with pytest.raises(InputError, match="no caption"):
        load_train_set(train_dir, 16, None)
    with pytest.raises(InputError, match="not a positive multiple of the VAE factor 2"):
        check_resolution(tiny_pipe("sd1"), 15)
    with pytest.raises(InputError, match="multiple of 4"):
        check_resolution(tiny_pipe("sd1"), 18)  # 9x9 latents cannot be downsampled once
    for rank in (0, -4):
        with pytest.raises(InputError, match="--rank must be a positive integer"):
            FinetuneConfig(method="lora", rank=rank)
    with pytest.raises(InputError, match="--augment"):
        FinetuneConfig(augment="mixup")
    with pytest.raises(InputError, match="--method"):
        FinetuneConfig(method="full")


def test_noise_and_targets_match_diffusers():
    import torch
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    rng = np.random.RandomState(0)
    x0, noise = rng.randn(3, 4, 8, 8).astype(np.float32), rng.randn(3, 4, 8, 8).astype(np.float32)
    t = np.array([0, 500, 999])
    abar = jnp.asarray(scheduler.alphas_cumprod.numpy()[t])
    ref_noisy = scheduler.add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
    ref_v = scheduler.get_velocity(torch.tensor(x0), torch.tensor(noise), torch.tensor(t)).numpy()
    np.testing.assert_allclose(add_noise(x0, noise, abar), ref_noisy, atol=1e-6)
    np.testing.assert_allclose(training_target(x0, noise, abar, "v_prediction"), ref_v, atol=1e-6)
    assert training_target(x0, noise, abar, "epsilon") is noise


# ---- augmentations --------------------------------------------------------------------------


def test_augmentations_are_seeded_and_change_images(train_dir):
    images = jnp.asarray(load_train_set(train_dir, 16, CAPTION).pixels)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    other = jax.random.split(jax.random.PRNGKey(1), 4)
    for name in ("cutout", "randaugment"):
        config = augment.AugmentConfig(name)
        run = jax.jit(lambda k, x, config=config: augment.augment_batch(config, k, x))
        a, b, c = np.asarray(run(keys, images)), np.asarray(run(keys, images)), np.asarray(run(other, images))
        assert a.shape == images.shape and np.array_equal(a, b), name
        assert not np.array_equal(a, c), name
        assert not np.allclose(a, images), name
        assert a.min() >= -1.0 - 1e-6 and a.max() <= 1.0 + 1e-6
    assert augment.augment_batch(augment.AugmentConfig("none"), keys, images) is images


def test_each_randaugment_op_acts():
    import skimage.data

    # 64x64 (Equalize leaves images of <= 256 pixels alone), contrast lowered so AutoContrast acts.
    image = jnp.asarray(skimage.data.astronaut()[::8, ::8] / 255.0 * 0.6 + 0.2, jnp.float32)
    ops = jnp.arange(len(augment.RANDAUGMENT_OPS))
    out = jax.jit(jax.vmap(lambda i: augment.randaugment_op(image, i, jnp.bool_(False))))(ops)
    changed = {name: not np.allclose(out[i], image) for i, name in enumerate(augment.RANDAUGMENT_OPS)}
    assert changed.pop("Identity") is False
    assert all(changed.values()), changed
    # torchvision's Solarize: invert pixels >= threshold (bin 9 of 31 -> 178.5 / 255).
    solarized = np.asarray(out[augment.RANDAUGMENT_OPS.index("Solarize")])
    np.testing.assert_allclose(solarized, np.where(image >= 0.7, 1 - image, image), atol=1e-6)


# ---- DreamBooth -----------------------------------------------------------------------------


def test_dreambooth_lowers_loss(dreambooth_run, sd1_trainer):
    before, state, after = dreambooth_run
    assert state.step == DREAMBOOTH.steps
    assert after < 0.9 * before, (before, after)
    assert len(sd1_trainer.losses) == DREAMBOOTH.steps and all(np.isfinite(l) for _, l in sd1_trainer.losses)


def test_bfloat16_compute_tracks_float32(tiny_pipe, train_dir, sd1_trainer):
    bf16 = Trainer(tiny_pipe("sd1"), load_train_set(train_dir, 16, CAPTION),
                   FinetuneConfig(**{**DREAMBOOTH.__dict__, "dtype": "bfloat16"}))
    state = sd1_trainer.init_state()
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(bf16.init_state().trainable))
    full, half = sd1_trainer.eval_loss(state), bf16.eval_loss(state)
    assert abs(half - full) < 0.05 * full, (full, half)


def test_dreambooth_export_loads_in_diffusers(dreambooth_run, sd1_trainer, tiny_pipe, tmp_path):
    import torch
    from diffusers import UNet2DConditionModel

    from finextract_jax.models.pipeline import load_finetuned

    _, state, _ = dreambooth_run
    out = sd1_trainer.export(state, str(tmp_path / "victim"))
    assert sorted(os.listdir(out)) == [".finextract",  # the marker: a rerun may replace this folder
                                       "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert os.listdir(os.path.join(out, "unet")) and "diffusion_pytorch_model.safetensors" in os.listdir(
        os.path.join(out, "unet"))
    params = state.trainable["unet"]
    base = tiny_pipe("sd1")
    assert not np.allclose(flatten_dict(params)[("conv_in", "kernel")], flatten_dict(base.unet.params)[("conv_in", "kernel")])

    torch_unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    rng = np.random.RandomState(0)
    x = rng.randn(2, 4, 8, 8).astype(np.float32)
    context = rng.randn(2, 77, 32).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = torch_unet(torch.tensor(x), torch.tensor(t), torch.tensor(context)).sample.numpy()
    ours = base.unet.module.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4

    loaded = load_finetuned(base, out, cache_dir=None)
    a, b = flatten_dict(loaded.unet.params), flatten_dict(params)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in b)


def test_dreambooth_export_of_a_flax_model_is_pytorch(tiny_pipe, torch_pipe, tmp_path):
    """Pretrained parts held as Flax msgpack are written as safetensors, so diffusers PyTorch loads it all."""
    from diffusers import StableDiffusionPipeline

    from finextract_jax.finetune.export import save_dreambooth
    from finextract_jax.finetune.train import dreambooth_components

    pipe = tiny_pipe("sd1_flax")
    out = save_dreambooth(str(tmp_path / "from_flax"), pipe.path, dreambooth_components(pipe, pipe.unet.params))
    assert not any(f.endswith(".msgpack") for _, _, files in os.walk(out) for f in files)
    loaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    reference = torch_pipe("sd1")  # same seed, PyTorch weights
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == ref.keys(), name
        assert all(np.array_equal(ours[k].numpy(), ref[k].numpy()) for k in ref), name


def test_resume_after_interrupt_gives_identical_parameters(dreambooth_run, sd1_trainer, tiny_pipe, train_dir,
                                                           tmp_path):
    _, uninterrupted, _ = dreambooth_run
    checkpoints = str(tmp_path / "ckpt")

    class Killed(Exception):
        pass

    def kill_at_7(state, metrics):
        if state.step == 7:
            raise Killed

    first = Trainer(tiny_pipe("sd1"), sd1_trainer.train_set, DREAMBOOTH)
    with pytest.raises(Killed):
        first.fit(checkpoint_dir=checkpoints, checkpoint_every=3, progress=False, callback=kill_at_7)
    assert sorted(os.listdir(os.path.join(checkpoints, "steps")))[-1] == "6"

    resumed_trainer = Trainer(tiny_pipe("sd1"), sd1_trainer.train_set, DREAMBOOTH)
    resumed = resumed_trainer.fit(checkpoint_dir=checkpoints, checkpoint_every=3, progress=False)
    assert resumed.step == DREAMBOOTH.steps
    assert [s for s, _ in resumed_trainer.losses] == list(range(7, DREAMBOOTH.steps + 1))
    a, b = flatten_dict(uninterrupted.trainable), flatten_dict(resumed.trainable)
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)
    mu_a = jax.tree_util.tree_leaves(uninterrupted.opt_state)
    mu_b = jax.tree_util.tree_leaves(resumed.opt_state)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(mu_a, mu_b))

    other = Trainer(tiny_pipe("sd1"), sd1_trainer.train_set, FinetuneConfig(**{**DREAMBOOTH.__dict__, "seed": 4}))
    with pytest.raises(InputError, match="different run"):
        other.fit(checkpoint_dir=checkpoints, progress=False)


# ---- LoRA -----------------------------------------------------------------------------------


def test_lora_export_loads_in_diffusers(tiny_pipe, torch_pipe, train_dir, tmp_path):
    import torch

    from finextract_jax.models.pipeline import encode_prompts, load_finetuned, tokenize

    pipe = tiny_pipe("sd2")  # v-prediction, linear projections
    trainer = Trainer(pipe, load_train_set(train_dir, 16, CAPTION), LORA)
    initial = trainer.init_state()
    ups = [v for k, v in flatten_dict(initial.trainable).items() if k[-1] == "up"]
    assert ups and all(not np.any(np.asarray(u)) for u in ups)  # B = 0: starts at the pretrained model
    paths = ft_lora.target_paths(pipe.unet.params, ft_lora.UNET_TARGETS)
    assert {ft_lora.module_name(p).rsplit(".", 1)[-1] for p in paths} == {"to_q", "to_k", "to_v", "0"}
    state = trainer.fit(progress=False)
    assert any(np.any(np.asarray(v)) for k, v in flatten_dict(state.trainable).items() if k[-1] == "up")

    # Random factors, so that a wrong key, transpose or scale could not hide behind B ~ 0.
    flat = flatten_dict(jax.device_get(state.trainable))
    rng = np.random.RandomState(0)
    noisy = {k: (rng.randn(*v.shape) * 0.2).astype(np.float32) for k, v in flat.items()}
    from flax.traverse_util import unflatten_dict

    factors = unflatten_dict(noisy)
    state.trainable = factors
    out = trainer.export(state, str(tmp_path / "lora"))
    assert out.endswith("pytorch_lora_weights.safetensors")
    from safetensors import safe_open

    with safe_open(out, framework="np") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        keys = list(f.keys())
    assert metadata["unet.r"] == 4 and metadata["unet.lora_alpha"] == 8 and metadata["text_encoder.r"] == 4
    assert sorted(metadata["unet.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert all(k.startswith(("unet.", "text_encoder.")) and k.endswith(("lora_A.weight", "lora_B.weight"))
               for k in keys)

    tp = torch_pipe("sd2")
    tp.load_lora_weights(str(tmp_path / "lora"))
    ids = tokenize(pipe.tokenizer, [CAPTION, ""])
    with torch.no_grad():
        ref_text = tp.text_encoder(torch.tensor(ids, dtype=torch.long))[0].numpy()
    text_params = ft_lora.merge(pipe.text_encoder.params, factors["text_lora"], LORA.lora_scale)
    ours_text = np.asarray(pipe.text_encoder.module(jnp.asarray(ids), params=text_params, train=False)[0])
    assert np.abs(ours_text - ref_text).max() <= 1e-4
    x = rng.randn(2, 4, 8, 8).astype(np.float32)
    t = np.array([10, 700])
    with torch.no_grad():
        ref = tp.unet(torch.tensor(x), torch.tensor(t), torch.tensor(ref_text)).sample.numpy()
    variables = {"params": pipe.unet.params, "lora": ft_lora.scaled(factors["unet_lora"], LORA.lora_scale)}
    ours = np.asarray(pipe.unet.module.apply(variables, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ref_text)))
    plain = np.asarray(pipe.unet.module.apply({"params": pipe.unet.params}, jnp.asarray(x), jnp.asarray(t),
                                              jnp.asarray(ref_text)))
    assert np.abs(ours - plain).max() > 1e-2  # the LoRA does something
    assert np.abs(ours - ref).max() <= 1e-4
    tp.unload_lora_weights()

    # Our loader reads the file back to the same model.
    loaded = load_finetuned(pipe, str(tmp_path / "lora"), lora_mode="unmerged", cache_dir=None)
    again = np.asarray(pipe.unet.module.apply(loaded.unet_variables(), jnp.asarray(x), jnp.asarray(t),
                                              jnp.asarray(ref_text)))
    assert np.abs(again - ours).max() <= 1e-5
    loaded_text = np.asarray(encode_prompts(loaded.text_encoder, loaded.tokenizer, [CAPTION, ""]))
    assert np.abs(loaded_text - ours_text).max() <= 1e-5


# ---- the binary, data-parallel --------------------------------------------------------------


def _binary_env(devices=1):
    # conftest's FINEXTRACT_CACHE="" and JAX_COMPILATION_CACHE_DIR (shared compiles) come with os.environ.
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                FINEXTRACT_CACHE="")


def _run_binary(args, devices=1, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.finetune", *args], cwd=REPO, env=_binary_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def test_binary_bad_input_is_one_line(tmp_path, tiny_dir, train_dir):
    result = _run_binary([f"--pretrained={tiny_dir['sd1']}", f"--train_dir={train_dir}", "--method=lora",
                          "--rank=0", f"--out={tmp_path / 'out'}", f"--caption={CAPTION}"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --rank must be a positive integer, got 0"]
    assert not os.path.exists(tmp_path / "out")


def test_binary_data_parallel_matches_one_device(tmp_path, tiny_dir, tiny_pipe, train_dir):
    """The binary on 2 host devices == the same run on 1 device in this process (same compiled step)."""
    import re

    from finextract_jax.models.pipeline import load_finetuned

    out = tmp_path / "victim"
    config = FinetuneConfig(**{**DREAMBOOTH.__dict__, "steps": 2})
    result = _run_binary([f"--pretrained={tiny_dir['sd1']}", f"--train_dir={train_dir}", f"--out={out}",
                          f"--caption={CAPTION}", "--method=dreambooth", "--steps=2", "--checkpoint_every=1",
                          f"--batch_size={config.batch_size}", f"--grad_accum={config.grad_accum}",
                          f"--learning_rate={config.learning_rate}", f"--seed={config.seed}"], devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 device(s)" in result.stdout and "steps/s" in result.stdout  # logs go to stdout (experiments/_app.py)
    assert "orbax" not in result.stdout.lower()  # its INFO chatter is filtered
    assert not os.path.exists(str(out) + ".checkpoints")  # removed after a successful export
    logged = float(re.search(r"step 2/2 loss \S+ \(mean of last 2: (\S+)\)", result.stdout).group(1))

    trainer = Trainer(tiny_pipe("sd1"), load_train_set(train_dir, 16, CAPTION), config)
    assert trainer.mesh.devices.size == 1
    state = trainer.fit(progress=False)
    assert abs(np.mean([l for _, l in trainer.losses]) - logged) <= 2e-5
    ours = flatten_dict(state.trainable["unet"])
    exported = flatten_dict(load_finetuned(tiny_pipe("sd1"), str(out), cache_dir=None).unet.params)
    # Adam turns a rounding difference in a near-zero gradient into up to lr per step, so compare
    # the bulk of the parameters tightly and the rest against that bound.
    diffs = np.concatenate([np.abs(np.asarray(ours[k]) - np.asarray(exported[k])).ravel() for k in ours])
    quantiles = np.quantile(diffs, [0.5, 0.99, 0.999, 1.0]) / config.lr
    assert quantiles[0] <= 1e-3 and quantiles[2] <= 0.1 and quantiles[3] <= 2 * config.steps, quantiles


def test_pixel_model_trains_on_pixels(tiny_pipe, train_dir):
    trainer = Trainer(tiny_pipe("pixel"), load_train_set(train_dir, 16, CAPTION), DREAMBOOTH)
    assert "pixels" in trainer.data() and "latent_mean" not in trainer.data()
    assert trainer.spec.sample_shape == (3, 16, 16) and trainer.spec.vae is None
    np.testing.assert_array_equal(np.asarray(trainer.data()["pixels"]), trainer.train_set.pixels)


def _safetensors_under(folder):
    """{relative path: {key: array}} of every .safetensors file under `folder`."""
    from safetensors.numpy import load_file

    return {os.path.relpath(os.path.join(root, f), folder): load_file(os.path.join(root, f))
            for root, _, files in os.walk(folder) for f in files if f.endswith(".safetensors")}


def test_binary_killed_mid_run_resumes_to_identical_export(tmp_path, tiny_dir, train_dir):
    """SIGKILL the binary while it saves a checkpoint (an earlier one already on disk), rerun the same
    command: its export equals an uninterrupted run's bit for bit, and the killed run left no output."""
    import shutil
    import signal
    import time

    def start(name, checkpoint_every, log_name=None):
        args = [sys.executable, "-m", "experiments.finetune", f"--pretrained={tiny_dir['sd1']}",
                f"--train_dir={train_dir}", f"--out={tmp_path / name}", f"--caption={CAPTION}", "--method=dreambooth",
                f"--steps={DREAMBOOTH.steps}", f"--batch_size={DREAMBOOTH.batch_size}",
                f"--grad_accum={DREAMBOOTH.grad_accum}", f"--learning_rate={DREAMBOOTH.learning_rate}",
                f"--seed={DREAMBOOTH.seed}", f"--checkpoint_every={checkpoint_every}"]
        log_file = open(tmp_path / f"{log_name or name}.log", "w")
        return subprocess.Popen(args, cwd=REPO, env=_binary_env(), stdout=log_file, stderr=subprocess.STDOUT), log_file

    def finish(run, timeout=300):
        proc, log_file = run
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log_file.close()
        return proc.returncode, open(log_file.name).read()

    # The uninterrupted run, alongside (the checkpoint interval is not part of a run: it changes no
    # parameter); both compile the step, into the session's shared compilation cache.
    reference = start("reference", 0)
    try:
        out, steps_dir = tmp_path / "victim", tmp_path / "victim.checkpoints" / "steps"
        victim = start("victim", 4)
        deadline, killed = time.monotonic() + 300, False
        try:
            while victim[0].poll() is None and time.monotonic() < deadline:
                names = os.listdir(steps_dir) if steps_dir.is_dir() else []
                # A finalised checkpoint, and orbax writing the next one (<step>.orbax-checkpoint-tmp).
                if any(n.isdigit() for n in names) and any(not n.isdigit() for n in names):
                    victim[0].send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.005)
        finally:
            code, log = finish(victim, timeout=60)
        assert killed and code == -signal.SIGKILL, (
            f"the run was not killed mid-way (exit {code}): it ended or timed out before a checkpoint was on disk "
            f"and the next one under way; give it more steps\n{log[-3000:]}")
        assert not os.path.lexists(out), "a killed run left (part of) its export behind"
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".finetune.")]  # nor a staging folder
        names = os.listdir(steps_dir)
        finalised = sorted(int(n) for n in names if n.isdigit())
        assert finalised and finalised[-1] < DREAMBOOTH.steps, names
        if all(n.isdigit() for n in names):  # the save finished between the last poll and the kill:
            partial = steps_dir / f"{finalised[-1] + 4}.orbax-checkpoint-tmp"  # leave half of one
            shutil.copytree(steps_dir / str(finalised[-1]), partial)
            for root, _, files in os.walk(partial):
                for f in files[: len(files) // 2 + 1]:
                    os.truncate(os.path.join(root, f), 0)

        code, log = finish(start("victim", 4, log_name="rerun"))  # the same command again
        assert code == 0, log[-3000:]
        assert f"resuming at step {finalised[-1]} of {DREAMBOOTH.steps}" in log, log[-3000:]
        assert not os.path.exists(str(out) + ".checkpoints")  # removed after the export
    finally:
        code, log = finish(reference)
    assert code == 0, log[-3000:]

    ours, ref = _safetensors_under(out), _safetensors_under(tmp_path / "reference")
    assert sorted(ours) == sorted(ref) and "unet/diffusion_pytorch_model.safetensors" in ref, (ours.keys(), ref.keys())
    for name in ref:
        assert ours[name].keys() == ref[name].keys(), name
        for key in ref[name]:
            assert np.array_equal(ours[name][key], ref[name][key]), (name, key)


def test_weight_average_follows_diffusers_warm_up():
    from finextract_jax.finetune.weight_average import averaged_weights, weight_average

    transform = weight_average(0.9)
    params = {"w": jnp.array([1.0, -2.0])}
    state = transform.init(params)
    expected = np.array([1.0, -2.0])
    for t, step in enumerate([np.array([0.5, 0.0]), np.array([-1.0, 3.0]), np.array([2.0, 2.0])]):
        updates, state = transform.update({"w": jnp.asarray(step)}, state, params)
        np.testing.assert_array_equal(updates["w"], step)  # passed through unchanged
        params = {"w": params["w"] + step}
        decay = min(0.9, (1 + t) / (10 + t))
        expected = decay * expected + (1 - decay) * np.asarray(params["w"])
    np.testing.assert_allclose(averaged_weights(state)["w"], expected, rtol=1e-6)
    assert averaged_weights((optax.EmptyState(), ())) is None


def test_export_writes_the_weight_average(tiny_pipe, train_dir, tmp_path):
    from finextract_jax.finetune.train import TrainState
    from finextract_jax.finetune.weight_average import WeightAverage
    from finextract_jax.models.pipeline import load_finetuned

    config = FinetuneConfig(**{**DREAMBOOTH.__dict__, "ema_decay": 0.99})
    assert "ema_decay" in config.identity() and "ema_decay" not in DREAMBOOTH.identity()
    trainer = Trainer(tiny_pipe("sd1"), load_train_set(train_dir, 16, CAPTION), config)
    state = trainer.init_state()
    clip, adamw, average = state.opt_state
    shifted = jax.tree_util.tree_map(lambda a: a + 1.0, average.average)
    state = TrainState(state.step, state.trainable, (clip, adamw, WeightAverage(average.count, shifted)))
    loaded = load_finetuned(tiny_pipe("sd1"), trainer.export(state, str(tmp_path / "averaged")), cache_dir=None)
    np.testing.assert_array_equal(flatten_dict(loaded.unet.params)[("conv_in", "kernel")],
                                  flatten_dict(shifted["unet"])[("conv_in", "kernel")])
    with pytest.raises(InputError, match="ema_decay"):
        FinetuneConfig(ema_decay=1.0)
