"""The two sentence-level pretraining objectives: masked LM + next-sentence prediction (BERT) and
denoising (BART). Datasets, corruption and collation; ``data.collate`` dispatches here.

Sentences
---------
Both objectives work on sentences of the corpus's documents. A document is split into lines
(BBC articles: a title line, then paragraphs), and each line after ``.``, ``!`` or ``?`` (optionally
followed by a closing quote or bracket) when whitespace and an upper-case letter, a digit or an
opening quote follow. Each sentence is tokenized on its own (no special tokens).

Masked LM + next-sentence prediction (``--objective mlm+nsp``)
---------------------------------------------------------------
As BERT's ``create_pretraining_data`` does: each document's sentences are gathered into chunks of
about ``seq_len − 3`` tokens (10% of the chunks aim at a random shorter length, ``short_seq_prob``);
a chunk is cut at a random sentence boundary into segment A and the rest. With probability 1/2, B is
that rest (label 0, *IsNext*); otherwise B is a run of sentences from a random other document,
starting at a random sentence (label 1, *NotNext*), and the unused sentences of the chunk start the
next one. A chunk of a single sentence takes the document's next sentence as its continuation, and
a document's last sentence left alone in a chunk makes no pair, so the two classes stay at 50 %
each (BERT forces *NotNext* in both cases, which tilts the classes towards it); documents of a
single sentence only serve as random B's. The pair is trimmed to ``seq_len − 3`` tokens
(the longer segment loses a token from its front or back at random, until it fits).
The example is ``[CLS] A [SEP] B [SEP]`` with token type 0 up to the first ``[SEP]`` and 1 after,
and its tokens are masked as for MLM (15%, 80/10/10; special tokens never) when batched. The pairs
of the training split are drawn once per seed; those of the validation split with a fixed seed.

Denoising (``--objective denoise``)
-----------------------------------
The target is a block of whole consecutive sentences of one document, ``[CLS] … [SEP]`` of at most
``seq_len`` tokens (a sentence longer than a block is cut). The encoder sees it corrupted as
BART's pretraining does (Lewis et al. 2019, the fairseq ``denoising`` task's settings for
bart.large):

1. **sentence permutation** — the block's sentences in a random order (``--no-permute-sentences``
   turns it off);
2. **text infilling** — ``round(mask_ratio × words)`` words (``--mask-ratio``, default 0.3; a word is a
   token that does not start with ``##``, with its ``##`` pieces) are covered by spans whose lengths
   are drawn from Poisson(λ) (``--poisson-lambda``, default 3.5; the last span is cut so that the
   lengths add up exactly); the spans go to random places that do not overlap (the unmasked words
   are split into the gaps around them, every split equally likely — fairseq places spans
   independently, so overlaps there mask a little less than the ratio); every span becomes **one**
   ``[MASK]`` (so the model must also infer how many tokens are missing), and a span of length 0
   inserts a ``[MASK]``.

Not done (fairseq options that bart.large leaves off or at zero): document rotation, random-token
replacement of masks, token deletion without a mask. The decoder is trained with teacher forcing to
reproduce the original block (labels ``[CLS] … [SEP]``, decoder input the labels shifted right with
``[SEP]`` as BART's ``decoder_start_token_id``). The corruption of example ``i`` in epoch ``e`` is
seeded by ``(seed, e, i)``; validation corruption by a fixed seed, so validation losses compare
across runs.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import TrainError

IGNORE_INDEX = -100
SHORT_SEQ_PROB = 0.1
NSP_RANDOM_PROB = 0.5

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])|(?<=[.!?][\"')\]])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """The sentences of a document (see the module docstring), empty ones dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            out += [s.strip() for s in _SENTENCE_END.split(line) if s.strip()]
    return out


def tokenized_documents(texts: Sequence[str], tok) -> list[list[list[int]]]:
    """Per document, the token ids of each sentence (sentences with no tokens dropped)."""
    sentences, owner = [], []
    for d, text in enumerate(texts):
        for s in split_sentences(text):
            sentences.append(s)
            owner.append(d)
    docs: list[list[list[int]]] = [[] for _ in texts]
    for d, ids in zip(owner, tok.encode_batch(sentences)):
        if ids:
            docs[d].append(ids)
    return [doc for doc in docs if doc]


# ------------------------------------------------------------------------------------------------
# masked LM + next-sentence prediction
# ------------------------------------------------------------------------------------------------
def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: random.Random) -> None:
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()


