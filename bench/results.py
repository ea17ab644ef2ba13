"""Result rows: the CSV files (``FIELDS``, appended, header checked), speedups against the baseline,
and the console table."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from .suite import FAILED_BASELINE

FIELDS = ["date", "git_sha", "device", "device_kind", "torch", "triton", "cuda", "op", "sweep", "config",
          "dtype", "mode", "provider", "status", "median_ms", "p20_ms", "p80_ms", "throughput", "unit",
          "pct_of_ceiling", "ceiling", "peak_mem_mb", "baseline", "speedup", "check", "samples"]


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append rows; the header is written when the file is new, and must match when it is not."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise RuntimeError(f"{path} has other columns than this version of the suite writes; "
                               "move it aside (or pass --results DIR)")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k)) for k in FIELDS})


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def add_speedups(rows: list[dict], baseline: str) -> None:
    """speedup = baseline's median / the provider's median, within the same op, config, dtype and mode."""
    base = {}
    for r in rows:
        if r["provider"] == baseline and r.get("median_ms"):
            base[(r["op"], r["config"], r["dtype"], r["mode"])] = r["median_ms"]
    for r in rows:
        b = base.get((r["op"], r["config"], r["dtype"], r["mode"]))
        r["baseline"] = baseline
        if b and r.get("median_ms"):
            r["speedup"] = b / r["median_ms"]


def _fmt(v, digits=3) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def format_table(rows: Sequence[dict]) -> str:
    """One block per (op, sweep, dtype, mode): a line per config and provider."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["sweep"], r["dtype"], r["mode"]), []).append(r)
    for (op, sweep, dtype, mode), rs in groups.items():
        unit = next((r["unit"] for r in rs if r.get("unit")), "")
        base = next((r["baseline"] for r in rs if r.get("baseline")), "")
        out.append("")
        out.append(f"== {op} / {sweep} / {dtype} / {mode}   (speedup = {base} median / provider median)")
        head = ["config", "provider", "median ms", "p20-p80 ms", unit, "% ceil", "peak MB", "speedup"]
        lines = [head]
        # A provider not timed for the same reason on every config is listed once, under the block.
        statuses: dict[str, set] = {}
        for r in rs:
            statuses.setdefault(r["provider"], set()).add(r["status"])
        untimed = {p: next(iter(st)) for p, st in statuses.items() if len(st) == 1 and "ok" not in st}
        rs = [r for r in rs if r["provider"] not in untimed]
        notes: dict[str, str] = {}
        for r in rs:
            label = r.get("_label") or r["config"]
            if r["status"] != "ok":
                lines.append([label, r["provider"], r["status"]])
                continue
            failed = str(r.get("check", "")).startswith(FAILED_BASELINE)
            if failed:
                notes[r["provider"]] = r["check"]
            lines.append([label, r["provider"] + (" (!)" if failed else ""), _fmt(r.get("median_ms")),
                          f"{_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))}", _fmt(r.get("throughput")),
                          _fmt(r.get("pct_of_ceiling"), 2), _fmt(r.get("peak_mem_mb")),
                          (_fmt(r["speedup"]) + "x") if r.get("speedup") else ""])
        widths = [max(len(l[i]) for l in lines if len(l) > 3) for i in range(len(head))]
        for l in lines:
            if len(l) == 3:  # a provider that was not timed: its status runs to the end of the line
                out.append("  " + "  ".join([l[0].ljust(widths[0]), l[1].ljust(widths[1]), l[2]]))
            else:
                out.append("  " + "  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip())
        for p, st in untimed.items():
            out.append(f"  not timed, any config: {p}: {st}")
        for p, note in notes.items():
            out.append(f"  (!) {p} failed the check (last: {note[len(FAILED_BASELINE):]}); timed only as the baseline")
    return "\n".join(out)
