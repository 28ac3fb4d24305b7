"""Data-parallel training of models with `EmbeddingFM` tables: DDP for the DNN, and the tables kept
identical on every rank by the library, in every table mode.

DDP all-reduces dense gradients. The fast table modes have none: a fused optimizer updates the
touched rows inside the backward, and sparse gradients (``table_optimizer="sparse_adam"``) are
``torch.sparse_coo`` tensors DDP cannot reduce. `wrap` makes both work with torch.distributed
collectives:

- the tables that have no dense gradient (and the fused optimizer's state buffers) are left out of
  DDP, and rank 0's copy of every table is broadcast once, so every replica starts equal;
- fused: the backward all-gathers each rank's coalesced ``(unique ids, row gradients)`` of both
  tables (V and w), merges them (sum per row, divided by the world size: DDP's averaged gradient)
  and applies the same update on every rank. It runs inside the backward, so it overlaps the DNN's
  all-reduce, which DDP starts as the DNN's gradients become ready.
- sparse: a gradient hook on each table with a sparse gradient does the same merge and hands the
  optimizer the averaged sparse gradient (the reference ops give ``w`` a dense one: DDP's).
- dense: DDP's own all-reduce, as for any parameter.
- the L2 penalty on the rows a batch uses covers the union of every rank's rows, once each.

Example (``torchrun --nproc_per_node=2 train.py``)::

    torch.distributed.init_process_group("gloo")        # "nccl" on GPUs
    model = DeepFM(fields, 10, table_optimizer="adam")
    ddp = deepfm_fast.distributed.wrap(model)           # DistributedDataParallel
    opt = torch.optim.Adam(model.dense_parameters(), lr=1e-3)
    loss = F.binary_cross_entropy_with_logits(ddp(batch_of_this_rank), labels)
    loss.backward()                                      # tables updated, equal on every rank
    opt.step()

The merge needs every rank in every step: a rank with an empty batch raises on all ranks (never a
hang), and so does a model that differs between ranks (checked once in `wrap`). An `EmbeddingFM`
with a fused optimizer or sparse gradients refuses to train in a process group of more than one
rank unless `wrap` synchronised it (or `independent` said the replicas are meant to differ).
``deepfm-fast train`` under ``torchrun`` does all of this (see its help).
"""
import datetime
import os
from typing import List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._row_merge import (
    INDEPENDENT,
    _collective_device,
    merge_rows,
    merge_sparse_grad,
    merges_across_ranks,
    register_group,
    union_rows,
)
from .embedding import EmbeddingFM

__all__ = ["wrap", "init_from_environment", "independent", "merges_across_ranks", "merge_rows", "union_rows",
           "is_distributed", "rank", "world_size", "convert_sync_batch_norm", "CpuSyncBatchNorm"]

