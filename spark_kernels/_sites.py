"""Active sites: the compact index of a mask, built once per mask and scale and shared by every op.

Kernels never call ``nonzero()`` per layer; they read two int32 tables cached here:

* ``index``: (M,) flat site numbers ``n*H*W + h*W + w`` of the active sites, ascending.
* ``neighbors(k)``: (M, k*k) flat site number of the tap ``(dy, dx)`` neighbour of each active site
  (taps row-major, ``dy, dx`` in ``-k//2 .. k//2``), or -1 where that neighbour is outside the image or
  inactive. The table is symmetric (b is a's tap t iff a is b's mirrored tap), which lets the input
  gradient of the conv be gathered instead of scattered with atomics.

A stride-s conv (padding k//2) reads these sites and writes the sites of ``strided(s)``, the output scale:
* ``strided_neighbors(k, s)``: (M_out, k*k) the input site read by tap ``(dy, dx)`` of each active output
  site ``(oy, ox)``, i.e. ``(s*oy + dy, s*ox + dx)``, or -1;
* ``transposed_taps(k, s)``: (M, k*k) for each active input site, the output site whose tap t reads it,
  or -1 (no such output site, or it is inactive). The conv's input gradient gathers through it with
  unmirrored taps, again without atomics. For s = 1 it is ``neighbors(k)`` with the taps mirrored.
"""
from __future__ import annotations

import collections
import operator
import threading
import weakref
from typing import Dict, List, Tuple

import torch

# Site numbers are int32 in the tables and the kernels, whose tiles also compute positions up to one tile
# past the last active site in int32: a margin of 2^20 keeps those from wrapping too.
MAX_SITES = 2**31 - 2**20


def check_site_count(n: int, h: int, w: int) -> None:
    """Refuse a batch whose N*H*W sites the int32 site numbers cannot address (they would wrap silently)."""
    sites = n * h * w
    if sites > MAX_SITES:
        raise ValueError(f"a mask of (N, H, W) = {(n, h, w)} has {sites} sites; the int32 site index supports at "
                         f"most {MAX_SITES} (2^31 - 2^20): split the batch")


def _check_mask(mask: torch.Tensor, name: str = "mask") -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = active), got {mask.dtype}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1, H, W), got {tuple(mask.shape)}")
    if mask.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: active sites are built from the mask's values, "
                         f"which a meta tensor does not have")


def _positive_int(value, name: str) -> int:
    try:
        number = operator.index(value)  # ints, numpy and torch integers, SymInts; not floats
    except TypeError:
        number = None
    if isinstance(value, bool) or number is None or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


