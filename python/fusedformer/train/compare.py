"""``compare``: the same run (seed, data, steps) on two or more backends, side by side.

Each backend's run is an ordinary training run in ``<output_dir>/<backend>/`` — by default in a
fresh child process, so its peak memory and speed are its own. The first backend is the
baseline. The report has, per backend:

* the per-step training-loss difference from the baseline (max and mean of ``|Δloss|``, and the
  largest relative difference in the first :data:`EARLY_STEPS` steps);
* the final validation metric (loss for LM objectives, accuracy for classification) and its
  difference from the baseline;
* tokens/s, median step time and peak memory (see ``perf.py`` for what is measured);
* whether the curves agree within the documented tolerance (below, and ``docs/training.md``).

The tolerance
-------------
With fusedformer's shared dropout RNG, two fused backends drop exactly the same elements at every
step, so their runs differ only by float rounding (fused kernels sum in a different order). Such
differences start at ~1e-6 relative and grow slowly as training amplifies them (the trajectory
is chaotic, not the math wrong), so a single absolute bound for all steps would be either too
loose early or too tight late. Two checks:

* **early** — over the first :data:`EARLY_STEPS` steps, ``|Δloss| ≤ rtol · loss`` with ``rtol`` from
  :data:`EARLY_RTOL` for the run's precision (1e-4 in fp32): at this point only rounding separates
  the runs, so anything larger is a real bug (a wrong gradient or a different dropout mask shows
  up here within a few steps);
* **whole run** — the curves, each smoothed by a centred moving average over :data:`WINDOW`
  steps, differ by at most :data:`CURVE_ATOL` nats anywhere.

The unconverted ``torch`` backend draws dropout from torch's own kernels, so its masks differ and
only the whole-run check is meaningful for it (with dropout off, both checks apply).
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .config import BACKEND_CHOICES, RunConfig, TrainError, atomic_write_text

log = logging.getLogger("fusedformer.train")

EARLY_STEPS = 10
#: Early-step relative tolerance by the baseline run's precision. fp32: measured rounding noise
#: between correct backends is ~1e-7; different dropout masks give ~1e-3 within a few steps even
#: from a fresh model. bf16/fp16 (GPU autocast, unit roundoff 2^-8 / 2^-11): set from the formats,
#: not yet validated on hardware.
EARLY_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 1e-2}
WINDOW = 20
CURVE_ATOL = 0.05


def read_log(run_dir: Path) -> dict:
    """The train/eval records and the summary of one finished run."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise TrainError(f"{run_dir} has no log.jsonl; the run did not start")
    train, evals, summary = [], [], None
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["kind"] == "train":
            train.append(rec)
        elif rec["kind"] == "eval":
            evals.append(rec)
        elif rec["kind"] == "summary":
            summary = rec
    if summary is None:
        raise TrainError(f"the run in {run_dir} did not finish (no summary in its log)")
    return {"train": train, "eval": evals, "summary": summary}


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average (shorter windows at the ends)."""
    out, half = [], window // 2
    for i in range(len(values)):
        chunk = values[max(0, i - half):i + half + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def curve_agreement(base: list[float], other: list[float], early_rtol: float = EARLY_RTOL["fp32"]) -> dict:
    """Differences between two per-step loss curves and the verdict of the two checks."""
    n = min(len(base), len(other))
    base, other = base[:n], other[:n]
    diffs = [abs(a - b) for a, b in zip(base, other)]
    rel = [d / max(abs(a), 1e-12) for d, a in zip(diffs, base)]
    early = rel[:EARLY_STEPS]
    smoothed = [abs(a - b) for a, b in zip(smooth(base, WINDOW), smooth(other, WINDOW))]
    finite = all(math.isfinite(x) for x in other)
    result = {
        "steps_compared": n,
        "max_abs_diff": max(diffs) if diffs else None,
        "mean_abs_diff": sum(diffs) / n if n else None,
        "max_rel_diff": max(rel) if rel else None,
        "early_max_rel_diff": max(early) if early else None,
        "smoothed_max_abs_diff": max(smoothed) if smoothed else None,
        "early_ok": bool(early) and finite and max(early) <= early_rtol,
        "curve_ok": bool(smoothed) and finite and max(smoothed) <= CURVE_ATOL,
    }
    return result


def final_metric(run: dict, objective: str) -> tuple[str, Optional[float]]:
    ev = run["summary"].get("final_eval") or (run["eval"][-1] if run["eval"] else {})
    key = "accuracy" if objective == "classify" else "loss"
    return f"validation {key}", ev.get(key)


def analyse(runs: dict[str, dict], objective: str, shared_rng: dict[str, bool]) -> dict:
    """The comparison of every run against the first (the baseline)."""
    names = list(runs)
    base = names[0]
    base_loss = [r["loss"] for r in runs[base]["train"]]
    metric_name, base_metric = final_metric(runs[base], objective)
    early_rtol = EARLY_RTOL.get(runs[base]["summary"].get("precision", "fp32"), EARLY_RTOL["fp32"])
    rows = []
    for name in names:
        run = runs[name]
        s = run["summary"]
        _, metric = final_metric(run, objective)
        row = {"backend": name, "final_train_loss": s.get("final_train_loss"), "final_metric": metric,
               "tokens_per_s": s.get("tokens_per_s"), "median_step_time_s": s.get("median_step_time_s"),
               "peak_memory_mb": s.get("peak_memory_mb"), "peak_memory_kind": s.get("peak_memory_kind"),
               "peak_memory_step": s.get("peak_memory_step"), "mfu": s.get("mfu"), "wall_time_s": s.get("wall_time_s"), "converted": s.get("converted")}
        if name != base:
            agree = curve_agreement(base_loss, [r["loss"] for r in run["train"]], early_rtol)
            # the early check means something only when both runs share the dropout stream
            same_stream = shared_rng.get(name, False) and shared_rng.get(base, False)
            agree["early_check_applies"] = same_stream
            agree["agrees"] = agree["curve_ok"] and (agree["early_ok"] or not same_stream)
            row["vs_baseline"] = agree
            row["final_metric_diff"] = None if metric is None or base_metric is None else metric - base_metric
            if s.get("tokens_per_s") and runs[base]["summary"].get("tokens_per_s"):
                row["speedup"] = s["tokens_per_s"] / runs[base]["summary"]["tokens_per_s"]
        rows.append(row)
    return {"baseline": base, "metric": metric_name, "rows": rows,
            "tolerance": {"early_steps": EARLY_STEPS, "early_rtol": early_rtol, "window": WINDOW,
                          "curve_atol": CURVE_ATOL}}


def format_table(result: dict) -> str:
    """The comparison as a fixed-width text table."""
    metric = result["metric"]
    head = ["backend", "train loss", metric, "Δ metric", "max|Δloss|", "mean|Δloss|", "early rel",
            "step ms", "tokens/s", "speedup", "peak MB", "agrees"]
    lines = []
    for row in result["rows"]:
        vs = row.get("vs_baseline")

        def f(v, fmt):
            return "—" if v is None else format(v, fmt)
        if vs is None:
            verdict = "baseline"
        else:
            verdict = "yes" if vs["agrees"] else "NO"
            if not vs["early_check_applies"]:
                verdict += "*"
        lines.append([row["backend"], f(row["final_train_loss"], ".4f"), f(row["final_metric"], ".4f"),
                      f(row.get("final_metric_diff"), "+.4f"),
                      f(vs and vs["max_abs_diff"], ".2e"), f(vs and vs["mean_abs_diff"], ".2e"),
                      f(vs and vs["early_max_rel_diff"], ".1e"),
                      f(row["median_step_time_s"] and row["median_step_time_s"] * 1e3, ".1f"),
                      f(row["tokens_per_s"], ",.0f"),
                      "—" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
                      f(row["peak_memory_mb"], ",.1f"), verdict])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    t = result["tolerance"]
    notes = [f"baseline: {result['baseline']}; agrees = first {t['early_steps']} steps within "
             f"{t['early_rtol']:g} relative and {t['window']}-step smoothed curves within {t['curve_atol']:g} nats"]
    if any(r.get("vs_baseline") and not r["vs_baseline"]["early_check_applies"] for r in result["rows"]):
        notes.append("* different dropout masks (the unconverted torch model uses torch's dropout): only the smoothed-curve check applies")
    notes.extend(_memory_notes(result["rows"]))
    return "\n".join(out + notes)


def _memory_notes(rows: list[dict]) -> list[str]:
    """What the peak MB column is (``perf.py``); a warning when runs reused from an older version
    (``--reuse-runs``) measured it differently."""
    from .perf import PEAK_MEMORY_KIND

    kinds = {r.get("peak_memory_kind") for r in rows if r.get("peak_memory_mb") is not None}
    if len(kinds) > 1:
        return ["peak MB: NOT comparable between these runs, measured as " + ", ".join(sorted(map(str, kinds)))]
    if kinds == {PEAK_MEMORY_KIND}:
        steps = sorted({r["peak_memory_step"] for r in rows if r.get("peak_memory_step")})
        at = f" (step {', '.join(map(str, steps))})" if steps else ""
        return [f"peak MB: the most memory one training step{at} holds at once through torch's allocator, "
                "beyond what was allocated when it began (activations, gradients, optimizer temporaries)"]
    if kinds == {"cpu_peak_rss"}:  # summaries written before the shared meter
        return ["peak MB: peak resident memory of the run's process (includes the Python/torch runtime)"]
    return []


def plot(runs: dict[str, dict], result: dict, path: Path, title: str) -> Optional[Path]:
    """Loss curves overlaid, |Δloss| against the baseline, and tokens/s bars, in one PNG.
    Returns None (with a log line) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plot skipped: pip install matplotlib")
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    base = result["baseline"]
    base_loss = {r["step"]: r["loss"] for r in runs[base]["train"]}
    styles = ["-", "--", ":", "-."]
    for i, (name, run) in enumerate(runs.items()):
        steps = [r["step"] for r in run["train"]]
        axes[0].plot(steps, [r["loss"] for r in run["train"]], styles[i % 4], lw=1.2, label=f"{name} train")
        if run["eval"]:
            axes[0].plot([r["step"] for r in run["eval"]], [r["loss"] for r in run["eval"]], "o" + styles[i % 4],
                         ms=4, lw=1, label=f"{name} validation")
        if name != base:
            d = [(r["step"], abs(r["loss"] - base_loss[r["step"]])) for r in run["train"] if r["step"] in base_loss]
            axes[1].plot([s for s, _ in d], [v for _, v in d], ".-", ms=3, lw=0.8, label=f"{name} vs {base}")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend(fontsize=8)
    axes[1].set_yscale("symlog", linthresh=1e-9)  # log scale that keeps exact agreement (0) visible
    axes[1].set_ylim(bottom=0)
    axes[1].set(xlabel="step", ylabel="|Δ train loss|  (0 = identical)", title=f"per-step difference from {base}")
    axes[1].legend(fontsize=8)
    names = [r["backend"] for r in result["rows"]]
    tps = [r["tokens_per_s"] or 0 for r in result["rows"]]
    bars = axes[2].bar(names, tps, color=["#888888"] + ["#1f77b4"] * (len(names) - 1))
    for b, v in zip(bars, tps):
        axes[2].annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    axes[2].set(ylabel="tokens/s (training)", title="speed")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


