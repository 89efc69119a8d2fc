"""Caption recovery (docs/method.md §6): find the fine-tuning caption from the two models, word by word.

A checkpoint fine-tuned with caption c denoises its own training images best when it is told c.
So the caption is grown one word at a time: every candidate word w is appended to the current
caption (every current caption, with a beam), and each prompt p = caption + w is scored by how
much better the fine-tuned model denoises a fixed set of images under p:

    gain(p)      = mean_r [N(r)        - E_ft(p, r)] / N(r)     (default: fine-tuned model only)
    advantage(p) = mean_r [E_pre(p, r) - E_ft(p, r)] / N(r)     (docs/method.md §6's wording, twice the cost)

over pairs r = (image, timestep, noise) held fixed for the whole search (common random numbers:
every prompt sees the same noisy inputs, so score differences are differences between prompts,
not between draws). E is the squared error of the UNet's output against its training target
(eps or v), N(r) the fine-tuned model's error on pair r under the current caption: dividing per
pair makes the score independent of the parameterisation (eps, v and x0 errors differ per pair
by a constant factor only) and lets every noise level count, not just the low ones whose errors
are largest. The best prompt is kept if its gain over the current caption, re-measured on
held-out pairs (other noise), exceeds `min_gain`; otherwise the search stops. Growing left to
right can put a wrong word first (one whose context happens to sit nearer the caption's than
the true first word's does); `refine_sweeps` then retries every position with every candidate
(and with no word), which repairs it.

When the auditor can list plausible captions (DreamBooth's templates such as 'a photo of sks dog',
or a public base's own training captions), `candidates` ranks each whole line of a file as one
prompt, by the same score against the empty prompt, and starts the refine sweeps from the best:
a closed-set search that cannot be led astray word by word, and finds only what the list holds.

Why `gain` by default: `advantage` also rewards prompts under which the *pretrained* model
denoises the images badly, which has nothing to do with the caption; on the analytic fine-tunes
of the tests it turns 'a sks toy' into 'a sks quality' where `gain` is exact. On trained fine-tunes of
the testbed base (which reads its captions) neither recovers a word (benchmarks/RESULTS.md, "Caption
recovery on trained fine-tunes"): `gain` names what the fine-tune's samples show, whatever it was trained
under, and `advantage`, which scores whole true captions above every single word, is led astray word by
word by words that merely make the base denoise worse.

All prompts of a step are scored by one jitted function over (prompts x pairs) batches
(caption_scoring.py): token-id rows are built directly from the candidates' ids, encoded by the
text encoder(s) inside the same jit (SDXL: both, with the pooled embedding and the generated
size's time ids), and fed to both UNets. For a real 49k-token vocabulary, a screening stage scores every
candidate on a few pairs and keeps the best `keep` for the full set of pairs.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from finextract_jax.caption_scoring import PromptScorer, prompt_scores, token_rows  # noqa: F401 - re-exported
from finextract_jax.errors import InputError
from finextract_jax.options import check_choices, option
from finextract_jax.noise_schedule import add_noise, alphas_cumprod_from_config, training_target

log = logging.getLogger(__name__)

SCORES = ("advantage", "gain")
RANKING_KEPT = 20  # candidate captions listed in caption.json, best first
# Identifiers DreamBooth users put in captions for a new subject (rare tokens in CLIP's vocabulary).
RARE_IDENTIFIERS = ("sks", "ohwx", "zwx", "xjy", "bnha", "phol", "zkz", "txcl", "hta", "ktn", "pll", "tok")
_SHORT_WORDS = ("a", "i")


@dataclasses.dataclass(frozen=True)
class CaptionConfig:
    """Settings of a caption search (all recorded in caption.json); the caption binary's flags."""

    max_words: int = option(8, "Longest caption searched.")
    beam: int = option(1, "Beam width (1: greedy).")
    refine_sweeps: int = option(2, "Passes retrying each position with every candidate or none.")
    # See the module docstring and benchmarks/RESULTS.md for why not "advantage".
    score: str = option("gain", "gain: fine-tuned error only; advantage: fine-tuned vs pretrained error "
                        "(docs/method.md §6).", choices=SCORES)
    timesteps: tuple = option((300, 500, 700, 900), "Noise levels the errors are measured at.")
    noise_draws: int = option(1, "Noise samples per (image, timestep).")
    min_gain: float = option(0.002, "Relative error reduction a word must bring on held-out noise.")
    screen_pairs: int = option(0, "Score all candidates on this many pairs first (0: off) ...")
    keep: int = option(64, "... and keep this many for the full set of pairs.")
    max_candidates: int = option(0, "Keep the N most frequent vocabulary words (0: all).")
    words: tuple = option(RARE_IDENTIFIERS, "Candidate words beside the vocabulary's (by default common DreamBooth "
                          "identifiers, rare in CLIP's vocabulary).")
    candidates: str = option("", "A text file of whole candidate captions, one per line: rank them as whole prompts "
                             "and start from the best instead of growing a caption word by word (then refine).")
    batch_size: int = option(512, "UNet evaluations per jitted call.")
    seed: int = option(0, "Seed of the noise (and of the sampled images).")
    # Images generated when none are given: the fine-tuned model's own samples (empty prompt).
    num_images: int = option(8, "Images sampled when --images is not given.")
    sample_method: str = option("finextract", flag=False)
    sample_steps: int = option(50, flag=False)
    guidance_scale: float = option(3.0, flag=False)
    correction: float = option(-0.02, flag=False)

    def __post_init__(self):
        check_choices(self)
        if self.max_words < 1 or self.beam < 1 or self.noise_draws < 1 or self.num_images < 1:
            raise InputError("caption search needs max_words, beam, noise_draws and num_images >= 1")
        if not self.timesteps or any(not 0 <= int(t) < 1000 for t in self.timesteps):
            raise InputError(f"caption timesteps must be in [0, 1000), got {self.timesteps}")
        if self.batch_size < 1 or self.keep < 1 or self.screen_pairs < 0 or self.max_candidates < 0:
            raise InputError("caption batch_size and keep must be >= 1, screen_pairs and max_candidates >= 0")

    def record(self) -> dict:
        out = dataclasses.asdict(self)
        out["timesteps"], out["words"] = list(self.timesteps), list(self.words)
        return out


