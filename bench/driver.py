"""The benchmark driver: check, then time, every provider (the order of ``bench/common.py``'s
docstring). :func:`run_op` drives the kernel benchmarks (attention, layer_norm, gelu_ffn);
``bench_train.run`` drives the training step through the same two steps, :func:`admit` (skipped /
unavailable / checked, with the baseline timed even when it fails its check) and
:func:`time_into_rows` (the one timing loop, its peak memory, the statuses of calls that raised)."""
from __future__ import annotations

import gc
from typing import Callable, Optional, Sequence

import torch

from .ceilings import Ceilings, record_timing
from .checks import check_provider, mode_runner
from .memory import peak_memory_bytes
from .suite import (CHECK_FAILED, DTYPE_NAMES, FAILED_BASELINE, OpBench, Provider, _short_error, select_providers,
                    status_of)
from .timing import Timing, TimingBudget, time_providers

def admit(name: str, *, skipped: Optional[dict], baseline: Optional[str], unavailable: Callable[[], Optional[str]],
          check: Callable[[], tuple[Optional[str], str]]) -> tuple[Optional[str], str]:
    """Whether provider ``name`` is timed: ``(None, check text)`` if it is, else ``(row status, "")``.

    In order: left out on purpose (``skipped``: name -> reason), ``unavailable()`` (a reason or None),
    ``check()`` (``(failure status or None, check text)``; a failed check's status starts with
    :data:`CHECK_FAILED`). A provider that fails the check is not timed — except the ``baseline``:
    every speedup is measured against it, so it is timed all the same and its check text says that
    it failed and how."""
    if skipped and name in skipped:
        return f"skipped: {skipped[name]}", ""
    why = unavailable()
    if why:
        return f"unavailable: {why}", ""
    failure, text = check()
    if failure and name == baseline and failure.startswith(CHECK_FAILED):
        return None, f"{FAILED_BASELINE}{failure[len(CHECK_FAILED):]}"
    if failure:
        return failure, ""
    return None, text


def time_into_rows(fns: dict[str, Callable[[], object]], rows: dict[str, dict], device: torch.device,
                   budget: TimingBudget, record: Callable[[dict, Timing], None], memory: bool) -> None:
    """Time ``fns`` side by side (:func:`timing.time_providers`) and write each result into
    ``rows[name]``: the status of a function that raised, else ``record(row, timing)`` and, with
    ``memory``, the peak memory of one more call (a side measurement: a failure to measure it is
    noted in the check column and the timing kept)."""
    timings = time_providers(fns, device, budget) if fns else {}
    for name, t in timings.items():
        r = rows[name]
        if isinstance(t, BaseException):
            r["status"] = status_of(t, name)
            continue
        record(r, t)
        if not memory:
            continue
        try:
            r["peak_mem_mb"] = peak_memory_bytes(fns[name], device) / 2**20
        except Exception as exc:  # a side measurement: note it, keep the timing
            r["check"] = (r["check"] + f"; peak memory not measured ({_short_error(exc)})").strip("; ")


def run_op(bench: OpBench, *, size: str, device: torch.device, dtypes: Sequence[torch.dtype],
           wanted: Optional[Sequence[str]], budget: TimingBudget, ceilings: Ceilings, env: dict,
           modes: Optional[Sequence[str]] = None, skipped: Optional[dict] = None,
           baseline: Optional[str] = None, log: Callable[[str], None] = print) -> list[dict]:
    """Check, then time, every provider on every case, dtype and mode. Returns result rows.

    ``skipped`` maps providers left out on purpose to the reason the table gives; ``baseline`` is
    timed even when it fails its check (see :func:`admit`)."""
    rows: list[dict] = []
    modes = [m for m in (modes or bench.modes) if m in bench.modes]
    memory_mode = "fwd+bwd" if "fwd+bwd" in modes else modes[-1]
    providers = select_providers(bench.providers(device), wanted)
    reference = next(p for p in bench.providers(device) if p.name == "reference")
    checked: dict[tuple, tuple[Optional[str], str]] = {}
    for case in bench.cases(size, device):
        for dtype in dtypes:
            dname = DTYPE_NAMES[dtype]
            log(f"  {bench.op} {case.sweep}: {case.label} {dname}")
            row0 = dict(env, op=bench.op, sweep=case.sweep, config=case.config(), dtype=dname, unit=bench.unit,
                        _x=case.x, _series=case.series, _xname=case.xname, _label=case.label)
            status: dict[str, str] = {}
            check_text: dict[str, str] = {}
            ready: list[Provider] = []
            for p in providers:
                cparams = bench.check_params(case.params)

                def check(p=p, cparams=cparams):
                    key = (p.name, dname, tuple(sorted(cparams.items())))
                    if p.name == "reference":
                        checked[key] = (None, "is the reference")
                    if key not in checked:
                        try:
                            failure, text = check_provider(bench.op, p, reference, bench.make_inputs, cparams, dtype,
                                                           device)
                            checked[key] = (None if failure is None else f"{CHECK_FAILED}{failure}", text)
                        except Exception as exc:
                            checked[key] = (status_of(exc, p.name), "")
                    return checked[key]

                st, text = admit(p.name, skipped=skipped, baseline=baseline,
                                 unavailable=lambda p=p: p.unavailable(device, dtype, case.params), check=check)
                if st is not None:
                    status[p.name] = st
                    continue
                check_text[p.name] = text + ("" if cparams == case.params or p.name == "reference" else " at a smaller shape")
                ready.append(p)
            for mode in modes:
                mode_rows = {p.name: dict(row0, mode=mode, provider=p.name, status=status.get(p.name, "ok"),
                                          check=check_text.get(p.name, "")) for p in providers}
                tensors, leaves = {}, []
                fns: dict[str, Callable] = {}
                try:
                    tensors, leaves = bench.make_inputs(case.params, dtype, device)
                except torch.OutOfMemoryError:
                    for p in ready:
                        mode_rows[p.name]["status"] = "out of memory (inputs)"
                    ready_now = []
                else:
                    ready_now = ready
                # A CPU times every provider together (interleaved); a GPU one at a time, so that only
                # one provider's retained graph and buffers occupy its memory.
                groups = [ready_now] if device.type == "cpu" else [[p] for p in ready_now]
                work = bench.work(case.params, mode, dtype)
                for group in groups:
                    for p in group:
                        try:
                            fns[p.name] = mode_runner(p, tensors, leaves, case.params, mode)
                        except Exception as exc:
                            mode_rows[p.name]["status"] = status_of(exc, p.name)
                    # on a CPU peak memory costs a profiled call: measured in training's mode only
                    time_into_rows(fns, mode_rows, device, budget,
                                   lambda r, t: record_timing(r, t, work, bench.unit, ceilings, dtype),
                                   memory=device.type != "cpu" or mode == memory_mode)
                    fns.clear()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.extend(mode_rows.values())
                del fns, tensors
                gc.collect()
    return rows
