// Unit test of csrc/common/dwconv_site.h (the per-site math shared by the CPU and CUDA kernels) against a
// naive dense "mask the input, conv, mask the output" evaluation, in both layouts the kernels use
// (rows: channel vectors of V lanes; planes: one channel), for k = 3, 5 and 7, on small random cases whose
// kernels overhang the borders. Returns non-zero on failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "common/dwconv_site.h"
#include "common/layout.h"

using spark_kernels::SiteView;

namespace {

int failures = 0;

void expect(bool ok, const char* what, int k, int n, int c, int h, int w) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s (k=%d N=%d C=%d H=%d W=%d)\n", what, k, n, c, h, w);
  }
}

bool close(double a, double b) { return std::fabs(a - b) <= 1e-9 + 1e-9 * std::fabs(b); }

struct Case {
  int n, c, h, w, k;
  std::vector<uint8_t> mask;                  // (N, H, W)
  std::vector<double> x, g, weight;           // x, g: (N, C, H, W); weight (C, k*k)
  std::vector<int32_t> index, neighbors;      // as spark_kernels.ActiveSites builds them
  int64_t sites() const { return int64_t(n) * h * w; }
  int64_t nchw(int ni, int ci, int hi, int wi) const { return ((int64_t(ni) * c + ci) * h + hi) * w + wi; }
  int64_t nhwc(int64_t site, int ci) const { return site * c + ci; }
};

Case make_case(std::mt19937& rng, int n, int c, int h, int w, int k, double keep) {
  Case cs{n, c, h, w, k, {}, {}, {}, {}, {}, {}};
  std::normal_distribution<double> normal;
  std::bernoulli_distribution active(keep);
  for (int64_t s = 0; s < cs.sites(); ++s) cs.mask.push_back(active(rng));
  for (int64_t i = 0; i < cs.sites() * c; ++i) cs.x.push_back(normal(rng)), cs.g.push_back(normal(rng));
  for (int i = 0; i < c * k * k; ++i) cs.weight.push_back(normal(rng));
  const int r = k / 2;
  for (int ni = 0; ni < n; ++ni)
    for (int hi = 0; hi < h; ++hi)
      for (int wi = 0; wi < w; ++wi) {
        const int32_t site = (ni * h + hi) * w + wi;
        if (!cs.mask[site]) continue;
        cs.index.push_back(site);
        for (int dy = -r; dy <= r; ++dy)
          for (int dx = -r; dx <= r; ++dx) {
            const int y = hi + dy, xx = wi + dx;
            const bool inside = y >= 0 && y < h && xx >= 0 && xx < w;
            const int32_t nb = (ni * h + y) * w + xx;
            cs.neighbors.push_back(inside && cs.mask[nb] ? nb : -1);
          }
      }
  return cs;
}

// Dense references: y = mask * conv(mask * x), gx = mask * conv^T(mask * g), gw = sum g * shifted (mask * x).
struct Dense {
  std::vector<double> y, gx, gw;
};

Dense dense_reference(const Case& cs) {
  const int r = cs.k / 2;
  Dense d{std::vector<double>(cs.x.size()), std::vector<double>(cs.x.size()),
          std::vector<double>(cs.weight.size())};
  auto at = [&](const std::vector<double>& t, int ni, int ci, int y, int xx) {
    if (y < 0 || y >= cs.h || xx < 0 || xx >= cs.w || !cs.mask[(ni * cs.h + y) * cs.w + xx]) return 0.0;
    return t[cs.nchw(ni, ci, y, xx)];
  };
  for (int ni = 0; ni < cs.n; ++ni)
    for (int ci = 0; ci < cs.c; ++ci)
      for (int y = 0; y < cs.h; ++y)
        for (int xx = 0; xx < cs.w; ++xx) {
          if (!cs.mask[(ni * cs.h + y) * cs.w + xx]) continue;
          double out = 0, gin = 0;
          for (int dy = -r; dy <= r; ++dy)
            for (int dx = -r; dx <= r; ++dx) {
              const double wv = cs.weight[ci * cs.k * cs.k + (dy + r) * cs.k + (dx + r)];
              out += wv * at(cs.x, ni, ci, y + dy, xx + dx);
              gin += wv * at(cs.g, ni, ci, y - dy, xx - dx);
              d.gw[ci * cs.k * cs.k + (dy + r) * cs.k + (dx + r)] +=
                  cs.g[cs.nchw(ni, ci, y, xx)] * at(cs.x, ni, ci, y + dy, xx + dx);
            }
          d.y[cs.nchw(ni, ci, y, xx)] = out;
          d.gx[cs.nchw(ni, ci, y, xx)] = gin;
        }
  return d;
}

