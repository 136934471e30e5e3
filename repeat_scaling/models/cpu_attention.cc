// Fused masked softmax attention for XLA:CPU (forward and backward), float32.
//
// The computation of the einsum path of repeat_scaling.models.layers.Attention with
// scale 1, no bias and no dropout:
//   logits = einsum("bqhd,bkhd->bhqk", q, k); logits = where(mask, logits, -1e10)
//   weights = softmax(logits); out = einsum("bhqk,bkhd->bqhd", weights, v)
// done per (batch, head) pair with the pair's rows in cache, keys beyond a row's last
// unmasked key skipped (their weight is exactly 0). A row without any unmasked key gets
// uniform weights, as the finite -1e10 gives there. The backward pass is the VJP of the
// same expression (the where() passes no gradient to masked logits).
//
// Layouts: q [B, Lq, H, D], k and v [B, Lk, H, D], mask [Bm, Hm, Lq, Lk] (bool, Bm in
// {1, B}, Hm in {1, H}), weights [B, H, Lq, Lk] (the forward's second result, kept for the
// backward pass).
//
// Built by repeat_scaling/models/cpu_attention.py with the host's compiler.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kNegInf = -1e10f;  // layers.NEG_INF


constexpr int64_t kW = 16;  // keys per chunk: one vector of kW floats

typedef float V __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t VI __attribute__((vector_size(kW * sizeof(int32_t))));
typedef uint8_t VB __attribute__((vector_size(kW)));

inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

typedef float V8 __attribute__((vector_size(8 * sizeof(float))));
inline V8 load8(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, V8 v) { std::memcpy(p, &v, sizeof(v)); }
inline V splat(float x) { return V{} + x; }
inline float hsum(V v) {
  float t = 0.0f;
  for (int64_t l = 0; l < kW; ++l) t += v[l];
  return t;
}
inline float hmax(V v) {
  float t = v[0];
  for (int64_t l = 1; l < kW; ++l) t = std::max(t, v[l]);
  return t;
}

