"""Which generated images are copies of training images: similarity graph, clique peeling.

docs/method.md §4, with the reference's wall-clock timeout replaced by an exact, deterministic
search. Everything below is a pure function of its inputs (no clock, no machine speed).

Semantics (the reference's, made exact):

* Similarity = cosine, diagonal set to 0. Thresholds live on the 0.01 grid:
  ``tau_k = float32(k / 100)`` for integer k, and i~j is an edge iff
  ``float32(sim_ij) >= tau_k`` (i != j). Working with the integer k avoids the reference's
  float drift from repeated ``+= 0.01``. A similarity matrix given as input must be
  symmetric up to 1e-4; it is used as ``(S + S^T) / 2`` so that the graph is undirected.
* Start: ``rng = np.random.default_rng(seed)`` draws 1000 distinct flat indices of the N x N
  matrix (diagonal included, as the reference samples the flattened matrix whose diagonal is
  0); ``q`` = their 25th percentile (linear interpolation, like ``torch.quantile``); the start
  is the largest k with ``tau_k <= q`` ("floored to 0.01").
* Peel: repeatedly take a maximum clique of the remaining graph and remove it, until no node
  is left (isolated nodes are cliques of size 1). Tie-break, so a run is reproducible: among
  the maximum cliques the one whose sorted index list is lexicographically smallest. (The
  reference takes whichever ``networkx.find_cliques`` yields first; that order depends on
  networkx internals.) With this rule the peel order equals the order
  "larger first, then lexicographically smaller"; that is the order of ``cliques`` in the
  output.
* Schedule: k = start, start+1, ... until the stopping rule holds: ``"chance"`` (default)
  or ``"reference"`` (>= N0 cliques); both are stated in ``schedule.py``.
* Representative of a clique: the member nearest (L2) to the mean of the members' features
  (L2-normalised, as the similarity is cosine; SSCD's already are unit vectors); ties go to
  the smaller index. For unit vectors the member nearest to the mean is the one with the
  largest summed similarity to the other members, which is what is used when only a
  similarity matrix is given, so both inputs pick the same member.
* ``select="reference"`` keeps every clique of the final threshold (with the chance
  schedule: every clique larger than chance); ``"topk"`` the N0 largest (the first N0 peeled).

The package, one module per concern: ``similarity`` (the 0.01 grid, input checks, JAX tiles
of the upper triangle), ``graph`` (the sparse CSR threshold graph, the edge budget, the start
threshold), ``cliques`` (exact maximum cliques, the peel, work budgets) and ``schedule`` (the
threshold schedule, representatives, ``cluster``); ``config`` holds their settings (``ClusterConfig``).
"""
from finextract_jax.cluster.cliques import (  # noqa: F401
    DEFAULT_SUBPROBLEM_BUDGET, DEFAULT_THRESHOLD_BUDGET, LOCAL_MAX, BudgetExceeded, PeelResult,
    max_clique, peel_cliques)
from finextract_jax.cluster.config import SELECTS, ClusterConfig  # noqa: F401
from finextract_jax.cluster.graph import (  # noqa: F401
    DEFAULT_EDGE_BUDGET, Graph, SimilarityGraph, _count_before, similarity_graph, start_level)
from finextract_jax.cluster.schedule import (  # noqa: F401
    DEFAULT_SCHEDULE, SCHEDULES, STABLE_STEPS, ClusterResult, chance_clique_size, cluster,
    cluster_graph, representatives)
from finextract_jax.cluster.similarity import (  # noqa: F401
    COL_CHUNK, NUM_THRESHOLD_SAMPLES, ROW_BLOCK, THRESHOLD_QUANTILE, _MAX_LEVEL, _MIN_LEVEL,
    check_similarity, cosine_similarity, feature_tiles, level_of, matrix_tiles, tau, tile_share)
