"""The ``synthetic`` source: a seeded toy language (Zipfian unigrams, bigram Markov structure,
copied bursts) rendered as pronounceable words, documents generated independently of each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from repeat_scaling.data.sources import Source, SourceError

_ONSETS = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]


def _render_word(i: int) -> str:
    """A deterministic pronounceable lowercase word for word index ``i`` (injective)."""
    syl = []
    n = i + 1
    while n > 0:
        n, r = divmod(n - 1, len(_ONSETS) * len(_VOWELS))
        syl.append(_ONSETS[r // len(_VOWELS)] + _VOWELS[r % len(_VOWELS)])
    return "".join(syl)


class SyntheticSource(Source):
    """A seeded toy language with Zipfian unigrams, bigram Markov structure and bursts.

    Generation of document ``d`` uses its own RNG ``default_rng([seed, d])``, so documents
    are independent of each other and of ``num_docs``. Each word is drawn

    - with probability ``p_copy``: a burst, copying a span of 2-8 words seen earlier in the
      same document (induction/copying structure);
    - else with probability ``p_bigram``: from the previous word's successor list
      (``successors`` fixed successors per word, Zipf-weighted; Markov structure);
    - else from the Zipfian unigram distribution ``p(rank r) ∝ r^-zipf``.

    Words are rendered as pronounceable strings, sentences end with a period every ~12
    words, so any vocabulary (byte or SentencePiece) tokenizes them. Parameters come from
    the spec: ``synthetic:num_docs=2000,words=2000,seed=0,doc_words=200``.
    """

    kind = "synthetic"
    PARAMS = {
        "num_docs": 2000,
        "words": 2000,
        "seed": 0,
        "doc_words": 200,
        "zipf": 1.1,
        "successors": 8,
        "p_bigram": 0.6,
        "p_copy": 0.05,
    }

    def __init__(self, spec: str, params: dict[str, Any] | None = None, **kw):
        super().__init__(spec, **kw)
        p = dict(self.PARAMS)
        for k, v in (params or {}).items():
            if k not in p:
                raise SourceError(
                    f"source {spec!r}: unknown synthetic parameter {k!r}; expected one of {sorted(p)}"
                )
            try:
                p[k] = type(self.PARAMS[k])(v)
            except ValueError:
                raise SourceError(f"source {spec!r}: parameter {k}={v!r} is not a number") from None
        if p["num_docs"] < 1 or p["words"] < 2 or p["doc_words"] < 1 or p["successors"] < 1:
            raise SourceError(
                f"source {spec!r}: num_docs, words, doc_words, successors must be positive"
            )
        if not (0 <= p["p_bigram"] <= 1 and 0 <= p["p_copy"] <= 1):
            raise SourceError(f"source {spec!r}: p_bigram and p_copy must lie in [0, 1]")
        self.params = p
        v = p["words"]
        ranks = np.arange(1, v + 1, dtype=np.float64)
        self.unigram = ranks ** -p["zipf"]
        self.unigram /= self.unigram.sum()
        table_rng = np.random.default_rng([p["seed"], 2**31 - 1])
        self.successor_table = table_rng.choice(v, size=(v, p["successors"]), p=self.unigram)
        w = np.arange(1, p["successors"] + 1, dtype=np.float64) ** -1.0
        self.successor_p = w / w.sum()
        self.vocab_words = [_render_word(i) for i in range(v)]

    def native_splits(self):
        return ("train",)

    def fingerprint(self):
        return {"kind": self.kind, **self.params}

    def generate_ids(self, d: int) -> np.ndarray:
        """The word indices of document ``d``."""
        p = self.params
        rng = np.random.default_rng([p["seed"], d])
        n = max(1, int(rng.poisson(p["doc_words"])))
        u = rng.random((n, 2))
        uni = rng.choice(p["words"], size=n, p=self.unigram)
        succ = rng.choice(p["successors"], size=n, p=self.successor_p)
        spans = rng.integers(2, 9, size=n)
        out: list[int] = []
        i = 0
        while len(out) < n:
            if out and len(out) > 8 and u[i, 0] < p["p_copy"]:
                length = int(spans[i])
                start = int(rng.integers(0, len(out) - length + 1)) if len(out) > length else 0
                out.extend(out[start : start + length])
            elif out and u[i, 1] < p["p_bigram"]:
                out.append(int(self.successor_table[out[-1], succ[i]]))
            else:
                out.append(int(uni[i]))
            i += 1
        return np.asarray(out[:n], dtype=np.int64)

    def render(self, ids: np.ndarray) -> str:
        words = [self.vocab_words[i] for i in ids]
        sentences = []
        for s in range(0, len(words), 12):
            sent = words[s : s + 12]
            sentences.append(" ".join([sent[0].capitalize(), *sent[1:]]) + ".")
        return " ".join(sentences)

    def _train_ids(self):
        n = (
            self.params["num_docs"]
            if self.max_docs is None
            else min(self.max_docs, self.params["num_docs"])
        )
        return [f"synthetic:{d}" for d in range(n)]  # documents are never empty

    def _iter_native(self, split):
        for d in range(self.params["num_docs"]):
            yield f"synthetic:{d}", self.render(self.generate_ids(d))