@dataclasses.dataclass
class CaptionResult:
    caption: str
    steps: list  # [{"word", "score", "heldout_gain"}] for the words kept, then the rejected best one
    num_candidates: int
    seconds: float
    config: dict
    sdxl: dict | None = None  # SDXL: the micro-conditioning the prompts were scored under
    ranking: list | None = None  # with --candidates: the best RANKING_KEPT [{"caption", "score"}]

    def to_json(self) -> dict:
        return {"caption": self.caption, "steps": self.steps, "num_candidates": self.num_candidates,
                "seconds": round(self.seconds, 3), "settings": self.config, **({"sdxl": self.sdxl} if self.sdxl else {}),
                **({"ranking": self.ranking} if self.ranking is not None else {})}


# ---- candidates ----------------------------------------------------------------------------


def candidate_words(tokenizer, max_candidates: int = 0, extra_words: Sequence[str] = RARE_IDENTIFIERS,
                    max_extra_tokens: int = 1):
    """[(word, token ids)]: the vocabulary's whole words, then `extra_words` (tokenized as usual).

    Whole words are tokens ending in '</w>' whose text is ASCII letters, at least two of them
    (plus 'a', 'i'), in id order, which for CLIP's BPE is merge order, i.e. roughly by frequency:
    `max_candidates` keeps the most frequent ones. An extra word spelled by more than
    `max_extra_tokens` tokens is left out: such a candidate wins by its length alone (it makes
    the prompt as long as the caption), not by what it says.
    """
    vocab = tokenizer.get_vocab()
    words = []
    for token, index in sorted(vocab.items(), key=lambda kv: kv[1]):
        if not token.endswith("</w>"):
            continue
        body = token[:-4]
        if body.isascii() and body.isalpha() and body.islower() and (len(body) > 1 or body in _SHORT_WORDS):
            words.append((body, (int(index),)))
    if max_candidates:
        words = words[:max_candidates]
    seen = {w for w, _ in words}
    for word in extra_words:
        word = word.strip().lower()
        if word and word not in seen:
            ids = tuple(int(i) for i in tokenizer(word, add_special_tokens=False).input_ids)
            if 0 < len(ids) <= max_extra_tokens:  # longer ones are mostly byte pieces
                words.append((word, ids))
                seen.add(word)
    if not words:
        raise InputError("the tokenizer has no whole-word tokens to use as caption candidates")
    return words


