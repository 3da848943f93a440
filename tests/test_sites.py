import gc

import pytest
import torch

import spark_kernels as sk
from spark_kernels._sites import MAX_SITES, _SitesCache, as_sites, check_site_count
from spark_kernels.masks import num_visible, patch_mask, upsample_mask

from helpers import random_mask, spark_mask


def brute_force_neighbors(mask: torch.Tensor, k: int, stride: int = 1) -> torch.Tensor:
    """The table of a stride-`stride` conv: per active output site (any child of its block active), the
    input site of each tap or -1."""
    n, _, h, w = mask.shape
    ho, wo = -(-h // stride), -(-w // stride)
    rows = []
    r = k // 2
    for b in range(n):
        for oy in range(ho):
            for ox in range(wo):
                if not mask[b, 0, oy * stride:oy * stride + stride, ox * stride:ox * stride + stride].any():
                    continue
                row = []
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        yy, xx = oy * stride + dy, ox * stride + dx
                        ok = 0 <= yy < h and 0 <= xx < w and bool(mask[b, 0, yy, xx])
                        row.append(b * h * w + yy * w + xx if ok else -1)
                rows.append(row)
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, k * k)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 9, 4), (2, 6, 8)])
def test_strided_tables_match_brute_force(k, stride, shape):
    """The forward table of a strided conv (odd sizes: ceil(H/2) output rows) and the transposed table, which
    holds exactly the same (output site, tap, input site) triples seen from the input sites."""
    n, h, w = shape
    mask = random_mask(n, h, w, 0.5, seed=h * w + k)
    sites = sk.ActiveSites(mask)
    out = sites.strided(stride)
    assert out.shape == (n, -(-h // stride), -(-w // stride))
    table = sites.strided_neighbors(k, stride)
    assert torch.equal(table, brute_force_neighbors(mask, k, stride))
    assert table is sites.strided_neighbors(k, stride) and sites.strided(stride) is out  # cached
    transposed = sites.transposed_taps(k, stride)
    assert transposed.shape == (sites.num_active, k * k) and transposed.dtype == torch.int32
    forward = {(o, t, i) for o, row in zip(out.index.tolist(), table.tolist()) for t, i in enumerate(row) if i >= 0}
    backward = {(o, t, i) for i, row in zip(sites.index.tolist(), transposed.tolist()) for t, o in enumerate(row)
                if o >= 0}
    assert forward == backward


def test_strided_scale_is_the_downsampled_scale_for_even_sizes():
    sites = sk.ActiveSites(spark_mask(2, 8, 12, 0.6, patch=4, seed=2))
    assert sites.strided(2) is sites.downsample(2) is sites.at(4, 6)
    assert sites.strided(1) is sites
    odd = sk.ActiveSites(random_mask(1, 7, 5, 0.5))
    assert odd.strided(2).spatial_size == (4, 3)
    with pytest.raises(ValueError, match="stride must be a positive int"):
        odd.strided(0)


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 7), (3, 9, 4)])
def test_neighbor_table_matches_brute_force(k, shape):
    n, h, w = shape
    mask = random_mask(n, h, w, 0.5, seed=h * w)
    sites = sk.ActiveSites(mask)
    assert sites.num_active == int(mask.sum())
    assert sites.index.dtype == torch.int32
    assert torch.equal(sites.index.long(), torch.nonzero(mask.reshape(-1)).reshape(-1))
    assert torch.equal(sites.neighbors(k), brute_force_neighbors(mask, k))
    assert sites.neighbors(k) is sites.neighbors(k)  # cached


def test_neighbor_table_is_symmetric():
    mask = spark_mask(2, 12, 12, 0.6, patch=4, seed=1)
    sites = sk.ActiveSites(mask)
    table = sites.neighbors(7)
    row_of = {int(s): i for i, s in enumerate(sites.index)}
    for i, site in enumerate(sites.index.tolist()):
        for t, nb in enumerate(table[i].tolist()):
            if nb >= 0:
                assert table[row_of[nb], 48 - t].item() == site


def test_empty_and_full_masks():
    empty = sk.ActiveSites(torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert empty.num_active == 0 and empty.neighbors(3).shape == (0, 9)
    full = sk.ActiveSites(torch.ones(1, 1, 3, 3, dtype=torch.bool))
    assert full.num_active == 9 and full.active_fraction == 1.0
    assert int((full.neighbors(3) >= 0).sum()) == 4 * 4 + 4 * 6 + 9  # corner 4, edge 6, centre 9


def test_mask_is_copied():
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    sites = sk.ActiveSites(mask)
    mask.zero_()
    assert sites.num_active == 4 and bool(sites.mask.all())


def test_downsample_and_at():
    patch = patch_mask(2, (3, 4), 0.5, generator=torch.Generator().manual_seed(0))
    fine = sk.ActiveSites(upsample_mask(patch, 24, 32))
    coarse = fine.downsample(8)
    assert torch.equal(coarse.mask, patch)
    assert fine.downsample(2) is fine.downsample(2)
    assert fine.at(6, 8) is fine.downsample(4)
    assert coarse.at(24, 32) is fine  # the pyramid shares its scales
    half = fine.downsample(2)
    assert torch.equal(half.mask, torch.nn.functional.max_pool2d(fine.mask.float(), 2).bool())
    with pytest.raises(ValueError, match="factor"):
        fine.downsample(5)
    with pytest.raises(ValueError, match="cannot be resampled"):
        fine.at(10, 10)


def test_downsample_is_any_child():
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 1, 2] = True
    assert sk.ActiveSites(mask).downsample(2).mask[0, 0].tolist() == [[False, True], [False, False]]