def is_distributed() -> bool:
    """A process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_environment(device: str = "cpu", timeout_s: float = 1800.0) -> Tuple[int, int, torch.device]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): the process group, NCCL for a CUDA
    ``device`` (this rank's GPU, ``LOCAL_RANK``) and gloo for the CPU, with a timeout on every
    collective so that a lost rank fails the others instead of hanging them. Returns
    ``(rank, world_size, device)``; one process: ``(0, 1, device)`` and nothing else."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = torch.device(device)
    if world <= 1:
        return 0, 1, target
    if target.type == "cuda":
        target = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), target


def _tables(model: nn.Module) -> List[Tuple[str, EmbeddingFM]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, EmbeddingFM)]


def _check_same_model(model: nn.Module, group: Optional[dist.ProcessGroup]) -> None:
    """Every rank must hold the same architecture and table optimizer: a mismatch would make the
    merged updates meaningless (or the collectives hang on different sizes)."""
    fingerprint = {"world_size": dist.get_world_size(group),
                   "parameters": [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
                   "tables": [(n, m.field_dims, m.embedding_dim, m.mode, repr(m.optimizer), m.sparse)
                              for n, m in _tables(model)]}
    gathered: List[Optional[dict]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, fingerprint, group=group)
    for r, other in enumerate(gathered):  # the same verdict on every rank: all raise, none waits
        if other != gathered[0]:
            different = [k for k in gathered[0] if other.get(k) != gathered[0][k]]
            raise ValueError(f"deepfm_fast.distributed.wrap: rank {r} has a different model than rank 0 "
                             f"(differs in: {', '.join(different)}); every rank must build the same model")


def _fused_state(module: EmbeddingFM) -> List[Tensor]:
    """The buffers of a fused optimizer: its states, row states and step count (none without one)."""
    if module.optimizer is None:
        return []
    return module.optimizer_state_list() + list(module.optimizer_row_state().values()) + [module.optimizer_step]


def _broadcast_tables(module: EmbeddingFM, group: Optional[dist.ProcessGroup]) -> None:
    """Rank 0's tables and optimizer state on every rank (DDP does this for the parameters it manages)."""
    src = dist.get_global_rank(group, 0) if group is not None else 0
    tensors = [module.weight, module.linear_weight] + _fused_state(module)
    with torch.no_grad():
        for t in tensors:
            device = _collective_device(group)
            buffer = t.detach().to(device).contiguous()  # packed rows are strided views
            dist.broadcast(buffer, src=src, group=group)
            t.copy_(buffer)


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks; its gradient is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class CpuSyncBatchNorm(nn.BatchNorm1d):
    """A batch norm over the global batch of every rank, on the CPU (gloo), where PyTorch's
    ``SyncBatchNorm`` has no kernel (and DDP refuses it): the batch statistics are summed over the
    ranks with autograd-aware all-reduces, so the forward and backward are those of one batch norm
    over the rows of all ranks. Made by `convert_sync_batch_norm` from ``BatchNorm1d`` layers."""

    process_group: Optional[dist.ProcessGroup] = None

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        count = _AllReduceSum.apply(torch.tensor([float(input.shape[0])], dtype=input.dtype), group)
        mean = _AllReduceSum.apply(input.sum(0), group) / count
        var = _AllReduceSum.apply((input - mean).pow(2).sum(0), group) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        out = (input - mean) / torch.sqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def convert_sync_batch_norm(model: nn.Module, process_group: Optional[dist.ProcessGroup] = None) -> nn.Module:
    """Batch norms over the global batch: ``torch.nn.SyncBatchNorm`` on GPUs, `CpuSyncBatchNorm` for
    the ``BatchNorm1d`` layers of a model on the CPU. Same parameters and buffers, in place."""
    if any(p.is_cuda for p in model.parameters()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for m in model.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = CpuSyncBatchNorm  # a subclass with the same state: only forward changes
            m.process_group = process_group
    return model


def wrap(model: nn.Module, *, process_group: Optional[dist.ProcessGroup] = None, sync_batch_norm: bool = False,
         **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model)`` with every `EmbeddingFM` table kept equal on all ranks.

    Args:
        model: a model holding `EmbeddingFM` tables (e.g. `deepfm_fast.models.DeepFM`), on its device.
        process_group: the group to train in (default: the world).
        sync_batch_norm: batch norms over the global batch (`convert_sync_batch_norm`), so that N ranks
            train the model one process would on the same rows.
        ddp_kwargs: passed to ``DistributedDataParallel`` (e.g. ``device_ids``).

    Returns:
        The DDP module; ``.module`` is ``model`` (converted batch norms included).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("deepfm_fast.distributed.wrap: no process group; call torch.distributed."
                           "init_process_group first (torchrun sets the environment it needs)")
    tables = _tables(model)
    if sync_batch_norm:
        model = convert_sync_batch_norm(model, process_group)
    _check_same_model(model, process_group)
    handle = register_group(process_group)
    synchronised: Set[int] = set()  # ids of the tensors kept equal here, not by DDP
    for _, module in tables:
        _broadcast_tables(module, process_group)
        if module.optimizer is not None:
            synchronised |= {id(t) for t in [module.weight, module.linear_weight] + _fused_state(module)}
        for param in module.sparse_parameters():
            if param.requires_grad:  # a frozen table has no gradient to merge (and refuses hooks)
                param.register_hook(lambda grad, h=handle: merge_sparse_grad(h, grad))
                synchronised.add(id(param))
        module._sync = handle
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, _ddp_names(model, synchronised))
    return nn.parallel.DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)


def _ddp_names(model: nn.Module, tensor_ids: Set[int]) -> List[str]:
    """The names under which DDP looks up the parameters and buffers ``tensor_ids`` to ignore. DDP
    spells them two ways: as ``named_parameters()`` and ``named_buffers()`` do, and, building its
    reducer, ``f"{module_name}.{param_name}"``, which for the root's own parameters is ``".weight"``."""
    names = [n for n, t in model.named_parameters(remove_duplicate=False) if id(t) in tensor_ids]
    names += [n for n, t in model.named_buffers(remove_duplicate=False) if id(t) in tensor_ids]
    names += [f"{module_name}.{n}" for module_name, module in model.named_modules()
              for n, p in module.named_parameters(recurse=False) if id(p) in tensor_ids]
    return sorted(set(names))


def independent(model: nn.Module) -> nn.Module:
    """Declares that the fused or sparse tables of ``model`` train independently on each rank (e.g.
    one model per rank in a hyper-parameter search): they are then not synchronised and not refused."""
    for _, module in _tables(model):
        module._sync = INDEPENDENT
    return model
