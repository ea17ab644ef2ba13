"""The GPU session's dry run (issue 20): ``OUT=dir bash scripts/gpu_session.sh --dry-run`` runs the
same steps and the same smoke / bench drivers on the CPU (the cpu backend and the Triton interpreter,
tiny shapes), so that no typo costs device time. Checked here: it passes within its deadline, leaves
at most 8 files, every smoke case of every op ran and passed the 2x rule on both CPU backends, the
smoke covers the cases the issue lists, the bench CSV has the ceilings and a checked, timed row per
fusedformer provider, and a run cut short by its deadline still says what it skipped.

The smoke's own judgement is checked too: a backend whose output is off by 1% must fail it, and a
case past the deadline is written as not run."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_session.sh"
DRY_BACKENDS = ("cpu", "triton")


def _load(name):
    """scripts/<name>.py as a module (registered first: its dataclasses look their module up)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _session(out: Path, **env):
    run_env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=run_env, capture_output=True,
                          text=True, timeout=420)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-session")
    proc = _session(out)
    log = (out / "session.log").read_text() if (out / "session.log").exists() else ""
    return proc, out, log


def test_dry_run_passes_and_leaves_at_most_8_files(dry_run):
    proc, out, log = dry_run
    assert proc.returncode == 0, (f"dry run failed (exit {proc.returncode}); session.log ends:\n{log[-4000:]}\n"
                                  f"{proc.stderr[-2000:]}")
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, f"{len(files)} files in $OUT (at most 8 come back from a GPU machine): {files}"
    for name in ("session.log", "smoke.jsonl", "bench.csv", "pytest.txt"):
        assert name in files, f"{name} missing from $OUT: {files}"
    for skipped in ("nvidia-smi skipped", "build skipped", "compute-sanitizer skipped"):
        assert f"dry run: {skipped}" in log, f"session.log does not say '{skipped}'"
    assert "every step passed" in log


def _smoke_records(out: Path) -> list[dict]:
    lines = [l for l in (out / "smoke.jsonl").read_text().splitlines() if l.strip()]
    assert lines, "smoke.jsonl is empty"
    return [json.loads(l) for l in lines]


def test_every_smoke_case_ran_and_passed(dry_run):
    _, out, _ = dry_run
    smoke = _load("gpu_smoke")
    recs = _smoke_records(out)
    for r in recs:
        for key in ("op", "case", "backend", "dtype", "shape", "status", "passed", "device"):
            assert key in r, f"smoke line without {key!r}: {r}"
    failed = [f"{r['op']} {r['case']} {r['dtype']} [{r['backend']}] {r['status']}: {r.get('detail', '')}"
              for r in recs if not r["passed"] or r["status"] != "pass"]
    assert not failed, "smoke lines that did not pass:\n" + "\n".join(failed)
    got = {(r["op"], r["case"], r["dtype"], r["backend"]) for r in recs}
    for op, (cases, _) in smoke.SUITES.items():
        for case in cases:
            for b in DRY_BACKENDS:
                key = (op, case.name, smoke.DTYPE_NAMES[case.dtype], b)
                assert key in got, f"no smoke line for {key}"
    assert len(recs) == len(got), "a smoke case was written twice"
    for r in recs:
        assert r["worst"] <= 1.0, f"passed with an error above its bound: {r}"
        if r["shape"].get("deterministic"):
            assert r.get("bitwise_equal") is True, f"deterministic case without a bitwise comparison: {r}"


def test_smoke_covers_the_cases_of_the_issue():
    """The case list itself (no run needed): what issue 20 asks the first GPU minutes to check."""
    smoke = _load("gpu_smoke")
    attn = smoke.SUITES["attention"][0]
    p = [c.params for c in attn]
    assert {torch.bfloat16, torch.float16} <= {c.dtype for c in attn}
    assert {64, 80, 128, 256} <= {q["D"] for q in p}
    assert any(q["Dv"] != q["D"] for q in p), "no Dv != D case"
    assert any(q["causal"] for q in p) and any(not q["causal"] for q in p)
    assert any(q["padding"] for q in p), "no key padding (with a fully padded row) case"
    assert any(q["mask_row_min"] for q in p), "no additive mask with a whole row at finfo.min"
    assert any(q["dropout_p"] > 0 for q in p), "no dropout against the reference's mask"
    assert any(q["H"] != q["Hk"] for q in p), "no GQA case"
    assert any(q["deterministic"] for q in p), "no deterministic backward (twice, bitwise)"
    assert any(q["Sq"] >= 16384 for q in p), "no 16k sequence"
    ffn = [c.params for c in smoke.SUITES["gelu_ffn"][0]]
    assert {"none", "tanh"} <= {q["approximate"] for q in ffn}
    assert any(q["dropout_p"] > 0 for q in ffn)
    assert any(q["M"] % 16 for q in ffn), "no ragged M"
    ln = smoke.SUITES["layer_norm"][0]
    assert {(n, dt) for n in (768, 1023, 4096, 20000) for dt in (torch.float32, torch.bfloat16)} <= \
        {(c.params["N"], c.dtype) for c in ln}


