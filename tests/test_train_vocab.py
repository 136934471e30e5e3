"""train_vocab: T5-style SentencePiece models from any source, offline."""

import subprocess
import sys

import pytest

from repeat_scaling.data.vocab import Encoder
from repeat_scaling.train_vocab import VocabTrainingError, train_vocab


def test_trains_t5_style_model_on_text_source(shared_data, tmp_path):
    import sentencepiece as spm

    src = f"text:{shared_data}/tinystories/*.txt"
    info = train_vocab(
        src, 350, tmp_path / "stories.model", text_separator="<|endoftext|>", max_docs=300
    )
    sp = spm.SentencePieceProcessor(model_file=info.path)
    assert sp.get_piece_size() == 350 and info.vocab_size == 450
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    enc = Encoder(info)
    text = "Once upon a time, a little girl named Lily found a big red ball."
    ids = enc.encode(text)
    assert enc.decode(ids) == text and len(ids) < len(text) / 2  # learned multi-char pieces
    # Same inputs -> the same model bytes (seeded sampling, deterministic training).
    again = train_vocab(
        src, 350, tmp_path / "again.model", text_separator="<|endoftext|>", max_docs=300
    )
    assert again.sha256 == info.sha256


def test_bad_requests(shared_data, tmp_path):
    src = f"json:{shared_data}/c4-en-sample/c4-train.*.json.gz"
    with pytest.raises(VocabTrainingError, match="must end with .model"):
        train_vocab(src, 300, tmp_path / "v.txt")
    with pytest.raises(
        VocabTrainingError, match=r"training on .* failed: Vocabulary size too high \(60000\)"
    ):
        train_vocab(src, 60_000, tmp_path / "huge.model", max_docs=5)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli(shared_data, tmp_path):
    out = tmp_path / "cli.model"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "repeat_scaling.train_vocab",
            f"--source=json:{shared_data}/c4-en-sample/c4-train.*.json.gz",
            "--vocab_size=300",
            "--max_docs=60",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "300 pieces + 100 extra ids" in ok.stderr and out.is_file()
    bad = subprocess.run(
        [sys.executable, "-m", "repeat_scaling.train_vocab", "--source=builtin", f"--out={out}"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip() == "error: --vocab_size is required (or set it in --config)"