// Planes layout, one channel per call (V = 1): what the planes CPU kernels and the CUDA kernels do.
template <int K>
void check_planes(const Case& cs, const Dense& d) {
  const int64_t hw = int64_t(cs.h) * cs.w;
  bool fwd = true, gin = true, gw_ok = true, valid = true;
  std::vector<double> gw(cs.weight.size());
  for (size_t i = 0; i < cs.index.size(); ++i) {
    const int32_t site = cs.index[i];
    const int ni = static_cast<int>(site / hw);
    const int32_t* taps = &cs.neighbors[i * K * K];
    for (int ci = 0; ci < cs.c; ++ci) {
      const int64_t plane = cs.nchw(ni, ci, 0, 0);
      const SiteView<double> xv{&cs.x[plane], ni * hw, hw, 1}, gv{&cs.g[plane], ni * hw, hw, 1};
      double acc[1] = {0}, gacc[1] = {0};
      valid &= spark_kernels::dwconv_site_gather<K, false, 1>(taps, xv, &cs.weight[ci * K * K], 1, acc);
      valid &= spark_kernels::dwconv_site_gather<K, true, 1>(taps, gv, &cs.weight[ci * K * K], 1, gacc);
      const double gs[1] = {cs.g[plane + site - ni * hw]};
      valid &= spark_kernels::dwconv_site_weight_grad<K, 1>(taps, gs, xv, &gw[ci * K * K], 1);
      fwd &= close(acc[0], d.y[plane + site - ni * hw]);
      gin &= close(gacc[0], d.gx[plane + site - ni * hw]);
    }
  }
  for (size_t i = 0; i < gw.size(); ++i) gw_ok &= close(gw[i], d.gw[i]);
  expect(valid, "planes: valid tables reported invalid", K, cs.n, cs.c, cs.h, cs.w);
  expect(fwd, "planes forward", K, cs.n, cs.c, cs.h, cs.w);
  expect(gin, "planes input gradient", K, cs.n, cs.c, cs.h, cs.w);
  expect(gw_ok, "planes weight gradient", K, cs.n, cs.c, cs.h, cs.w);
}

// Rows layout: channel vectors of V lanes with a per-channel tail, weights transposed to (k*k, C).
template <int K, int V>
void check_rows(const Case& cs, const Dense& d) {
  const int64_t hw = int64_t(cs.h) * cs.w;
  std::vector<double> x_rows(cs.x.size()), g_rows(cs.x.size()), wt(cs.weight.size()), gw(cs.weight.size());
  for (int ni = 0; ni < cs.n; ++ni)
    for (int ci = 0; ci < cs.c; ++ci)
      for (int64_t s = 0; s < hw; ++s) {
        x_rows[cs.nhwc(ni * hw + s, ci)] = cs.x[cs.nchw(ni, ci, 0, 0) + s];
        g_rows[cs.nhwc(ni * hw + s, ci)] = cs.g[cs.nchw(ni, ci, 0, 0) + s];
      }
  for (int ci = 0; ci < cs.c; ++ci)
    for (int t = 0; t < K * K; ++t) wt[t * cs.c + ci] = cs.weight[ci * K * K + t];
  bool fwd = true, gin = true, gw_ok = true, valid = true;
  auto run = [&](auto lanes, int c0, size_t i) {
    constexpr int L = decltype(lanes)::value;
    const int32_t site = cs.index[i];
    const int32_t* taps = &cs.neighbors[i * K * K];
    const SiteView<double> xv{&x_rows[c0], 0, cs.sites(), cs.c}, gv{&g_rows[c0], 0, cs.sites(), cs.c};
    double acc[L] = {}, gacc[L] = {}, gs[L];
    for (int v = 0; v < L; ++v) gs[v] = g_rows[cs.nhwc(site, c0 + v)];
    valid &= spark_kernels::dwconv_site_gather<K, false, L>(taps, xv, &wt[c0], cs.c, acc);
    valid &= spark_kernels::dwconv_site_gather<K, true, L>(taps, gv, &wt[c0], cs.c, gacc);
    valid &= spark_kernels::dwconv_site_weight_grad<K, L>(taps, gs, xv, &gw[c0], cs.c);
    const int ni = static_cast<int>(site / hw);
    for (int v = 0; v < L; ++v) {
      const int64_t dense = cs.nchw(ni, c0 + v, 0, 0) + site - ni * hw;
      fwd &= close(acc[v], d.y[dense]);
      gin &= close(gacc[v], d.gx[dense]);
    }
  };
  const int full = cs.c / V * V;
  for (size_t i = 0; i < cs.index.size(); ++i) {
    for (int c0 = 0; c0 < full; c0 += V) run(std::integral_constant<int, V>{}, c0, i);
    for (int c = full; c < cs.c; ++c) run(std::integral_constant<int, 1>{}, c, i);
  }
  for (int ci = 0; ci < cs.c; ++ci)
    for (int t = 0; t < K * K; ++t) gw_ok &= close(gw[t * cs.c + ci], d.gw[ci * K * K + t]);
  expect(valid, "rows: valid tables reported invalid", K, cs.n, cs.c, cs.h, cs.w);
  expect(fwd, "rows forward", K, cs.n, cs.c, cs.h, cs.w);
  expect(gin, "rows input gradient", K, cs.n, cs.c, cs.h, cs.w);
  expect(gw_ok, "rows weight gradient", K, cs.n, cs.c, cs.h, cs.w);
}