// exp(x) for x <= 0 (a logit minus its row's maximum): Cody-Waite reduction to
// r in [-ln2/2, ln2/2] and a degree-6 polynomial; below -87.3 it is 0.
inline V exp_nonpositive(V x) {
  const VI underflow = x < -87.3f;
  x = underflow ? splat(-87.3f) : x;
  const V t = x * 1.44269504088896341f;
  const VI n = __builtin_convertvector(t - 0.5f, VI);  // round to nearest (t <= 0)
  const V nf = __builtin_convertvector(n, V);
  const V r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  V p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI bits = (n + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? V{} : p * scale;
}

struct Shape {
  int64_t B, Lq, Lk, H, D, Bm, Hm;
  const bool* mask_row(const bool* mask, int64_t b, int64_t h, int64_t i) const {
    const int64_t bm = Bm == 1 ? 0 : b, hm = Hm == 1 ? 0 : h;
    return mask + ((bm * Hm + hm) * Lq + i) * Lk;
  }
};

// Runs fn(pair) for pair in [0, n) on up to `threads` threads.
template <typename Fn>
void parallel_for(int64_t n, Fn fn) {
  static const int64_t kThreads = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min<int64_t>(kThreads, n);
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t p; (p = next.fetch_add(1)) < n;) fn(p);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

inline int64_t round_up(int64_t n) { return (n + kW - 1) / kW * kW; }

// The (b, h) rows of x [B, L, H, D], transposed to [D, Lp] (zero past L).
template <int64_t DT>
void gather_t(const float* x, const Shape& s, int64_t L, int64_t b, int64_t h, float* t,
              int64_t Lp) {
  const int64_t D = DT ? DT : s.D;
  std::fill(t, t + D * Lp, 0.0f);
  for (int64_t l = 0; l < L; ++l) {
    const float* src = x + ((b * L + l) * s.H + h) * D;
    for (int64_t d = 0; d < D; ++d) t[d * Lp + l] = src[d];
  }
}

// The (b, h) rows of x [B, L, H, D] as [Lp, D] (zero past L).
template <int64_t DT>
void gather_rows(const float* x, const Shape& s, int64_t L, int64_t b, int64_t h, float* r,
                 int64_t Lp) {
  const int64_t D = DT ? DT : s.D;
  std::fill(r, r + D * Lp, 0.0f);
  for (int64_t l = 0; l < L; ++l) {
    const float* src = x + ((b * L + l) * s.H + h) * D;
    for (int64_t d = 0; d < D; ++d) r[l * D + d] = src[d];
  }
}

// valid[j] = mask[j] for j < Lk, 0 past it (Lp floats); returns one past the last valid
// key (0: none). `bytes` is scratch of Lp bytes.
inline int64_t mask_row(const bool* m, int64_t Lk, int64_t Lp, uint8_t* bytes, float* valid) {
  std::memcpy(bytes, m, Lk);
  std::memset(bytes + Lk, 0, Lp - Lk);
  int64_t end = Lk;
  while (end > 0 && !bytes[end - 1]) --end;
  for (int64_t j0 = 0; j0 < Lp; j0 += kW) {
    VB vb;
    std::memcpy(&vb, bytes + j0, kW);
    store(valid + j0, __builtin_convertvector(vb, V));
  }
  return end;
}

// sc[j] = q . kt[:, j] for the chunks below `end` (scores of one query row).
template <int64_t DT>
inline void scores_row(const float* qi, const float* kt, int64_t D_, int64_t Lp, int64_t end,
                       float* sc) {
  const int64_t D = DT ? DT : D_;
  for (int64_t j0 = 0; j0 < end; j0 += kW) {
    float acc[kW] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float qd = qi[d];
      const float* kd = kt + d * Lp + j0;
      for (int64_t l = 0; l < kW; ++l) acc[l] += qd * kd[l];
    }
    for (int64_t l = 0; l < kW; ++l) sc[j0 + l] = acc[l];
  }
}

// out[d] = sum_{j < n} w[j] * rows[j * D + d] (a weighted sum of n rows of width D).
template <int64_t DT>
inline void weighted_rows(const float* w, const float* rows, int64_t n, int64_t D_,
                          float* out) {
  if constexpr (DT > 0 && DT % 8 == 0) {
    constexpr int64_t K = DT / 8;  // vectors of 8 per row; two rows per iteration
    V8 a0[K] = {}, a1[K] = {};
    int64_t j = 0;
    for (; j + 1 < n; j += 2) {
      const float* r0 = rows + j * DT;
      for (int64_t c = 0; c < K; ++c) {
        a0[c] += w[j] * load8(r0 + 8 * c);
        a1[c] += w[j + 1] * load8(r0 + DT + 8 * c);
      }
    }
    if (j < n)
      for (int64_t c = 0; c < K; ++c) a0[c] += w[j] * load8(rows + j * DT + 8 * c);
    for (int64_t c = 0; c < K; ++c) store8(out + 8 * c, a0[c] + a1[c]);
  } else {
    std::fill(out, out + D_, 0.0f);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D_; ++d) out[d] += w[j] * rows[j * D_ + d];
  }
}

