"""An alpha-beta cost model of the MoE layer's all-to-all: flat, hierarchical and coordinated.

Legend: p ranks in the expert-parallel exchange, G ranks of it per node (N = p / G nodes), B bytes of
rows a rank sends per exchange (tokens x width x bytes per element), TP the tensor-parallel degree.

A collective costs `call_s` once, `alpha` per peer a rank sends to and `beta` per byte it sends off
itself, with its own (alpha, beta) for peers on the same node (NVLink, or loopback on one box) and
for peers on other nodes (InfiniBand); a rank's messages are serialized on its links, so the times of
its intra- and inter-node messages add up (no overlap: an upper-bound style estimate). Rows are
assumed spread evenly over the destinations (a balanced top-1 router).

- Flat: one exchange with p - 1 peers (G - 1 on the node, p - G off it); B (G - 1) / p bytes stay on
  the node and B (p - G) / p cross it.
- Hierarchical (paper section 5): hop 1 inside the node, G - 1 peers, B (G - 1) / G bytes; hop 2
  across nodes among ranks of the same local index, N - 1 peers, B (N - 1) / N bytes. The same bytes
  cross nodes as in the flat exchange, G - 1 + N - 1 peers instead of p - 1, at the price of moving
  the node-local share of the rows a second time.
- Coordinated (paper section 5, TP ranks hold the same tokens): the exchange runs among the p / TP
  ranks of one TP index (G / TP of them per node) on B / TP bytes, then an all-gather inside the TP
  group (TP - 1 node-local peers, B / TP bytes to each).

`round_trip` is what `pyramoe.parallel.AllToAllDispatcher` does per MoE layer forward: a counts
exchange, the rows out, the rows back (and the TP all-gather when coordinated); the hierarchical
exchange runs a counts hop before its first data hop when it moves rows (the counts exchange, equal
splits, needs none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEMES = ("flat", "hierarchical", "coordinated", "coordinated-hierarchical")
COUNT_BYTES = 8  # one int64 count per local expert and destination (one local expert assumed)


@dataclass(frozen=True)
class Link:
    alpha_s: float  # per message (peer) a rank sends to
    beta_s_per_byte: float  # per byte a rank sends

    @property
    def gb_per_s(self) -> float:
        return 1e-9 / self.beta_s_per_byte if self.beta_s_per_byte else math.inf


@dataclass(frozen=True)
class Network:
    intra: Link  # peers on the same node
    inter: Link  # peers on other nodes
    call_s: float = 0.0  # fixed cost of one collective call


@dataclass(frozen=True)
class Phase:
    """One collective as one rank sees it: peers and bytes sent, on the node and off it."""

    what: str
    intra_peers: int
    inter_peers: int
    intra_bytes: float
    inter_bytes: float

    @property
    def peers(self) -> int:
        return self.intra_peers + self.inter_peers


def check_layout(p: int, per_node: int, tp: int = 1) -> None:
    if p < 1:
        raise ValueError(f"ranks: must be >= 1, got {p}")
    if per_node < 1 or p % per_node and per_node < p:
        raise ValueError(f"gpus-per-node: {per_node} does not divide {p} ranks")
    if tp < 1 or p % tp or min(per_node, p) % tp:
        raise ValueError(f"tp: {tp} must divide the ranks ({p}) and the ranks per node ({min(per_node, p)})")


def flat_exchange(p: int, per_node: int, nbytes: float, what: str = "exchange") -> Phase:
    g = min(per_node, p)
    return Phase(what, g - 1, p - g, nbytes * (g - 1) / p, nbytes * (p - g) / p)


def hierarchical_exchange(p: int, per_node: int, nbytes: float, what: str = "exchange") -> list[Phase]:
    """Two hops; on one node the hierarchical exchange is the flat one."""
    g = min(per_node, p)
    nodes = p // g
    if nodes == 1:
        return [flat_exchange(p, g, nbytes, what)]
    return [
        Phase(f"{what} hop1", g - 1, 0, nbytes * (g - 1) / g, 0.0),
        Phase(f"{what} hop2", 0, nodes - 1, 0.0, nbytes * (nodes - 1) / nodes),
    ]


def exchange_call(p: int, per_node: int, nbytes: float, hierarchical: bool, what: str,
                  equal_splits: bool = False) -> list[Phase]:
    """One `Exchange.__call__` as pyramoe runs it, the receive splits known: the flat one is one
    collective; the hierarchical one exchanges counts before its first data hop (the second hop's
    follow from them), none when every split is equal (the count table itself)."""
    if not hierarchical or p <= min(per_node, p):
        return [flat_exchange(p, per_node, nbytes, what)]
    data = hierarchical_exchange(p, per_node, nbytes, what)
    if equal_splits:
        return data
    counts = hierarchical_exchange(p, per_node, COUNT_BYTES * p, f"{what} counts")
    return [counts[0], data[0], data[1]]


def round_trip(scheme: str, p: int, per_node: int, nbytes: float, tp: int = 1) -> list[Phase]:
    """The collectives of one MoE layer's forward communication on one rank (see module doc).
    `nbytes`: the rows a rank holds before any TP split."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: unknown {scheme!r} (choose from {', '.join(SCHEMES)})")
    coordinated = scheme.startswith("coordinated")
    tp = tp if coordinated else 1
    check_layout(p, per_node, tp)
    hier = scheme.endswith("hierarchical")
    ep, ep_per_node, share = p // tp, min(per_node, p) // tp, nbytes / tp
    phases = exchange_call(ep, ep_per_node, COUNT_BYTES * ep, hier, "counts", equal_splits=True)
    phases += exchange_call(ep, ep_per_node, share, hier, "dispatch")
    phases += exchange_call(ep, ep_per_node, share, hier, "combine")
    if coordinated and tp > 1:
        phases.append(Phase("tp all-gather", tp - 1, 0, share * (tp - 1), 0.0))
    return phases


