"""Multi-process training under torchrun: process group setup and synchronized BatchNorm."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import spark_kernels as sk


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return World(rank, size, local_rank)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class DenseSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are reduced over a process group, on any device
    (nn.SyncBatchNorm runs on GPUs only). It is the synchronized masked BatchNorm of spark_kernels with
    every site active, on the reference backend (autograd through the all-reduce)."""

    def __init__(self, num_features: int, process_group, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        self.process_group = process_group

    @classmethod
    def from_dense(cls, bn: nn.BatchNorm2d, process_group) -> "DenseSyncBatchNorm2d":
        synced = cls(bn.num_features, process_group, bn.eps, bn.momentum, bn.affine)
        synced.to(device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        synced.load_state_dict(bn.state_dict())
        synced.train(bn.training)
        return synced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        everywhere = torch.ones(x.shape[0], 1, x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
        return sk.masked_batch_norm(x, everywhere, self.running_mean, self.running_var, self.weight, self.bias,
                                    training=True, momentum=self.momentum, eps=self.eps,
                                    process_group=self.process_group, backend="reference")


def align_gradient_strides(model: nn.Module) -> int:
    """Give each parameter's gradient exactly the parameter's strides, as soon as it is accumulated.

    Some backward ops (convolutions, reductions) return gradients whose strides differ from the
    parameter's only in dimensions of size 1, e.g. a 1x1 conv weight (C_out, C_in, 1, 1) with strides
    (C_in, 1, C_in, C_in) instead of (C_in, 1, 1, 1). Autograd accepts that layout (strides of size-1
    dimensions address no memory), but DistributedDataParallel compares strides exactly with its bucket
    views (built with the parameter's strides) and warns on every run. Restriding the gradient to the
    parameter's strides is a view of the same memory: no copy, no change of values. Returns the number of
    parameters hooked."""
    hooked = 0
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_restride_gradient)
            hooked += 1
    return hooked


def _restride_gradient(param: torch.Tensor) -> None:
    grad = param.grad
    if grad is None or grad.is_sparse or grad.stride() == param.stride() or grad.shape != param.shape:
        return
    if all(a == b for a, b, n in zip(grad.stride(), param.stride(), param.shape) if n > 1):
        param.grad = grad.as_strided(param.shape, param.stride(), grad.storage_offset())


def synchronize_batch_norm(model: nn.Module, process_group=None) -> int:
    """Make every BatchNorm of `model` compute its statistics over the whole global batch: masked BNs get
    the process group; dense BNs (decoder, densify) become nn.SyncBatchNorm on GPUs and
    DenseSyncBatchNorm2d on CPUs. Returns the number of layers changed."""
    group = process_group if process_group is not None else dist.group.WORLD
    changed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, sk.nn.MaskedBatchNorm2d):
                child.process_group = group
                changed += 1
            elif type(child) is nn.BatchNorm2d:
                if child.running_mean is not None and child.running_mean.is_cuda:
                    synced = nn.SyncBatchNorm.convert_sync_batchnorm(child, group)
                else:
                    synced = DenseSyncBatchNorm2d.from_dense(child, group)
                setattr(parent, name, synced)
                changed += 1
    return changed