@pytest.mark.parametrize("bad, err, match", [
    (torch.ones(1, 1, 2, 2), TypeError, "torch.bool"),
    (torch.ones(1, 2, 2, 2, dtype=torch.bool), ValueError, r"\(N, 1, H, W\)"),
    (torch.ones(2, 2, dtype=torch.bool), ValueError, r"\(N, 1, H, W\)"),
    ([[True]], TypeError, "torch.Tensor"),
])
def test_bad_masks(bad, err, match):
    with pytest.raises(err, match=match):
        sk.ActiveSites(bad)


def test_patch_mask_counts():
    for ratio in (0.0, 0.6, 0.75, 1.0):
        m = patch_mask(5, 7, ratio, generator=torch.Generator().manual_seed(3))
        assert m.shape == (5, 1, 7, 7) and m.dtype == torch.bool
        assert m.reshape(5, -1).sum(1).tolist() == [num_visible(49, ratio)] * 5
    assert num_visible(49, 0.6) == 20  # round(49 * 0.4) = round(19.6)
    with pytest.raises(ValueError, match="mask_ratio"):
        patch_mask(1, 7, 1.5)


class TestSitesCache:
    def test_hit_miss_and_version(self):
        cache = _SitesCache(capacity=2)
        mask = random_mask(1, 4, 4, 0.5)
        a = cache.get(mask)
        assert cache.get(mask) is a
        mask[0, 0, 0, 0] = ~mask[0, 0, 0, 0]  # in-place edit bumps the version: must miss
        b = cache.get(mask)
        assert b is not a and b.num_active != a.num_active

    def test_bounded(self):
        cache = _SitesCache(capacity=3)
        masks = [random_mask(1, 4, 4, 0.5, seed=i) for i in range(10)]
        for m in masks:
            cache.get(m)
        assert len(cache) == 3

    def test_freed_mask_with_reused_id_cannot_hit(self):
        cache = _SitesCache(capacity=4)
        m1 = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
        s1 = cache.get(m1)
        del m1
        gc.collect()
        m2 = torch.ones(1, 1, 2, 2, dtype=torch.bool)
        assert cache.get(m2).num_active == 4 and s1.num_active == 0

    def test_as_sites(self):
        sites = sk.ActiveSites(random_mask(1, 3, 3, 0.5))
        assert as_sites(sites) is sites
        with pytest.raises(TypeError, match="active"):
            as_sites(3)


def test_upsample_mask_by_hand():
    """Nearest repetition, with different factors for height (2) and width (3)."""
    mask = torch.tensor([[[[True, False], [False, True]]]])
    expected = torch.tensor([[[[1, 1, 1, 0, 0, 0],
                               [1, 1, 1, 0, 0, 0],
                               [0, 0, 0, 1, 1, 1],
                               [0, 0, 0, 1, 1, 1]]]], dtype=torch.bool)
    assert torch.equal(upsample_mask(mask, 4, 6), expected)
    with pytest.raises(ValueError, match="integer factor"):
        upsample_mask(mask, 5, 6)


def test_at_upsamples_by_hand_and_downsamples_any_child():
    mask = torch.tensor([[[[True, False, False], [False, False, True]]]])
    sites = sk.ActiveSites(mask)
    fine = sites.at(4, 6).mask[0, 0].int().tolist()
    assert fine == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert sites.at(4, 6).index.tolist() == [0, 1, 6, 7, 16, 17, 22, 23]
    pixel = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    pixel[0, 0, 3, 0] = pixel[0, 0, 0, 5] = True
    coarse = sk.ActiveSites(pixel).at(2, 3)
    assert coarse.mask[0, 0].int().tolist() == [[0, 0, 1], [1, 0, 0]] and coarse.num_active == 2


def test_patch_mask_draws_every_layout():
    """Uniform draws: over many images every one of the C(4, 2) = 6 layouts of 2 visible patches among
    4 appears, with frequency near 1/6."""
    m = patch_mask(3000, (2, 2), 0.5, generator=torch.Generator().manual_seed(0)).reshape(3000, 4)
    layouts = torch.unique(m.int(), dim=0, return_counts=True)
    assert layouts[0].shape[0] == 6 and bool((layouts[0].sum(1) == 2).all())
    assert bool(((layouts[1] / 3000 - 1 / 6).abs() < 0.03).all()), layouts[1]


def test_more_sites_than_int32_addresses_are_refused():
    """The int32 site index would wrap past 2^31 sites: the limit is checked on sizes, before allocating."""
    check_site_count(1, 1, MAX_SITES)
    check_site_count(256, 2048, 4094)  # 2^31 - 2^21 sites
    for n, h, w in ((1, 1, MAX_SITES + 1), (2**16, 2**8, 2**8), (2**20, 2**20, 2**20)):
        with pytest.raises(ValueError, match=r"int32 site index supports at most .*split the batch"):
            check_site_count(n, h, w)
    # A mask of 2^32 sites that occupies one byte (an expanded view): refused before any table is built.
    huge = torch.ones(1, 1, 1, 1, dtype=torch.bool).expand(2**16, 1, 2**8, 2**8)
    with pytest.raises(ValueError, match="has 4294967296 sites"):
        sk.ActiveSites(huge)


def test_cached_scales_do_not_answer_other_sizes():
    """A non-square pyramid: each scale is found under its own (H, W) only, so a size that is not a scale
    of the mask is refused even when another scale with that width is cached."""
    sites = sk.ActiveSites(torch.ones(1, 1, 2, 4, dtype=torch.bool))
    up = sites.at(4, 8)
    assert sites.at(4, 8) is up and up.at(2, 4) is sites and up.at(8, 16).at(4, 8) is up
    with pytest.raises(ValueError, match="cannot be resampled"):
        sites.at(8, 8)
