// Fused masked softmax attention for XLA:CPU (forward and backward), float32.
//
// The computation of the einsum path of repeat_scaling.models.layers.Attention with
// scale 1, no bias and no dropout:
//   logits = einsum("bqhd,bkhd->bhqk", q, k); logits = where(mask, logits, -1e10)
//   weights = softmax(logits); out = einsum("bhqk,bkhd->bqhd", weights, v)
// done per (batch, head) pair with the pair's rows in cache, kR query rows at a time,
// keys beyond a row's last unmasked key skipped (their weight is exactly 0). A row without
// any unmasked key gets uniform weights, as the finite -1e10 gives there. The backward pass is the VJP of the
// same expression (the where() passes no gradient to masked logits).
//
// q and k arrive before their rotary embedding, which the kernel applies to each row as it
// loads it (layers.rotate's float operations, in the same order) from the tables sin and
// cos of the query and key positions; their gradients leave through the transposed
// rotation. XLA:CPU would otherwise recompute the tables' sines and cosines in every pass
// over q and k and their gradients.
//
// Layouts: q [B, Lq, H, D] (D in 8, 16, 32, 64, 128), k and v [B, Lk, H, D], mask
// [Bm, Hm, Lq, Lk] (bool, Bm in {1, B}, Hm in {1, H}), the rotary tables of the queries
// [Bt, Lq, D/2] and of the keys [Bt, Lk, D/2] (Bt in {1, B}), weights [B, H, Lq, Lk] (the
// forward's second result, kept for the backward pass, which reads a row only up to E, the
// last unmasked key of its block of kR rows rounded up to a chunk: the rest is not written).
//
// Built by repeat_scaling/models/cpu_attention.py with the host's compiler.

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
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

inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

typedef float V8 __attribute__((vector_size(8 * sizeof(float))));  // rows of head size 8
inline V splat(float x) { return V{} + x; }
// The sum and the maximum of a vector's lanes by halving it (a tree: 4 dependent steps,
// not 15).
template <typename Op>
inline float reduce_lanes(V v, Op op) {
  typedef float V4 __attribute__((vector_size(4 * sizeof(float))));
  V8 lo8, hi8;
  std::memcpy(&lo8, &v, sizeof(lo8));
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof(lo8), sizeof(hi8));
  const V8 a = op(lo8, hi8);
  V4 lo4, hi4;
  std::memcpy(&lo4, &a, sizeof(lo4));
  std::memcpy(&hi4, reinterpret_cast<const char*>(&a) + sizeof(lo4), sizeof(hi4));
  const V4 b = op(lo4, hi4);
  return op(op(b[0], b[2]), op(b[1], b[3]));
}
inline float hsum(V v) {
  return reduce_lanes(v, [](auto x, auto y) { return x + y; });
}
inline float hmax(V v) {
  return reduce_lanes(v, [](auto x, auto y) { return x > y ? x : y; });
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
  int64_t B, Lq, Lk, H, D, Bm, Hm, Bt;
  const bool* mask_row(const bool* mask, int64_t b, int64_t h, int64_t i) const {
    const int64_t bm = Bm == 1 ? 0 : b, hm = Hm == 1 ? 0 : h;
    return mask + ((bm * Hm + hm) * Lq + i) * Lk;
  }
};

// The rotary tables of the queries and the keys: [Bt, Lq, D/2] and [Bt, Lk, D/2].
struct Rope {
  const float *sin_q, *cos_q, *sin_k, *cos_k;
  // where the table row of position l (of L) of example b starts
  static int64_t offset(const Shape& s, int64_t b, int64_t L, int64_t l) {
    return ((s.Bt == 1 ? 0 : b) * L + l) * (s.D / 2);
  }
};

// Rotary embedding of one row (rotate-half): [x1 c - x2 s, x2 c + x1 s] with x = [x1, x2].
template <int64_t D>
inline void rotate(const float* x, const float* s, const float* c, float* out) {
  constexpr int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) {
    out[d] = x[d] * c[d] - x[d + h] * s[d];
    out[d + h] = x[d + h] * c[d] + x[d] * s[d];
  }
}

