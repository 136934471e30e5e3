"""Synthetic in-context-learning tasks: the bursty few-shot classification task and its
token sequences. Their stores are written by :mod:`repeat_scaling.data.icl_store`; the
``icl`` objective the normal trainer uses on them is :mod:`repeat_scaling.data.icl_objective`.

The task (Chan et al. 2022; Reddy 2023)
---------------------------------------
A sequence holds ``N`` item-label pairs and a query item; the model must output the
query's label::

    x_1 l_1 x_2 l_2 ... x_N l_N x_q l_q          (sequence_length = 2N + 2 tokens)

Classes and items (the continuous version, :func:`continuous_sequences`): ``K`` trained
classes with Zipfian frequencies ``p(k) ~ (k+1)^-alpha``, each with a mean
``mu_k ~ N(0, I_D / D)``; an item of class ``k`` is ``x = (mu_k + eps * eta) / sqrt(1 + eps^2)``
with ``eta ~ N(0, I_D / D)`` (within-class noise ``eps``). Every trained class has a fixed
label in ``[0, L)`` (drawn once from the seed), so a trained class can be solved "in
weights". Novel classes (fresh means, the ``p_C`` fraction) get labels assigned at random
per sequence, so only the context tells their label.

Sequence kinds (training mixture):

- bursty (probability ``p_B``): ``N / B`` distinct classes, each appearing ``B`` times in
  the context (shuffled); the query's class is one of them.
- non-bursty (``1 - p_B``): ``N`` context classes and the query class drawn i.i.d. from
  the Zipfian distribution (the query's class is usually absent from the context).
- novel (probability ``p_C``, instead of the above): a bursty sequence over novel classes
  with labels drawn per sequence (distinct labels for distinct classes).

Evaluation sets (the metrics of :mod:`repeat_scaling.eval.icl`):

- ``eval_icl`` (in-context accuracy): bursty sequences of novel classes, random labels.
- ``eval_unseen``: as ``eval_icl`` with classes whose tokens never occur in training.
- ``eval_flipped`` (flipped-label accuracy): bursty sequences of TRAINED classes whose
  in-context labels are their true labels shifted by a random ``r in [1, L)`` (mod L): the
  target is the in-context label, which the in-weights answer always gets wrong.
- ``eval_iwl`` (in-weights accuracy): trained query class (Zipfian) that does NOT occur in
  the context; the target is its fixed label.

Tokens (the token-sequence version, :func:`token_sequences`)
------------------------------------------------------------
Items are VECTOR-QUANTISED: every class ``c`` (trained, novel pool, unseen pool) owns
``E = exemplars`` codewords ``w_{c,e} = normalise(mu_c + eps * g_{c,e})`` and one token
each; an item's token is its nearest codeword (largest cosine) over the WHOLE codebook.
So with ``eps -> 0`` (or ``E = 1``) every item of class ``c`` is one token; as ``eps``
grows, the items of a class spread over its exemplar tokens (the context's copies of the
query class are then different tokens from the query: matching must be by class, not by
token identity), and at large ``eps`` items cross into other classes' cells (the token
analogue of overlapping classes). This keeps ``D`` and ``eps`` meaningful, derives the
token task from the continuous one, and needs no text. Novel classes come from a pool of
``novel_classes`` classes whose labels are re-drawn in every sequence (a token task needs
a finite token set; no fixed label ever attaches to them), ``unseen_classes`` more are
kept out of training entirely.

Token ids: 0 pad, 1 EOS, 2 unk (vocabulary ``tokens:V``); labels ``3 .. 3+L-1``; then the
exemplar tokens of the trained classes, the novel pool and the unseen pool, ``E`` per
class. ``V = 3 + L + (K + novel_classes + unseen_classes) * E``.

Only numpy is needed here (no jax, no tensorflow).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

FIRST_LABEL = 3  # ids 0, 1, 2 are pad / EOS / unk
TASK_NAMES = ("icl_bursty", "icl_regression")
EVAL_SPLITS = ("eval_icl", "eval_unseen", "eval_flipped", "eval_iwl")

#: Defaults of ``icl_bursty:k=v,...``; the CPU demo values (configs/icl_bursty.py).
BURSTY_DEFAULTS: dict[str, Any] = {
    "K": 128,  # trained classes (Zipfian frequencies, fixed labels)
    "alpha": 0.0,  # Zipf exponent
    "D": 32,  # item dimension
    "eps": 0.1,  # within-class noise
    "L": 8,  # labels
    "N": 8,  # item-label pairs in the context
    "B": 4,  # burstiness: copies of each context class in a bursty sequence
    "p_B": 1.0,  # fraction of bursty sequences
    "p_C": 0.5,  # fraction of novel-class sequences
    "E": 1,  # exemplar tokens per class
    "novel_classes": 128,  # pool of novel classes (labels re-drawn per sequence)
    "unseen_classes": 64,  # classes never seen in training (eval_unseen)
    "train": 40_000,  # training sequences
    "validation": 1024,  # held-out sequences of the training distribution
    "eval": 512,  # sequences per evaluation set
}


class IclTaskError(ValueError):
    """A bad ICL task specification or store (one-line message)."""


# ----------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------
def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"icl_bursty:K=64,p_C=0.5"`` -> ``("icl_bursty", {"K": "64", "p_C": "0.5"})``."""
    name, _, rest = spec.partition(":")
    if name not in TASK_NAMES:
        raise IclTaskError(f"ICL task {name!r} in source {spec!r}; expected one of {TASK_NAMES}")
    params: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise IclTaskError(f"ICL task parameter {item!r} in {spec!r}; expected key=value")
        params[key.strip()] = value.strip()
    return name, params


