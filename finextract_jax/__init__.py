"""finextract_jax: FineXtract (Wu, Zhang, Wu, ICML 2025) in JAX/Flax.

Data flows one way: checkpoints -> parameter trees -> guided samples -> features ->
similarity graph -> cliques -> extracted images -> scores.
"""
import importlib.metadata
import os

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10 hands convolutions, dots and reductions to YNNPACK fusions. On our UNets its
# convolution gradients run up to 6x below XLA's own emitters (one weight gradient took a quarter of the
# testbed base's training step), so without it a CPU training step is ~1.8x faster, while guided sampling
# moves within this machine's noise (one run 9-31% faster, one 13% slower; benchmarks/RESULTS.md, "Fine-tuning
# step on CPU: XLA without YNNPACK" and "Sampling with and without YNNPACK"). XLA reads its flags once, when JAX first
# creates the CPU client, so this is set on import; a process that already computed keeps what it had.
# Setting the flag yourself wins (`--xla_cpu_experimental_ynn_fusion_type=+reduce` keeps jaxlib's own
# default). Only for the jaxlib versions it was measured on: XLA aborts on a flag it does not know.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_FLAG_JAXLIB = ("0.10.2",)


def _installed_jaxlib() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def _prefer_xla_cpu_emitters(environ=os.environ, jaxlib_version: str | None = None) -> bool:
    """Add `YNN_FLAG=` (no YNNPACK fusions) to XLA_FLAGS unless it is there or jaxlib is unverified."""
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FLAG in flags or (jaxlib_version or _installed_jaxlib()) not in _YNN_FLAG_JAXLIB:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    return True


_prefer_xla_cpu_emitters()