// Its transpose (the gradient of the row before rotation): [g1 c + g2 s, g2 c - g1 s].
template <int64_t D>
inline void unrotate(const float* g, const float* s, const float* c, float* out) {
  constexpr int64_t h = D / 2;
  for (int64_t d = 0; d < h; ++d) {
    out[d] = g[d] * c[d] + g[d + h] * s[d];
    out[d + h] = g[d + h] * c[d] - g[d] * s[d];
  }
}

// The CPUs this process may run on (its affinity mask: a SLURM or taskset share).
int64_t usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// The scratch buffers of one thread, kept across calls (no allocation per pair or call):
// take(n) hands out the next buffer of n T's, contents unspecified; reset() starts over,
// rewind(mark()) hands out again the buffers taken after the mark.
class Scratch {
 public:
  void reset() { next_ = 0; }
  size_t mark() const { return next_; }
  void rewind(size_t mark) { next_ = mark; }
  template <typename T>
  T* take(int64_t n) {
    if (next_ == bufs_.size()) bufs_.emplace_back();
    std::vector<unsigned char>& b = bufs_[next_++];
    const size_t bytes = static_cast<size_t>(n) * sizeof(T);
    if (b.size() < bytes) b.resize(bytes);
    return reinterpret_cast<T*>(b.data());
  }

 private:
  std::vector<std::vector<unsigned char>> bufs_;
  size_t next_ = 0;
};

