// C++ check of the CUDA kernels against plain host computations in double (run by CTest on a GPU;
// exits 77, which CTest reports as skipped, where there is none).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cmath>
#include <cstdio>
#include <tuple>
#include <vector>

namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// (loss, gradient) of one group of rows, SPEC 3, in double.
double group_loss(const std::vector<std::vector<double>>& s, const std::vector<std::vector<double>>& t,
                  std::vector<std::vector<double>>& grad) {
  const size_t P = s.size(), D = s.empty() ? 0 : s[0].size();
  grad.assign(P, std::vector<double>(D, 0.0));
  if (P < 2) return 0.0;
  auto dist = [&](const auto& r, size_t a, size_t b, double& sq) {
    double gab = 0, gaa = 0, gbb = 0;
    for (size_t d = 0; d < D; ++d) gab += r[a][d] * r[b][d], gaa += r[a][d] * r[a][d], gbb += r[b][d] * r[b][d];
    sq = gaa + gbb - 2 * gab;
    return std::sqrt(std::max(sq, 1e-12));
  };
  std::vector<std::vector<double>> ds(P, std::vector<double>(P)), dt = ds, sq = ds;
  double mu_s = 0, mu_t = 0, n = double(P) * (P - 1), tmp;
  for (size_t a = 0; a < P; ++a)
    for (size_t b = 0; b < P; ++b)
      if (a != b) ds[a][b] = dist(s, a, b, sq[a][b]), dt[a][b] = dist(t, a, b, tmp), mu_s += ds[a][b], mu_t += dt[a][b];
  mu_s /= n, mu_t /= n;
  double loss = 0, k = 0;
  for (size_t a = 0; a < P; ++a)
    for (size_t b = 0; b < P; ++b)
      if (a != b) {
        const double x = ds[a][b] / mu_s - dt[a][b] / mu_t;
        loss += std::fabs(x) < 1 ? 0.5 * x * x : std::fabs(x) - 0.5;
        k += std::max(-1.0, std::min(1.0, x)) * ds[a][b];
      }
  for (size_t a = 0; a < P; ++a)
    for (size_t b = 0; b < P; ++b)
      if (a != b && sq[a][b] > 1e-12) {
        const double x = ds[a][b] / mu_s - dt[a][b] / mu_t;
        const double g = (std::max(-1.0, std::min(1.0, x)) / mu_s - k / (mu_s * mu_s * n)) / P;
        for (size_t d = 0; d < D; ++d) grad[a][d] += 2 * g / ds[a][b] * (s[a][d] - s[b][d]);
      }
  return loss / P;
}

double rel_err(const at::Tensor& got, const at::Tensor& want) {
  return (got.to(at::kDouble).cpu() - want).norm().item<double>() / want.norm().item<double>();
}

int failures = 0;
void check(bool ok, const char* what, double value) {
  std::printf("%-44s %s (%.3g)\n", what, ok ? "ok" : "FAILED", value);
  failures += !ok;
}

}  // namespace