template <int64_t DT>
void forward_pair(const Shape& s, int64_t pair, const float* q, const float* k,
                  const float* v, const bool* mask, float* out, float* weights) {
  const int64_t b = pair / s.H, h = pair % s.H, D = DT ? DT : s.D, Lk = s.Lk;
  const int64_t Lp = round_up(Lk);
  std::vector<float> kt(D * Lp), vr(D * Lp), sc(Lp), valid(Lp);
  std::vector<uint8_t> bytes(Lp);
  gather_t<DT>(k, s, Lk, b, h, kt.data(), Lp);
  gather_rows<DT>(v, s, Lk, b, h, vr.data(), Lp);
  for (int64_t i = 0; i < s.Lq; ++i) {
    const float* qi = q + ((b * s.Lq + i) * s.H + h) * D;
    float* wi = weights + (pair * s.Lq + i) * Lk;
    float* oi = out + ((b * s.Lq + i) * s.H + h) * D;
    const int64_t end = mask_row(s.mask_row(mask, b, h, i), Lk, Lp, bytes.data(), valid.data());
    int64_t wend = round_up(end);
    float* p = sc.data();
    if (end == 0) {  // every key masked: softmax of equal logits
      std::fill(p, p + Lp, 0.0f);
      std::fill(p, p + Lk, 1.0f / static_cast<float>(Lk));
      wend = Lp;
    } else {
      scores_row<DT>(qi, kt.data(), D, Lp, wend, p);
      V mx = splat(kNegInf);
      for (int64_t j0 = 0; j0 < wend; j0 += kW) {
        const V x = load(valid.data() + j0) != 0.0f ? load(p + j0) : splat(kNegInf);
        store(p + j0, x);
        mx = x > mx ? x : mx;
      }
      const float m = hmax(mx);
      V sum{};
      for (int64_t j0 = 0; j0 < wend; j0 += kW) {
        // masked keys (and the padding past Lk) weigh exactly 0
        const V e = load(valid.data() + j0) != 0.0f ? exp_nonpositive(load(p + j0) - m) : V{};
        store(p + j0, e);
        sum += e;
      }
      const float total = hsum(sum);
      for (int64_t j0 = 0; j0 < wend; j0 += kW) store(p + j0, load(p + j0) / total);
    }
    std::copy(p, p + std::min(wend, Lk), wi);
    std::fill(wi + std::min(wend, Lk), wi + Lk, 0.0f);
    weighted_rows<DT>(p, vr.data(), wend, D, oi);
  }
}

template <int64_t DT>
void backward_pair(const Shape& s, int64_t pair, const float* q, const float* k,
                   const float* v, const bool* mask, const float* weights, const float* dout,
                   float* dq, float* dk, float* dv) {
  const int64_t b = pair / s.H, h = pair % s.H, D = DT ? DT : s.D, Lk = s.Lk;
  const int64_t Lp = round_up(Lk);
  std::vector<float> kr(D * Lp), vt(D * Lp), dkt(D * Lp, 0.0f), dvt(D * Lp, 0.0f);
  std::vector<float> w(Lp), dw(Lp), valid(Lp), g(D), qv(D);
  std::vector<uint8_t> bytes(Lp);
  gather_rows<DT>(k, s, Lk, b, h, kr.data(), Lp);
  gather_t<DT>(v, s, Lk, b, h, vt.data(), Lp);
  for (int64_t i = 0; i < s.Lq; ++i) {
    const float* qi = q + ((b * s.Lq + i) * s.H + h) * D;
    const float* gi = dout + ((b * s.Lq + i) * s.H + h) * D;
    const float* wrow = weights + (pair * s.Lq + i) * Lk;
    std::copy(gi, gi + D, g.begin());
    std::copy(qi, qi + D, qv.begin());
    const int64_t end = mask_row(s.mask_row(mask, b, h, i), Lk, Lp, bytes.data(), valid.data());
    const int64_t wend = end == 0 ? Lp : round_up(end);  // keys with a nonzero weight
    std::copy(wrow, wrow + std::min(wend, Lk), w.begin());
    std::fill(w.begin() + std::min(wend, Lk), w.begin() + wend, 0.0f);
    // dv[j] += w[i, j] * g[i]
    for (int64_t d = 0; d < D; ++d) {
      const float gd = g[d];
      float* dvd = dvt.data() + d * Lp;
      for (int64_t j0 = 0; j0 < wend; j0 += kW)
        for (int64_t l = 0; l < kW; ++l) dvd[j0 + l] += w[j0 + l] * gd;
    }
    float* dqo = dq + ((b * s.Lq + i) * s.H + h) * D;
    if (end == 0) {  // no logit of this row reaches q or k
      std::fill(dqo, dqo + D, 0.0f);
      continue;
    }
    // dweights[j] = g[i] . v[j]; dlogits = w * (dweights - sum(w * dweights)), 0 if masked
    scores_row<DT>(g.data(), vt.data(), D, Lp, wend, dw.data());
    V dots{};
    for (int64_t j0 = 0; j0 < wend; j0 += kW) dots += load(w.data() + j0) * load(dw.data() + j0);
    const float dot = hsum(dots);
    for (int64_t j0 = 0; j0 < wend; j0 += kW) {
      const V ds = load(w.data() + j0) * (load(dw.data() + j0) - dot);
      store(dw.data() + j0, load(valid.data() + j0) != 0.0f ? ds : V{});
    }
    // dq[i] = sum_j dlogits[j] k[j]; dk[j] += dlogits[j] q[i]
    weighted_rows<DT>(dw.data(), kr.data(), wend, D, dqo);
    for (int64_t d = 0; d < D; ++d) {
      const float qd = qv[d];
      float* dkd = dkt.data() + d * Lp;
      for (int64_t j0 = 0; j0 < wend; j0 += kW)
        for (int64_t l = 0; l < kW; ++l) dkd[j0 + l] += dw[j0 + l] * qd;
    }
  }
  for (int64_t j = 0; j < Lk; ++j) {
    float* dkj = dk + ((b * Lk + j) * s.H + h) * D;
    float* dvj = dv + ((b * Lk + j) * s.H + h) * D;
    for (int64_t d = 0; d < D; ++d) {
      dkj[d] = dkt[d * Lp + j];
      dvj[d] = dvt[d * Lp + j];
    }
  }
}

