"""Clustering time: our exact clique peeling vs a networkx run of the reference semantics,
and the large-N run (N = 100,000) through the `cluster` binary.

python benchmarks/bench_cluster.py [--sizes=500,2000,10000] [--reference_cap_s=330]
python benchmarks/bench_cluster.py --large [--large_n=100000] [--num_train=20]
    [--copy_fraction=0.05] [--zipf=1.0] [--groups=G] [--dim=D]
python benchmarks/bench_cluster.py --copy_groups [--large_n=500] [--num_train=20] ...

Data: SSCD-like unit features (512-d): a few dozen tight clusters (2-15 near-copies each,
within-cluster cosine about 0.6-0.9) among diverse images (cosine about 0.05 +- 0.05, with
some topic structure), shuffled. N0 = 10, select=reference, seed 0.

Reference: the FineXtract Cluster.py loop (threshold from 1000 sampled entries, +0.01 per
step, ``nx.find_cliques`` + largest clique peeled until the graph is empty), each threshold
in a forked process killed after 30 s as the reference does, graph building included in the
timed part. Ties use the same lexicographic rule as ours so partitions can be compared. The
reference run of one N is stopped after --reference_cap_s seconds (reported as "> cap").
Children get an address-space limit so a dense networkx graph cannot exhaust memory.

Large N (--large): realistic_features() below, written as .npy by a spawned process, then
clustered by `python -m experiments.cluster --features_file=...` in a child process whose wall
time and peak RSS (os.wait4) are what is reported. (Linux carries a parent's RSS at fork into
its child's ru_maxrss, hence the separate generator: this process stays at ~0.1 GB.)
It also reports the similarity pass's rate, N (N - 1) / 2 x D multiply-adds over the
similarity time (tiles plus edge extraction), against the machine's fp32 FMA peak
(``PEAK_GMACS``: cores x clock x 16 FMA per cycle for two 256-bit FMA pipes).

Copy groups in process (--copy_groups): copy_group_features() clustered by
``cluster.cluster`` twice in this process, the first call cold (JAX compile, numba cache
load), the second warm; wall and CPU time of each, and the scores.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time

import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from finextract_jax import cluster as C  # noqa: E402
from finextract_jax.cluster.synthetic import copy_group_features, copy_group_scores  # noqa: E402

REFERENCE_TIMEOUT_S = 30
# The forked children only run numpy and networkx, never JAX.
warnings.filterwarnings("ignore", message=".*os.fork.*")


def sscd_like(n, seed=0, dim=512):
    rng = np.random.default_rng(seed)
    n_clusters = 24 if n <= 1000 else 48
    common = rng.normal(size=dim)
    common /= np.linalg.norm(common)
    topics = rng.normal(size=(8, dim))
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    parts = []
    sizes = rng.integers(2, 16, size=n_clusters)
    for s in sizes:
        c = rng.normal(size=dim)
        c /= np.linalg.norm(c)
        parts.append(c + rng.uniform(0.4, 0.9) * rng.normal(size=(s, dim)) / np.sqrt(dim))
    rest = n - int(sizes.sum())
    parts.append(0.23 * common + 0.2 * topics[rng.integers(0, 8, size=rest)]
                 + rng.normal(size=(rest, dim)) / np.sqrt(dim))
    f = np.concatenate(parts)[:n]
    f = f[rng.permutation(n)]
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def _write_features(path, n, groups, copy_fraction, zipf, dim, pairs=200_000, seed=1):
    """copy_group_features() to ``path`` (labels next to it); a one-line description."""
    feats, labels = copy_group_features(n, groups, dim=dim, copy_fraction=copy_fraction,
                                        zipf=zipf)
    np.save(path, feats)
    np.save(path + ".labels.npy", labels)
    counts = np.bincount(labels[labels >= 0], minlength=groups)
    i, j = np.random.default_rng(seed).integers(n, size=(2, pairs))
    s = np.einsum("ij,ij->i", feats[i[i != j]], feats[j[i != j]])
    return (f"features: N={n} D={feats.shape[1]}, {counts.sum()} near-copies of {groups} "
            f"training images ({counts.max()} .. {counts.min()} each); pair cosine "
            f"{s.mean():.3f} +- {s.std():.3f}, 25th percentile {np.quantile(s, 0.25):.3f}")


def _peak_gmacs():
    """fp32 multiply-adds per second at the nominal clock: cores x GHz x 16 (AVX2: two 8-wide
    FMA pipes per core); None where /proc/cpuinfo has no clock or no AVX2/FMA."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    mhz = re.search(r"cpu MHz\s*:\s*([0-9.]+)", info)
    if not mhz or " fma " not in info or " avx2 " not in info:
        return None
    return os.cpu_count() * float(mhz.group(1)) / 1000 * 16