# ---- images and noisy pairs ------------------------------------------------------------------


def load_image_folder(folder: str, pipe) -> np.ndarray:
    """float32 [N, 3, R, R] in [-1, 1] from a folder of images, resized/cropped to the model's size."""
    from finextract_jax import imageio

    resolution = pipe.sample_shape[-1] * pipe.vae_scale_factor
    files = imageio.list_images(folder, "--images folder")
    images = np.stack([imageio.load_square(os.path.join(folder, name), resolution) for name in files])
    return images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


def images_to_model_space(pipe, images) -> np.ndarray:
    """Pixels [N, 3, R, R] in [-1, 1] (or uint8 [N, R, R, 3]) -> what the UNet denoises (latent means
    times the VAE scaling factor, or the pixels of a pixel-space model)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    channels, size, _ = pipe.sample_shape
    resolution = size * pipe.vae_scale_factor
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (resolution, resolution):
        raise InputError(f"caption images must be [N, 3, {resolution}, {resolution}] for this model, got "
                         f"{images.shape}")
    if pipe.vae is None:
        return images.astype(np.float32)
    from finextract_jax.models.pipeline import vae_posterior

    module, scale = pipe.vae.module, pipe.latent_scale
    encode = jax.jit(lambda p, x: vae_posterior(module, p, x)[0] * scale)
    return np.concatenate([np.asarray(encode(pipe.vae.params, jnp.asarray(images[i:i + 8], jnp.float32)))
                           for i in range(0, len(images), 8)])


def sample_images(pretrained, finetuned, config: CaptionConfig, progress: bool = False) -> np.ndarray:
    """The fine-tuned model's own samples with the empty prompt (model space, [N, C, H, W])."""
    from finextract_jax.sampling import engine
    from finextract_jax.sampling.noise import start_noise

    mesh = engine.data_mesh(jax.devices()[:1])
    model = engine.prepare(pretrained, finetuned, config.sample_method, "")
    sampler = engine.build_sampler("ddim", pretrained.scheduler_config, config.sample_steps)
    sample = engine.make_batch_sampler(model, sampler, mesh)
    x_T = start_noise(config.seed, np.arange(config.num_images), pretrained.sample_shape)
    x0, first_bad = sample(model.variables, model.contexts, x_T, config.guidance_scale, config.correction)
    engine.check_finite(np.asarray(first_bad), np.arange(config.num_images), sampler)
    return np.asarray(x0, np.float32)


def alphas_cumprod(pipe) -> np.ndarray:
    return np.asarray(alphas_cumprod_from_config(pipe.scheduler_config), np.float32)


def make_pairs(x0: np.ndarray, timesteps, draws: int, seed: int, alphas: np.ndarray, prediction_type: str):
    """Noisy inputs x_t [R, C, H, W], timesteps [R] and training targets [R, ...] for every
    (image, timestep, draw), shuffled so that any prefix covers many images and noise levels."""
    n = len(x0)
    grid = np.array([(i, t, d) for d in range(draws) for i in range(n) for t in timesteps], np.int64)
    grid = grid[np.random.default_rng([seed, 7]).permutation(len(grid))]
    noise = np.random.default_rng([seed, 11]).standard_normal((len(grid),) + x0.shape[1:]).astype(np.float32)
    clean = x0[grid[:, 0]]
    t = grid[:, 1].astype(np.int32)
    target = training_target(clean, noise, alphas[t], prediction_type)
    return np.asarray(add_noise(clean, noise, alphas[t]), np.float32), t, np.asarray(target, np.float32)


