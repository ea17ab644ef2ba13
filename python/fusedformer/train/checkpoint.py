"""Checkpoints: Hugging Face-loadable weights plus everything an exact resume needs.

A checkpoint is a folder ``<output_dir>/checkpoint-<step:06d>/`` holding

==========================  ===================================================================
``config.json``             the Hugging Face model config
``model.safetensors``       the weights (Hugging Face layout: ``from_pretrained`` loads the folder)
``tokenizer.json``          the tokenizer the run used
``training_state.pt``       optimizer, LR schedule, grad scaler, step, and every rank's RNG state
``run_config.json``         the :class:`~fusedformer.train.config.RunConfig`
``meta.json``               step, metrics and backend; written last
==========================  ===================================================================

Writing is atomic: everything goes into a hidden temporary folder that is renamed into place
only when complete, and older checkpoints are removed only after that. An interrupted save
leaves the previous checkpoints untouched; a leftover temporary folder is ignored.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from .config import TrainError, atomic_write_bytes, atomic_write_text

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step:06d}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``output_dir`` as ``(step, path)``, oldest first."""
    out = []
    d = Path(output_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "meta.json").is_file() and (p / "training_state.pt").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------------
# RNG state (stored as plain data so training_state.pt loads with weights_only=True)
# ------------------------------------------------------------------------------------------------
def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)]
    except ImportError:  # pragma: no cover
        pass
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _plain(x):
    return [_plain(v) for v in x] if isinstance(x, tuple) else x


def _tuple(x):
    return tuple(_tuple(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------
def save_checkpoint(output_dir: Path, step: int, *, model: torch.nn.Module, model_state: dict,
                    training_state: dict, tokenizer, run_config, meta: dict, keep: int) -> Path:
    """Write checkpoint ``step`` atomically (rank 0 only), then prune to the newest ``keep``.

    ``model`` is the unwrapped Hugging Face model (its ``save_pretrained`` writes config and
    weights); ``model_state`` its full state dict (gathered on rank 0 under FSDP)."""
    output_dir = Path(output_dir)
    final = checkpoint_dir(output_dir, step)
    tmp = output_dir / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), state_dict=model_state, safe_serialization=True)
    tokenizer.save(tmp / "tokenizer.json")
    buf = io.BytesIO()
    torch.save(training_state, buf)
    atomic_write_bytes(tmp / "training_state.pt", buf.getvalue())
    run_config.to_json(tmp / "run_config.json")
    atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        old = output_dir / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load ``model.safetensors`` of ``ckpt`` into ``model`` (exactly; tied weights may be absent
    from the file, as Hugging Face saves them once)."""
    from safetensors.torch import load_file
    path = Path(ckpt) / "model.safetensors"
    if not path.is_file():
        raise TrainError(f"{ckpt} has no model.safetensors; it is not a complete checkpoint")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    really_missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if really_missing or unexpected:
        raise TrainError(f"checkpoint {ckpt} does not match the model (missing {really_missing[:3]}, "
                         f"unexpected {list(unexpected)[:3]}); resume with the same --model")


def load_training_state(ckpt: Path) -> dict:
    path = Path(ckpt) / "training_state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainError(f"could not read {path} ({type(exc).__name__}: {exc}); "
                         "resume from an earlier checkpoint or start a new run") from exc
