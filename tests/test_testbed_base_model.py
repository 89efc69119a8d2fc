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
