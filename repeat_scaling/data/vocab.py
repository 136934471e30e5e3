"""Vocabulary facts and fast, TensorFlow-free encoders.

Two vocabulary kinds exist, both with T5/seqio conventions (pad=0, eos=1, unk=2) and 100
extra ids (sentinels) at the end of the id space:

- ``byte``: seqio ``ByteVocabulary(extra_ids=100)``: id = utf-8 byte + 3, so
  ``vocab_size = 256 + 3 + 100 = 359``.
- ``sentencepiece``: seqio ``SentencePieceVocabulary(path, extra_ids=100)``: the model's
  pieces plus 100 user-defined pieces ``▁<extra_id_k>`` appended in reverse order, so that
  extra id ``k`` is ``vocab_size - 1 - k``.

This module never imports tensorflow or seqio at import time (training and evaluation use
:class:`VocabInfo`); :func:`seqio_vocabulary` imports seqio lazily for data preparation and
seqio task registration only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
EXTRA_IDS = 100
BYTE_OFFSET = 3  # pad, eos, unk precede the 256 byte ids.
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET + EXTRA_IDS


class VocabError(ValueError):
    """A vocabulary spec or file that cannot be used (one-line message)."""


VOCAB_KINDS = ("byte", "sentencepiece", "tokens")


@dataclasses.dataclass(frozen=True)
class VocabInfo:
    """Everything a consumer needs to know about a vocabulary, without loading it.

    Attributes:
      kind: "byte", "sentencepiece" or "tokens" (a synthetic id space with no text form,
        e.g. the in-context-learning task stores; spec ``tokens:N``).
      path: the SentencePiece ``.model`` path (None for byte).
      sha256: hex digest of the ``.model`` file bytes (None for byte).
      vocab_size: number of ids including the extra ids (unpadded).
      extra_ids: number of sentinel ids at the end of the id space.
      pad_id, eos_id, unk_id: special ids (0, 1, 2).
    """

    kind: str
    path: str | None
    sha256: str | None
    vocab_size: int
    extra_ids: int = EXTRA_IDS
    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    def __post_init__(self):
        if self.kind not in VOCAB_KINDS:
            raise VocabError(f"vocab kind {self.kind!r} is not one of {VOCAB_KINDS}")

    def sentinel(self, k: int) -> int:
        """Id of extra id ``k`` (T5 sentinels count down from the end of the vocabulary)."""
        if not 0 <= k < self.extra_ids:
            raise VocabError(f"sentinel index {k} out of range [0, {self.extra_ids})")
        return self.vocab_size - 1 - k

    @property
    def spec(self) -> str:
        """The spec string that :func:`load_vocab_info` accepts for this vocabulary."""
        if self.kind == "tokens":
            return f"tokens:{self.vocab_size}"
        return "byte" if self.kind == "byte" else str(self.path)

    @property
    def token_dtype(self) -> np.dtype:
        """Smallest unsigned dtype that holds every id (uint16 when it fits, else uint32)."""
        return np.dtype(np.uint16) if self.vocab_size <= 2**16 else np.dtype(np.uint32)

    def same_vocabulary(self, other: VocabInfo) -> bool:
        """Whether two infos describe the same id mapping (paths may differ, bytes may not)."""
        return (self.kind, self.sha256, self.vocab_size, self.extra_ids) == (
            other.kind,
            other.sha256,
            other.vocab_size,
            other.extra_ids,
        )

    def describe(self) -> str:
        if self.kind in ("byte", "tokens"):
            return f"{self.kind} (vocab_size={self.vocab_size})"
        return f"sentencepiece {self.path} (sha256={str(self.sha256)[:12]}, vocab_size={self.vocab_size})"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise VocabError(
                f"unknown VocabInfo fields {sorted(unknown)}; expected {sorted(names)}"
            )
        return cls(**d)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_sp_processor(path: str, extra_ids: int = EXTRA_IDS):
    """A ``SentencePieceProcessor`` built exactly like seqio's (extra-id pieces appended).

    seqio appends ``▁<extra_id_k>`` user-defined pieces in reverse order; doing the same
    makes the ids of this TF-free processor identical to ``seqio`` ``vocab.encode``.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    try:
        with open(path, "rb") as f:
            data = f.read()
        model = sentencepiece_model_pb2.ModelProto.FromString(data)
        if not model.pieces:
            raise ValueError("no pieces")
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise VocabError(
            f"vocab file {path!r} is not a loadable SentencePiece model ({type(e).__name__}: {e})"
        ) from None
    for i in reversed(range(extra_ids)):
        model.pieces.add(
            piece=f"▁<extra_id_{i}>",
            score=0.0,
            type=sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED,
        )
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model.SerializeToString())
    except Exception as e:  # noqa: BLE001
        raise VocabError(f"vocab file {path!r} does not load in sentencepiece: {e}") from None
    return sp