// Calls fn.template operator()<D>() with D a compile-time head size where one is common.
template <typename Fn>
void with_head_dim(int64_t D, Fn fn) {
  switch (D) {
    case 8: fn(std::integral_constant<int64_t, 8>()); break;
    case 16: fn(std::integral_constant<int64_t, 16>()); break;
    case 32: fn(std::integral_constant<int64_t, 32>()); break;
    case 64: fn(std::integral_constant<int64_t, 64>()); break;
    default: fn(std::integral_constant<int64_t, 0>()); break;
  }
}

ffi::Error shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                    ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& mask, Shape* s) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 4)
    return ffi::Error::InvalidArgument("cpu_fused attention: q, k, v and mask must be rank 4");
  *s = Shape{qd[0], qd[1], kd[1], qd[2], qd[3], md[0], md[1]};
  bool ok = kd[0] == s->B && kd[2] == s->H && kd[3] == s->D;
  ok = ok && vd[0] == kd[0] && vd[1] == kd[1] && vd[2] == kd[2] && vd[3] == kd[3];
  ok = ok && (s->Bm == 1 || s->Bm == s->B) && (s->Hm == 1 || s->Hm == s->H);
  ok = ok && md[2] == s->Lq && md[3] == s->Lk;
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cpu_fused attention: expected q [B, Lq, H, D], k and v [B, Lk, H, D], mask "
        "[1|B, 1|H, Lq, Lk]");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> weights) {
  Shape s;
  if (auto e = shape_of(q, k, v, mask, &s); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float *op = out->typed_data(), *wp = weights->typed_data();
  with_head_dim(s.D, [&](auto dt) {
    parallel_for(s.B * s.H, [&](int64_t p) {
      forward_pair<decltype(dt)::value>(s, p, qp, kp, vp, mp, op, wp);
    });
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> weights,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape s;
  if (auto e = shape_of(q, k, v, mask, &s); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *wp = weights.typed_data(), *gp = dout.typed_data();
  const bool* mp = mask.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  with_head_dim(s.D, [&](auto dt) {
    parallel_for(s.B * s.H, [&](int64_t p) {
      backward_pair<decltype(dt)::value>(s, p, qp, kp, vp, mp, wp, gp, dqp, dkp, dvp);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