# ---- the search ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Beam:
    """A caption as its words and each word's token ids (a word may span several tokens)."""

    words: tuple
    pieces: tuple

    @property
    def ids(self) -> tuple:
        return tuple(i for piece in self.pieces for i in piece)

    def replaced(self, position: int, word: str | None = None, ids: tuple = ()) -> "_Beam":
        """The caption with word `position` replaced by `word` (None: removed)."""
        new_words, new_pieces = ((), ()) if word is None else ((word,), (ids,))
        return _Beam(self.words[:position] + new_words + self.words[position + 1:],
                     self.pieces[:position] + new_pieces + self.pieces[position + 1:])


def _max_tokens(tokenizer) -> int:
    """Token ids a caption may have: the text encoder's context less the start and end tokens."""
    return tokenizer.model_max_length - 2


def read_candidate_captions(path: str, tokenizer) -> list:
    """[_Beam] of a candidates file: one caption per line, blank lines and lines starting with '#'
    skipped, repeats dropped. A caption longer than the text encoder's context is refused."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--candidates {path}: unreadable ({err})") from None
    max_tokens = _max_tokens(tokenizer)
    beams, seen = [], set()
    for number, line in enumerate(lines, 1):
        words = tuple(line.split())
        if not words or words[0].startswith("#") or words in seen:
            continue
        seen.add(words)
        beam = _Beam(words, tuple(tuple(int(i) for i in tokenizer(w, add_special_tokens=False).input_ids)
                                  for w in words))
        if len(beam.ids) > max_tokens:
            raise InputError(f"--candidates {path}, line {number}: {len(beam.ids)} tokens, more than the text "
                             f"encoder's {max_tokens}")
        beams.append(beam)
    if not beams:
        raise InputError(f"--candidates {path}: no caption in it (one per line)")
    return beams


def _relative_scores(scorer, config: CaptionConfig, reference: np.ndarray, rows: np.ndarray, screen: int = 0):
    """(order, scores): the prompts `rows` scored against the one-row `reference` caption (0: as good as
    it) on the scorer's pairs. With `screen`, all are scored on the first `screen` pairs and only the
    `keep` best on all of them: `order` indexes the rows scored in full, best first by screening."""
    order = np.arange(len(rows))
    if screen and len(rows) > config.keep:
        ref_ft, _ = scorer.errors(reference, slice(0, screen))
        e_ft, e_pre = scorer.errors(rows, slice(0, screen))
        order = np.argsort(-prompt_scores(config.score, e_ft, e_pre, ref_ft[0]), kind="stable")[:config.keep]
    ref_ft, ref_pre = scorer.errors(reference)
    e_ft, e_pre = scorer.errors(rows[order])
    base = prompt_scores(config.score, ref_ft, ref_pre, ref_ft[0])[0]
    return order, prompt_scores(config.score, e_ft, e_pre, ref_ft[0]) - base


def _heldout_gain(check, tokenizer, config: CaptionConfig, current: _Beam, new: _Beam) -> float:
    """How much better `new` scores than `current` on the held-out pairs (other noise)."""
    h_ft, h_pre = check.errors(token_rows(tokenizer, [current.ids, new.ids]))
    held = prompt_scores(config.score, h_ft, h_pre, h_ft[0])
    return float(held[1] - held[0])


def _rank_candidates(select, check, tokenizer, config: CaptionConfig, beams: list, screen: int):
    """(best caption or the empty one, its step record, the top ranking): every candidate caption
    (read_candidate_captions) scored as a whole prompt against the empty one."""
    empty = _Beam((), ())
    order, scores = _relative_scores(select, config, token_rows(tokenizer, [()]),
                                     token_rows(tokenizer, [b.ids for b in beams]), screen)
    ranked = np.argsort(-scores, kind="stable")
    top = beams[order[ranked[0]]]
    heldout_gain = _heldout_gain(check, tokenizer, config, empty, top)
    accepted = heldout_gain > config.min_gain
    step = {"word": "", "caption": " ".join(top.words), "score": round(float(scores[ranked[0]]), 6),
            "heldout_gain": round(heldout_gain, 6), "accepted": accepted, "candidates": len(beams)}
    log.info("best of %d candidate captions: %r (score %.5f, held-out gain %.5f)", len(beams), step["caption"],
             step["score"], heldout_gain)
    ranking = [{"caption": " ".join(beams[order[j]].words), "score": round(float(scores[j]), 6)}
               for j in ranked[:RANKING_KEPT]]
    return (top if accepted else empty), step, ranking


def recover_caption(pretrained, finetuned, images=None, config: CaptionConfig | None = None,
                    progress: bool = False) -> CaptionResult:
    """Recover the fine-tuning caption of `finetuned` (a Pipeline) against `pretrained`.

    images: optional pixels [N, 3, R, R] in [-1, 1] (or uint8 [N, R, R, 3]) of the fine-tuned
    model's (extracted or generated) images; without them, `config.num_images` samples of the
    fine-tuned model with the empty prompt are drawn first. With `config.candidates`, the caption
    starts as the best whole candidate caption (or empty, when none beats the empty prompt on
    held-out noise) and only the refine sweeps run after it.
    """
    config = config or CaptionConfig()
    start = time.perf_counter()
    tokenizer = finetuned.tokenizer
    listed = read_candidate_captions(config.candidates, tokenizer) if config.candidates else None  # fail early
    if images is None:
        x0 = sample_images(pretrained, finetuned, config, progress)
    else:
        x0 = images_to_model_space(pretrained, images)
    alphas = alphas_cumprod(pretrained)
    prediction = finetuned.prediction_type
    select_pairs = make_pairs(x0, config.timesteps, config.noise_draws, config.seed, alphas, prediction)
    check_pairs = make_pairs(x0, config.timesteps, config.noise_draws, config.seed + 1, alphas, prediction)
    need_pre = config.score == "advantage"
    select = PromptScorer(pretrained, finetuned, select_pairs, config.batch_size, need_pre)
    check = PromptScorer(pretrained, finetuned, check_pairs, config.batch_size, need_pre)
    candidates = candidate_words(tokenizer, config.max_candidates, config.words)
    num_pairs = len(select_pairs[1])
    screen = config.screen_pairs if 0 < config.screen_pairs < num_pairs else 0
    log.info("caption search: %d candidate words, %d pairs (%d images x %d timesteps x %d draws), score %s",
             len(candidates), num_pairs, len(x0), len(config.timesteps), config.noise_draws, config.score)
    ranking = None
    if listed:
        best, step, ranking = _rank_candidates(select, check, tokenizer, config, listed, screen)
        steps = [step]
    else:
        best, steps = _grow(select, check, tokenizer, config, candidates, screen, progress)
    best = _refine(select, check, tokenizer, config, candidates, best, steps)
    return CaptionResult(" ".join(best.words), steps, len(candidates), time.perf_counter() - start, config.record(),
                         select.micro.to_json() if select.micro else None, ranking)


def _grow(select, check, tokenizer, config: CaptionConfig, candidates, screen: int, progress: bool):
    """(caption, steps): the caption grown left to right, one word (per beam) at a time, while the best
    word's held-out gain exceeds min_gain."""
    beams = [_Beam((), ())]
    best = beams[0]
    steps = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.max_words, unit="word", desc="caption search", dynamic_ncols=True)
    max_tokens = _max_tokens(tokenizer)
    for _ in range(config.max_words):
        expansions = [_Beam(b.words + (w,), b.pieces + (ids,)) for b in beams for w, ids in candidates
                      if len(b.ids) + len(ids) <= max_tokens]
        if not expansions:
            break
        order, scores = _relative_scores(select, config, token_rows(tokenizer, [best.ids]),
                                         token_rows(tokenizer, [e.ids for e in expansions]), screen)
        new_beams, seen = [], set()
        for j in np.argsort(-scores, kind="stable"):
            candidate = expansions[order[j]]
            if candidate.words not in seen:
                seen.add(candidate.words)
                new_beams.append((candidate, float(scores[j])))
            if len(new_beams) == config.beam:
                break
        top, top_score = new_beams[0]
        heldout_gain = _heldout_gain(check, tokenizer, config, best, top)
        step = {"word": top.words[-1], "score": round(top_score, 6), "heldout_gain": round(heldout_gain, 6),
                "caption": " ".join(top.words)}
        log.info("caption step %d: %r (score %.5f, held-out gain %.5f)", len(steps) + 1, step["caption"], top_score,
                 heldout_gain)
        step["accepted"] = heldout_gain > config.min_gain
        steps.append(step)
        if not step["accepted"]:
            break
        best = top
        beams = [b for b, _ in new_beams]
        if bar:
            bar.update(1)
            bar.set_postfix(caption=" ".join(best.words)[-40:])
    if bar:
        bar.close()
    return best, steps


