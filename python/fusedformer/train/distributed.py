"""More than one process: ``torchrun`` with DDP (or FSDP for larger models).

The same command runs on one process or many: under ``torchrun`` the environment carries
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``, and :func:`init` joins the process group
(``nccl`` on GPUs, ``gloo`` on CPUs). Multi-node runs use torchrun's usual rendezvous flags
(``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``); nothing here changes.

How a global batch is shared: each optimizer step's ``batch_size`` examples are cut into
``world_size × accumulation`` micro-batches; rank ``r`` takes micro-batches ``r·A … r·A+A-1``.
Losses are *sums* divided by the global number of loss terms (all-reduced before the backward),
so the gradient — and the logged loss — equal those of one process holding the whole batch,
whatever the split (up to float summation order).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .config import TrainError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"--device {pref}: no CUDA GPU is visible to torch here; use --device cpu")
        return torch.device(pref) if ":" in pref else torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_pref: str, strategy: str) -> DistEnv:
    """Join torchrun's process group if launched by it; otherwise a one-process environment."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistEnv(device=pick_device(device_pref))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device, strategy)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP, or FSDP (``fully_shard`` on every Transformer layer, then the whole model)."""
    if not env.enabled:
        return model
    if env.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in transformer_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def transformer_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a BERT (``encoder.layer``), GPT-2 (``transformer.h``) or BART
    (``encoder.layers`` and ``decoder.layers``)."""
    found = []
    for m in model.modules():
        for name in ("layer", "h", "layers"):
            seq = getattr(m, name, None)
            if isinstance(seq, torch.nn.ModuleList) and len(seq) > 0:
                found += list(seq)
    return found


@contextlib.contextmanager
def maybe_no_sync(model: torch.nn.Module, env: DistEnv, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation steps that are not the last."""
    if not env.enabled or sync:
        if env.strategy == "fsdp" and env.enabled:
            model.set_requires_gradient_sync(True)
        yield
        return
    if env.strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        yield
        return
    with model.no_sync():
        yield


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over all ranks (float64; exact for counts)."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float, env: DistEnv) -> float:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def full_model_state(wrapped: torch.nn.Module, model: torch.nn.Module, env: DistEnv) -> dict:
    """The state dict of ``model`` (the Hugging Face model inside ``wrapped``, held there as
    ``.model``), whole and on the CPU. Collective under FSDP: every rank must call it."""
    if env.strategy == "fsdp" and env.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # the gathered copies of tied parameters are separate tensors: keep each parameter once,
        # under its first name, as an unsharded state dict would
        aliases = tied_aliases(model)
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        return {k: v for k, v in state.items() if k not in aliases}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (tied weights)."""
    seen: set[int] = set()
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.add(name)
        seen.add(id(p))
    return aliases


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    if env.strategy == "fsdp" and env.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                         env: DistEnv) -> None:
    if env.strategy == "fsdp" and env.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
