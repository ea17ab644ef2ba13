"""The benchmark's command line end to end, on a small CPU run: every provider is checked, timed and
written (CSV rows, ceilings), and a missing matplotlib (the ``bench`` extra) costs the plots only."""
from __future__ import annotations

import csv

import pytest

from fusedformer.bench import cli, plot

from conftest import skip_unless_available
from fusedformer.ops import layer_norm as layer_norm_module

ARGS = ["--quick", "--device", "cpu", "--ops", "layer_norm", "--backends", "reference,cpu", "--dtype", "float32",
        "--modes", "fwd", "--seconds", "0.01"]


@pytest.mark.parametrize("matplotlib", ["missing", "present"])
def test_bench_writes_rows_with_or_without_matplotlib(tmp_path, monkeypatch, capsys, matplotlib):
    skip_unless_available(layer_norm_module, "cpu")
    if matplotlib == "missing":
        monkeypatch.setattr(plot, "unavailable", lambda: "matplotlib is not installed (test)")
    elif plot.unavailable():
        pytest.skip(plot.unavailable())
    assert cli.main(ARGS + ["--results", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    rows = list(csv.DictReader(open(tmp_path / "layer_norm.csv")))
    timed = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"reference", "cpu"} <= timed, rows
    assert all(float(r["median_ms"]) > 0 for r in rows if r["status"] == "ok")
    assert (tmp_path / "ceilings.csv").exists()
    pngs = list(tmp_path.glob("*.png"))
    if matplotlib == "missing":
        assert not pngs and "no plots this run: matplotlib is not installed (test)" in err
    else:
        assert pngs, err
