"""Caption recovery: candidates and token rows, the batched scorer, recovery of short captions,
caption.json, extract's --prompt=auto helper, and the caption binary.

Why an analytic fine-tune: a tiny randomly initialised pipeline fine-tuned for a few hundred steps
does not learn to *read* its caption (its denoising error on the training images is within ~1% for
the true caption, the empty prompt or any other; see benchmarks/RESULTS.md), so there is nothing
to recover from it. `MemorizingUNet` is the fine-tune such a model stands for: the ideal denoiser
of its training images, blended in by how close the prompt's CLIP context is to the caption's (the
base UNet elsewhere). It runs the real tiny text encoder and UNet, and the search cannot see
the caption except through the denoising errors.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finextract_jax import caption as caption_lib
from finextract_jax.errors import InputError
from finextract_jax.models.pipeline import encode_prompts, tokenize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Few pairs and one refine sweep: enough on the analytic model, and fast on 2 CPU cores.
FAST = caption_lib.CaptionConfig(score="gain", timesteps=(500, 800), max_words=4, refine_sweeps=1)


class MemorizingUNet:
    """eps(x, t, c) = m(c) * eps_ideal(x, t) + (1 - m(c)) * eps_base(x, t, c), m(c) = exp(-d(c, c*) / tau),
    d = mean squared difference of the CLIP contexts; eps_ideal is the posterior-mean denoiser of
    the training set `memory/x0`. Duck-types the flax module where caption.py uses it."""

    def __init__(self, base, tau: float = 0.1):
        self.base, self.tau, self.dtype = base, tau, base.dtype

    def apply(self, variables, x, t, context, **sdxl_kwargs):
        base = self.base.apply({"params": variables["params"]}, x, t, context, **sdxl_kwargs)
        memory = variables["memory"]
        a = memory["alphas"][t].reshape(-1, 1, 1, 1)
        x0 = memory["x0"]
        d = jnp.sum((x[:, None] - jnp.sqrt(a)[:, None] * x0[None]) ** 2, axis=(2, 3, 4)) / (1 - a[:, :, 0, 0])
        x0_hat = jnp.einsum("bj,jchw->bchw", jax.nn.softmax(-d / 2, axis=1), x0)
        eps = (x - jnp.sqrt(a) * x0_hat) / jnp.sqrt(1 - a)
        distance = jnp.mean((context - memory["context"][None]) ** 2, axis=(1, 2))
        mix = jnp.exp(-distance / self.tau).reshape(-1, 1, 1, 1)
        return mix * eps + (1 - mix) * base


def _context(pipe, caption):
    """The UNet's context of `caption` ([77, d]; SDXL: both encoders', see models/sdxl.py)."""
    from finextract_jax.models import sdxl

    if sdxl.is_sdxl(pipe):
        return sdxl.encode_prompts(pipe, [caption])[0][0]
    return encode_prompts(pipe.text_encoder, pipe.tokenizer, [caption])[0]


class _Finetuned:
    """A Pipeline stand-in whose UNet is a MemorizingUNet of `caption` on `pixels`."""

    def __init__(self, pretrained, caption, pixels, tau=0.1):
        import dataclasses

        self._pipe = pretrained
        self.unet = dataclasses.replace(pretrained.unet, module=MemorizingUNet(pretrained.unet.module, tau))
        self._memory = {"x0": jnp.asarray(caption_lib.images_to_model_space(pretrained, pixels)),
                        "context": _context(pretrained, caption),
                        "alphas": jnp.asarray(caption_lib.alphas_cumprod(pretrained))}

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def unet_variables(self):
        return {"params": self._pipe.unet.params, "memory": self._memory}


def photos(resolution: int = 16, names=("astronaut", "coffee", "chelsea", "rocket")) -> np.ndarray:
    """float32 [N, 3, R, R] in [-1, 1] from scikit-image's sample photos."""
    import skimage.data
    from PIL import Image

    out = []
    for name in names:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((resolution, resolution),
                                                                                      Image.BILINEAR)
        out.append(np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1)
    return np.stack(out)


@pytest.fixture(scope="module")
def sd1(tiny_pipe):
    return tiny_pipe("sd1")


# ---- candidates, rows, pairs -----------------------------------------------------------------


