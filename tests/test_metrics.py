"""AS / A-ESR on hand-made features, and the pairs grid."""
import numpy as np
import pytest
import skimage.data
from PIL import Image

from finextract_jax import grids, metrics
from finextract_jax.errors import InputError


def test_as_and_a_esr_on_hand_made_features():
    train = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    # e0 matches t0 exactly; e1 at 45 degrees between t1 and t2 (cos 0.7071 with both).
    extracted = np.array([[3.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    r = metrics.extraction_scores(train, extracted, ["a.png", "b.png", "c.png"],
                                  ["x.png", "y.png"], features="pixel")
    s = [p["similarity"] for p in r["per_image"]]
    np.testing.assert_allclose(s, [1.0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-12)
    assert [p["match"] for p in r["per_image"]] == ["x.png", "y.png", "y.png"]
    assert [p["train"] for p in r["per_image"]] == ["a.png", "b.png", "c.png"]
    assert r["AS"] == pytest.approx((1 + 2 * np.sqrt(0.5)) / 3)
    assert r["A_ESR"] == pytest.approx(1.0)  # 0.7071 > 0.7
    assert r["success_threshold"] == 0.7 and r["features"] == "pixel"
    r2 = metrics.extraction_scores(train, extracted, ["a", "b", "c"], ["x", "y"],
                                   success_threshold=0.75)
    assert r2["A_ESR"] == pytest.approx(1 / 3)
    # Strictly greater: a similarity equal to the threshold does not count.
    r3 = metrics.extraction_scores(train, extracted, ["a", "b", "c"], ["x", "y"],
                                   success_threshold=1.0)
    assert r3["A_ESR"] == 0.0


def test_ties_go_to_first_extracted():
    r = metrics.extraction_scores(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0], [1.0, -1.0]]),
                                  ["t"], ["e0", "e1"])
    assert r["per_image"][0]["match"] == "e0"


def test_bad_inputs():
    with pytest.raises(InputError, match="feature sizes differ"):
        metrics.extraction_scores(np.ones((2, 3)), np.ones((2, 4)), ["a", "b"], ["c", "d"])
    with pytest.raises(InputError, match="NaN"):
        metrics.extraction_scores(np.array([[np.nan, 1.0]]), np.ones((1, 2)), ["a"], ["b"])
    with pytest.raises(InputError, match="non-empty"):
        metrics.extraction_scores(np.ones((0, 2)), np.ones((1, 2)), [], ["b"])
    with pytest.raises(InputError, match="all-zero"):
        metrics.extraction_scores(np.zeros((1, 2)), np.ones((1, 2)), ["a"], ["b"])


def test_pairs_grid():
    a = Image.fromarray(skimage.data.astronaut())
    b = Image.fromarray(skimage.data.chelsea())
    grid = metrics.pairs_grid([a, b], [b, a], [0.91, 0.12], tile=64, success_threshold=0.7)
    pad, label = grids.PAD, grids.LABEL
    assert grid.size == (pad + 2 * (64 + pad), label + pad + 2 * (64 + label + pad))
    px = np.asarray(grid).astype(int)
    top = label + pad  # first row of tiles
    assert px[top + 32, pad + 32].tolist() != [255, 255, 255]  # an image was pasted
    caption = px[top + 64 + 1: top + 64 + label, pad + 64 + pad:]
    assert ((caption[..., 1] > 90) & (caption[..., 0] < 50)).any()  # 0.91 > 0.7: a green caption
    second = px[top + 2 * 64 + label + pad + 1: top + 2 * (64 + label) + pad, pad + 64 + pad:]
    assert (second.max(-1) < 128).any() and not ((second[..., 1] > 90) & (second[..., 0] < 50)).any()