def nsp_pairs(docs: list[list[list[int]]], max_tokens: int, rng: random.Random) -> list[tuple[list, list, int]]:
    """``(A, B, label)`` sentence pairs, label 0 = B follows A, 1 = B is from another document."""
    if len(docs) < 2:
        raise TrainError("next-sentence prediction needs at least 2 documents (random second segments come "
                         "from other documents); add text or use --objective mlm")
    pairs = []

    def new_target() -> int:
        return rng.randint(2, max_tokens) if rng.random() < SHORT_SEQ_PROB else max_tokens

    for d, sents in enumerate(docs):
        if len(sents) < 2:
            continue
        chunk, length, target, i = [], 0, new_target(), 0
        while i < len(sents):
            chunk.append(sents[i])
            length += len(sents[i])
            if i == len(sents) - 1 or length >= target:
                if len(chunk) == 1 and i == len(sents) - 1:
                    break                         # a document's last sentence alone: no continuation exists
                is_random = rng.random() < NSP_RANDOM_PROB
                if not is_random and len(chunk) == 1:
                    i += 1                        # a continuation needs a second segment: the next sentence
                    chunk.append(sents[i])
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                a = [t for s in chunk[:a_end] for t in s]
                if is_random:
                    want = max(1, target - len(a))
                    other = rng.randrange(len(docs) - 1)
                    other += other >= d
                    b = []
                    for s in docs[other][rng.randrange(len(docs[other])):]:
                        b += s
                        if len(b) >= want:
                            break
                    i -= len(chunk) - a_end       # the chunk's unused sentences start the next one
                else:
                    b = [t for s in chunk[a_end:] for t in s]
                _truncate_pair(a, b, max_tokens, rng)
                pairs.append((a, b, int(is_random)))
                chunk, length, target = [], 0, new_target()
            i += 1
    return pairs


@dataclass
class NSPDataset:
    """``[CLS] A [SEP] B [SEP]`` examples: ids and token types (N, S) padded, lengths (N,), NSP labels (N,)."""
    ids: torch.Tensor
    type_ids: torch.Tensor
    lengths: torch.Tensor
    nsp_labels: torch.Tensor
    objective: str = "mlm+nsp"

    def __len__(self) -> int:
        return self.ids.shape[0]


def build_nsp(docs, tok, seq_len: int, seed: int) -> dict:
    pairs = nsp_pairs(docs, seq_len - 3, random.Random(seed))
    n = len(pairs)
    ids = torch.full((n, seq_len), tok.pad_id, dtype=torch.long)
    types = torch.zeros((n, seq_len), dtype=torch.long)
    lengths = torch.empty(n, dtype=torch.long)
    for j, (a, b, _) in enumerate(pairs):
        row = [tok.cls_id] + a + [tok.sep_id] + b + [tok.sep_id]
        ids[j, :len(row)] = torch.tensor(row)
        types[j, len(a) + 2:len(row)] = 1
        lengths[j] = len(row)
    return {"ids": ids, "type_ids": types, "lengths": lengths,
            "nsp_labels": torch.tensor([p[2] for p in pairs], dtype=torch.long)}


def collate_nsp(ds: NSPDataset, indices: list[int], tok, mask_seeds: list[int], mlm_probability: float):
    from .data import Batch, mask_tokens
    lengths = ds.lengths[indices]
    longest = int(lengths.max())
    inputs = torch.full((len(indices), longest), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(indices), longest), IGNORE_INDEX, dtype=torch.long)
    for j, (i, s) in enumerate(zip(indices, mask_seeds)):
        n = int(lengths[j])   # masked without its padding: the same mask in any batch
        inputs[j, :n], labels[j, :n] = mask_tokens(ds.ids[i, :n], tok, mlm_probability, s)
    attention = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    return Batch(inputs, attention, labels, int((labels != IGNORE_INDEX).sum()), int(attention.sum()),
                 extra={"token_type_ids": ds.type_ids[indices, :longest],
                        "next_sentence_label": ds.nsp_labels[indices]},
                 counts={"nsp": len(indices)})


# ------------------------------------------------------------------------------------------------
# denoising
# ------------------------------------------------------------------------------------------------
@dataclass
class DenoiseDataset:
    """Target blocks ``[CLS] … [SEP]`` (N, S) padded, the sentence index of each body token (-1 for
    the special tokens and padding), lengths (N,), and the corruption settings."""
    targets: torch.Tensor
    sentence: torch.Tensor
    lengths: torch.Tensor
    word_start: torch.Tensor          # (vocab,) bool: the token begins a word
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.5
    permute_sentences: bool = True
    objective: str = "denoise"

    def __len__(self) -> int:
        return self.targets.shape[0]


