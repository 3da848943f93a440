// Checks the shared per-site norm math (common/norm_row.h) against naive double-precision formulas:
// LayerNorm row statistics, forward and input gradient (the latter against central finite
// differences of the naive forward), the per-channel BN/LN terms, the GroupNorm affine maps and the chunked
// reduction helpers.
// Returns non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/norm_row.h"

namespace {

namespace norm = spark_kernels::norm;

int failures = 0;

void expect_close(double got, double want, double tol, const char* what, long long c) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s [%lld]: got %.17g, want %.17g\n", what, c, got, want);
    ++failures;
  }
}

// Naive LayerNorm of one row in double: y = (x - mean) / sqrt(var + eps) * w + b.
std::vector<double> naive_forward(const std::vector<double>& x, const std::vector<double>& w,
                                  const std::vector<double>& b, double eps) {
  const double n = static_cast<double>(x.size());
  double mean = 0;
  for (double v : x) mean += v;
  mean /= n;
  double var = 0;
  for (double v : x) var += (v - mean) * (v - mean);
  var /= n;
  std::vector<double> y(x.size());
  for (size_t c = 0; c < x.size(); ++c) y[c] = (x[c] - mean) / std::sqrt(var + eps) * w[c] + b[c];
  return y;
}

// Row math for `channels` values laid out with `stride`, storage type T, accumulation Acc.
template <typename T, typename Acc>
void check_row(long long channels, long long stride, double tol, bool affine, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const double eps = 1e-5;
  std::vector<double> x(channels), dy(channels), w(channels, 1.0), b(channels, 0.0);
  for (auto& v : x) v = 3.0 + 2.0 * normal(rng);  // an offset mean exercises the centering
  for (auto& v : dy) v = normal(rng);
  if (affine) {
    for (auto& v : w) v = normal(rng);
    for (auto& v : b) v = normal(rng);
  }
  std::vector<T> xs(channels * stride, T(0)), dys(channels * stride, T(0)), ys(channels * stride, T(0)),
      dxs(channels * stride, T(0));
  std::vector<Acc> wa(w.begin(), w.end()), ba(b.begin(), b.end());
  for (long long c = 0; c < channels; ++c) {
    xs[c * stride] = static_cast<T>(x[c]);
    dys[c * stride] = static_cast<T>(dy[c]);
  }
  for (long long c = 0; c < channels; ++c) {  // the naive formulas see the rounded inputs
    x[c] = static_cast<double>(xs[c * stride]);
    dy[c] = static_cast<double>(dys[c * stride]);
  }
  const Acc* wp = affine ? wa.data() : nullptr;
  const Acc* bp = affine ? ba.data() : nullptr;

  const auto s = norm::row_stats<Acc>(xs.data(), stride, channels, static_cast<Acc>(eps));
  double mean = 0, var = 0;
  for (double v : x) mean += v;
  mean /= channels;
  for (double v : x) var += (v - mean) * (v - mean);
  var /= channels;
  expect_close(s.mean, mean, tol, "row_stats mean", channels);
  expect_close(s.rstd, 1.0 / std::sqrt(var + eps), tol, "row_stats rstd", channels);

  norm::row_forward<Acc>(xs.data(), stride, ys.data(), stride, channels, s, wp, bp);
  const auto want = naive_forward(x, w, b, eps);
  for (long long c = 0; c < channels; ++c) expect_close(ys[c * stride], want[c], tol, "row_forward", c);

  // dx_c = d/dx_c sum_k dy_k * y_k, by central differences of the naive forward.
  norm::row_backward<Acc>(dys.data(), stride, xs.data(), stride, dxs.data(), stride, channels, s, wp);
  const double h = 1e-5;
  for (long long c = 0; c < channels; ++c) {
    auto xp = x, xm = x;
    xp[c] += h;
    xm[c] -= h;
    const auto yp = naive_forward(xp, w, b, eps), ym = naive_forward(xm, w, b, eps);
    double numeric = 0;
    for (long long k = 0; k < channels; ++k) numeric += dy[k] * (yp[k] - ym[k]) / (2 * h);
    expect_close(dxs[c * stride], numeric, std::max(tol, 1e-6), "row_backward", c);
  }
  // In place (dx aliasing dy) gives the same result.
  std::vector<T> inplace = dys;
  norm::row_backward<Acc>(inplace.data(), stride, xs.data(), stride, inplace.data(), stride, channels, s, wp);
  for (long long c = 0; c < channels; ++c) expect_close(inplace[c * stride], dxs[c * stride], 0, "in place", c);
}