def test_candidates_are_whole_words_and_rows_match_the_tokenizer(sd1):
    tokenizer = sd1.tokenizer
    words = caption_lib.candidate_words(tokenizer)
    names = [w for w, _ in words]
    assert "sks" in names and "dog" in names and "a" in names and "photo" in names
    assert len(set(names)) == len(names)
    assert all(len(ids) == 1 and w.isalpha() for w, ids in words)  # tiny vocab: each listed word is one token
    assert "b" not in names  # single letters are byte pieces, not words
    assert [w for w, _ in caption_lib.candidate_words(tokenizer, max_candidates=5, extra_words=())] == names[:5]
    lookup = dict(words)
    for text in ("", "sks", "a photo of sks dog", "art style of impressionism claude monet"):
        ids = sum((lookup[w] for w in text.split()), ())
        np.testing.assert_array_equal(caption_lib.token_rows(tokenizer, [ids]), tokenize(tokenizer, [text]))


def test_pairs_are_deterministic_and_targets_follow_the_parameterisation():
    x0 = np.random.default_rng(0).standard_normal((3, 2, 4, 4)).astype(np.float32)
    alphas = np.linspace(0.99, 0.01, 1000).astype(np.float32)
    noisy, t, eps = caption_lib.make_pairs(x0, (100, 900), 2, 0, alphas, "epsilon")
    assert noisy.shape == (12, 2, 4, 4) and sorted(set(t.tolist())) == [100, 900]
    again = caption_lib.make_pairs(x0, (100, 900), 2, 0, alphas, "epsilon")
    np.testing.assert_array_equal(noisy, again[0])
    other = caption_lib.make_pairs(x0, (100, 900), 2, 1, alphas, "epsilon")
    assert not np.allclose(noisy, other[0])
    _, _, v = caption_lib.make_pairs(x0, (100, 900), 2, 0, alphas, "v_prediction")
    a = alphas[t].reshape(-1, 1, 1, 1)
    clean = (noisy - np.sqrt(1 - a) * eps) / np.sqrt(a)
    np.testing.assert_allclose(v, np.sqrt(a) * eps - np.sqrt(1 - a) * clean, atol=1e-4)
    with pytest.raises(InputError, match="epsilon or v_prediction"):
        caption_lib.make_pairs(x0, (100,), 1, 0, alphas, "sample")


def test_config_rejects_bad_settings():
    with pytest.raises(InputError, match="score"):
        caption_lib.CaptionConfig(score="loss")
    with pytest.raises(InputError, match="timesteps"):
        caption_lib.CaptionConfig(timesteps=(1000,))
    with pytest.raises(InputError):
        caption_lib.CaptionConfig(beam=0)


def test_scorer_matches_a_direct_unet_call(sd1, tiny_pipe):
    """The batched (prompts x pairs) errors equal one UNet call per prompt, for both models."""
    finetuned = tiny_pipe("sd1_flax")  # same architecture, other weights: stands in for a fine-tune
    x0 = caption_lib.images_to_model_space(sd1, photos()[:2])
    pairs = caption_lib.make_pairs(x0, (300, 700), 1, 0, caption_lib.alphas_cumprod(sd1), "epsilon")
    scorer = caption_lib.PromptScorer(sd1, finetuned, pairs, batch_size=8)
    prompts = ["sks dog", "a photo", ""]
    e_ft, e_pre = scorer.errors(tokenize(sd1.tokenizer, prompts))
    noisy, t, target = pairs
    for row, prompt in enumerate(prompts):
        for pipe, errors in ((finetuned, e_ft), (sd1, e_pre)):
            context = encode_prompts(pipe.text_encoder, pipe.tokenizer, [prompt])
            out = pipe.unet.module.apply(pipe.unet_variables(), noisy, t, jnp.repeat(context, len(t), 0))
            np.testing.assert_allclose(errors[row], np.mean((np.asarray(out) - target) ** 2, axis=(1, 2, 3)),
                                       rtol=2e-4)


def test_images_must_fit_the_model(sd1):
    with pytest.raises(InputError, match=r"\[N, 3, 16, 16\]"):
        caption_lib.images_to_model_space(sd1, np.zeros((2, 3, 8, 8), np.float32))
    uint8 = np.zeros((2, 16, 16, 3), np.uint8)
    assert caption_lib.images_to_model_space(sd1, uint8).shape == (2,) + sd1.sample_shape


