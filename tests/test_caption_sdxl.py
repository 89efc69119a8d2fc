"""Caption recovery on the tiny SDXL pipeline: the batched scorer conditions as SDXL sampling does
(both encoders, the second's own padding, the pooled embedding, the generated size's time ids), and
the search recovers a short caption from an analytic SDXL fine-tune (test_caption.py says why analytic)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finextract_jax import caption as caption_lib
from finextract_jax.models import sdxl
from finextract_jax.models.pipeline import tokenize
from test_caption import FAST, _Finetuned, photos


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    from finextract_jax.models.pipeline import load_pipeline

    return load_pipeline(tiny_sdxl_dir, cache_dir=None)


def test_sdxl_scorer_matches_a_direct_unet_call(sdxl_pipe):
    """The batched errors equal one UNet call per prompt with sdxl.conditioning's inputs, for both models."""
    pipe = sdxl_pipe
    perturbed = jax.tree_util.tree_map(lambda a: a * 1.05, pipe.unet.params)
    finetuned = dataclasses.replace(pipe, unet=dataclasses.replace(pipe.unet, params=perturbed))
    x0 = caption_lib.images_to_model_space(pipe, photos()[:2])
    pairs = caption_lib.make_pairs(x0, (300, 700), 1, 0, caption_lib.alphas_cumprod(pipe), "epsilon")
    scorer = caption_lib.PromptScorer(pipe, finetuned, pairs, batch_size=8)
    prompts = ["sks dog", "a photo", ""]
    rows = tokenize(pipe.tokenizer, prompts)
    # The second tokenizer pads with "!" (not the end token): the re-padded rows are its own.
    np.testing.assert_array_equal(scorer._repad(rows), tokenize(pipe.tokenizer_2, prompts))
    e_ft, e_pre = scorer.errors(rows)
    noisy, t, target = pairs
    micro = sdxl.micro_conditioning(pipe)
    apply = jax.jit(lambda variables, context, added: pipe.unet.module.apply(variables, noisy, t, context,
                                                                             added_cond_kwargs=added))
    for row, prompt in enumerate(prompts):
        cond = sdxl.conditioning(pipe, prompt, empty=False, micro=micro)
        added = {k: jnp.repeat(cond[k], len(t), 0) for k in ("text_embeds", "time_ids")}
        for model, errors in ((finetuned, e_ft), (pipe, e_pre)):
            out = apply(model.unet_variables(), jnp.repeat(cond["context"], len(t), 0), added)
            np.testing.assert_allclose(errors[row], np.mean((np.asarray(out) - target) ** 2, axis=(1, 2, 3)),
                                       rtol=2e-4)
    assert np.abs(e_ft - e_pre).max() > 1e-3  # the two models differ


def test_sdxl_recovers_a_short_caption(sdxl_pipe):
    finetuned = _Finetuned(sdxl_pipe, "sks dog", photos())
    config = dataclasses.replace(FAST, max_candidates=32, max_words=3)
    result = caption_lib.recover_caption(sdxl_pipe, finetuned, images=photos(), config=config)
    assert result.caption == "sks dog", result.steps
    assert result.to_json()["sdxl"] == {"original_size": [16, 16], "crops_coords_top_left": [0, 0],
                                        "target_size": [16, 16]}