void check_terms_and_reductions() {
  double a, b;
  norm::BnBackwardTerms<double>()(2.0, 5.0, 1.5, a, b);
  expect_close(a, 2.0, 0, "bn backward term dy", 0);
  expect_close(b, 7.0, 0, "bn backward term dy*(x-mean)", 0);
  norm::LnParamGradTerms<double>()(2.0, 5.0, 1.0, 0.5, a, b);
  expect_close(a, 4.0, 0, "ln param term dy*xhat", 0);
  expect_close(b, 2.0, 0, "ln param term dy", 0);
  expect_close(norm::bn_affine(2.0, 3.0, -1.0), 5.0, 0, "bn_affine", 0);
  expect_close(norm::bn_backward_elem(1.0, 2.0, 3.0, 4.0, 5.0), 16.0, 0, "bn_backward_elem", 0);

  // The chunking depends on the channel count only and covers every site exactly once.
  for (long long channels : {1LL, 3LL, 96LL, 97LL, 768LL, 20000LL}) {
    const long long per = norm::sites_per_chunk(channels);
    if (per < norm::kMinChunkSites || (per > norm::kMinChunkSites && per * channels > norm::kChunkElements)) {
      std::printf("FAIL sites_per_chunk(%lld) = %lld\n", channels, per);
      ++failures;
    }
    for (long long sites : {0LL, 1LL, per, per + 1, 10 * per - 1}) {
      const long long chunks = norm::num_chunks(sites, per);
      if (chunks * per < sites || (chunks > 0 && (chunks - 1) * per >= sites)) {
        std::printf("FAIL num_chunks(%lld, %lld) = %lld\n", sites, per, chunks);
        ++failures;
      }
    }
  }
  // combine_rows adds each column of a (chunks, width) table in chunk order.
  const float partials[] = {1.f, 10.f, 2.f, 20.f, 3.f, 30.f};
  double totals[2] = {-1, -1};
  norm::combine_rows(partials, 3, 2, totals);
  expect_close(totals[0], 6.0, 0, "combine_rows", 0);
  expect_close(totals[1], 60.0, 0, "combine_rows", 1);
  norm::combine_rows(partials, 0, 2, totals);
  expect_close(totals[1], 0.0, 0, "combine_rows empty", 1);
}

// BN statistics (ShiftedSums per partial, Moments merged across partials) in float against a two-pass
// double evaluation, with the mean offset by up to 1e4 standard deviations: the relative error of M2
// stays at float rounding level (E[x^2] - E[x]^2 in float would lose every digit at 1e4).
void check_bn_moments() {
  std::mt19937 rng(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (double offset : {0.0, 1e2, 1e4, -1e4}) {
    for (double scale : {1e-3, 1.0, 1e3}) {
      for (long long count : {1LL, 2LL, 7LL, 1000LL}) {
        std::vector<float> x(count);
        for (auto& v : x) v = static_cast<float>((offset + normal(rng)) * scale);
        double mean = 0, m2 = 0;
        for (float v : x) mean += v;
        mean /= count;
        for (float v : x) m2 += (v - mean) * (v - mean);
        // Partials of uneven sizes (the last one empty), merged in order relative to the first pivot.
        const long long bounds[] = {0, count / 3, count / 3 + (count > 1), count, count};
        std::vector<norm::ShiftedSums<float>> parts(4, norm::ShiftedSums<float>{});
        for (int k = 0; k < 4; ++k) {
          for (long long i = bounds[k]; i < bounds[k + 1]; ++i) parts[k].add(x[i]);
        }
        const float reference = parts[0].count ? parts[0].pivot : parts[1].pivot;
        norm::Moments<float> merged{};
        for (const auto& part : parts) merged.merge(norm::moments_of(part, reference));
        expect_close(merged.count, static_cast<double>(count), 0, "moments count", count);
        // float rounding of the mean's magnitude, and a 1e-5 relative error of the variance.
        const double got_mean = reference + static_cast<double>(merged.offset), var = m2 / count;
        if (!(std::fabs(got_mean - mean) <= 1e-6 * (std::fabs(mean) + scale)) ||
            !(std::fabs(merged.m2 / count - var) <= 1e-5 * var)) {
          std::printf("FAIL moments offset %g scale %g count %lld: mean %.9g (want %.9g), var %.9g (want %.9g)\n",
                      offset, scale, count, got_mean, mean, merged.m2 / count, var);
          ++failures;
        }
      }
    }
  }
  // Merging into an empty Moments copies; merging an empty one changes nothing.
  norm::Moments<double> m{};
  m.merge({2.0, 1.5, 0.5});
  m.merge({});
  expect_close(m.count, 2.0, 0, "merge into empty count", 0);
  expect_close(m.offset, 1.5, 0, "merge into empty offset", 0);
  expect_close(m.m2, 0.5, 0, "merge into empty m2", 0);
  m.merge({1.0, 4.5, 0.0});  // values {1, 2} and {4.5}: mean 2.5, M2 = 2.25 + 0.25 + 4
  expect_close(m.offset, 2.5, 1e-15, "merge mean", 0);
  expect_close(m.m2, 0.5 + 9.0 * 2.0 / 3.0, 1e-15, "merge m2", 0);
}

// The GroupNorm affine maps centre x before scaling: far from 0 (x = 1e4 + 0.25 in float, the centre 1e4, a
// scale that float cannot hold exactly), (x - c) * s + t keeps float's precision of the result, where
// x * s + (t - c * s) would round x * s ~ 1e3 first and lose ~1e-4 to cancellation.
void check_gn_maps() {
  const float x = 10000.25f, center = 10000.0f, scale = 0.1f, shift = 0.5f;
  const double want = 0.25 * double(scale) + 0.5;
  expect_close(norm::gn_affine<float>(x, center, scale, shift), want, 2e-7, "gn_affine", 0);
  expect_close(norm::gn_backward_elem<float>(2.0f, x, center, 0.5f, scale, shift), 1.0 + want, 2e-7,
               "gn_backward_elem", 0);
}

}  // namespace

int main() {
  unsigned seed = 1;
  for (long long channels : {1LL, 2LL, 3LL, 8LL, 96LL, 97LL, 768LL}) {
    for (bool affine : {false, true}) {
      for (long long stride : {1LL, 5LL}) {
        check_row<double, double>(channels, stride, 1e-9, affine, seed++);
        check_row<float, float>(channels, stride, 2e-4, affine, seed++);
      }
    }
  }
  check_terms_and_reductions();
  check_bn_moments();
  check_gn_maps();
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("norm_row: all checks passed\n");
  return 0;
}