# ---- recovery -------------------------------------------------------------------------------


@pytest.mark.parametrize("true_caption, score", [("sks dog", "advantage"), ("a sks toy", "gain")])
def test_recovers_short_captions(sd1, true_caption, score):
    import dataclasses

    finetuned = _Finetuned(sd1, true_caption, photos())
    config = dataclasses.replace(FAST, score=score)
    result = caption_lib.recover_caption(sd1, finetuned, images=photos(), config=config)
    assert result.caption == true_caption, result.steps
    grown = [s for s in result.steps if not s.get("refine")]
    assert grown[-1]["accepted"] is False or len(grown) == config.max_words  # it stopped by itself
    record = result.to_json()
    assert record["caption"] == true_caption and all({"word", "score"} <= set(s) for s in record["steps"])
    assert record["settings"]["score"] == score and record["num_candidates"] > 100


def test_candidate_file_is_read_line_by_line_and_checked(sd1, tmp_path):
    path = tmp_path / "candidates.txt"
    path.write_text("# DreamBooth templates\na photo of sks dog\n\n  sks   toy \na photo of sks dog\n")
    beams = caption_lib.read_candidate_captions(str(path), sd1.tokenizer)
    assert [b.words for b in beams] == [("a", "photo", "of", "sks", "dog"), ("sks", "toy")]
    for beam in beams:  # words tokenized one by one spell what the tokenizer makes of the line
        np.testing.assert_array_equal(caption_lib.token_rows(sd1.tokenizer, [beam.ids]),
                                      tokenize(sd1.tokenizer, [" ".join(beam.words)]))
    path.write_text("sks\n" + "dog " * 80 + "\n")
    with pytest.raises(InputError, match="line 2: 80 tokens"):
        caption_lib.read_candidate_captions(str(path), sd1.tokenizer)
    path.write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="no caption in it"):
        caption_lib.read_candidate_captions(str(path), sd1.tokenizer)
    with pytest.raises(InputError, match="unreadable"):
        caption_lib.read_candidate_captions(str(tmp_path / "missing.txt"), sd1.tokenizer)


def test_candidate_captions_are_ranked_whole_then_refined(sd1, tmp_path):
    """The true caption among near misses ranks first; a list without it starts the refine sweep
    from the nearest line, which repairs the wrong word; no line is taken when none clears min_gain."""
    import dataclasses

    true_caption = "a photo of sks dog"
    finetuned = _Finetuned(sd1, true_caption, photos())
    near_misses = ["a photo of sks cat", "a photo of ohwx dog", "a sks dog", "photo of sks dog", "a photo of a dog"]
    listed = tmp_path / "listed.txt"
    listed.write_text("\n".join(near_misses[:2] + [true_caption] + near_misses[2:]) + "\n")
    config = dataclasses.replace(FAST, candidates=str(listed), refine_sweeps=0)
    result = caption_lib.recover_caption(sd1, finetuned, images=photos(), config=config)
    assert result.caption == true_caption, result.ranking
    assert [r["caption"] for r in result.ranking][0] == true_caption and len(result.ranking) == 6
    assert result.steps[0]["accepted"] and result.steps[0]["candidates"] == 6
    assert result.to_json()["ranking"] == result.ranking

    missing = tmp_path / "missing_truth.txt"
    missing.write_text("a photo of sks cat\nsks toy\n")
    result = caption_lib.recover_caption(sd1, finetuned, images=photos(),
                                         config=dataclasses.replace(FAST, candidates=str(missing)))
    assert result.ranking[0]["caption"] == "a photo of sks cat" and result.caption == true_caption, result.steps
    assert result.steps[-1]["refine"] == 1 and result.steps[-1]["replaces"] == "cat"

    strict = dataclasses.replace(config, min_gain=10.0)
    result = caption_lib.recover_caption(sd1, finetuned, images=photos(), config=strict)
    assert result.caption == "" and result.steps[0]["accepted"] is False