class ActiveSites:
    """Compact index of the active sites of a bool mask of shape (N, 1, H, W) (True = active).

    Instances are immutable: the mask is copied, so later in-place edits of the caller's tensor cannot
    desynchronise the cached tables. Scales derived with :meth:`downsample` or :meth:`at` are cached
    and shared, so one ``ActiveSites`` per batch serves every layer of a network; a derived scale
    lives as long as the scale it was derived from (or longer, if the caller holds it).
    """

    def __init__(self, mask: torch.Tensor):
        _check_mask(mask)
        check_site_count(mask.shape[0], mask.shape[2], mask.shape[3])  # before anything is allocated
        self.mask = mask.detach().clone().contiguous()
        self.shape: Tuple[int, int, int] = (mask.shape[0], mask.shape[2], mask.shape[3])
        self.index = torch.nonzero(self.mask.reshape(-1)).reshape(-1).to(torch.int32)
        # One host sync per mask; every op later reads the count without syncing.
        self.num_active = int(self.index.numel())
        self._neighbors: Dict[int, torch.Tensor] = {}
        self._strided_tables: Dict[Tuple[str, int, int], torch.Tensor] = {}
        self._ceil_downsampled: Dict[int, ActiveSites] = {}
        self._image_counts = None
        # The scales of this mask, shared by every member of the pyramid. Weak values: each scale is kept
        # alive by the one it was derived from (_derived), so a pyramid has no reference cycle and is
        # freed as soon as the caller drops it, not at the next full garbage collection (its tables can
        # be hundreds of MB per batch).
        self._scales: "weakref.WeakValueDictionary[Tuple[int, int], ActiveSites]" = weakref.WeakValueDictionary()
        self._scales[(self.shape[1], self.shape[2])] = self
        self._derived: List[ActiveSites] = []

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.mask.device

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    @property
    def spatial_size(self) -> Tuple[int, int]:
        return self.shape[1], self.shape[2]

    @property
    def num_sites(self) -> int:
        n, h, w = self.shape
        return n * h * w

    @property
    def image_counts(self) -> torch.Tensor:
        """(N,) int64 number of active sites of each image (on the mask's device; built once, no host sync)."""
        if self._image_counts is None:
            self._image_counts = self.mask.reshape(self.shape[0], -1).sum(dim=1)
        return self._image_counts

    @property
    def active_fraction(self) -> float:
        return self.num_active / max(self.num_sites, 1)

    def __repr__(self) -> str:
        n, h, w = self.shape
        return f"ActiveSites(N={n}, H={h}, W={w}, active={self.num_active}/{self.num_sites}, device={self.device})"

    # -- tables ---------------------------------------------------------------------------------------
    def neighbors(self, kernel_size: int) -> torch.Tensor:
        """(M, k*k) int32 neighbour table for a k x k stride-1 'same' conv; cached per k."""
        table = self._neighbors.get(kernel_size)
        if table is None:
            table = self._build_neighbors(kernel_size)
            self._neighbors[kernel_size] = table
        return table

    def _build_neighbors(self, k: int) -> torch.Tensor:
        return self._tap_table(self.index, self.shape, k, 1, self)

    def strided_neighbors(self, kernel_size: int, stride: int) -> torch.Tensor:
        """(M_out, k*k) int32 table of a k x k stride-`stride` conv with padding k//2: for each active site
        of ``strided(stride)``, this scale's site read by each tap (or -1); cached per (k, stride)."""
        if stride == 1:
            return self.neighbors(kernel_size)
        key = ("forward", kernel_size, stride)
        table = self._strided_tables.get(key)
        if table is None:
            out = self.strided(stride)
            table = self._tap_table(out.index, out.shape, kernel_size, stride, self)
            self._strided_tables[key] = table
        return table

    def transposed_taps(self, kernel_size: int, stride: int) -> torch.Tensor:
        """(M, k*k) int32: for each active site of this scale and each tap t, the active site of
        ``strided(stride)`` whose tap t reads it, or -1; cached per (k, stride)."""
        key = ("transposed", kernel_size, stride)
        table = self._strided_tables.get(key)
        if table is None:
            if stride == 1:  # the neighbour at offset d reads this site through tap -d
                table = self.neighbors(kernel_size).flip(1).contiguous()
            else:
                table = self._transposed_table(kernel_size, stride)
            self._strided_tables[key] = table
        return table

    @staticmethod
    def _tap_table(out_index: torch.Tensor, out_shape: Tuple[int, int, int], k: int, stride: int,
                   src: "ActiveSites") -> torch.Tensor:
        """For each site of out_index (numbered in out_shape), the site of `src` at (stride*oy + dy,
        stride*ox + dx) for every tap, or -1 where it is outside the image or inactive."""
        _, h, w = src.shape
        _, ho, wo = out_shape
        site = out_index.to(torch.int64)
        image = site // (ho * wo)
        row = (site // wo) % ho * stride
        col = site % wo * stride
        r = k // 2
        offsets = torch.arange(-r, r + 1, device=site.device)
        dy = offsets.repeat_interleave(k)  # taps row-major: (dy, dx) for dy, for dx
        dx = offsets.repeat(k)
        nrow = row[:, None] + dy[None, :]
        ncol = col[:, None] + dx[None, :]
        inside = (nrow >= 0) & (nrow < h) & (ncol >= 0) & (ncol < w)
        nsite = (image * h)[:, None] * w + nrow * w + ncol
        nsite = torch.where(inside, nsite, torch.zeros_like(nsite))
        active = inside & src.mask.reshape(-1)[nsite]
        return torch.where(active, nsite, torch.full_like(nsite, -1)).to(torch.int32).contiguous()

    def _transposed_table(self, k: int, stride: int) -> torch.Tensor:
        out = self.strided(stride)
        _, h, w = self.shape
        _, ho, wo = out.shape
        site = self.index.to(torch.int64)
        image = site // (h * w)
        row = (site // w) % h
        col = site % w
        r = k // 2
        offsets = torch.arange(-r, r + 1, device=site.device)
        dy = offsets.repeat_interleave(k)
        dx = offsets.repeat(k)
        # Output (oy, ox) reads this site through tap (dy, dx) iff stride*oy + dy = row (and likewise ox).
        orow_s = row[:, None] - dy[None, :]
        ocol_s = col[:, None] - dx[None, :]
        orow = torch.div(orow_s, stride, rounding_mode="floor")
        ocol = torch.div(ocol_s, stride, rounding_mode="floor")
        hit = ((orow_s % stride == 0) & (ocol_s % stride == 0) & (orow >= 0) & (orow < ho) & (ocol >= 0)
               & (ocol < wo))
        osite = (image * ho)[:, None] * wo + orow * wo + ocol
        osite = torch.where(hit, osite, torch.zeros_like(osite))
        active = hit & out.mask.reshape(-1)[osite]
        return torch.where(active, osite, torch.full_like(osite, -1)).to(torch.int32).contiguous()

    # -- scales ---------------------------------------------------------------------------------------
    def _derive(self, mask: torch.Tensor) -> "ActiveSites":
        key = (mask.shape[2], mask.shape[3])
        sites = self._scales.get(key)
        if sites is None:
            sites = ActiveSites(mask)
            sites._scales = self._scales
            self._scales[key] = sites
            self._derived.append(sites)
        return sites

    def downsample(self, factor: int = 2) -> "ActiveSites":
        """The next coarser scale: a site is active if any of its factor x factor children is."""
        factor = _positive_int(factor, "factor")
        _, h, w = self.shape
        self._check_resamplable()
        if h % factor or w % factor:
            raise ValueError(f"downsample factor {factor} does not divide the spatial size {h}x{w}")
        cached = self._scales.get((h // factor, w // factor))
        if cached is not None:
            return cached
        pooled = torch.nn.functional.max_pool2d(self.mask.to(torch.uint8), factor).to(torch.bool)
        return self._derive(pooled)

    def strided(self, stride: int) -> "ActiveSites":
        """The output sites of a stride-`stride` conv with padding k//2 (odd k): output site (oy, ox) is active
        if any input site of its stride x stride block is. Equals ``downsample(stride)`` when the stride
        divides the spatial size; otherwise the output has nn.Conv2d's ceil(H/stride) x ceil(W/stride)
        sites, the last ones pooling the partial blocks at the border (cached, not shared as a scale)."""
        stride = _positive_int(stride, "stride")
        if stride == 1:
            return self
        _, h, w = self.shape
        if h % stride == 0 and w % stride == 0:
            return self.downsample(stride)
        self._check_resamplable()
        cached = self._ceil_downsampled.get(stride)
        if cached is None:
            pooled = torch.nn.functional.max_pool2d(self.mask.to(torch.uint8), stride, ceil_mode=True)
            cached = self._ceil_downsampled[stride] = ActiveSites(pooled.to(torch.bool))
        return cached

    def at(self, height: int, width: int) -> "ActiveSites":
        """The sites of this mask at another resolution: nearest-upsampled to an integer multiple,
        or downsampled ("any child active") to an integer divisor of the spatial size."""
        height, width = _positive_int(height, "height"), _positive_int(width, "width")
        cached = self._scales.get((height, width))
        if cached is not None:
            return cached
        _, h, w = self.shape
        self._check_resamplable()
        if height % h == 0 and width % w == 0 and height // h == width // w:
            s = height // h
            up = self.mask.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
            return self._derive(up)
        if h % height == 0 and w % width == 0 and h // height == w // width:
            return self.downsample(h // height)
        raise ValueError(
            f"active sites of spatial size {h}x{w} cannot be resampled to {height}x{width}: "
            f"the sizes must differ by the same integer factor in both dimensions")

    def _check_resamplable(self) -> None:
        if min(self.spatial_size) == 0:
            raise ValueError(f"active sites of spatial size {self.spatial_size[0]}x{self.spatial_size[1]} "
                             f"(no sites) cannot be resampled")

    # -- consistency ----------------------------------------------------------------------------------
    def check_matches(self, x: torch.Tensor, x_name: str = "x", name: str = "active",
                      spatial_dims: Tuple[int, int] = (2, 3)) -> None:
        n, h, w = self.shape
        xs = (x.shape[0], x.shape[spatial_dims[0]], x.shape[spatial_dims[1]])
        if xs != (n, h, w):
            raise ValueError(f"{name} is for (N, H, W) = {(n, h, w)} but {x_name} has (N, H, W) = {xs}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {self.device} but {x_name} is on {x.device}")


class _SitesCache:
    """Bounded LRU cache from mask tensors to their ActiveSites, for callers that pass raw masks.

    Keyed by the mask object (through a weak reference, so a freed tensor whose id is reused cannot
    hit) together with its storage pointer, shape and version counter, so an in-place edit misses.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: "collections.OrderedDict[tuple, Tuple[weakref.ref, ActiveSites]]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def get(self, mask: torch.Tensor) -> ActiveSites:
        key = (id(mask), mask.data_ptr(), tuple(mask.shape), tuple(mask.stride()), mask.device, mask._version)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is mask:
                self._entries.move_to_end(key)
                return hit[1]
        sites = ActiveSites(mask)
        with self._lock:
            self._entries[key] = (weakref.ref(mask), sites)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return sites


sites_cache = _SitesCache()


def as_sites(active, name: str = "active") -> ActiveSites:
    """An ActiveSites from an ActiveSites or a bool (N, 1, H, W) mask."""
    if isinstance(active, ActiveSites):
        return active
    if isinstance(active, torch.Tensor):
        _check_mask(active, name)
        return sites_cache.get(active)
    raise TypeError(f"{name} must be a bool mask tensor of shape (N, 1, H, W) or an ActiveSites, "
                    f"got {type(active).__name__}")


def resolve_sites(active, x: torch.Tensor, name: str = "active", x_name: str = "x",
                  spatial_dims: Tuple[int, int] = (2, 3)) -> ActiveSites:
    """ActiveSites for x, which must match x's batch, spatial size and device exactly."""
    if isinstance(active, torch.Tensor):  # before building tables on a device x is not on
        _check_mask(active, name)
        if active.device != x.device:
            raise ValueError(f"{name} is on {active.device} but {x_name} is on {x.device}")
    sites = as_sites(active, name)
    sites.check_matches(x, x_name, name, spatial_dims)
    return sites
