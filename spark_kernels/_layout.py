"""The memory layout the native and Triton kernels work in (mirrored by csrc/common/layout.h).

A tensor that is channels_last-contiguous but not plain-contiguous is processed as rows of C
contiguous values per site ("rows"); anything else as plain-contiguous NCHW planes ("planes").
Outputs and gradients come back in the layout the input was processed in.
"""
import torch


def uses_rows(x: torch.Tensor) -> bool:
    return (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)


def kernel_memory_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if uses_rows(x) else torch.contiguous_format


def to_kernel_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (same shape as like) in the layout the kernels use for like."""
    return t.contiguous(memory_format=kernel_memory_format(like))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-channel and per-site statistics are kept in float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