#: RunConfig fields that do not change what a run computes.
_COSMETIC = ("output_dir", "name", "resume", "overwrite", "progress", "tensorboard")


def _reusable(cfg: RunConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``cfg`` (ignoring cosmetic fields)."""
    saved = run_dir / "run_config.json"
    if not saved.is_file() or not (run_dir / "summary.json").is_file():
        return False
    a = {k: v for k, v in RunConfig.from_json(saved).to_dict().items() if k not in _COSMETIC}
    b = {k: v for k, v in cfg.to_dict().items() if k not in _COSMETIC}
    return a == b


def run_compare(base: RunConfig, backends: list[str], output_dir: Path, isolate: bool = True,
                reuse: bool = False) -> dict:
    """Run ``base`` once per backend into ``output_dir/<backend>`` and compare (see module doc).
    Writes ``compare.json`` and ``compare.png`` there and returns the result. With ``reuse``, a
    backend whose folder already holds a finished run of the same configuration is not run again
    (to add a backend to a comparison, or to run long comparisons one backend at a time)."""
    from . import distributed as distrib
    from .models import check_backend

    if distrib.launched_by_torchrun():
        raise TrainError("compare runs its backends one after another in one process tree; run it "
                         "without torchrun (use torchrun with pretrain/finetune)")
    if len(backends) < 2 or len(set(backends)) != len(backends):
        raise TrainError(f"compare needs two or more different backends, got {backends}; "
                         "e.g. --backends reference,cpu")
    for b in backends:
        if b not in BACKEND_CHOICES:
            raise TrainError(f"unknown backend {b!r}; choose from {', '.join(BACKEND_CHOICES)}")
    base.replace(backend=backends[0]).validate()
    device = distrib.pick_device(base.device)
    for b in backends:  # fail before any run starts
        check_backend(b, device)
    output_dir = Path(output_dir)
    if (output_dir / "compare.json").is_file() and not (base.overwrite or reuse):
        raise TrainError(f"{output_dir} already holds a comparison; pass --overwrite, --reuse-runs "
                         "or another --output-dir")
    output_dir.mkdir(parents=True, exist_ok=True)

    runs: dict[str, dict] = {}
    for b in backends:
        cfg = base.replace(backend=b, output_dir=str(output_dir / b), name=None, resume=False)
        if reuse and _reusable(cfg, output_dir / b):
            log.info("compare: reusing the finished %s run in %s", b, cfg.output_dir)
            runs[b] = read_log(output_dir / b)
            continue
        log.info("compare: running %s (%d/%d) into %s", b, len(runs) + 1, len(backends), cfg.output_dir)
        if isolate:
            cfg_path = output_dir / f".{b}.run_config.json"
            cfg.to_json(cfg_path)
            proc = subprocess.run([sys.executable, "-m", "fusedformer.train", "_worker", str(cfg_path)])
            cfg_path.unlink(missing_ok=True)
            if proc.returncode != 0:
                raise TrainError(f"the {b} run failed (exit status {proc.returncode}; its error is above); "
                                 f"finished runs stay in {output_dir}")
        else:
            from .trainer import run
            run(cfg)
        runs[b] = read_log(output_dir / b)

    # runs share one dropout stream when they are all fused, or when there is no dropout at all
    shared = {b: b != "torch" or base.dropout == 0.0 for b in backends}
    result = analyse(runs, base.objective, shared)
    result.update({"objective": base.objective, "model": base.model, "steps": base.steps,
                   "epochs": base.epochs, "batch_size": base.batch_size, "seq_len": base.seq_len,
                   "seed": base.seed, "dropout": base.dropout, "data": base.data, "device": str(device),
                   "isolated_processes": isolate,
                   "curves": {b: {"train_loss": [r["loss"] for r in runs[b]["train"]],
                                  "eval": [{k: r[k] for k in r if k not in ("kind",)} for r in runs[b]["eval"]]}
                              for b in backends}})
    atomic_write_text(output_dir / "compare.json", json.dumps(result, indent=2) + "\n")
    title = (f"{base.objective} · {base.model} · {base.data} · seed {base.seed} · dropout "
             f"{base.dropout if base.dropout is not None else 'model default'} · {device}")
    png = plot(runs, result, output_dir / "compare.png", title)
    result["json_path"] = str(output_dir / "compare.json")
    result["plot_path"] = str(png) if png else None
    return result