def test_bench_rows_have_ceilings_and_timed_checked_providers(dry_run):
    from fusedformer.bench import common

    _, out, _ = dry_run
    bench = _load("gpu_bench")
    with open(out / "bench.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == common.FIELDS
        rows = list(reader)
    ceilings = {r["provider"]: float(r["throughput"]) for r in rows if r["op"] == "ceiling"}
    assert ceilings.get("copy", 0) > 0 and ceilings.get("mm", 0) > 0, f"ceiling rows: {ceilings}"
    kernel_rows = [r for r in rows if r["op"] != "ceiling"]
    for focus in bench.CASES:
        params = {**focus.params, **focus.tiny}
        config = common.Case(focus.op, bench.SWEEP, params, "", "").config()
        mine = [r for r in kernel_rows if r["op"] == focus.op and r["config"] == config]
        for mode in focus.modes:
            for provider in ("cpu", "triton"):
                r = [x for x in mine if x["mode"] == mode and x["provider"] == provider]
                assert len(r) == 1, f"{focus.label} {mode} {provider}: {len(r)} rows"
                r = r[0]
                assert r["status"] == "ok", f"{focus.label} {mode} {provider}: {r['status']}"
                assert r["check"].startswith("ok"), f"{focus.label} {mode} {provider} not checked: {r['check']}"
                assert float(r["throughput"]) > 0 and float(r["pct_of_ceiling"]) > 0
        if focus.op == "gelu_ffn":
            assert {x["mode"] for x in mine if x["provider"] == "torch.mm" and x["status"] == "ok"} == set(focus.modes)
        if focus.op == "attention":
            eff = [x for x in mine if x["provider"] == "sdpa-efficient"]
            assert eff and all("CUDA only" in x["status"] for x in eff), "sdpa-efficient should say it needs CUDA"


def test_pytest_step_collected_the_gpu_selection(dry_run):
    _, out, _ = dry_run
    text = (out / "pytest.txt").read_text()
    assert "tests collected" in text, text[-2000:]
    assert "test_attention.py::" in text and "[cuda" in text and "test_triton.py::" in text


def test_a_run_past_its_deadline_says_what_it_skipped(tmp_path):
    proc = _session(tmp_path, GPU_SESSION_DEADLINE_S="1")
    log = (tmp_path / "session.log").read_text()
    assert proc.returncode == 1, log
    for step in ("smoke", "bench", "pytest"):
        assert f"{step}: skipped" in log, f"no line saying the {step} step was skipped:\n{log}"
    assert "not passed: smoke bench pytest" in log
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8


def test_smoke_judgement_fails_a_wrong_backend_and_honours_the_deadline(tmp_path):
    smoke = _load("gpu_smoke")
    case = smoke.Case("w64-residual", torch.float32, dict(M=3, N=64, dropout_p=0.0))

    def off_by_one_percent(p, dtype):
        masters, fn, leaves = smoke.layer_norm_problem(p, dtype)

        def wrong(t, backend):
            out = fn(t, backend)
            return out if backend == "reference" else (out[0] * 1.01,) + tuple(out[1:])
        return masters, wrong, leaves

    good = smoke.run_case("layer_norm", case, smoke.layer_norm_problem, "cpu", torch.device("cpu"), dry=False)
    assert good["status"] == "pass", good
    bad = smoke.run_case("layer_norm", case, off_by_one_percent, "cpu", torch.device("cpu"), dry=False)
    assert bad["status"] == "fail" and not bad["passed"] and "out0" in bad["detail"], bad

    out = tmp_path / "smoke.jsonl"
    rc = smoke.main(["--op", "layer_norm", "--out", str(out), "--dry-run", "--backends", "cpu",
                     "--cases", "w768-residual", "--deadline", "0"])
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert rc == 1 and recs and all(r["status"] == "not run" and "deadline" in r["detail"] for r in recs), recs
