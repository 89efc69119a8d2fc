"""Compiled maximum-clique kernels (numba): one subproblem of the peel, over uint64 bitsets.

Why compiled: the peel solves tens of thousands of small subproblems per threshold; the
former Python-int bitsets cost ~1 microsecond per search unit, these ~10-30 ns, and the
results are the same integers on every machine (integer operations only, no clock, no
threads). What is computed is stated in ``cliques.py``; here is how:

* A subproblem is v's later live neighbours N+(v) (ascending), with their adjacency read out
  of the CSR graph straight into a bitset matrix (``adj[a]`` bit b = a ~ b).
* Its clique number, by Tomita's MCQ (greedy colouring bounds, branching on the highest
  colours first), on the candidates renumbered by decreasing degree (up to LOCAL_MAX of them;
  in index order above), started from a greedy clique (candidates in decreasing-degree order,
  each taken if adjacent to all taken so far). A copy group is a near-clique: the greedy
  clique is then the whole group and the first colouring proves it maximum, where MCQ alone
  would first descend through the whole group, colouring it once per level (quadratic).
* The lexicographically smallest clique of that size: candidates in increasing index order,
  each taken if a clique of the remaining size still fits with it. A witness (a clique of
  the remaining size that the last decision or the greedy clique found) answers "yes" for
  its own smallest member without a search; other candidates get an MCQ decision with a
  tight target, started from a greedy clique too.

Work units (the deterministic budget): one per vertex coloured and one per colouring, one per
candidate a greedy clique scans, and (``cliques.py``) one per CSR entry read to build a
subproblem plus a fixed charge per subproblem. A kernel that passes its limit returns -1.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I64 = ir.IntType(64)
_ONE = np.uint64(1)


@intrinsic
def _popcount(typingctx, x):
    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop.i64", fnty=ir.FunctionType(_I64, [_I64]))
        return builder.call(fn, args)
    return types.uint64(types.uint64), codegen


@intrinsic
def _lowest_bit(typingctx, x):
    """Index of the lowest set bit (x != 0)."""
    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic(
            "llvm.cttz.i64", fnty=ir.FunctionType(_I64, [_I64, ir.IntType(1)]))
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 0)])
    return types.uint64(types.uint64), codegen


_jit = nb.njit(cache=True, nogil=True)


@_jit
def _first(bits, start):
    """Lowest set bit of a bitset at or after word ``start``; -1 if none."""
    for w in range(start, bits.shape[0]):
        if bits[w] != 0:
            return (w << 6) + np.int64(_lowest_bit(bits[w]))
    return -1


@_jit
def _count(bits):
    c = 0
    for w in range(bits.shape[0]):
        c += np.int64(_popcount(bits[w]))
    return c


@_jit
def _has(bits, u):
    return (bits[u >> 6] >> np.uint64(u & 63)) & _ONE


@_jit
def _clear(bits, u):
    bits[u >> 6] &= ~(_ONE << np.uint64(u & 63))


@_jit
def _set(bits, u):
    bits[u >> 6] |= _ONE << np.uint64(u & 63)


@_jit
def induced(indptr, upper, indices, live, v, pos):
    """(idx, adj, scanned): v's later live neighbours, ascending, their adjacency bitsets and
    the number of CSR entries read (the work). ``pos`` is a scratch array of the graph's size
    holding -1 (reset before returning)."""
    row = indices[upper[v]:indptr[v + 1]]
    scanned = row.shape[0]
    m = 0
    for x in row:
        if live[x]:
            m += 1
    idx = np.empty(m, np.int32)
    m = 0
    for x in row:
        if live[x]:
            idx[m] = x
            pos[x] = m
            m += 1
    adj = np.zeros((m, (m + 63) >> 6), np.uint64)
    for a in range(m):
        x = idx[a]
        scanned += indptr[x + 1] - upper[x]
        for p in range(upper[x], indptr[x + 1]):
            b = pos[indices[p]]
            if b >= 0:
                _set(adj[a], b)
                _set(adj[b], a)
    for a in range(m):
        pos[idx[a]] = -1
    return idx, adj, scanned


@_jit
def _colour(Q0, adj, kmin, us, cs, top, scratch_u, scratch_q):
    """Greedy colouring of Q0 (colour classes in index order). Appends the vertices of colour
    >= kmin, in colour order, to us/cs from ``top``. Returns (new top, colours, vertices)."""
    U = scratch_u
    U[:] = Q0
    Q = scratch_q
    c = 0
    n = 0
    start = 0
    while True:
        while start < U.shape[0] and U[start] == 0:
            start += 1
        if start == U.shape[0]:
            break
        c += 1
        Q[:] = U
        w = start
        while True:
            while w < Q.shape[0] and Q[w] == 0:
                w += 1
            if w == Q.shape[0]:
                break
            u = (w << 6) + np.int64(_lowest_bit(Q[w]))
            _clear(U, u)
            _clear(Q, u)
            row = adj[u]
            for x in range(w, Q.shape[0]):
                Q[x] &= ~row[x]
            n += 1
            if c >= kmin:
                us[top] = u
                cs[top] = c
                top += 1
    return top, c, n


@_jit
def _greedy(P, adj, gorder, out):
    """A clique of P grown in ``gorder``: each vertex taken if adjacent to all taken so far.
    Returns (size, vertices scanned); the members are out[:size]."""
    Q = P.copy()
    g = 0
    scanned = 0
    for u in gorder:
        if _has(Q, u):
            out[g] = u
            g += 1
            row = adj[u]
            for x in range(Q.shape[0]):
                Q[x] &= row[x]
            if _first(Q, 0) < 0:
                break
        scanned += 1
    return g, scanned + 1


@_jit
def clique_number(P, adj, gorder, r, lower, upper, used, limit, witness):
    """(max(lower - 1, r + clique number of P), used, witness size), stopping early once
    ``upper`` is reached; used = -1 when the work passed ``limit``. When the first value is
    >= lower, witness[:size] is a clique of P of that size minus r."""
    W = P.shape[0]
    best = lower - 1
    nwit = 0
    cand = _count(P)
    if cand == 0:
        return max(best, r), used, 0
    g, scanned = _greedy(P, adj, gorder, witness)
    used += scanned
    if r + g > best:
        best = r + g
        nwit = g
        if best >= upper:
            return best, used, nwit
    us = np.empty(4 * cand + 16, np.int64)
    cs = np.empty(4 * cand + 16, np.int64)
    su = np.empty(W, np.uint64)
    sq = np.empty(W, np.uint64)
    top, ncol, n = _colour(P, adj, best - r + 1, us, cs, 0, su, sq)
    used += n + 1
    if used > limit:
        return best, -1, nwit
    if r + ncol <= best:
        return best, used, nwit
    # One frame per clique member at most, and the root's colours bound the clique.
    prem = np.empty((ncol + 2, W), np.uint64)
    seg_start = np.empty(ncol + 2, np.int64)
    seg_end = np.empty(ncol + 2, np.int64)
    ptr = np.empty(ncol + 2, np.int64)
    chosen = np.empty(ncol + 2, np.int64)
    prem[0, :] = P
    seg_start[0] = 0
    seg_end[0] = top
    ptr[0] = top - 1
    d = 0
    while d >= 0:
        i = ptr[d]
        if i < seg_start[d] or r + d + cs[i] <= best:
            d -= 1
            continue
        u = us[i]
        ptr[d] = i - 1
        _clear(prem[d], u)
        chosen[d] = u
        child = prem[d + 1]
        row = adj[u]
        empty = True
        for x in range(W):
            child[x] = prem[d, x] & row[x]
            if child[x] != 0:
                empty = False
        depth = r + d + 1
        if empty:
            if depth > best:
                best = depth
                nwit = d + 1
                witness[:nwit] = chosen[:nwit]
                if best >= upper:
                    return best, used, nwit
            continue
        base = seg_end[d]  # the child's colour list goes above its parent's
        need = _count(child)
        if base + need > us.shape[0]:
            grown_u = np.empty(2 * (base + need), np.int64)
            grown_c = np.empty(2 * (base + need), np.int64)
            grown_u[:base] = us[:base]
            grown_c[:base] = cs[:base]
            us, cs = grown_u, grown_c
        new_top, ncol, n = _colour(child, adj, best - depth + 1, us, cs, base, su, sq)
        used += n + 1
        if used > limit:
            return best, -1, nwit
        if depth + ncol <= best:
            continue
        if ncol == n:  # the child is a clique
            best = depth + ncol
            nwit = d + 1
            witness[:nwit] = chosen[:nwit]
            x = _first(child, 0)
            while x >= 0:
                witness[nwit] = x
                nwit += 1
                _clear(child, x)
                x = _first(child, x >> 6)
            if best >= upper:
                return best, used, nwit
            continue
        d += 1
        seg_start[d] = base
        seg_end[d] = new_top
        ptr[d] = new_top - 1
    return best, used, nwit


@_jit
def _bitset(m):
    P = np.zeros((m + 63) >> 6, np.uint64)
    for u in range(m):
        _set(P, u)
    return P


@_jit
def lex_clique(adj, size, gorder, witness, nwit, used, limit):
    """The lexicographically smallest clique of ``size`` (the clique number) of the graph
    ``adj``, given a clique of that size (witness[:nwit]). Returns (members, used); used = -1
    when the work passed ``limit``."""
    m = adj.shape[0]
    W = (m + 63) >> 6
    P = _bitset(m)
    out = np.empty(size, np.int64)
    wit = np.sort(witness[:nwit].copy())
    wpos = 0
    scratch = np.empty(max(m, 1), np.int64)
    newP = np.empty(W, np.uint64)
    for k in range(size):
        need = size - k  # vertices still to take from P, this one included
        u = _first(P, 0)
        while True:
            row = adj[u]
            for x in range(W):
                newP[x] = P[x] & row[x]
            for x in range(u >> 6):
                newP[x] = 0
            newP[u >> 6] &= ~((_ONE << np.uint64(u & 63)) - _ONE) & ~(_ONE << np.uint64(u & 63))
            if wpos < wit.shape[0] and u == wit[wpos]:
                wpos += 1  # the witness's rest is a clique of need - 1 in newP
                break
            if need == 1:
                break
            if _count(newP) >= need - 1:
                got, used, nw = clique_number(newP, adj, gorder, 1, need, need, used, limit,
                                              scratch)
                if used < 0:
                    return out, -1
                if got >= need:
                    wit = np.sort(scratch[:nw].copy())
                    wpos = 0
                    break
            _clear(P, u)
            u = _first(P, u >> 6)
        out[k] = u
        P[:] = newP
    return out, used


@_jit
def _degree_order(adj):
    """Candidates by decreasing degree, ties to the smaller index."""
    m = adj.shape[0]
    deg = np.empty(m, np.int64)
    for a in range(m):
        deg[a] = _count(adj[a])
    return np.argsort(-deg, kind="mergesort")


@_jit
def _renumbered(adj, order):
    m = adj.shape[0]
    inv = np.empty(m, np.int64)
    for i in range(m):
        inv[order[i]] = i
    out = np.zeros_like(adj)
    for i in range(m):
        row = adj[order[i]]
        b = _first(row, 0)
        while b >= 0:
            _set(out[i], inv[b])
            b = _first_after(row, b)
    return out


@_jit
def _first_after(bits, u):
    """Lowest set bit above u; -1 if none."""
    w = u >> 6
    rest = bits[w] & ~((_ONE << np.uint64(u & 63)) - _ONE) & ~(_ONE << np.uint64(u & 63))
    if rest != 0:
        return (w << 6) + np.int64(_lowest_bit(rest))
    return _first(bits, w + 1)


@_jit
def solve(adj, lower, upper, used, limit, local_max):
    """One subproblem: (size, members, used). size >= lower: members (local indices) are the
    lexicographically smallest maximum clique; size < lower: an upper bound < lower on the
    clique number, no members. used = -1: over the work limit."""
    m = adj.shape[0]
    witness = np.empty(max(m, 1), np.int64)
    order = _degree_order(adj)
    P = _bitset(m)
    if m <= local_max:
        size, used, nwit = clique_number(P, _renumbered(adj, order), np.arange(m), 1, lower,
                                         upper, used, limit, witness)
        for i in range(nwit):
            witness[i] = order[witness[i]]
    else:
        size, used, nwit = clique_number(P, adj, order, 1, lower, upper, used, limit, witness)
    if used < 0 or size < lower:
        return size, np.empty(0, np.int64), used
    members, used = lex_clique(adj, size - 1, order, witness, nwit, used, limit)
    return size, members, used


@_jit
def greedy_clique(adj):
    """Deterministic fallback (local indices, ascending): grow the clique by the candidate
    with most candidate neighbours, the first one on ties."""
    m = adj.shape[0]
    P = _bitset(m)
    tmp = np.empty(P.shape[0], np.uint64)
    out = np.empty(m, np.int64)
    g = 0
    while _first(P, 0) >= 0:
        best_u, best_d = -1, -1
        u = _first(P, 0)
        while u >= 0:
            for x in range(P.shape[0]):
                tmp[x] = adj[u, x] & P[x]
            d = _count(tmp)
            if d > best_d:
                best_u, best_d = u, d
            u = _first_after(P, u)
        out[g] = best_u
        g += 1
        row = adj[best_u]
        for x in range(P.shape[0]):
            P[x] &= row[x]
    return np.sort(out[:g])