int main() {
  if (c10::cuda::device_count() == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  auto& dispatcher = c10::Dispatcher::singleton();
  auto mld = dispatcher.findSchemaOrThrow("l2d_kernels::mld_cuda", "")
                 .typed<Pair(const at::Tensor&, const at::Tensor&, c10::string_view, double, double, bool)>();
  auto led = dispatcher.findSchemaOrThrow("l2d_kernels::led_cuda", "")
                 .typed<Triple(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, bool)>();
  at::manual_seed(0);

  // MLD, batchmean, against the formula in double.
  const int64_t B = 37, C = 53;
  at::Tensor zs = at::randn({B, C}, at::kDouble) * 4, zt = at::randn({B, C}, at::kDouble) * 4;
  auto [loss, grad] = mld.call(zs.to(at::kFloat).cuda(), zt.to(at::kFloat).cuda(), "batchmean", 1e-8, 1.0, true);
  at::Tensor ps = at::sigmoid(zs).clamp(1e-8, 1 - 1e-8), pt = at::sigmoid(zt).clamp(1e-8, 1 - 1e-8);
  at::Tensor want = (pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()).sum() / B;
  check(rel_err(loss, want) < 1e-4, "mld_cuda loss, float32", rel_err(loss, want));
  check(rel_err(grad, (ps - pt) / B) < 1e-4, "mld_cuda gradient, float32", rel_err(grad, (ps - pt) / B));
  auto [loss_only, no_grad] =
      mld.call(zs.to(at::kFloat).cuda(), zt.to(at::kFloat).cuda(), "batchmean", 1e-8, 1.0, false);
  check(at::equal(loss_only, loss) && no_grad.numel() == 0, "mld_cuda without gradient: same loss", 0.0);

  // LED on ragged groups (one label positive everywhere, one image positive for every label).
  const int64_t b = 40, c = 6, D = 45;
  at::Tensor es = at::randn({b, c, D}, at::kDouble), et = at::randn({b, c, D}, at::kDouble);
  at::Tensor y = at::rand({b, c}, at::kDouble) < 0.4;
  y.select(1, 0).fill_(true);
  y.select(0, 3).fill_(true);
  auto [losses, lgrad, ltotal] = led.call(es.to(at::kFloat).cuda(), et.to(at::kFloat).cuda(), y.cuda(), 3.0, 5.0, true);
  at::Tensor want_grad = at::zeros({b, c, D}, at::kDouble);
  auto acc_s = es.accessor<double, 3>(), acc_t = et.accessor<double, 3>();
  auto acc_y = y.accessor<bool, 2>();
  auto acc_g = want_grad.accessor<double, 3>();
  double cd = 0, id = 0;
  for (int family = 0; family < 2; ++family) {
    const int64_t groups = family == 0 ? c : b, members = family == 0 ? b : c;
    for (int64_t g = 0; g < groups; ++g) {
      std::vector<int64_t> rows;
      for (int64_t m = 0; m < members; ++m)
        if (family == 0 ? acc_y[m][g] : acc_y[g][m]) rows.push_back(m);
      std::vector<std::vector<double>> s, t, gr;
      for (int64_t m : rows) {
        s.emplace_back(D), t.emplace_back(D);
        for (int64_t d = 0; d < D; ++d)
          s.back()[d] = family == 0 ? acc_s[m][g][d] : acc_s[g][m][d],
          t.back()[d] = family == 0 ? acc_t[m][g][d] : acc_t[g][m][d];
      }
      const double l = group_loss(s, t, gr);
      (family == 0 ? cd : id) += l;
      for (size_t k = 0; k < rows.size(); ++k)
        for (int64_t d = 0; d < D; ++d)
          (family == 0 ? acc_g[rows[k]][g][d] : acc_g[g][rows[k]][d]) += (family == 0 ? 3.0 : 5.0) * gr[k][d];
    }
  }
  at::Tensor l = losses.cpu();
  const double total = 3 * cd + 5 * id;
  check(std::fabs(l[0].item<double>() - total) < 1e-4 * total, "led_cuda total, float32",
        std::fabs(l[0].item<double>() - total) / total);
  check(at::equal(ltotal.cpu(), l[0]) && ltotal.dim() == 0, "led_cuda total apart, equal to losses[0]", 0.0);
  check(std::fabs(l[1].item<double>() - cd) < 1e-4 * cd, "led_cuda CD", std::fabs(l[1].item<double>() - cd) / cd);
  check(std::fabs(l[2].item<double>() - id) < 1e-4 * id, "led_cuda ID", std::fabs(l[2].item<double>() - id) / id);
  check(rel_err(lgrad, want_grad) < 1e-4, "led_cuda gradient, float32", rel_err(lgrad, want_grad));
  auto [again, again_grad, again_total] =
      led.call(es.to(at::kFloat).cuda(), et.to(at::kFloat).cuda(), y.cuda(), 3.0, 5.0, true);
  check(at::equal(again, losses) && at::equal(again_grad, lgrad) && at::equal(again_total, ltotal),
        "led_cuda bitwise reproducible", 0.0);
  auto [only, none, only_total] =
      led.call(es.to(at::kFloat).cuda(), et.to(at::kFloat).cuda(), y.cuda(), 3.0, 5.0, false);
  check(at::equal(only, losses) && at::equal(only_total, ltotal) && none.numel() == 0,
        "led_cuda without gradient: same losses", 0.0);
  return failures == 0 ? 0 : 1;
}