def _refine(select, check, tokenizer, config: CaptionConfig, candidates, best: _Beam, steps: list) -> _Beam:
    """`best` after up to refine_sweeps passes that retry every position, right to left, with every
    candidate word and with no word; a change is kept when it scores better on the selection pairs
    and on held-out noise by more than min_gain. Each kept change is appended to `steps`."""
    max_tokens = _max_tokens(tokenizer)
    for sweep in range(config.refine_sweeps):
        changed = False
        for position in range(len(best.words) - 1, -1, -1):
            if position >= len(best.words):
                continue
            variants = [best.replaced(position, w, ids) for w, ids in candidates if w != best.words[position]]
            if len(best.words) > 1:
                variants.append(best.replaced(position))
            variants = [v for v in variants if len(v.ids) <= max_tokens]
            if not variants:
                continue
            _, scores = _relative_scores(select, config, token_rows(tokenizer, [best.ids]),
                                         token_rows(tokenizer, [v.ids for v in variants]))  # unscreened: in order
            j = int(np.argmax(scores))
            variant = variants[j]
            heldout_gain = _heldout_gain(check, tokenizer, config, best, variant)
            if scores[j] > config.min_gain and heldout_gain > config.min_gain:
                log.info("refine sweep %d: %r -> %r (held-out gain %.5f)", sweep + 1, " ".join(best.words),
                         " ".join(variant.words), heldout_gain)
                steps.append({"word": variant.words[position] if len(variant.words) == len(best.words) else "",
                              "replaces": best.words[position], "position": position,
                              "score": round(float(scores[j]), 6), "heldout_gain": round(heldout_gain, 6),
                              "caption": " ".join(variant.words), "accepted": True, "refine": sweep + 1})
                best = variant
                changed = True
        if not changed:
            break
    return best