def copy_groups_run(n, num_train, groups, copy_fraction, zipf, dim, schedule):
    """In-process: cold and warm wall/CPU time of cluster.cluster, and the scores."""
    feats, labels = copy_group_features(n, groups, dim=dim, copy_fraction=copy_fraction,
                                        zipf=zipf)
    for run in ("cold", "warm"):
        t0, c0 = time.perf_counter(), time.process_time()
        res = C.cluster(features=feats, num_train=num_train, schedule=schedule)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        scores = copy_group_scores(res.cliques, res.representatives, labels)
        print(f"ours  N={n} N0={num_train} groups={groups} zipf={zipf} {run}: {wall:.2f} s wall "
              f"(similarity {res.similarity_s:.2f} s, cliques {res.cliques_s:.2f} s), CPU "
              f"{cpu:.2f} s, load {os.getloadavg()[0]:.1f}; threshold {res.threshold:.2f}, "
              f"{len(res.cliques)} cliques, skipped {len(res.skipped_thresholds)}; "
              + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in scores.items()), flush=True)


def large_run(n, num_train, groups, copy_fraction, zipf, dim, schedule, extra=()):
    """Cluster synthetic features through the binary; wall time and peak RSS of that child,
    thresholds searched / skipped, and the scores against the known copy groups."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.npy")
        with mp.get_context("spawn").Pool(1) as pool:
            print(pool.apply(_write_features, (path, n, groups, copy_fraction, zipf, dim)),
                  flush=True)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.cluster", f"--features_file={path}",
             f"--num_train={num_train}", f"--workdir={tmp}/out", f"--schedule={schedule}",
             *extra], cwd=root,
            env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        log = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()[0]
        if status != 0:
            raise SystemExit(f"cluster failed:\n{log[-3000:]}")
        with open(os.path.join(tmp, "out", "clusters.json")) as f:
            res = json.load(f)
        labels = np.load(path + ".labels.npy")
    over_edges = len(re.findall(r"more edges than the edge budget", log))
    over_work = len(re.findall(r"exceeded the deterministic work budget", log))
    searched = len(re.findall(r"threshold [0-9.]+ \(\d+ edges, \d+ work units\)", log))
    fallback = ("most groups" if "taking the threshold with the most groups" in log else
                "reference rule" if "using the reference schedule" in log else "window")
    scores = copy_group_scores(res["cliques"], res["representatives"], labels)
    sim_s = res["timing"]["similarity_s"]
    gmacs = n * (n - 1) / 2 * dim / sim_s / 1e9
    peak = _peak_gmacs()
    print(f"ours  N={n} N0={num_train} schedule={schedule}: {wall:.1f} s wall (similarity "
          f"{res['timing']['similarity_s']:.1f} s, cliques {res['timing']['cliques_s']:.1f} s), "
          f"CPU {usage.ru_utime + usage.ru_stime:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB, load average {load0:.1f} -> {load1:.1f};"
          f" threshold {res['threshold']:.2f}, {len(res['cliques'])} cliques (largest "
          f"{[len(c) for c in res['cliques'][:5]]}); thresholds searched {searched}, skipped: "
          f"{over_edges} over the edge budget, {over_work} over the work budget; chosen by: "
          f"{fallback}; similarity {gmacs:.1f} GMAC/s"
          + (f" ({100 * gmacs / peak:.0f}% of {peak:.0f} peak)" if peak else "") + "; "
          + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in scores.items()), flush=True)


def _rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


_SIM = None


def _reference_threshold(thr, queue):
    import networkx as nx

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    try:
        sim = _SIM
        n = sim.shape[0]
        graph = nx.Graph()
        graph.add_nodes_from(range(n))
        for start in range(0, n, 256):
            ii, jj = np.nonzero(sim[start:start + 256] >= thr)
            ii = ii + start
            keep = ii < jj
            graph.add_edges_from(zip(ii[keep].tolist(), jj[keep].tolist()))
        cliques = []
        while graph.number_of_nodes():
            best = min((sorted(c) for c in nx.find_cliques(graph)), key=lambda c: (-len(c), c))
            cliques.append(best)
            graph.remove_nodes_from(best)
        queue.put(cliques)
    except MemoryError:
        queue.put("oom")


def reference_run(sim, num_train, cap_s, seed=0):
    global _SIM
    _SIM = sim
    ctx = mp.get_context("fork")
    n = sim.shape[0]
    idx = np.random.default_rng(seed).choice(n * n, size=min(1000, n * n), replace=False)
    q = np.float32(np.quantile(sim.reshape(-1)[np.sort(idx)], 0.25))
    k = math.floor(float(q) * 100) + 1
    while np.float32(k / 100) > q:
        k -= 1
    t0 = time.perf_counter()
    timeouts = oom = 0
    while True:
        if time.perf_counter() - t0 > cap_s:
            return {"finished": False, "time_s": time.perf_counter() - t0,
                    "timeouts": timeouts, "oom": oom, "threshold": None}
        thr = np.float32(k / 100)
        queue = ctx.Queue()
        proc = ctx.Process(target=_reference_threshold, args=(thr, queue))
        proc.start()
        result = None
        deadline = time.perf_counter() + REFERENCE_TIMEOUT_S
        while time.perf_counter() < deadline and result is None:
            try:
                result = queue.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty
                if not proc.is_alive() and queue.empty():
                    break
        if proc.is_alive():
            proc.terminate()
        proc.join()
        if result is None:
            timeouts += 1
        elif result == "oom":
            oom += 1
        elif len(result) >= num_train:
            result.sort(key=lambda c: (-len(c), c))
            return {"finished": True, "time_s": time.perf_counter() - t0, "timeouts": timeouts,
                    "oom": oom, "threshold": float(thr), "cliques": result}
        k += 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="500,2000,10000")
    parser.add_argument("--reference_cap_s", type=float, default=330.0)
    parser.add_argument("--skip_reference", action="store_true")
    parser.add_argument("--large", action="store_true", help="only the large-N run")
    parser.add_argument("--copy_groups", action="store_true",
                        help="copy-group features clustered in process (cold and warm)")
    parser.add_argument("--large_n", type=int, default=100_000)
    parser.add_argument("--num_train", type=int, default=20)
    parser.add_argument("--copy_fraction", type=float, default=0.05)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--groups", type=int, default=None,
                        help="training images copied (default: --num_train)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--schedule", default=C.DEFAULT_SCHEDULE, choices=C.SCHEDULES)
    args = parser.parse_args()
    print(f"# bench_cluster  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}"
          f"  {os.cpu_count()} cores  python {platform.python_version()}")
    if args.copy_groups:
        copy_groups_run(args.large_n, args.num_train, args.groups or args.num_train,
                        args.copy_fraction, args.zipf, args.dim, args.schedule)
        return
    if args.large:
        large_run(args.large_n, args.num_train, args.groups or args.num_train,
                  args.copy_fraction, args.zipf, args.dim, args.schedule)
        return
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        feats = sscd_like(n)
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        res = C.cluster(features=feats, num_train=10)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        row = {"n": n, "ours_total_s": wall, "ours_cpu_s": cpu, "ours_sim_s": res.similarity_s,
               "ours_cliques_s": res.cliques_s, "ours_thr": res.threshold,
               "ours_count": len(res.cliques), "ours_skipped": len(res.skipped_thresholds),
               "ours_largest": len(res.cliques[0])}
        print(f"ours  N={n}: total {wall:.2f} s (similarity {res.similarity_s:.2f} s, cliques "
              f"{res.cliques_s:.2f} s, cpu {cpu:.2f} s), threshold {res.threshold:.2f}, "
              f"{len(res.cliques)} cliques (largest {len(res.cliques[0])}), "
              f"{len(res.skipped_thresholds)} thresholds over budget", flush=True)
        if not args.skip_reference:
            sim = C.cosine_similarity(feats)
            ref = reference_run(sim, 10, args.reference_cap_s)
            row.update({"ref": ref})
            if ref["finished"]:
                same = (ref["threshold"] == res.threshold and ref["cliques"] == res.cliques)
                at_ours = "same threshold, same partition" if same else (
                    "different threshold" if ref["threshold"] != res.threshold
                    else "same threshold, DIFFERENT partition")
                print(f"networkx N={n}: {ref['time_s']:.1f} s, threshold {ref['threshold']:.2f}"
                      f", {len(ref['cliques'])} cliques, {ref['timeouts']} thresholds timed out"
                      f" ({ref['oom']} out of memory); {at_ours}", flush=True)
            else:
                print(f"networkx N={n}: not finished after {ref['time_s']:.0f} s "
                      f"({ref['timeouts']} thresholds timed out, {ref['oom']} out of memory)",
                      flush=True)
            del sim
        rows.append(row)
    print("\n| N | ours: total (similarity + cliques) | ours: threshold, cliques, over budget "
          "| networkx reference, 30 s timeout |")
    print("|---|---|---|---|")
    for r in rows:
        ref = r.get("ref")
        if ref is None:
            ref_txt = "not run"
        elif ref["finished"]:
            ref_txt = (f"{ref['time_s']:.0f} s, threshold {ref['threshold']:.2f}, "
                       f"{len(ref['cliques'])} cliques, {ref['timeouts']} timeouts")
        else:
            ref_txt = f"> {ref['time_s']:.0f} s (cap), {ref['timeouts']} timeouts, not finished"
        print(f"| {r['n']} | {r['ours_total_s']:.2f} s ({r['ours_sim_s']:.2f} + "
              f"{r['ours_cliques_s']:.2f}) | {r['ours_thr']:.2f}, {r['ours_count']}, "
              f"{r['ours_skipped']} | {ref_txt} |")


if __name__ == "__main__":
    main()
