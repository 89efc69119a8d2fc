"""The testbed's caption probes (finextract_jax/testbed/samples.py) on constructed features and a tiny model."""
import numpy as np
import pytest

from finextract_jax.errors import InputError
from finextract_jax.testbed import samples


def test_retrieval_rates_count_own_image_nearest():
    real = np.eye(6, dtype=np.float32)  # six orthogonal "images"
    draws = np.repeat(real[:, None], 2, axis=1).copy()  # every caption's two samples equal its image...
    draws[0, 1] = real[3]  # ...but one sample of caption 0 looks like image 3
    draws[1, 0] = real[1] + 0.9 * real[2]  # and one of caption 1 is closest to its own, barely
    rates = samples.retrieval_rates(draws, real)
    assert rates["top1"] == pytest.approx(11 / 12) and rates["top5"] == 1.0  # image 3 first, its own second
    assert rates["chance_top1"] == pytest.approx(1 / 6) and rates["samples"] == 12
    draws[0, 1] = real[0] * -1 + real[3]  # now own image is the farthest of all six: outside the top 5
    assert samples.retrieval_rates(draws, real)["top5"] == pytest.approx(11 / 12)
    with pytest.raises(InputError, match="at least 5 captions"):
        samples.retrieval_rates(draws[:4], real[:4])


def test_caption_retrieval_on_a_tiny_model(tiny_dir):
    """End to end on make_tiny's pixel model: rates in range, the same numbers twice (fixed noise)."""
    rng = np.random.default_rng(0)
    split = (rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8), [f"a photo of {w}" for w in "abcde"],
             [str(i) for i in range(5)])
    first = samples.caption_retrieval(tiny_dir["pixel"], split, count=5, per_caption=2, steps=2)
    assert 0.0 <= first["top1"] <= first["top5"] <= 1.0 and first["samples"] == 10
    assert samples.caption_retrieval(tiny_dir["pixel"], split, count=5, per_caption=2, steps=2) == first


def test_start_noise_bias_on_a_tiny_model(tiny_dir):
    """The first DDIM timestep's share of the mean image (SD 1.4's schedule, 25 steps: t = 961), and that
    it reaches the sampler."""
    from finextract_jax.models.tiny import SCHEDULER_SD1
    from finextract_jax.noise_schedule import alphas_cumprod_from_config

    white = np.full((3, 16, 16, 3), 255, np.uint8)
    bias = samples.start_noise_bias(tiny_dir["pixel"], white, count=2, steps=25)
    assert bias["data"] == 1.0 and bias["data_spread"] == 0.0 and bias["timestep"] == 961 and bias["pure_noise_spread"] > 0
    assert bias["sqrt_alpha_bar"] == pytest.approx(np.sqrt(alphas_cumprod_from_config(SCHEDULER_SD1)[961]))
    assert -1.0 <= bias["pure_noise"] <= 1.0 and bias["with_mean_image"] != bias["pure_noise"]


def test_captions_sampled_together_equal_one_at_a_time(tiny_dir):
    """The vmapped chunks draw what one caption's own loop draws (and "" stays unguided)."""
    from finextract_jax.models.pipeline import load_pipeline

    pipe = load_pipeline(tiny_dir["pixel"])
    captions = ["a photo of dog", "", "a red car"]
    together = samples.sample_captions(pipe, captions, per_caption=2, steps=2, chunk=2)
    for i in (1, 2):
        alone = samples.sample_captions(pipe, [captions[i]], per_caption=2, steps=2)[0]
        assert np.abs(together[i].astype(int) - alone.astype(int)).max() <= 1, captions[i]
    assert not np.array_equal(together[0], together[2]) and not np.array_equal(together[0], together[1])