// Runs fn(item, scratch) for item in [0, n) on the calling thread and on XLA:CPU's
// intra-op threads (the pool that runs the step's other ops: no thread of its own competes
// with them for the cores), each thread with its own Scratch (reset before every item).
// A helper that starts late, once every item is taken, returns at once; the call returns
// when every item is done.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct Loop {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* item = nullptr;  // valid while done < n
  };
  const std::function<void(int64_t)> item = [&](int64_t i) {
    thread_local Scratch scratch;
    scratch.reset();
    fn(i, scratch);
  };
  auto loop = std::make_shared<Loop>();
  loop->n = n;
  loop->item = &item;
  auto work = [loop] {
    for (int64_t i; (i = loop->next.fetch_add(1)) < loop->n;) {
      (*loop->item)(i);
      loop->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min(std::min(pool.num_threads(), usable_cpus()), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (loop->done.load(std::memory_order_acquire) < n) sched_yield();
}

inline int64_t round_up(int64_t n) { return (n + kW - 1) / kW * kW; }

// The (b, h) rows of x [B, L, H, D] as [Lp, D], or transposed to [D, Lp]; zero past L.
// With tables (sin, cos [Bt, L, D/2]) the rows are rotated.
template <int64_t D, bool kTransposed>
void gather(const float* x, const Shape& s, int64_t L, int64_t b, int64_t h, float* out,
            int64_t Lp, const float* sin = nullptr, const float* cos = nullptr) {
  std::fill(out, out + D * Lp, 0.0f);
  float rotated[D];
  for (int64_t l = 0; l < L; ++l) {
    const float* src = x + ((b * L + l) * s.H + h) * D;
    if (sin) {
      const int64_t t = Rope::offset(s, b, L, l);
      rotate<D>(src, sin + t, cos + t, rotated);
      src = rotated;
    }
    for (int64_t d = 0; d < D; ++d) out[kTransposed ? d * Lp + l : l * D + d] = src[d];
  }
}

constexpr VI kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Which keys of a query row are unmasked: the range [start, end) when the unmasked keys are
// contiguous (causal, packed segments, padding), else per key in `valid`. end == 0: none.
struct RowMask {
  int64_t start = 0, end = 0;
  bool range = true;
  const float* valid = nullptr;
  // -1 in the lanes j0 .. j0 + kW - 1 that are unmasked, else 0
  VI lanes(int64_t j0) const {
    if (!range) return load(valid + j0) != 0.0f;
    const VI j = kIota + static_cast<int32_t>(j0);
    return (j >= static_cast<int32_t>(start)) & (j < static_cast<int32_t>(end));
  }
};

// The RowMask of mask row m (Lk bools); `bytes` (Lp) and `valid` (Lp floats) are scratch.
inline RowMask mask_row(const bool* m, int64_t Lk, int64_t Lp, uint8_t* bytes, float* valid) {
  RowMask r;
  std::memcpy(bytes, m, Lk);
  std::memset(bytes + Lk, 0, Lp - Lk);
  int64_t end = Lp;
  for (uint64_t a, b; end >= kW; end -= kW) {  // whole empty chunks first
    std::memcpy(&a, bytes + end - kW, 8);
    std::memcpy(&b, bytes + end - 8, 8);
    if (a | b) break;
  }
  while (end > 0 && !bytes[end - 1]) --end;
  r.end = end;
  if (end == 0) return r;
  const void* first = std::memchr(bytes, 1, end);
  r.start = static_cast<const uint8_t*>(first) - bytes;
  if (std::memchr(bytes + r.start, 0, end - r.start)) {  // holes: per key
    r.range = false;
    for (int64_t j = 0; j < Lp; ++j) valid[j] = bytes[j] ? 1.0f : 0.0f;
    r.valid = valid;
  }
  return r;
}

// The RowMasks of the Lq query rows of pair (b, h), from scratch (the per-key flags of
// rows with holes too: [Lq, Lp] floats, taken only when a row has holes).
RowMask* row_masks(const Shape& s, const bool* mask, int64_t b, int64_t h, Scratch& scratch) {
  const int64_t Lp = round_up(s.Lk);
  RowMask* rows = scratch.take<RowMask>(s.Lq);
  uint8_t* bytes = scratch.take<uint8_t>(Lp);
  float* row_valid = scratch.take<float>(Lp);
  float* valid = nullptr;
  for (int64_t i = 0; i < s.Lq; ++i) {
    rows[i] = mask_row(s.mask_row(mask, b, h, i), s.Lk, Lp, bytes, row_valid);
    if (rows[i].range) continue;
    if (!valid) valid = scratch.take<float>(s.Lq * Lp);
    std::copy(row_valid, row_valid + Lp, valid + i * Lp);
    rows[i].valid = valid + i * Lp;
  }
  return rows;
}

// Runs pair_fn(pair, masks, scratch) for every (b, h) pair on the pool, the row masks
// computed once for the heads that share them (a mask [B|1, 1, Lq, Lk]).
template <typename Fn>
void for_each_pair(ffi::ThreadPool& pool, const Shape& s, const bool* mask, Fn pair_fn) {
  const int64_t heads = s.Hm == 1 ? s.H : 1;  // pairs per item
  parallel_for(pool, s.B * s.H / heads, [&](int64_t item, Scratch& scratch) {
    const int64_t first = item * heads;
    const RowMask* masks = row_masks(s, mask, first / s.H, first % s.H, scratch);
    const size_t mark = scratch.mark();
    for (int64_t pair = first; pair < first + heads; ++pair) {
      scratch.rewind(mark);
      pair_fn(pair, masks, scratch);
    }
  });
}

// ---- Row-blocked kernels for head sizes 8, 16, 32, 64 -------------------------------
// kR query rows at a time share every load of a key (or value) vector; the key/value
// gradients are accumulated per block of kC keys over the query rows that reach them.

constexpr int64_t kR = 4;  // query rows per block
constexpr int64_t kC = 8;  // keys per block of the key/value gradient passes

template <int64_t DT>
struct HeadRow {  // a row of DT floats as kN vectors
  using T = std::conditional_t<DT % 16 == 0, V, V8>;
  static constexpr int64_t kLanes = DT % 16 == 0 ? 16 : 8;
  static constexpr int64_t kN = DT / kLanes;
  static T get(const float* p) {
    T v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void put(float* p, T v) { std::memcpy(p, &v, sizeof(v)); }
};

// out[r][j] = a[r] . bt[:, j] for j < E (E a multiple of kW), kR rows; out is [kR][Lp].
template <int64_t DT>
inline void block_scores(const float* const* a, const float* bt, int64_t Lp, int64_t E,
                         float* out) {
  int64_t j0 = 0;
  for (; j0 + 2 * kW <= E; j0 += 2 * kW) {
    V acc[kR][2] = {};
    for (int64_t d = 0; d < DT; ++d) {
      const V b0 = load(bt + d * Lp + j0), b1 = load(bt + d * Lp + j0 + kW);
      for (int64_t r = 0; r < kR; ++r) {
        const float x = a[r][d];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
    for (int64_t r = 0; r < kR; ++r) {
      store(out + r * Lp + j0, acc[r][0]);
      store(out + r * Lp + j0 + kW, acc[r][1]);
    }
  }
  for (; j0 < E; j0 += kW) {
    V acc[kR] = {};
    for (int64_t d = 0; d < DT; ++d) {
      const V b = load(bt + d * Lp + j0);
      for (int64_t r = 0; r < kR; ++r) acc[r] += a[r][d] * b;
    }
    for (int64_t r = 0; r < kR; ++r) store(out + r * Lp + j0, acc[r]);
  }
}

// out[r] = sum_{j < E} p[r][j] * rows[j] for kR rows (p [kR][Lp], rows [Lp][DT]); rows
// with out[r] == nullptr are not written.
template <int64_t DT>
inline void block_context(const float* p, int64_t Lp, const float* rows, int64_t E,
                          float* const* out) {
  using H = HeadRow<DT>;
  typename H::T acc[kR][H::kN] = {};
  for (int64_t j = 0; j < E; ++j) {
    typename H::T v[H::kN];
    for (int64_t c = 0; c < H::kN; ++c) v[c] = H::get(rows + j * DT + c * H::kLanes);
    for (int64_t r = 0; r < kR; ++r) {
      const float x = p[r * Lp + j];
      for (int64_t c = 0; c < H::kN; ++c) acc[r][c] += x * v[c];
    }
  }
  for (int64_t r = 0; r < kR; ++r)
    if (out[r])
      for (int64_t c = 0; c < H::kN; ++c) H::put(out[r] + c * H::kLanes, acc[r][c]);
}

// out[c] = sum_i m[i][j0 + c] * x_i for c < kC, over the rows i with reach[i] > j0 (m
// [Lq][Lp]; x_i = x + i * stride); out is [kC][DT].
template <int64_t DT>
inline void block_columns(const float* m, int64_t Lp, const float* x, int64_t stride,
                          const int64_t* reach, int64_t Lq, int64_t j0, float* out) {
  using H = HeadRow<DT>;
  typename H::T acc[kC][H::kN] = {};
  for (int64_t i = 0; i < Lq; ++i) {
    if (reach[i] <= j0) continue;
    typename H::T xi[H::kN];
    for (int64_t c = 0; c < H::kN; ++c) xi[c] = H::get(x + i * stride + c * H::kLanes);
    const float* mi = m + i * Lp + j0;
    for (int64_t k = 0; k < kC; ++k) {
      const float w = mi[k];
      for (int64_t c = 0; c < H::kN; ++c) acc[k][c] += w * xi[c];
    }
  }
  for (int64_t k = 0; k < kC; ++k)
    for (int64_t c = 0; c < H::kN; ++c) H::put(out + k * DT + c * H::kLanes, acc[k][c]);
}

// Masked softmax of a score row in place over [0, E): masked keys and keys past `end`
// weigh exactly 0; a row without an unmasked key (end == 0) gets 1 / Lk on every key.
inline void softmax_row(float* p, const RowMask& mask, int64_t Lk, int64_t E) {
  const int64_t end = mask.end;
  if (end == 0) {
    std::fill(p, p + E, 0.0f);
    std::fill(p, p + std::min(Lk, E), 1.0f / static_cast<float>(Lk));
    return;
  }
  const int64_t wend = round_up(end);
  V mx = splat(kNegInf);
  for (int64_t j0 = 0; j0 < wend; j0 += kW) {
    const V x = mask.lanes(j0) ? load(p + j0) : splat(kNegInf);
    store(p + j0, x);
    mx = x > mx ? x : mx;
  }
  const float m = hmax(mx);
  V sum{};
  for (int64_t j0 = 0; j0 < wend; j0 += kW) {
    const V e = mask.lanes(j0) ? exp_nonpositive(load(p + j0) - m) : V{};
    store(p + j0, e);
    sum += e;
  }
  const float total = hsum(sum);
  for (int64_t j0 = 0; j0 < wend; j0 += kW) store(p + j0, load(p + j0) / total);
  std::fill(p + wend, p + E, 0.0f);
}

template <int64_t DT>
void forward_pair_blocked(const Shape& s, int64_t pair, const float* q, const float* k,
                          const float* v, const RowMask* masks, const Rope& rope, float* out,
                          float* weights, Scratch& scratch) {
  const int64_t b = pair / s.H, h = pair % s.H, Lk = s.Lk, Lp = round_up(Lk);
  float* kt = scratch.take<float>(DT * Lp);
  float* vr = scratch.take<float>(DT * Lp);
  float* p = scratch.take<float>(kR * Lp);
  float* qr = scratch.take<float>(s.Lq * DT);  // the pair's rotated query rows
  float* zero = scratch.take<float>(DT);
  std::fill(zero, zero + DT, 0.0f);
  gather<DT, true>(k, s, Lk, b, h, kt, Lp, rope.sin_k, rope.cos_k);
  gather<DT, false>(v, s, Lk, b, h, vr, Lp);
  gather<DT, false>(q, s, s.Lq, b, h, qr, s.Lq, rope.sin_q, rope.cos_q);
  for (int64_t i0 = 0; i0 < s.Lq; i0 += kR) {
    const float* qa[kR];
    float* oa[kR];
    RowMask rows[kR];
    int64_t E = 0;
    for (int64_t r = 0; r < kR; ++r) {
      const int64_t i = i0 + r;
      if (i < s.Lq) {
        qa[r] = qr + i * DT;
        oa[r] = out + ((b * s.Lq + i) * s.H + h) * DT;
        rows[r] = masks[i];
        E = std::max(E, rows[r].end == 0 ? Lp : round_up(rows[r].end));
      } else {
        qa[r] = zero;
        oa[r] = nullptr;
        rows[r].end = -1;
      }
    }
    // the weights rows themselves when they are whole chunks, else scratch copied out
    const bool direct = Lk == Lp && i0 + kR <= s.Lq;
    float* pb = direct ? weights + (pair * s.Lq + i0) * Lk : p;
    block_scores<DT>(qa, kt, Lp, E, pb);
    for (int64_t r = 0; r < kR; ++r) {
      float* pr = pb + r * Lp;
      if (rows[r].end < 0) {
        std::fill(pr, pr + E, 0.0f);
        continue;
      }
      softmax_row(pr, rows[r], Lk, E);
      float* wi = weights + (pair * s.Lq + i0 + r) * Lk;
      if (!direct) std::copy(pr, pr + std::min(E, Lk), wi);
    }
    block_context<DT>(pb, Lp, vr, E, oa);
  }
}

template <int64_t DT>
void backward_pair_blocked(const Shape& s, int64_t pair, const float* q, const float* k,
                           const float* v, const RowMask* masks, const Rope& rope,
                           const float* weights, const float* dout, float* dq, float* dk,
                           float* dv, Scratch& scratch) {
  const int64_t b = pair / s.H, h = pair % s.H, Lq = s.Lq, Lk = s.Lk, Lp = round_up(Lk);
  const int64_t row = s.H * DT;  // stride between the tokens of one (b, h) pair
  // the weights rows as [Lq][Lp]: in place when Lk is whole chunks, else a padded copy
  float* kr = scratch.take<float>(DT * Lp);
  float* vt = scratch.take<float>(DT * Lp);
  float* wcopy = scratch.take<float>(Lk == Lp ? 0 : Lq * Lp);
  float* ds = scratch.take<float>(Lq * Lp);
  const float* w = Lk == Lp ? weights + pair * Lq * Lk : wcopy;
  float* zero = scratch.take<float>(DT);
  float* cols = scratch.take<float>(kC * DT);
  float* tail = scratch.take<float>(kR * Lp);  // the last block's rows past Lq
  int64_t* reach_ds = scratch.take<int64_t>(Lq);
  int64_t* reach_w = scratch.take<int64_t>(Lq);
  // the rotated query rows, and the gradients of the rotated rows before the transpose
  float* qr = scratch.take<float>(Lq * DT);
  float* dqr = scratch.take<float>(Lq * DT);
  std::fill(zero, zero + DT, 0.0f);
  gather<DT, false>(k, s, Lk, b, h, kr, Lp, rope.sin_k, rope.cos_k);
  gather<DT, true>(v, s, Lk, b, h, vt, Lp);
  gather<DT, false>(q, s, Lq, b, h, qr, Lq, rope.sin_q, rope.cos_q);
  const float* g0 = dout + (b * Lq * s.H + h) * DT;
  for (int64_t i0 = 0; i0 < Lq; i0 += kR) {
    const float* ga[kR];
    float* dqa[kR];
    RowMask rows[kR];
    int64_t ends[kR], E = 0;
    for (int64_t r = 0; r < kR; ++r) {
      const int64_t i = i0 + r;
      if (i < Lq) {
        ga[r] = g0 + i * row;
        dqa[r] = dqr + i * DT;
        rows[r] = masks[i];
        ends[r] = rows[r].end;
        E = std::max(E, ends[r] == 0 ? Lp : round_up(ends[r]));
        if (Lk != Lp) {
          const float* wi = weights + (pair * Lq + i) * Lk;
          std::copy(wi, wi + Lk, wcopy + i * Lp);
          std::fill(wcopy + i * Lp + Lk, wcopy + (i + 1) * Lp, 0.0f);
        }
        reach_ds[i] = ends[r];
        reach_w[i] = ends[r] == 0 ? Lk : ends[r];
      } else {
        ga[r] = zero;
        dqa[r] = nullptr;
        ends[r] = -1;
      }
    }
    float* dsb = ds + i0 * Lp;  // rows i0.. of ds; the block's dweights first
    if (i0 + kR > Lq) {  // the last block writes kR rows: past Lq into scratch
      std::fill(tail, tail + kR * Lp, 0.0f);
      dsb = tail;
    }
    block_scores<DT>(ga, vt, Lp, E, dsb);
    for (int64_t r = 0; r < kR && i0 + r < Lq; ++r) {
      float* dr = dsb + r * Lp;
      const float* wr = &w[(i0 + r) * Lp];
      if (ends[r] == 0) {  // no logit of this row reaches q or k
        std::fill(dr, dr + Lp, 0.0f);
        continue;
      }
      // dlogits = w * (dweights - sum(w * dweights)), 0 where masked
      V dots{};
      for (int64_t j0 = 0; j0 < E; j0 += kW) dots += load(wr + j0) * load(dr + j0);
      const float dot = hsum(dots);
      for (int64_t j0 = 0; j0 < E; j0 += kW) {
        const V x = load(wr + j0) * (load(dr + j0) - dot);
        store(dr + j0, rows[r].lanes(j0) ? x : V{});
      }
      std::fill(dr + E, dr + Lp, 0.0f);
    }
    for (int64_t r = i0 + kR > Lq ? Lq - i0 : kR; r < kR; ++r)
      std::fill(dsb + r * Lp, dsb + (r + 1) * Lp, 0.0f);
    block_context<DT>(dsb, Lp, kr, E, dqa);  // dq[i] = sum_j dlogits[j] k[j]
    if (dsb != ds + i0 * Lp) std::copy(dsb, dsb + (Lq - i0) * Lp, ds + i0 * Lp);
  }
  for (int64_t i = 0; i < Lq; ++i) {
    const int64_t t = Rope::offset(s, b, Lq, i);
    unrotate<DT>(dqr + i * DT, rope.sin_q + t, rope.cos_q + t, dq + ((b * Lq + i) * s.H + h) * DT);
  }
  // dk[j] = sum_i dlogits[i, j] q[i]; dv[j] = sum_i w[i, j] g[i]
  for (int64_t j0 = 0; j0 < Lk; j0 += kC) {
    const int64_t n = std::min(kC, Lk - j0);
    block_columns<DT>(ds, Lp, qr, DT, reach_ds, Lq, j0, cols);
    for (int64_t c = 0; c < n; ++c) {
      const int64_t t = Rope::offset(s, b, Lk, j0 + c);
      unrotate<DT>(cols + c * DT, rope.sin_k + t, rope.cos_k + t,
                   dk + ((b * Lk + j0 + c) * s.H + h) * DT);
    }
    block_columns<DT>(w, Lp, g0, row, reach_w, Lq, j0, cols);
    for (int64_t c = 0; c < n; ++c)
      std::copy(cols + c * DT, cols + (c + 1) * DT, dv + ((b * Lk + j0 + c) * s.H + h) * DT);
  }
}

// Calls fn(std::integral_constant<int64_t, D>) for the head sizes compiled in (HEAD_DIMS
// in cpu_attention.py).
template <typename Fn>
void with_head_dim(int64_t D, Fn fn) {
  switch (D) {
    case 8: fn(std::integral_constant<int64_t, 8>()); break;
    case 16: fn(std::integral_constant<int64_t, 16>()); break;
    case 32: fn(std::integral_constant<int64_t, 32>()); break;
    case 64: fn(std::integral_constant<int64_t, 64>()); break;
    case 128: fn(std::integral_constant<int64_t, 128>()); break;
    default: break;  // refused by shape_of
  }
}

using Table = ffi::Buffer<ffi::F32>;

ffi::Error shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k,
                    ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::PRED>& mask, Table& sin_q,
                    Table& cos_q, Table& sin_k, Table& cos_k, Shape* s) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 4)
    return ffi::Error::InvalidArgument("cpu_fused attention: q, k, v and mask must be rank 4");
  auto tq = sin_q.dimensions(), tk = sin_k.dimensions();
  if (tq.size() != 3 || tk.size() != 3)
    return ffi::Error::InvalidArgument("cpu_fused attention: the rotary tables must be rank 3");
  *s = Shape{qd[0], qd[1], kd[1], qd[2], qd[3], md[0], md[1], tq[0]};
  bool tables = tk[0] == tq[0] && (tq[0] == 1 || tq[0] == qd[0]);
  tables = tables && tq[1] == qd[1] && tk[1] == kd[1] && tq[2] == qd[3] / 2 && tk[2] == tq[2];
  auto same = [](auto x, auto y) {
    return x.size() == y.size() && std::equal(x.begin(), x.end(), y.begin());
  };
  tables = tables && same(cos_q.dimensions(), tq) && same(cos_k.dimensions(), tk);
  if (!tables)
    return ffi::Error::InvalidArgument(
        "cpu_fused attention: expected rotary tables [1|B, Lq, D/2] and [1|B, Lk, D/2]");
  bool ok = kd[0] == s->B && kd[2] == s->H && kd[3] == s->D;
  ok = ok && vd[0] == kd[0] && vd[1] == kd[1] && vd[2] == kd[2] && vd[3] == kd[3];
  ok = ok && (s->Bm == 1 || s->Bm == s->B) && (s->Hm == 1 || s->Hm == s->H);
  ok = ok && md[2] == s->Lq && md[3] == s->Lk;
  const int64_t D = s->D;
  if (D != 8 && D != 16 && D != 32 && D != 64 && D != 128)
    return ffi::Error::InvalidArgument("cpu_fused attention: head size must be 8, 16, 32, 64 or 128");
  if (!ok)
    return ffi::Error::InvalidArgument(
        "cpu_fused attention: expected q [B, Lq, H, D], k and v [B, Lk, H, D], mask "
        "[1|B, 1|H, Lq, Lk]");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::PRED> mask, Table sin_q, Table cos_q, Table sin_k,
                   Table cos_k, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> weights, ffi::ThreadPool pool) {
  Shape s;
  if (auto e = shape_of(q, k, v, mask, sin_q, cos_q, sin_k, cos_k, &s); e.failure()) return e;
  const Rope rope{sin_q.typed_data(), cos_q.typed_data(), sin_k.typed_data(), cos_k.typed_data()};
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float *op = out->typed_data(), *wp = weights->typed_data();
  with_head_dim(s.D, [&](auto dt) {
    for_each_pair(pool, s, mp, [&](int64_t p, const RowMask* masks, Scratch& scratch) {
      forward_pair_blocked<decltype(dt)::value>(s, p, qp, kp, vp, masks, rope, op, wp, scratch);
    });
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::PRED> mask, Table sin_q, Table cos_q, Table sin_k,
                    Table cos_k, ffi::Buffer<ffi::F32> weights, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, ffi::ThreadPool pool) {
  Shape s;
  if (auto e = shape_of(q, k, v, mask, sin_q, cos_q, sin_k, cos_k, &s); e.failure()) return e;
  const Rope rope{sin_q.typed_data(), cos_q.typed_data(), sin_k.typed_data(), cos_k.typed_data()};
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *wp = weights.typed_data(), *gp = dout.typed_data();
  const bool* mp = mask.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  with_head_dim(s.D, [&](auto dt) {
    for_each_pair(pool, s, mp, [&](int64_t p, const RowMask* masks, Scratch& scratch) {
      backward_pair_blocked<decltype(dt)::value>(s, p, qp, kp, vp, masks, rope, wp, gp, dqp,
                                                 dkp, dvp, scratch);
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
                                  .Arg<Table>()
                                  .Arg<Table>()
                                  .Arg<Table>()
                                  .Arg<Table>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RsAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<Table>()
                                  .Arg<Table>()
                                  .Arg<Table>()
                                  .Arg<Table>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ctx<ffi::ThreadPool>());
