"""Long runs: 1,000 forward + backward steps of the ops (and a two-scale ActiveSites pyramid) with
a fresh bool mask every step keep memory flat and the mask cache bounded.

The loop runs with the cyclic garbage collector disabled, so anything that only a full collection
would free (a reference cycle per step) shows up as growth instead of depending on when Python
happens to collect. Allocator: whatever the process runs with (glibc malloc unless LD_PRELOAD says
otherwise).
"""
import gc
import os

import pytest
import torch
import torch.nn.functional as F

import spark_kernels as sk

from helpers import kernel_backends

STEPS, WARMUP = 1000, 100
RSS_SLACK_BYTES = 4 << 20  # one leaked input per step would be ~14 MB, one leaked ActiveSites ~11 MB
N, C, H, W = 2, 8, 16, 16
GN_GROUPS = 4


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_active_sites() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is sk.ActiveSites)


@pytest.mark.parametrize("backend", kernel_backends("conv", "batch_norm", "layer_norm", "group_norm"))
def test_memory_flat_over_1000_steps(backend):
    g = torch.Generator().manual_seed(0)
    params = dict(w3=torch.randn(C, 1, 3, 3, generator=g), w7=torch.randn(C, 1, 7, 7, generator=g),
                  bias=torch.randn(C, generator=g), bn_w=torch.ones(C), bn_b=torch.zeros(C),
                  ln_w=torch.ones(C), ln_b=torch.zeros(C), gn_w=torch.ones(C))
    for p in params.values():
        p.requires_grad_()
    running_mean, running_var = torch.zeros(C), torch.ones(C)

    def step():
        mask = torch.rand(N, 1, H, W, generator=g) > 0.6  # a new mask object every step
        x = torch.randn(N, C, H, W, generator=g, requires_grad=True)
        y = sk.sparse_depthwise_conv2d(x, params["w3"], params["bias"], mask, backend=backend)
        y = sk.masked_batch_norm(y, mask, running_mean, running_var, params["bn_w"], params["bn_b"],
                                 training=True, backend=backend)
        y = sk.masked_layer_norm(y, mask, params["ln_w"], params["ln_b"], backend=backend)
        y = sk.masked_group_norm(y, mask, GN_GROUPS, params["gn_w"], None, backend=backend)
        coarse = sk.ActiveSites(mask).downsample(2)
        z = sk.sparse_depthwise_conv2d(F.avg_pool2d(y, 2), params["w7"], None, coarse, backend=backend)
        (y.square().mean() + z.square().mean()).backward()
        for p in params.values():
            p.grad = None
        return x

    sk.sites_cache.clear()
    gc.collect()
    gc.disable()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: threads would only add synchronisation (and time) here
    try:
        for _ in range(WARMUP):
            step()
        rss_after_warmup = rss_bytes()
        largest_cache = 0
        for _ in range(STEPS - WARMUP):
            x = step()
            largest_cache = max(largest_cache, len(sk.sites_cache))
        rss_at_end = rss_bytes()
        live = live_active_sites()
    finally:
        gc.enable()
        torch.set_num_threads(threads)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.isfinite(running_mean).all() and torch.isfinite(running_var).all()
    assert largest_cache <= sk.sites_cache.capacity
    # The cache's entries (one scale each, masks passed raw) plus the step's own: nothing accumulates.
    assert live <= sk.sites_cache.capacity + 2, f"{live} ActiveSites alive after {STEPS} steps"
    growth = rss_at_end - rss_after_warmup
    assert growth <= RSS_SLACK_BYTES, f"RSS grew by {growth / 2**20:.1f} MiB over {STEPS - WARMUP} steps"
