// The CPU layer_norm kernels called directly (no Python), checked against a double-precision
// computation on random rows of awkward widths: forward with residual + dropout, and backward.
// Run under -DFF_SANITIZE=address to catch out-of-bounds access in the kernels.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "layer_norm/layer_norm.h"

namespace {
int failures = 0;

void check_close(const char* what, double got, double want, double tol) {
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    if (failures < 10) std::fprintf(stderr, "FAIL %s: got %.8g want %.8g\n", what, got, want);
    ++failures;
  }
}

void run(int64_t M, int64_t N, bool rms, double p) {
  std::mt19937 gen(static_cast<uint32_t>(M * 131 + N));
  std::normal_distribution<float> normal;
  std::vector<float> x(M * N), res(M * N), w(N), b(N), dy(M * N);
  for (auto* v : {&x, &res, &dy}) for (float& e : *v) e = normal(gen);
  for (float& e : w) e = normal(gen);
  for (float& e : b) e = normal(gen);
  std::vector<float> y(M * N), h(M * N), mean(M), rstd(M), dh(M * N), dx(M * N), dw(N), db(N);

  ff::layer_norm::FwdParams f{};
  f.x = x.data(), f.residual = res.data(), f.weight = w.data(), f.bias = rms ? nullptr : b.data();
  f.y = y.data(), f.h = h.data(), f.mean = rms ? nullptr : mean.data(), f.rstd = rstd.data();
  f.M = M, f.N = N, f.eps = 1e-5f, f.rms = rms, f.dropout = ff::make_dropout(p, 99, 3);
  f.dtype = f.wtype = c10::kFloat;
  ff::layer_norm::fwd_cpu(f);

  ff::layer_norm::BwdParams g{};
  g.dy = dy.data(), g.dh_out = nullptr, g.h = h.data(), g.weight = w.data(), g.mean = f.mean, g.rstd = rstd.data();
  g.dh = dh.data(), g.dx = p > 0 ? dx.data() : nullptr,  // dx exists only with dropout
   g.dweight = dw.data(), g.dbias = rms ? nullptr : db.data();
  g.M = M, g.N = N, g.rms = rms, g.dropout = f.dropout, g.dtype = g.wtype = c10::kFloat;
  ff::layer_norm::bwd_cpu(g);

  std::vector<double> dw_ref(N, 0.0), db_ref(N, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    std::vector<double> hv(N);
    double s = 0, ss = 0;
    for (int64_t c = 0; c < N; ++c) {
      hv[c] = x[m * N + c] * ff::dropout_multiplier(f.dropout, m * N + c) + res[m * N + c];
      check_close("h", h[m * N + c], hv[c], 1e-6);
      s += hv[c];
    }
    const double mu = rms ? 0.0 : s / N;
    for (int64_t c = 0; c < N; ++c) ss += (hv[c] - mu) * (hv[c] - mu);
    const double r = 1.0 / std::sqrt(ss / N + 1e-5);
    check_close("rstd", rstd[m], r, 1e-5);
    double sgx = 0, sg = 0;
    for (int64_t c = 0; c < N; ++c) {
      const double xhat = (hv[c] - mu) * r;
      check_close("y", y[m * N + c], xhat * w[c] + (rms ? 0.0 : b[c]), 2e-5);
      sgx += dy[m * N + c] * w[c] * xhat;
      sg += dy[m * N + c] * w[c];
      dw_ref[c] += dy[m * N + c] * xhat;
      db_ref[c] += dy[m * N + c];
    }
    for (int64_t c = 0; c < N; ++c) {
      const double xhat = (hv[c] - mu) * r, g_ = dy[m * N + c] * w[c];
      const double dhv = r * (g_ - xhat * sgx / N - (rms ? 0.0 : sg / N));
      check_close("dh", dh[m * N + c], dhv, 1e-4);
      if (p > 0) check_close("dx", dx[m * N + c], dhv * ff::dropout_multiplier(f.dropout, m * N + c), 1e-4);
    }
  }
  for (int64_t c = 0; c < N; ++c) {
    check_close("dweight", dw[c], dw_ref[c], 1e-4);
    if (!rms) check_close("dbias", db[c], db_ref[c], 1e-4);
  }
}
}  // namespace

int main() {
  for (int64_t N : {1, 7, 1023, 1500})
    for (bool rms : {false, true}) run(N == 1500 ? 3 : 70, N, rms, N % 2 ? 0.2 : 0.0);
  if (failures) {
    std::fprintf(stderr, "%d mismatches\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("layer_norm_cpu: all checks passed\n");
  return EXIT_SUCCESS;
}
