"""Weight updates of the low-rank adapter formats, as PyTorch-layout numpy arrays.

Every function here works on one module's factors in the layout the file stores them
([out, in] for linear layers, [out, in, kh, kw] for convolutions) and returns the update as
[out, in*kh*kw] (before alpha/rank scaling); lora.py maps names, checks and reshapes it to the
base weight and converts to our Flax layout. The formulas are LyCORIS' (the tool that writes
LoCon/LoHa/LoKr files) and PEFT's, and tests/test_lora_variants.py checks them against both:

- LoRA / LoCon: up @ down, with down a kxk conv and up a 1x1 conv for convolutions;
- LoHa: (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product), or with CP/Tucker cores t1, t2;
- LoKr: kron(w1, w2), each factor full or a product (w2 optionally with a Tucker core t2);
- DoRA: W' = m * (W + dW) / ||W + dW||, the norm taken per output channel (PEFT's
  `lora_magnitude_vector`), or per input channel when a `dora_scale` is shaped [1, in, ...]
  (LyCORIS without wd_on_out).
"""
from __future__ import annotations

import numpy as np

LOHA_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def lora_delta(f: dict) -> np.ndarray:
    """up [out, r(, 1, 1)] @ down [r, in(, kh, kw)] -> [out, in*kh*kw]."""
    rank = f["down"].shape[0]
    return f["up"].reshape(-1, rank) @ f["down"].reshape(rank, -1)


def _tucker(core: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A conv factor [out, in, kh, kw] from a CP/Tucker core [r, r, kh, kw] and mode factors a [r, out], b [r, in]."""
    return np.einsum("ijkl,jr,ip->prkl", core, b, a)


def loha_delta(f: dict) -> np.ndarray:
    """(w1_a @ w1_b) * (w2_a @ w2_b), each factor [out, in*kh*kw] (or [out, in, kh, kw] from its Tucker core)."""
    if "hada_t1" in f:
        w1 = _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
        w2 = _tucker(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
    else:
        w1 = f["hada_w1_a"] @ f["hada_w1_b"]
        w2 = f["hada_w2_a"] @ f["hada_w2_b"]
    return w1 * w2


def loha_rank(f: dict) -> int:
    return f["hada_w1_b"].shape[0]


def lokr_delta(f: dict) -> np.ndarray:
    """kron(w1 [a, c], w2 [b, d*kh*kw]) = [a*b, c*d*kh*kw], which is the [out, in, kh, kw] weight flattened
    (a conv's w2, full [b, d, kh, kw] or rebuilt from its Tucker core, is flattened first)."""
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = np.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    return np.kron(w1, w2.reshape(w2.shape[0], -1))


def lokr_rank(f: dict) -> int | None:
    """The rank alpha is divided by; None when neither factor is decomposed (LyCORIS then ignores alpha)."""
    for name in ("lokr_w1_b", "lokr_w2_b"):
        if name in f:
            return f[name].shape[0]
    return None


DELTAS = {"lora": lora_delta, "loha": loha_delta, "lokr": lokr_delta}
RANKS = {"lora": lambda f: f["down"].shape[0], "loha": loha_rank, "lokr": lokr_rank}


def dora_weight(weight: np.ndarray, delta: np.ndarray, magnitude: np.ndarray, peft_layout: bool) -> np.ndarray:
    """m * (W + dW) / ||W + dW||.

    PEFT's `lora_magnitude_vector` ([out], or [1, out, 1, 1] for convolutions) always holds one
    magnitude per output channel, the norm taken over everything else. LyCORIS' `dora_scale` keeps
    the norm's axes as size-1 dimensions: [out, 1(, 1, 1)] is per output channel, [1, in(, 1, 1)]
    per input channel.
    """
    updated = weight + delta
    if peft_layout:
        magnitude = magnitude.reshape(-1, *([1] * (weight.ndim - 1)))
    axes = tuple(i for i in range(weight.ndim) if magnitude.shape[i] == 1)
    norm = np.sqrt(np.sum(np.square(updated, dtype=np.float64), axis=axes, keepdims=True)).astype(np.float32)
    return updated * (magnitude / norm)