def build_denoise(docs, tok, seq_len: int) -> dict:
    body_max = seq_len - 2
    blocks: list[tuple[list[int], list[int]]] = []
    for sents in docs:
        ids, sent = [], []
        for s in sents:
            s = s[:body_max]
            if ids and len(ids) + len(s) > body_max:
                blocks.append((ids, sent))
                ids, sent = [], []
            sent += [sent[-1] + 1 if sent else 0] * len(s)
            ids += s
        if ids:
            blocks.append((ids, sent))
    n = len(blocks)
    targets = torch.full((n, seq_len), tok.pad_id, dtype=torch.long)
    sentence = torch.full((n, seq_len), -1, dtype=torch.int16)
    lengths = torch.empty(n, dtype=torch.long)
    for j, (ids, sent) in enumerate(blocks):
        targets[j, :len(ids) + 2] = torch.tensor([tok.cls_id] + ids + [tok.sep_id])
        sentence[j, 1:len(ids) + 1] = torch.tensor(sent, dtype=torch.int16)
        lengths[j] = len(ids) + 2
    return {"targets": targets, "sentence": sentence, "lengths": lengths}


def word_starts(tok) -> torch.Tensor:
    """(vocab,) bool: whether a token begins a word (WordPiece continuation pieces start with ``##``)."""
    vocab = tok.tok.get_vocab()
    out = torch.ones(tok.vocab_size, dtype=torch.bool)
    for piece, i in vocab.items():
        if piece.startswith("##") and i < len(out):
            out[i] = False
    return out


def corrupt(body: list[int], sentence: list[int], word_start: torch.Tensor, mask_id: int, mask_ratio: float,
            poisson_lambda: float, permute: bool, g: torch.Generator) -> list[int]:
    """Sentence permutation, then text infilling (see the module docstring) of one block's body."""
    if permute and body:
        n = max(sentence) + 1
        groups: list[list[int]] = [[] for _ in range(n)]
        for t, s in zip(body, sentence):
            groups[s].append(t)
        body = [t for k in torch.randperm(n, generator=g).tolist() for t in groups[k]]
    starts = [i for i, t in enumerate(body) if word_start[t]]
    if body and (not starts or starts[0] != 0):
        starts.insert(0, 0)
    words = len(starts)
    n_mask = min(words, int(round(mask_ratio * words)))
    if n_mask == 0:
        return list(body)
    lengths: list[int] = []
    while sum(lengths) < n_mask:
        lengths += torch.poisson(torch.full((n_mask,), float(poisson_lambda)), generator=g).long().tolist()
    total, k = 0, 0
    while total < n_mask:          # keep the spans that cover n_mask words; cut the last one to fit
        total += lengths[k]
        k += 1
    lengths = lengths[:k]
    lengths[-1] -= total - n_mask
    # the words left unmasked fall into the k + 1 gaps around the spans, every split equally likely
    kept = words - n_mask
    cuts = sorted(torch.randperm(kept + k, generator=g)[:k].tolist())
    gaps = [cuts[0]] + [b - a - 1 for a, b in zip(cuts, cuts[1:])] + [kept + k - 1 - cuts[-1]]
    ends = starts[1:] + [len(body)]
    out, w = [], 0
    for gap, length in zip(gaps, lengths + [None]):
        for _ in range(gap):
            out += body[starts[w]:ends[w]]
            w += 1
        if length is not None:     # one [MASK] for the span (a length-0 span inserts it)
            out.append(mask_id)
            w += length
    return out


def collate_denoise(ds: DenoiseDataset, indices: list[int], tok, seeds: list[int]):
    from .data import Batch
    if tok.mask_id is None:
        raise TrainError(f"tokenizer {tok.source} has no [MASK] token; denoising needs one")
    S = ds.targets.shape[1]
    sources = []
    for i, seed in zip(indices, seeds):
        n = int(ds.lengths[i])
        body = ds.targets[i, 1:n - 1].tolist()
        sent = ds.sentence[i, 1:n - 1].tolist()
        g = torch.Generator().manual_seed(seed)
        src = corrupt(body, sent, ds.word_start, tok.mask_id, ds.mask_ratio, ds.poisson_lambda,
                      ds.permute_sentences, g)
        sources.append([tok.cls_id] + src[:S - 2] + [tok.sep_id])
    longest_src = max(len(s) for s in sources)
    inputs = torch.full((len(sources), longest_src), tok.pad_id, dtype=torch.long)
    attention = torch.zeros((len(sources), longest_src), dtype=torch.long)
    for j, s in enumerate(sources):
        inputs[j, :len(s)] = torch.tensor(s)
        attention[j, :len(s)] = 1
    lengths = ds.lengths[indices]
    longest = int(lengths.max())
    present = torch.arange(longest)[None, :] < lengths[:, None]
    labels = torch.where(present, ds.targets[indices, :longest], torch.full_like(present, IGNORE_INDEX,
                                                                                dtype=torch.long))
    count = int(present.sum())
    return Batch(inputs, attention, labels, count, int(attention.sum()) + count,
                 extra={"decoder_attention_mask": present.long()})
