"""Helpers of the training driver's tests (tests/test_train.py, tests/test_objectives.py): runs go
through ``cli.main`` in this process with one thread and a private tokenizer cache, and are read
back from the run's ``log.jsonl``. The fixtures are imported by the test files that use them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusedformer.train import cli


@pytest.fixture(autouse=True)
def restore_threads():
    """Runs here use --threads 1 (several times faster on a busy machine); give the rest of the
    session its thread count back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch, request):
    """FUSEDFORMER_CACHE in the session's temporary folder, one per test file."""
    cache = tmp_path_factory.getbasetemp() / f"ffcache-{Path(request.path).stem}"
    monkeypatch.setenv("FUSEDFORMER_CACHE", str(cache))
    return cache


def cli_args(corpus_dir: Path, out: Path, *extra: str, vocab_size: int, seq_len: int, eval_every: int,
             eval_samples: int) -> list[str]:
    """``fusedformer-train`` arguments for a run on ``corpus_dir``'s docs.txt and small.json model."""
    return ["--data", str(corpus_dir / "docs.txt"), "--model", str(corpus_dir / "small.json"),
            "--vocab-size", str(vocab_size), "--seq-len", str(seq_len), "--batch-size", "8",
            "--eval-every", str(eval_every), "--eval-samples", str(eval_samples), "--no-progress", "--quiet",
            "--threads", "1", "--output-dir", str(out), *extra]


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    """The rows of ``kind`` in the run's log.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``cli.main(args)``: (exit code, stdout, stderr)."""
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Bad input: exit status 2 and one line, ``fusedformer-train: error: ...``, naming each needle."""
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fusedformer-train: error: ")
    for n in needles:
        assert n in lines[0], lines[0]