def test_auto_prompt_writes_then_reuses_caption_json(sd1, tmp_path, monkeypatch):
    finetuned = _Finetuned(sd1, "sks", photos())
    config = caption_lib.CaptionConfig(score="gain", timesteps=(600,), max_words=2, refine_sweeps=0,
                                       max_candidates=40)
    prompt = caption_lib.auto_prompt(sd1, finetuned, str(tmp_path), config=config, images=photos(), progress=False)
    assert prompt == "sks"
    record = json.loads((tmp_path / "caption.json").read_text())
    assert record["caption"] == "sks" and record["steps"][0]["word"] == "sks"

    def fail(*args, **kwargs):
        raise AssertionError("recovered again instead of reusing caption.json")

    monkeypatch.setattr(caption_lib, "recover_caption", fail)
    assert caption_lib.auto_prompt(sd1, finetuned, str(tmp_path), config=config) == "sks"
    (tmp_path / "caption.json").write_text("{not json")
    with pytest.raises(InputError, match="unreadable caption file"):
        caption_lib.auto_prompt(sd1, finetuned, str(tmp_path), config=config)


# ---- the binary -------------------------------------------------------------------------------


def _run(*args):
    return subprocess.run([sys.executable, "-m", "experiments.caption", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_binary_writes_caption_json(tiny_dir, tiny_finetuned, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i, pixels in enumerate(photos()[:2]):
        Image.fromarray(np.round((pixels.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8)).save(images / f"{i}.png")
    work = tmp_path / "work"
    proc = _run(f"--pretrained={tiny_dir['sd1']}", f"--finetuned={tiny_finetuned['full']}", f"--workdir={work}",
                f"--images={images}", "--max_words=1", "--refine_sweeps=0", "--max_candidates=16", "--timesteps=500",
                "--words=sks")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((work / "caption.json").read_text())
    assert isinstance(record["caption"], str) and record["steps"] and {"word", "score"} <= set(record["steps"][0])
    assert proc.stdout.endswith("\n" + record["caption"] + "\n")  # the result is stdout's last line (maybe empty)
    assert record["num_candidates"] == 17 and record["images"] == str(images)


def test_binary_bad_input_is_one_line(tiny_dir, tmp_path):
    proc = _run(f"--pretrained={tiny_dir['sd1']}", f"--finetuned={tmp_path / 'missing'}", f"--workdir={tmp_path / 'work'}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not found" in proc.stderr
    proc = _run(f"--pretrained={tiny_dir['sd1']}", f"--finetuned={tiny_dir['sd1']}", f"--workdir={tmp_path / 'work'}",
                "--timesteps=5000")
    assert proc.returncode == 2 and "timesteps" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _run(f"--pretrained={tiny_dir['sd1']}", f"--finetuned={tiny_dir['sd1']}", f"--workdir={tmp_path / 'work'}",
                f"--candidates={tmp_path / 'no_such_list.txt'}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no_such_list.txt: unreadable" in proc.stderr
    assert not (tmp_path / "work").exists()


def test_extract_prompt_auto_guides_with_the_recovered_caption(tiny_dir, tiny_finetuned, tmp_path):
    """`extract --prompt=auto` = recover the caption, then extract with it: the same images as an
    explicit --prompt of those words; run.json keeps "auto" in its settings and the words apart."""
    from finextract_jax.sampling.run import ExtractConfig, extract

    # min_gain < 0: keep the best word even though this random tiny fine-tune does not read captions.
    small = caption_lib.CaptionConfig(max_words=1, refine_sweeps=0, timesteps=(500,), max_candidates=16,
                                      num_images=2, sample_steps=3, min_gain=-1.0)
    common = dict(pretrained=tiny_dir["sd1"], finetuned=tiny_finetuned["full"], num_images=2, batch_size=2, steps=3)
    record = extract(ExtractConfig(prompt="auto", **common), str(tmp_path / "auto"), progress=False,
                     recover_caption=caption_lib.auto_prompt_resolver(str(tmp_path / "auto"), small, progress=False))
    recovered = json.loads((tmp_path / "auto" / "caption.json").read_text())["caption"]
    assert record["settings"]["prompt"] == "auto" and record["caption"] == recovered and recovered
    extract(ExtractConfig(prompt=recovered, **common), str(tmp_path / "explicit"), progress=False)
    read = lambda d: [(tmp_path / d / "images" / n).read_bytes() for n in ("00000.png", "00001.png")]
    assert read("auto") == read("explicit")
    empty = str(tmp_path / "empty")
    extract(ExtractConfig(prompt="", **common), empty, progress=False)
    assert read("auto") != read("empty")  # the caption did steer the fine-tuned model