def bursty_params(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bursty task's parameters: defaults, ``overrides`` applied and validated."""
    p = dict(BURSTY_DEFAULTS)
    for k, v in (overrides or {}).items():
        if k not in BURSTY_DEFAULTS:
            raise IclTaskError(
                f"unknown icl_bursty parameter {k!r}; expected one of {sorted(BURSTY_DEFAULTS)}"
            )
        want = type(BURSTY_DEFAULTS[k])
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise IclTaskError(f"icl_bursty {k}={v!r}; expected a number") from None
        if want is int and x != int(x):
            raise IclTaskError(f"icl_bursty {k}={v!r}; expected an integer")
        p[k] = want(x)

    def bad(k: str, expected: str) -> None:
        raise IclTaskError(f"icl_bursty {k}={p[k]!r}; expected {expected}")

    for k in ("K", "D", "N", "B", "E", "novel_classes", "train", "validation", "eval"):
        if p[k] < 1:
            bad(k, "an int >= 1")
    if p["L"] < 2:
        bad("L", "an int >= 2 labels")
    if p["unseen_classes"] < 0:
        bad("unseen_classes", "an int >= 0")
    for k in ("p_B", "p_C"):
        if not 0.0 <= p[k] <= 1.0:
            bad(k, "a probability in [0, 1]")
    if p["alpha"] < 0:
        bad("alpha", ">= 0")
    if p["eps"] < 0:
        bad("eps", ">= 0")
    if p["N"] % p["B"]:
        bad("B", f"a divisor of N={p['N']}")
    groups = p["N"] // p["B"]
    if groups > p["L"]:
        bad(
            "B",
            f"at least N/L={p['N'] / p['L']:g} (N/B={groups} context classes need distinct labels)",
        )
    if groups > min(p["K"], p["novel_classes"]):
        bad("N", f"N/B={groups} <= the number of classes in each pool")
    if p["N"] > p["K"] - 1:
        bad("K", f"> N={p['N']} (in-weights sequences need N other classes)")
    return p


def sequence_length(p: dict[str, Any]) -> int:
    return 2 * int(p["N"]) + 2


# ----------------------------------------------------------------------------------------
# The continuous version
# ----------------------------------------------------------------------------------------
class BurstyTask:
    """The fixed world of one bursty task: class means, labels, codebook (seeded).

    Class index space: trained ``[0, K)``, novel pool ``[K, K + P)``, unseen pool
    ``[K + P, K + P + U)``.
    """

    def __init__(self, params: dict[str, Any], seed: int = 0):
        self.p = p = bursty_params(params)
        self.seed = int(seed)
        g = np.random.default_rng([self.seed, 0x1C1])
        self.K, self.P, self.U = p["K"], p["novel_classes"], p["unseen_classes"]
        self.num_classes = self.K + self.P + self.U
        D = p["D"]
        self.means = g.normal(0.0, 1.0 / math.sqrt(D), (self.num_classes, D))
        self.labels = g.integers(0, p["L"], self.K)  # fixed labels of the trained classes
        w = self.means[:, None, :] + p["eps"] * g.normal(
            0.0, 1.0 / math.sqrt(D), (self.num_classes, p["E"], D)
        )
        w = w.reshape(-1, D)
        self.codebook = w / np.linalg.norm(w, axis=1, keepdims=True)
        ranks = np.arange(1, self.K + 1, dtype=np.float64)
        z = ranks ** -float(p["alpha"])
        self.zipf = z / z.sum()
        self.length = sequence_length(p)
        self.first_item_token = FIRST_LABEL + p["L"]
        self.vocab_size = self.first_item_token + self.num_classes * p["E"]

    # -- class/label layouts -------------------------------------------------------------
    def _bursty_layout(self, g, cls: np.ndarray):
        """Context [n, N] from [n, N/B] distinct classes (each B times, shuffled), query."""
        n, groups = cls.shape
        B = self.p["B"]
        ctx = np.repeat(cls, B, axis=1)
        order = np.argsort(g.random(ctx.shape), axis=1)
        ctx = np.take_along_axis(ctx, order, axis=1)
        q = cls[np.arange(n), g.integers(0, groups, n)]
        return ctx, q

    def _random_labels(self, g, ctx, q, groups_cls):
        """Per-sequence distinct labels for the classes in ``groups_cls`` [n, G]."""
        n, G = groups_cls.shape
        lab = np.argsort(g.random((n, self.p["L"])), axis=1)[:, :G]  # distinct labels
        ctx_lab = np.empty_like(ctx)
        q_lab = np.empty(n, np.int64)
        for j in range(G):
            ctx_lab = np.where(ctx == groups_cls[:, j : j + 1], lab[:, j : j + 1], ctx_lab)
            q_lab = np.where(q == groups_cls[:, j], lab[:, j], q_lab)
        return ctx_lab, q_lab

    def sample_classes(self, kind: str, n: int, g: np.random.Generator):
        """Classes and labels ``(ctx [n,N], ctx_labels [n,N], query [n], query_label [n])``.

        ``kind``: "train" (the training mixture), "validation" (same), "eval_icl",
        "eval_unseen", "eval_flipped", "eval_iwl".
        """
        p = self.p
        N, B, L = p["N"], p["B"], p["L"]
        G = N // B
        if kind in ("train", "validation"):
            u = g.random(n)
            novel = u < p["p_C"]
            bursty = ~novel & (g.random(n) < p["p_B"])
            ctx = np.empty((n, N), np.int64)
            ctx_lab = np.empty((n, N), np.int64)
            q = np.empty(n, np.int64)
            q_lab = np.empty(n, np.int64)
            parts = (
                ("novel", novel),
                ("bursty", bursty),
                ("iid", ~novel & ~bursty),
            )
            for what, rows in parts:
                m = int(rows.sum())
                if not m:
                    continue
                c, cl, qq, ql = self._kind(what, m, g)
                ctx[rows], ctx_lab[rows], q[rows], q_lab[rows] = c, cl, qq, ql
            return ctx, ctx_lab, q, q_lab
        what = {
            "eval_icl": "novel",
            "eval_unseen": "unseen",
            "eval_flipped": "flipped",
            "eval_iwl": "iwl",
        }.get(kind)
        if what is None:
            raise IclTaskError(
                f"sequence kind {kind!r}; expected train, validation or one of {EVAL_SPLITS}"
            )
        if what == "unseen" and self.U < G:
            raise IclTaskError(f"eval_unseen needs unseen_classes >= N/B={G}, got {self.U}")
        del L
        return self._kind(what, n, g)

    def _kind(self, what: str, n: int, g: np.random.Generator):
        p = self.p
        N, B = p["N"], p["B"]
        G = N // B
        if what in ("novel", "unseen"):
            base, size = (self.K, self.P) if what == "novel" else (self.K + self.P, self.U)
            cls = base + np.argsort(g.random((n, size)), axis=1)[:, :G]
            ctx, q = self._bursty_layout(g, cls)
            ctx_lab, q_lab = self._random_labels(g, ctx, q, cls)
            return ctx, ctx_lab, q, q_lab
        if what in ("bursty", "flipped"):
            cls = self._zipf_distinct(g, n, G)
            ctx, q = self._bursty_layout(g, cls)
            ctx_lab, q_lab = self.labels[ctx], self.labels[q]
            if what == "flipped":
                r = g.integers(1, p["L"], n)[:, None]
                ctx_lab = (ctx_lab + r) % p["L"]
                q_lab = (q_lab + r[:, 0]) % p["L"]
            return ctx, ctx_lab, q, q_lab
        if what == "iid":
            ctx = g.choice(self.K, size=(n, N), p=self.zipf)
            q = g.choice(self.K, size=n, p=self.zipf)
            return ctx, self.labels[ctx], q, self.labels[q]
        if what == "iwl":
            q = g.choice(self.K, size=n, p=self.zipf)
            # Context: N other classes (Zipfian over the classes != query): resample clashes.
            ctx = g.choice(self.K, size=(n, N), p=self.zipf)
            clash = ctx == q[:, None]
            while clash.any():
                ctx[clash] = g.choice(self.K, size=int(clash.sum()), p=self.zipf)
                clash = ctx == q[:, None]
            return ctx, self.labels[ctx], q, self.labels[q]
        raise AssertionError(what)

    def _zipf_distinct(self, g, n: int, k: int) -> np.ndarray:
        """[n, k] distinct trained classes per row, Zipf-weighted, without replacement."""
        gumbel = -np.log(-np.log(g.random((n, self.K))))
        return np.argsort(-(np.log(self.zipf)[None, :] + gumbel), axis=1)[:, :k]

    def items(self, classes: np.ndarray, g: np.random.Generator) -> np.ndarray:
        """Item vectors ``(mu_c + eps * eta) / sqrt(1 + eps^2)`` [..., D] for ``classes``."""
        D, eps = self.p["D"], self.p["eps"]
        eta = g.normal(0.0, 1.0 / math.sqrt(D), classes.shape + (D,))
        return (self.means[classes] + eps * eta) / math.sqrt(1.0 + eps * eps)

    def quantise(self, x: np.ndarray, block: int = 65_536) -> np.ndarray:
        """Nearest codeword (largest dot product) of each item -> its token id."""
        flat = x.reshape(-1, x.shape[-1])
        out = np.empty(len(flat), np.int64)
        for s in range(0, len(flat), block):
            out[s : s + block] = np.argmax(flat[s : s + block] @ self.codebook.T, axis=1)
        return (self.first_item_token + out).reshape(x.shape[:-1])


_KIND_SALT = {k: i for i, k in enumerate(("train", "validation", *EVAL_SPLITS))}


def continuous_sequences(task: BurstyTask, kind: str, n: int, seed: int, block: int = 0):
    """The continuous version: ``(items [n, N+1, D], labels [n, N+1], classes [n, N+1])``.

    Position ``N`` is the query; ``labels[:, N]`` is its target label (0-based). ``block``
    (> 0) draws an independent block of sequences (large splits are made block by block).
    """
    if kind not in _KIND_SALT:
        raise IclTaskError(f"sequence kind {kind!r}; expected one of {tuple(_KIND_SALT)}")
    key = [int(seed), 0xC0, _KIND_SALT[kind]] + ([int(block)] if block else [])
    g = np.random.default_rng(key)
    ctx, ctx_lab, q, q_lab = task.sample_classes(kind, n, g)
    classes = np.concatenate([ctx, q[:, None]], axis=1)
    labels = np.concatenate([ctx_lab, q_lab[:, None]], axis=1)
    return task.items(classes, g), labels, classes


BLOCK_SEQUENCES = 131_072  # sequences generated at once (bounds memory for large splits)


def token_sequences(task: BurstyTask, kind: str, n: int, seed: int) -> np.ndarray:
    """The token version: int32 [n, 2N+2] rows ``x_1 l_1 ... x_N l_N x_q l_q``.

    Made in blocks of ``BLOCK_SEQUENCES`` (block ``b`` from its own random stream).
    """
    out = np.empty((n, task.length), np.int32)
    for b, start in enumerate(range(0, n, BLOCK_SEQUENCES)):
        m = min(BLOCK_SEQUENCES, n - start)
        items, labels, _ = continuous_sequences(task, kind, m, seed, block=b)
        out[start : start + m, 0::2] = task.quantise(items)
        out[start : start + m, 1::2] = FIRST_LABEL + labels
    return out


def bursty_token_task(params: dict[str, Any], seed: int):
    """``(splits, vocab_size, task)`` of ``icl_bursty`` (same contract as icl_regression)."""
    task = BurstyTask(params, seed)
    p = task.p
    splits = {
        "train": token_sequences(task, "train", p["train"], seed),
        "validation": token_sequences(task, "validation", p["validation"], seed),
    }
    for name in EVAL_SPLITS:
        if name == "eval_unseen" and task.U < p["N"] // p["B"]:
            continue
        splits[name] = token_sequences(task, name, p["eval"], seed)
    N = p["N"]
    info = {
        "name": "icl_bursty",
        **p,
        "seed": int(seed),
        "sequence_length": task.length,
        "loss_positions": [2 * N + 1],
        "label_positions": list(range(1, 2 * N + 2, 2)),
        "label_tokens": list(range(FIRST_LABEL, FIRST_LABEL + p["L"])),
        "eval_splits": [s for s in EVAL_SPLITS if s in splits],
        "item_tokens": [task.first_item_token, task.vocab_size],
    }
    return splits, task.vocab_size, info
