"""The merge of the touched rows across ranks: what keeps data-parallel replicas of a fused or
sparse table equal (`deepfm_fast.distributed.wrap` registers the process group; the fused backward,
the sparse gradient hooks and the L2 penalty call the merge).

A ground-floor module: it imports torch.distributed and nothing of the models, so that the ops and
`EmbeddingFM` can call it while `deepfm_fast.distributed` (which wraps models) sits above them.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["INDEPENDENT", "merges_across_ranks", "register_group", "merge_rows", "union_rows", "merge_sparse_grad"]

# Process groups by the handle `EmbeddingFM._sync` holds (0: not synchronised, -1: independent).
_GROUPS: Dict[int, Optional[dist.ProcessGroup]] = {}
INDEPENDENT = -1


def merges_across_ranks(handle: int) -> bool:
    """``handle`` (an `EmbeddingFM._sync`) names a process group of `wrap` whose ranks merge their
    rows: not 0 (not synchronised) nor `INDEPENDENT`."""
    return handle > 0


def register_group(process_group: Optional[dist.ProcessGroup]) -> int:
    """A new handle for ``process_group`` (what `deepfm_fast.distributed.wrap` gives each table)."""
    handle = max(_GROUPS, default=0) + 1
    _GROUPS[handle] = process_group
    return handle


def _collective_device(group: Optional[dist.ProcessGroup]) -> torch.device:
    """Where the tensors of a collective must be: this rank's GPU for NCCL, else the CPU (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather_rows(handle: int, ids: Tensor, values: Tensor, batch: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Every rank's (ids [U_r], values [U_r, D]), concatenated in rank order on every rank."""
    group = _GROUPS[handle]
    world = dist.get_world_size(group)
    device = _collective_device(group)
    counts = torch.tensor([ids.numel(), -1 if batch is None else batch], dtype=torch.int64, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts, group=group)
    sizes = [int(c[0]) for c in all_counts]
    empty = [r for r, c in enumerate(all_counts) if int(c[1]) == 0]
    if empty:  # raised on every rank alike: none waits for the others
        raise RuntimeError(f"deepfm_fast.distributed: rank(s) {empty} had an empty batch; every rank must train on "
                           f"at least one row per step (shard the data so that no rank runs dry)")
    longest = max(sizes)
    padded_ids = torch.zeros(longest, dtype=torch.int64, device=device)
    padded_ids[:ids.numel()] = ids.to(device)
    padded_values = values.new_zeros((longest, values.shape[1]), device=device)
    padded_values[:values.shape[0]] = values.to(device)
    all_ids = [torch.empty_like(padded_ids) for _ in range(world)]
    all_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(all_ids, padded_ids, group=group)
    dist.all_gather(all_values, padded_values, group=group)
    ids = torch.cat([i[:n] for i, n in zip(all_ids, sizes)]).to(values.device)
    values = torch.cat([v[:n] for v, n in zip(all_values, sizes)]).to(values.device)
    return ids, values / world


def _sum_rows(ids: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
    """(sorted unique ids, the sum of their values), summed in a fixed order on every rank: a stable
    sort and a segment sum, no atomics, so the ranks' results are bitwise equal."""
    if ids.numel() == 0:
        return ids, values
    ids, order = torch.sort(ids, stable=True)
    unique, counts = torch.unique_consecutive(ids, return_counts=True)
    return unique, torch.segment_reduce(values[order], "sum", lengths=counts, axis=0)


def merge_rows(handle: int, ids: Tensor, grads: List[Tensor], batch: int) -> Tuple[Tensor, List[Tensor]]:
    """The fused backward's merge: every rank's coalesced rows (sorted unique ``ids``; ``grads``, one
    ``[U]`` or ``[U, D]`` tensor per table) -> the union of the rows and their gradients summed over
    the ranks and divided by the world size (DDP's average). ``batch``: this rank's batch size."""
    widths = [1 if g.dim() == 1 else g.shape[1] for g in grads]
    values = torch.cat([g.reshape(g.shape[0], width) for g, width in zip(grads, widths)], dim=1)
    ids, values = _sum_rows(*_gather_rows(handle, ids, values, batch))
    merged, start = [], 0
    for g, width in zip(grads, widths):
        part = values[:, start:start + width]
        merged.append(part.reshape(-1) if g.dim() == 1 else part.contiguous())
        start += width
    return ids, merged


def union_rows(handle: int, rows: Tensor) -> Tensor:
    """The sorted union of every rank's ``rows``: the rows an L2 penalty on the used rows covers, so
    that N ranks apply it once per row of the global batch, as one process would."""
    ids, _ = _gather_rows(handle, rows, rows.new_zeros((rows.numel(), 0), dtype=torch.float32), None)
    return torch.unique(ids)


def merge_sparse_grad(handle: int, grad: Tensor) -> Tensor:
    """The gradient hook of a sparse table: the merged, averaged sparse gradient of every rank."""
    grad = grad.coalesce()
    shape = grad.shape
    values = grad.values().reshape(grad.values().shape[0], math.prod(shape[1:]))
    ids, values = _sum_rows(*_gather_rows(handle, grad.indices()[0], values, None))
    return torch.sparse_coo_tensor(ids.unsqueeze(0), values.reshape((-1,) + tuple(shape[1:])), shape,
                                   is_coalesced=True)
