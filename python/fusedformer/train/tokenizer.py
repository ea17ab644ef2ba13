"""Tokenizers: a WordPiece tokenizer trained on the corpus (cached), or a model's own.

The driver only needs token ids and a handful of special ids, so everything is a
``tokenizers.Tokenizer`` (the Rust library behind Hugging Face's fast tokenizers) wrapped in
:class:`TextTokenizer`. Special tokens are added by the data code, never by the tokenizer, so
truncation and padding stay under the driver's control.

A trained tokenizer is BERT-style: lower-cased, WordPiece, with ``[PAD] [UNK] [CLS] [SEP] [MASK]``
as ids 0–4. GPT-style runs use the same tokenizer with ``[SEP]`` as end-of-document.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .config import TrainError, atomic_write_text, cache_dir

log = logging.getLogger("fusedformer.train")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TrainError("the training driver needs the `tokenizers` package: "
                         "pip install 'fusedformer[data]' (or pip install tokenizers)") from exc
    return tokenizers


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the special ids the driver uses."""

    def __init__(self, tok, source: str):
        tok.no_truncation()
        tok.no_padding()
        self.tok = tok
        self.source = source
        vocab = tok.get_vocab()

        def find(*names: str) -> Optional[int]:
            for n in names:
                if n in vocab:
                    return vocab[n]
            return None

        self.pad_id = find("[PAD]", "<pad>", "<|endoftext|>")
        self.unk_id = find("[UNK]", "<unk>")
        self.cls_id = find("[CLS]", "<s>", "<|endoftext|>")
        self.sep_id = find("[SEP]", "</s>", "<|endoftext|>")
        self.mask_id = find("[MASK]", "<mask>")
        if self.pad_id is None or self.sep_id is None or self.cls_id is None:
            raise TrainError(f"tokenizer {source} lacks the special tokens the driver needs "
                             "([PAD], [CLS], [SEP]); use --tokenizer auto to train one on the corpus")
        self.special_ids = sorted({i for i in (self.pad_id, self.unk_id, self.cls_id, self.sep_id,
                                               self.mask_id) if i is not None})

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens and without truncation."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), self.tok.to_str())


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A tokenizer from ``tokenizer.json`` (a file or a folder holding one), or from a BERT
    ``vocab.txt`` in a folder."""
    tokenizers = _require_tokenizers()
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            p = p / "tokenizer.json"
        elif (p / "vocab.txt").is_file():
            lower = True
            tok = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(str(p / "vocab.txt"),
                                                                             unk_token="[UNK]"))
            tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=lower)
            tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
            return TextTokenizer(tok, str(p / "vocab.txt"))
        else:
            raise TrainError(f"no tokenizer.json or vocab.txt in {p}; pass --tokenizer PATH or "
                             "--tokenizer auto to train one on the corpus")
    if not p.is_file():
        raise TrainError(f"tokenizer file {p} does not exist; pass an existing tokenizer.json or "
                         "--tokenizer auto")
    try:
        tok = tokenizers.Tokenizer.from_file(str(p))
    except Exception as exc:
        raise TrainError(f"could not read tokenizer {p} ({exc}); pass a tokenizers JSON file") from exc
    return TextTokenizer(tok, str(p))


def train_tokenizer(texts: Iterable[str], vocab_size: int, corpus_fingerprint: str) -> TextTokenizer:
    """A lower-cased WordPiece tokenizer trained on ``texts``, cached under the user cache dir by
    (corpus fingerprint, vocabulary size): the second call with the same corpus loads it."""
    tokenizers = _require_tokenizers()
    key = hashlib.sha256(f"wordpiece-v2|{corpus_fingerprint}|{vocab_size}".encode()).hexdigest()[:16]
    path = cache_dir() / "tokenizers" / f"wordpiece-{vocab_size}-{key}.json"
    if path.is_file():
        return load_tokenizer(path)
    log.info("training a %d-token WordPiece tokenizer on the corpus (cached at %s)", vocab_size, path)
    trained = _wordpiece(tokenizers, tokenizers.models.WordPiece(unk_token="[UNK]"))
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2,
                                                   special_tokens=list(SPECIAL_TOKENS),
                                                   show_progress=False)
    trained.train_from_iterator(list(texts), trainer=trainer)
    # The trainer breaks ties between equally frequent candidates in an order that changes from
    # process to process (hash-map iteration): its ids, and a few tokens at the vocabulary's edge,
    # vary between trainings. WordPiece encodes by vocabulary membership only, so the ids are made
    # canonical here (special tokens first, then sorted); the cache makes every later run on this
    # machine use this very tokenizer, and --tokenizer PATH pins one across machines.
    words = [t for t in trained.get_vocab() if t not in SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + sorted(words))}
    tok = _wordpiece(tokenizers, tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    atomic_write_text(path, tok.to_str())
    return load_tokenizer(path)


def _wordpiece(tokenizers, model):
    """A BERT-style (lower-cased, BERT pre-tokenized) tokenizer around a WordPiece ``model``."""
    tok = tokenizers.Tokenizer(model)
    tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece()
    return tok