// A corrupt tap (outside the readable sites) is reported and skipped, never read.
template <int K>
void check_corrupt_taps() {
  std::vector<int32_t> taps(K * K, -1);
  taps[0] = 5;   // readable
  taps[1] = 9;   // past the end of a 6-site view
  taps[2] = -7;  // negative but not -1
  const std::vector<double> x = {1, 2, 3, 4, 5, 6};
  const std::vector<double> w(K * K, 1.0);
  const SiteView<double> xv{x.data(), 0, 6, 1};
  double acc[1] = {0};
  const bool valid = spark_kernels::dwconv_site_gather<K, false, 1>(taps.data(), xv, w.data(), 1, acc);
  expect(!valid && acc[0] == 6.0, "corrupt taps are reported and skipped", K, 1, 1, 6, 1);
  // In the planes layout a tap in another image is corrupt too.
  const SiteView<double> plane{x.data(), 6, 6, 1};
  taps.assign(K * K, -1);
  taps[0] = 3;
  acc[0] = 0;
  expect(!spark_kernels::dwconv_site_gather<K, false, 1>(taps.data(), plane, w.data(), 1, acc) && acc[0] == 0.0,
         "taps across images are reported and skipped", K, 2, 1, 3, 1);
}

void check_layout_rule() {
  const int64_t sizes[4] = {2, 3, 4, 5};
  const int64_t nchw[4] = {60, 20, 5, 1}, nhwc[4] = {60, 1, 15, 3}, strided[4] = {120, 40, 10, 2};
  const int64_t one_channel[4] = {2, 1, 4, 5}, one_channel_strides[4] = {20, 1, 5, 1};
  bool ok = !spark_kernels::uses_rows(sizes, nchw) && spark_kernels::uses_rows(sizes, nhwc) &&
            !spark_kernels::uses_rows(sizes, strided) &&
            // both contiguous and channels_last: planes, as in spark_kernels/_layout.py
            !spark_kernels::uses_rows(one_channel, one_channel_strides);
  expect(ok, "layout rule", 0, 2, 3, 4, 5);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const int shapes[][4] = {{1, 1, 5, 6}, {2, 3, 13, 11}, {2, 5, 9, 4}, {1, 9, 3, 2}, {3, 4, 7, 7}};
  for (const auto& s : shapes)
    for (double keep : {1.0, 0.4, 0.0}) {
      const Case c3 = make_case(rng, s[0], s[1], s[2], s[3], 3, keep);
      const Dense d3 = dense_reference(c3);
      check_planes<3>(c3, d3);
      check_rows<3, 4>(c3, d3);
      const Case c5 = make_case(rng, s[0], s[1], s[2], s[3], 5, keep);
      const Dense d5 = dense_reference(c5);
      check_planes<5>(c5, d5);
      check_rows<5, 3>(c5, d5);
      const Case c7 = make_case(rng, s[0], s[1], s[2], s[3], 7, keep);
      const Dense d7 = dense_reference(c7);
      check_planes<7>(c7, d7);
      check_rows<7, 2>(c7, d7);
    }
  check_corrupt_taps<3>();
  check_corrupt_taps<5>();
  check_corrupt_taps<7>();
  check_layout_rule();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all dwconv_site checks passed\n");
  return 0;
}
