"""finextract_jax: FineXtract (Wu, Zhang, Wu, ICML 2025) in JAX/Flax.

Data flows one way: checkpoints -> parameter trees -> guided samples -> features ->
similarity graph -> cliques -> extracted images -> scores.
"""
__version__ = "0.1.0"
