"""The trained testbed base the repository carries (finextract_jax/testbed/base_model, CARD.md there)."""
import json
import os

from finextract_jax.testbed import base, data, samples


def test_committed_base_reads_its_captions():
    """On 16 of its training images (committed with it), the base's denoising error under each image's
    own caption is clearly below the error under the empty caption and under another image's: it
    reads its captions (CARD.md records the margins measured when it was committed)."""
    errors = samples.caption_dependence(base.COMMITTED_BASE_DIR, data.read_committed("probe"))
    assert errors["own"] < 0.9 * errors["empty"] and errors["own"] < 0.9 * errors["other"], errors


def test_committed_base_is_the_testbed_architecture():
    with open(os.path.join(base.COMMITTED_BASE_DIR, "unet", "config.json")) as f:
        unet = json.load(f)
    assert {k: unet[k] for k in base.TESTBED_UNET} == base.TESTBED_UNET
    with open(os.path.join(base.COMMITTED_BASE_DIR, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["prediction_type"] == "v_prediction"


def test_committed_base_draws_its_captions_under_guidance():
    """cfg at s = 3 (FineXtract's reference w) on the committed base: a caption's samples are nearest its own
    image among the 16 committed probe images far above chance (1/16). With the unclipped epsilon in DDIM's
    step (diffusers' default) every caption became the same dark-framed square and this fell to chance;
    with the re-derived epsilon it was 0.75 on 32 training captions (benchmarks/RESULTS.md)."""
    rates = samples.caption_retrieval(base.COMMITTED_BASE_DIR, data.read_committed("probe"), count=16,
                                      per_caption=2, scale=3.0)
    assert rates["top1"] >= 0.4, rates