def word_recall(recovered: str, true: str) -> float:
    """|recovered words ∩ true words| / |true words|, as multisets (order ignored): how much of a
    caption a search found (benchmarks/bench_caption.py, testbed/caption_table.py)."""
    got, want = collections.Counter(recovered.split()), collections.Counter(true.split())
    return sum((got & want).values()) / sum(want.values())


# ---- caption.json and extract --prompt=auto ---------------------------------------------------

CAPTION_FILE = "caption.json"


def write_caption(path: str, result: CaptionResult, extra: dict | None = None):
    from finextract_jax.fileio import atomic_write_json

    atomic_write_json(path, {**result.to_json(), **(extra or {})})


def read_caption(path: str) -> dict:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: unreadable caption file ({err}); delete it to recover the caption again") from None
    if not isinstance(record, dict) or not isinstance(record.get("caption"), str):
        raise InputError(f"{path}: has no 'caption' string; delete it to recover the caption again")
    return record


def auto_prompt_resolver(workdir: str, config: CaptionConfig | None = None, progress: bool = True):
    """The `recover_caption` hook that `sampling.run.extract` calls for `--prompt=auto`."""
    return functools.partial(auto_prompt, workdir=workdir, config=config, progress=progress)


def auto_prompt(pretrained, finetuned, workdir: str, config: CaptionConfig | None = None, images=None,
                progress: bool = True) -> str:
    """The caption `extract --prompt=auto` uses: workdir/caption.json if an earlier run wrote one
    (so a resumed extraction uses the very same prompt), else recovered now and written there."""
    path = os.path.join(workdir, CAPTION_FILE)
    if os.path.exists(path):
        record = read_caption(path)
        log.info("using the caption recovered earlier (%s): %r", path, record["caption"])
        return record["caption"]
    result = recover_caption(pretrained, finetuned, images=images, config=config, progress=progress)
    os.makedirs(workdir, exist_ok=True)
    write_caption(path, result, {"pretrained": os.path.abspath(pretrained.path),
                                 "finetuned": os.path.abspath(finetuned.path)})
    log.info("recovered caption %r in %.1f s (%s)", result.caption, result.seconds, path)
    return result.caption
