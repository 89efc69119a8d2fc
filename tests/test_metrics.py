"""AS / A-ESR on hand-made features, and the pairs grid."""
import numpy as np
import pytest
import skimage.data
from PIL import Image

from finextract_jax import metrics
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
    assert grid.size == (2 * 64 + 3 * 8, 2 * (64 + 24 + 8) + 8)
    px = np.asarray(grid)
    assert px[8 + 32, 8 + 32].tolist() != [255, 255, 255]  # an image was pasted
    assert (px[8 + 64 + 4: 8 + 64 + 20, 8:200] < 128).any()  # a label was written