def peers_per_exchange(scheme: str, p: int, per_node: int, tp: int = 1) -> int:
    """Distinct ranks one rank sends rows to in one exchange: p - 1 flat, G - 1 + N - 1
    hierarchical, p / TP - 1 (+ TP - 1 for the all-gather) coordinated."""
    phases = round_trip(scheme, p, per_node, 1.0, tp)
    dispatch = [ph for ph in phases if ph.what.startswith("dispatch") and "counts" not in ph.what]
    gather = [ph for ph in phases if ph.what == "tp all-gather"]
    return sum(ph.peers for ph in dispatch + gather)


def phase_time(network: Network, phase: Phase) -> float:
    intra, inter = network.intra, network.inter
    return (
        network.call_s
        + phase.intra_peers * intra.alpha_s + phase.intra_bytes * intra.beta_s_per_byte
        + phase.inter_peers * inter.alpha_s + phase.inter_bytes * inter.beta_s_per_byte
    )


def predict(network: Network, phases: list[Phase]) -> float:
    """Seconds for the phases, one after the other."""
    return sum(phase_time(network, ph) for ph in phases)


def features(phases: list[Phase], shared_link: bool) -> list[float]:
    """Coefficients of (call_s, alpha, beta) - or of (call_s, alpha_intra, beta_intra, alpha_inter,
    beta_inter) - in `predict`, which is linear in them."""
    calls = float(len(phases))
    ai, bi = sum(ph.intra_peers for ph in phases), sum(ph.intra_bytes for ph in phases)
    ae, be = sum(ph.inter_peers for ph in phases), sum(ph.inter_bytes for ph in phases)
    return [calls, ai + ae, bi + be] if shared_link else [calls, ai, bi, ae, be]


def fit(samples: list[tuple[list[Phase], float]], shared_link: bool = True) -> Network:
    """Least squares on relative error (each sample weighted by 1 / its time), coefficients kept
    non-negative (a negative one is fixed at 0 and the rest refitted). `shared_link`: one link for
    on- and off-node peers, as when every rank is a process on one machine."""
    if not samples:
        raise ValueError("fit: no measurements")
    rows = [(features(ph, shared_link), t) for ph, t in samples if t > 0]
    active = list(range(len(rows[0][0])))
    while True:
        coef = _weighted_lstsq(rows, active)
        negative = [i for i in active if coef[i] < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda i: coef[i]))
    if shared_link:
        link = Link(coef[1], coef[2])
        return Network(link, link, coef[0])
    return Network(Link(coef[1], coef[2]), Link(coef[3], coef[4]), coef[0])


def _weighted_lstsq(rows: list[tuple[list[float], float]], active: list[int]) -> list[float]:
    """Normal equations of min sum((x.c - t) / t)^2 over the active coefficients (others 0)."""
    n = len(active)
    a = [[0.0] * n for _ in range(n)]
    b = [0.0] * n
    for x, t in rows:
        xs = [x[i] / t for i in active]
        for i in range(n):
            b[i] += xs[i]
            for j in range(n):
                a[i][j] += xs[i] * xs[j]
    solution = _solve(a, b)
    coef = [0.0] * len(rows[0][0])
    for i, value in zip(active, solution):
        coef[i] = value
    return coef


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting; a singular column gets 0."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            continue
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col and m[r][col]:
                factor = m[r][col] / m[col][col]
                m[r] = [vr - factor * vc for vr, vc in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] if abs(m[i][i]) > 1e-300 else 0.0 for i in range(n)]


# Link figures for predictions on GPU clusters. ASSUMPTIONS, not measurements of this project:
#  - NVLink 3 on an NVIDIA A100 (DGX A100, the paper's GPU): 600 GB/s total per GPU, i.e. 300 GB/s
#    each way (NVIDIA's A100 datasheet); per-message latency 3 us is assumed.
#  - InfiniBand HDR, one 200 Gb/s (25 GB/s) adapter per GPU (the DGX A100 layout); per-message
#    latency 5 us is assumed (a few microseconds, as NCCL point-to-point latencies typically are).
#  - 10 us per collective call (kernel launch and synchronisation) is assumed.
PUBLISHED_GPU_NETWORK = Network(
    intra=Link(alpha_s=3e-6, beta_s_per_byte=1 / 300e9),
    inter=Link(alpha_s=5e-6, beta_s_per_byte=1 / 25e9),
    call_s=10e-6,
)
PUBLISHED_GPU_NETWORK_NOTE = (
    "ASSUMED link figures: intra-node NVLink 300 GB/s per GPU each way (NVIDIA A100 datasheet: 600 GB/s "
    "total), 3 us per message (assumed); inter-node InfiniBand HDR 25 GB/s per GPU (200 Gb/s, one adapter "
    "per GPU as in a DGX A100), 5 us per message (assumed); 10 us per collective call (assumed); "
    "messages of a rank serialized, no overlap of intra- and inter-node transfers"
)


def predict_table(
    network: Network, sizes: list[int], per_node: int, nbytes: float, tp: int = 2
) -> list[dict[str, float]]:
    """Predicted round-trip seconds of every scheme for each p in `sizes`."""
    rows = []
    for p in sizes:
        row: dict[str, float] = {"p": p}
        for scheme in SCHEMES:
            row[scheme] = predict(network, round_trip(scheme, p, per_node, nbytes, tp))
            row[f"{scheme} peers"] = peers_per_exchange(scheme, p, per_node, tp)
        rows.append(row)
    return rows
