"""The oracle's own checks: the masked-dense reference against independent formulations."""
import pytest
import torch
import torch.nn.functional as F

import spark_kernels as sk
from spark_kernels import reference

from helpers import make_mask


def conv_by_neighbor_table(x, w, b, mask, stride=1):
    sites = sk.ActiveSites(mask)
    out = sites.strided(stride)
    n, c, _, _ = x.shape
    _, ho, wo = out.shape
    k = w.shape[-1]
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)
    padded = torch.cat([rows, rows.new_zeros(1, c)])
    table = sites.strided_neighbors(k, stride).long()
    table[table < 0] = rows.shape[0]
    out_rows = (padded[table] * w.reshape(c, k * k).t()[None]).sum(1) + (0 if b is None else b)
    y = rows.new_zeros(n * ho * wo, c).index_copy(0, out.index.long(), out_rows)
    return y.reshape(n, ho, wo, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("kind", ["random", "spark"])
def test_conv_equals_neighbor_sum(k, kind, stride):
    """The dense (strided) conv of the masked input, masked at the output, equals the sum over the tables'
    taps (9 x 11 is odd: the half blocks at the border at stride 2)."""
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64)
    w = torch.randn(5, 1, k, k, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    mask = make_mask(kind, 2, 9, 11, 0.6)
    torch.testing.assert_close(reference.sparse_depthwise_conv2d(x, w, b, mask, stride),
                               conv_by_neighbor_table(x, w, b, mask, stride))


def test_strided_conv_output_sites_are_the_downsampled_mask():
    """At stride 2 an output site is active iff any input site of its 2x2 block is (SparK's downsample)."""
    mask = make_mask("random", 2, 8, 6, 0.7)
    x, w = torch.randn(2, 3, 8, 6, dtype=torch.float64) + 5, torch.ones(3, 1, 3, 3, dtype=torch.float64)
    y = reference.sparse_depthwise_conv2d(x, w, torch.ones(3, dtype=torch.float64), mask, 2)
    any_child = mask.reshape(2, 1, 4, 2, 3, 2).any(5).any(3)
    assert torch.equal(y[:, :1] != 0, any_child)


def test_conv_all_visible_is_dense_conv():
    x, w, b = torch.randn(2, 4, 6, 5), torch.randn(4, 1, 7, 7), torch.randn(4)
    full = torch.ones(2, 1, 6, 5, dtype=torch.bool)
    torch.testing.assert_close(reference.sparse_depthwise_conv2d(x, w, b, full), F.conv2d(x, w, b, padding=3, groups=4))


def test_conv_inactive_garbage_does_not_leak_and_grad_is_masked():
    mask = make_mask("random", 1, 6, 6, 0.5)
    x = torch.randn(1, 3, 6, 6)
    garbage = torch.where(mask, x, torch.full_like(x, float("nan"))).requires_grad_()
    w = torch.randn(3, 1, 3, 3)
    y = reference.sparse_depthwise_conv2d(garbage, w, None, mask)
    assert torch.isfinite(y).all()
    assert torch.equal(y, reference.sparse_depthwise_conv2d(x, w, None, mask))
    y.sum().backward()
    assert (garbage.grad[~mask.expand_as(x)] == 0).all()


def test_batch_norm_all_visible_is_dense_bn():
    x = torch.randn(3, 4, 5, 6)
    rm1, rv1, rm2, rv2 = torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4)
    w, b = torch.randn(4), torch.randn(4)
    full = torch.ones(3, 1, 5, 6, dtype=torch.bool)
    y = reference.masked_batch_norm(x, full, rm1, rv1, w, b, True, 0.1, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x, rm2, rv2, w, b, True, 0.1, 1e-5))
    torch.testing.assert_close((rm1, rv1), (rm2, rv2))


def test_batch_norm_statistics_over_active_sites_only():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    mask = make_mask("spark", 2, 8, 8, 0.5)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = reference.masked_batch_norm(x, mask, rm, rv, None, None, True, 0.5, 1e-5)
    rows = x.permute(0, 2, 3, 1)[mask[:, 0]]
    mean, var = rows.mean(0), rows.var(0, unbiased=False)
    expected = ((x - mean[:, None, None]) / (var + 1e-5).sqrt()[:, None, None]) * mask
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(rm, 0.5 * mean)
    torch.testing.assert_close(rv, 0.5 + 0.5 * rows.var(0, unbiased=True))


def test_batch_norm_single_and_no_active_site():
    x = torch.randn(1, 2, 3, 3)
    one = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    one[0, 0, 1, 1] = True
    rm, rv = torch.zeros(2), torch.ones(2)
    b = torch.tensor([0.5, -1.0])
    y = reference.masked_batch_norm(x, one, rm, rv, torch.ones(2), b, True, 0.1, 1e-5)
    torch.testing.assert_close(y[0, :, 1, 1], b)
    assert y.abs().sum() == b.abs().sum()
    rm, rv = torch.zeros(2), torch.ones(2)
    y = reference.masked_batch_norm(x, torch.zeros_like(one), rm, rv, None, b, True, 0.1, 1e-5)
    assert torch.equal(y, torch.zeros_like(x))
    assert torch.equal(rm, torch.zeros(2)) and torch.equal(rv, torch.ones(2))


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_all_visible_is_dense_ln(channels_last):
    x = torch.randn(2, 5, 4, 6)  # (N, C, H, W)
    w, b = torch.randn(5), torch.randn(5)
    full = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (5,), w, b, 1e-6)
    if channels_last:
        y = reference.masked_layer_norm(x.permute(0, 2, 3, 1), full, w, b, 1e-6, True)
        torch.testing.assert_close(y, expected)
    else:
        y = reference.masked_layer_norm(x, full, w, b, 1e-6, False)
        torch.testing.assert_close(y, expected.permute(0, 3, 1, 2))


def test_layer_norm_zero_at_inactive_sites():
    x = torch.randn(2, 5, 4, 6)
    mask = make_mask("random", 2, 4, 6, 0.6)
    y = reference.masked_layer_norm(x, mask, torch.ones(5), torch.ones(5), 1e-6, False)
    assert (y * (~mask)).abs().sum() == 0
    assert (y[mask.expand_as(y)] != 0).all()


def test_conv_one_element_and_empty_inputs():
    """A 1 x 1 x 1 x 1 input: the centre tap times x plus the bias (active) or 0 (inactive); an empty
    input gives an empty output."""
    x, w, b = torch.tensor([[[[2.0]]]]), torch.arange(9.0).reshape(1, 1, 3, 3), torch.tensor([0.5])
    on, off = torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.zeros(1, 1, 1, 1, dtype=torch.bool)
    assert reference.sparse_depthwise_conv2d(x, w, b, on).item() == 4.0 * 2.0 + 0.5
    assert reference.sparse_depthwise_conv2d(x, w, b, off).item() == 0.0
    empty = torch.zeros(0, 1, 4, 4)
    assert reference.sparse_depthwise_conv2d(empty, w, b, torch.ones(0, 1, 4, 4, dtype=torch.bool)).shape == empty.shape