def load_vocab_info(spec: str | VocabInfo) -> VocabInfo:
    """``"byte"`` or a path to a SentencePiece ``.model`` -> :class:`VocabInfo`.

    Raises:
      VocabError: the spec is neither, the file is missing, or it does not load, or its
        special ids disagree with T5's (pad=0, eos=1, unk=2).
    """
    if isinstance(spec, VocabInfo):
        return spec
    if not isinstance(spec, str) or not spec:
        raise VocabError(f"vocab spec {spec!r} must be 'byte' or a path to a SentencePiece .model")
    if spec == "byte":
        return VocabInfo(kind="byte", path=None, sha256=None, vocab_size=BYTE_VOCAB_SIZE)
    if spec.startswith("tokens:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) <= UNK_ID + 1:
            raise VocabError(f"vocab spec {spec!r}: expected tokens:N with N > {UNK_ID + 1} ids")
        return VocabInfo(kind="tokens", path=None, sha256=None, vocab_size=int(n), extra_ids=0)
    path = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isfile(path):
        raise VocabError(
            f"vocab {spec!r} is neither 'byte' nor an existing SentencePiece .model file"
        )
    sp = _load_sp_processor(path, extra_ids=0)
    ids = (sp.pad_id(), sp.eos_id(), sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
        raise VocabError(
            f"vocab file {spec!r} has (pad, eos, unk) ids {ids}; expected (0, 1, 2) as in T5"
        )
    return VocabInfo(
        kind="sentencepiece",
        path=path,
        sha256=_sha256_file(path),
        vocab_size=sp.GetPieceSize() + EXTRA_IDS,
    )


def seqio_vocabulary(info_or_spec: str | VocabInfo):
    """The seqio ``Vocabulary`` for a spec or info (imports seqio, hence tensorflow)."""
    info = load_vocab_info(info_or_spec)
    import seqio

    if info.kind == "byte":
        return seqio.ByteVocabulary(extra_ids=info.extra_ids)
    return seqio.SentencePieceVocabulary(info.path, extra_ids=info.extra_ids)


class Encoder:
    """Fast TF-free text -> ids encoder with seqio-identical ids (no EOS appended).

    Picklable by spec so multiprocessing workers can rebuild it cheaply.
    """

    def __init__(self, info_or_spec: str | VocabInfo):
        self.info = load_vocab_info(info_or_spec)
        self._sp = None
        if self.info.kind == "sentencepiece":
            self._sp = _load_sp_processor(self.info.path, self.info.extra_ids)

    def __getstate__(self):
        return {"info": self.info}

    def __setstate__(self, state):
        self.__init__(state["info"])

    def encode(self, text: str) -> np.ndarray:
        """One document -> int32 ids."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Many documents -> list of int32 id arrays (SentencePiece batch-encodes in C++)."""
        if self._sp is None:
            return [
                np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) + BYTE_OFFSET
                for t in texts
            ]
        # One thread: parallelism comes from worker processes (see prepare).
        return [
            np.asarray(ids, dtype=np.int32)
            for ids in self._sp.encode(list(texts), num_threads=1, return_type="numpy")
        ]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text, skipping pad/eos (unk and sentinels in byte vocab are dropped)."""
        ids = [int(i) for i in ids if int(i) not in (PAD_ID, EOS_ID)]
        if self._sp is None:
            return bytes(
                i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < 256 + BYTE_OFFSET
            ).decode("utf-8", errors="replace")
        base = self._sp.GetPieceSize() - self.info.extra_ids
        return self._sp.decode([i if i < base else UNK_ID for i in ids])
