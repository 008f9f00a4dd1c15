// Row-wise kernels for the CPU training step (see sae_lit/native.py).
//
// Plain C ABI over raw pointers, called through ctypes (which releases the GIL); rows are
// split over a persistent pool of std::threads. Built once per machine with the system C++ compiler; when that
// fails sae_lit falls back to torch ops, so nothing here is required to run.
//
// topk_f32: per row, the k largest values of x + bias (bias optional: the GEMM that
//   produced x then needs no bias pass over its [B, n] output) and their columns, sorted
//   descending. One pass keeps a min-heap of k candidates; a block of 64 values is skipped
//   after a few vector compares when none beats the heap's minimum, which is the common
//   case once the heap holds good candidates, so the pass runs near memory speed.
//   NaN ranks above every number (as in torch.topk): a row with a NaN takes an exact slow path.
//
// aux_select_f32: AuxK's selection. Per row, gather the pre-activations of the given
//   columns (the dead latents), keep the top k_aux of them and write ReLU of the kept ones
//   into a dense [B, n_cols] block (zero elsewhere), and optionally their values and local
//   column positions. Only positive values matter after the ReLU: the selection runs over
//   the positives alone, and rows with at most k_aux of them need none for the dense block.
//
// project_rows_f32: removes from each decoder row's gradient its component along the row,
//   in one pass (torch's vecdot materialises the [n, d] product first).
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Inputs are float32 or bfloat16 (stored as uint16_t: the high half of a float32).
using bf16 = uint16_t;

inline float ld(const float* p, int64_t j) { return p[j]; }
inline float ld(const bf16* p, int64_t j) {
  const uint32_t u = static_cast<uint32_t>(p[j]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX512F__)
inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(__AVX2__)
inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 ld8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

// Bit t set where !(x[t] + b[t] <= thr), i.e. above the threshold or NaN, for 64
// consecutive values (b may be nullptr: no bias).
template <class T>
inline uint64_t above_mask64(const T* x, const float* b, float thr) {
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(thr);
  uint64_t m = 0;
  for (int q = 0; q < 4; ++q) {
    __m512 v = ld16(x + 16 * q);
    if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + 16 * q));
    m |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v, t, _CMP_NLE_UQ)) << (16 * q);
  }
  return m;
#elif defined(__AVX2__)
  const __m256 t = _mm256_set1_ps(thr);
  uint64_t m = 0;
  for (int q = 0; q < 8; ++q) {
    __m256 v = ld8(x + 8 * q);
    if (b) v = _mm256_add_ps(v, _mm256_loadu_ps(b + 8 * q));
    m |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_NLE_UQ))) << (8 * q);
  }
  return m;
#else
  uint64_t m = 0;
  for (int q = 0; q < 64; ++q) m |= static_cast<uint64_t>(!(ld(x, q) + (b ? b[q] : 0.0f) <= thr)) << q;
  return m;
#endif
}

// A persistent pool of worker threads: starting threads per call costs ~30 us each, which
// on a many-core machine would rival the work itself. Created on first use and never
// destroyed (workers simply end with the process); a forked child, which inherits the
// pool's state but none of its threads, makes a fresh one. Calls are serialised.
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = nullptr;
    static pid_t owner = 0;
    static std::mutex m;
    std::lock_guard<std::mutex> lock(m);
    if (!pool || owner != getpid()) {
      pool = new Pool();  // the old one (from before a fork) is abandoned on purpose
      owner = getpid();
    }
    return *pool;
  }

  // Runs task(t) for t in [0, n): t = 0 on the calling thread, the rest on workers.
  void run(int n, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> serial(run_mutex_);
    {
      std::unique_lock<std::mutex> lock(m_);
      while (static_cast<int>(workers_.size()) < n - 1) {
        const int idx = static_cast<int>(workers_.size()) + 1;
        workers_.emplace_back([this, idx] { loop(idx); });
      }
      task_ = &task;
      active_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    cv_.notify_all();
    task(0);
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void loop(int idx) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* task;
      {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (idx >= active_) continue;
        task = task_;
      }
      (*task)(idx);
      std::lock_guard<std::mutex> lock(m_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mutex_, m_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0, pending_ = 0;
};

template <class F>
void parallel_rows(int64_t rows, int nthreads, const F& f) {
  if (nthreads > rows) nthreads = static_cast<int>(rows);
  if (nthreads <= 1) {
    f(0, rows);
    return;
  }
  const int64_t chunk = (rows + nthreads - 1) / nthreads;
  Pool::get().run(nthreads, [&](int t) {
    const int64_t s = t * chunk, e = std::min(rows, s + chunk);
    if (s < e) f(s, e);
  });
}

// Min-heap of (value, index) on parallel arrays; the root holds the smallest kept value.
inline void sift_down(float* hv, int64_t* hi, int64_t size, int64_t pos) {
  const float v = hv[pos];
  const int64_t id = hi[pos];
  for (;;) {
    int64_t c = 2 * pos + 1;
    if (c >= size) break;
    if (c + 1 < size && hv[c + 1] < hv[c]) ++c;
    if (!(hv[c] < v)) break;
    hv[pos] = hv[c];
    hi[pos] = hi[c];
    pos = c;
  }
  hv[pos] = v;
  hi[pos] = id;
}

// Exact top-k of a row that contains NaN: NaN first (by column), then values descending.
template <class T>
void topk_row_nan(const T* x, const float* bias, int64_t n, int64_t k, float* ov, int64_t* oi) {
  std::vector<float> y(n);
  for (int64_t j = 0; j < n; ++j) y[j] = ld(x, j) + (bias ? bias[j] : 0.0f);
  std::vector<int64_t> idx(n);
  for (int64_t j = 0; j < n; ++j) idx[j] = j;
  auto before = [&y](int64_t a, int64_t b) {
    const bool na = std::isnan(y[a]), nb = std::isnan(y[b]);
    if (na || nb) return na && !nb;
    return y[a] > y[b];
  };
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), before);
  for (int64_t j = 0; j < k; ++j) {
    ov[j] = y[idx[j]];
    oi[j] = idx[j];
  }
}

// Top-k of x + bias (bias may be nullptr), sorted descending.
template <class T>
void topk_row(const T* x, const float* bias, int64_t n, int64_t k, float* ov, int64_t* oi) {
  bool has_nan = false;
  for (int64_t j = 0; j < k; ++j) {
    ov[j] = ld(x, j) + (bias ? bias[j] : 0.0f);
    oi[j] = j;
    has_nan |= std::isnan(ov[j]);
  }
  if (has_nan) return topk_row_nan(x, bias, n, k, ov, oi);
  for (int64_t p = k / 2 - 1; p >= 0; --p) sift_down(ov, oi, k, p);
  float thr = ov[0];
  int64_t j = k;
  constexpr int64_t W = 64;
  for (; j + W <= n; j += W) {
    uint64_t m = above_mask64(x + j, bias ? bias + j : nullptr, thr);  // usually 0 after a while
    while (m) {
      const int t = __builtin_ctzll(m);
      m &= m - 1;
      const float v = ld(x, j + t) + (bias ? bias[j + t] : 0.0f);
      if (v > thr) {
        ov[0] = v;
        oi[0] = j + t;
        sift_down(ov, oi, k, 0);
        thr = ov[0];
      } else if (std::isnan(v)) {
        has_nan = true;
      }
    }
  }
  for (; j < n; ++j) {
    const float v = ld(x, j) + (bias ? bias[j] : 0.0f);
    if (v > thr) {
      ov[0] = v;
      oi[0] = j;
      sift_down(ov, oi, k, 0);
      thr = ov[0];
    } else if (std::isnan(v)) {
      has_nan = true;
    }
  }
  if (has_nan) return topk_row_nan(x, bias, n, k, ov, oi);
  // Heap sort with a min-heap leaves the array in descending order.
  for (int64_t e = k - 1; e > 0; --e) {
    std::swap(ov[0], ov[e]);
    std::swap(oi[0], oi[e]);
    sift_down(ov, oi, e, 0);
  }
}

inline float select_key(float v) { return std::isnan(v) ? std::numeric_limits<float>::infinity() : v; }

// AuxK selection of one row, exact in every case (NaN ranks highest, ties in column order).
void aux_row_exact(const float* vals, int64_t n_cols, int64_t k_aux, float* keys, float* zr, float* ov,
                   int64_t* ol) {
  for (int64_t j = 0; j < n_cols; ++j) keys[j] = select_key(vals[j]);
  std::nth_element(keys, keys + (k_aux - 1), keys + n_cols, std::greater<float>());
  const float t = keys[k_aux - 1];
  int64_t above = 0;
  for (int64_t j = 0; j < n_cols; ++j) above += select_key(vals[j]) > t;
  int64_t ties = k_aux - above, m = 0;
  if (zr) std::memset(zr, 0, n_cols * sizeof(float));
  for (int64_t j = 0; j < n_cols && m < k_aux; ++j) {
    const float v = vals[j], key = select_key(v);
    bool keep = key > t;
    if (!keep && key == t && ties > 0) {
      keep = true;
      --ties;
    }
    if (!keep) continue;
    if (zr) zr[j] = v <= 0.0f ? 0.0f : v;
    if (ov) {
      ov[m] = v;
      ol[m] = j;
    }
    ++m;
  }
}

// Copies the positive values of vals[0:n] to keys (in order); returns their count, or -1
// when the row holds a NaN.
inline int64_t compact_positives(const float* vals, int64_t n, float* keys) {
  int64_t pos = 0, j = 0;
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(vals + j);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __mmask16 m = _mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_ps(keys + pos, m, v);
    pos += __builtin_popcount(m);
  }
  if (nan) return -1;
#endif
  for (; j < n; ++j) {
    if (std::isnan(vals[j])) return -1;
    keys[pos] = vals[j];
    pos += vals[j] > 0.0f;
  }
  return pos;
}

}  // namespace

// Largest of x[j] + b[j] over 64 consecutive values; sets *nan when one of them is NaN.
template <class T>
inline float block_max64(const T* x, const float* b, bool* nan) {
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 un = 0;
  for (int q = 0; q < 4; ++q) {
    __m512 v = ld16(x + 16 * q);
    if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + 16 * q));
    un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(m, v);
  }
  if (un) *nan = true;
  return _mm512_reduce_max_ps(m);
#else
  float m = -std::numeric_limits<float>::infinity();
  for (int q = 0; q < 64; ++q) {
    const float v = ld(x, q) + (b ? b[q] : 0.0f);
    if (std::isnan(v)) *nan = true;
    m = v > m ? v : m;
  }
  return m;
#endif
}

// Top-k of x + bias by block maxima: the k-th largest of the per-block maxima is a lower
// bound on the row's k-th largest value (the k largest maxima are k distinct entries), so
// only blocks whose maximum reaches it can hold the top k. Two cheap passes instead of a
// heap update per improving value. Needs at least 2k blocks of 64 (else returns false).
template <class T>
bool topk_row_blocks(const T* x, const float* bias, int64_t n, int64_t k, float* ov, int64_t* oi,
                     std::vector<float>& bm, std::vector<float>& tmp, std::vector<std::pair<float, int64_t>>& cand) {
  constexpr int64_t W = 64;
  const int64_t nb = n / W;
  if (nb < 2 * k) return false;
  bm.resize(nb + 1);
  tmp.resize(nb + 1);
  bool nan = false;
  for (int64_t blk = 0; blk < nb; ++blk) bm[blk] = block_max64(x + blk * W, bias ? bias + blk * W : nullptr, &nan);
  int64_t nblocks = nb;
  if (nb * W < n) {  // the tail as one more (short) block
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = nb * W; j < n; ++j) {
      const float v = ld(x, j) + (bias ? bias[j] : 0.0f);
      if (std::isnan(v)) nan = true;
      m = v > m ? v : m;
    }
    bm[nblocks++] = m;
  }
  if (nan) {
    topk_row_nan(x, bias, n, k, ov, oi);
    return true;
  }
  std::copy(bm.begin(), bm.begin() + nblocks, tmp.begin());
  std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.begin() + nblocks, std::greater<float>());
  const float t0 = tmp[k - 1];
  cand.clear();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    if (!(bm[blk] >= t0)) continue;
    const int64_t lo = blk * W, hi = std::min(n, lo + W);
    for (int64_t j = lo; j < hi; ++j) {
      const float v = ld(x, j) + (bias ? bias[j] : 0.0f);
      if (v >= t0) cand.emplace_back(v, j);
    }
  }
  // Largest first; among equal values the lower column first.
  auto before = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
  std::sort(cand.begin(), cand.begin() + k, before);
  for (int64_t j = 0; j < k; ++j) {
    ov[j] = cand[j].first;
    oi[j] = cand[j].second;
  }
  return true;
}

template <class T>
void topk_rows(const T* x, const float* bias, int64_t rows, int64_t n, int64_t stride, int64_t k, float* out_v,
               int64_t* out_i, int nthreads) {
  parallel_rows(rows, nthreads, [=](int64_t s, int64_t e) {
    std::vector<float> bm, tmp;
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t r = s; r < e; ++r) {
      const T* xr = x + r * stride;
      if (!topk_row_blocks(xr, bias, n, k, out_v + r * k, out_i + r * k, bm, tmp, cand))
        topk_row(xr, bias, n, k, out_v + r * k, out_i + r * k);
    }
  });
}

// pre: [rows, n] with row stride `stride`; cols: n_cols column ids (nullptr: columns 0..n_cols-1);
// bias: [n] added to pre's columns (or nullptr).
// z: dense [rows, n_cols] output (may be nullptr); out_v / out_local: [rows, k_aux] (may be nullptr).
template <class T>
void aux_select(const T* pre, const float* bias, int64_t rows, int64_t stride, const int64_t* cols,
                int64_t n_cols, int64_t k_aux, float* z, float* out_v, int64_t* out_local, int nthreads) {
  parallel_rows(rows, nthreads, [=](int64_t s, int64_t e) {
    std::vector<float> vals(n_cols), keys(n_cols + 16);
    for (int64_t r = s; r < e; ++r) {
      const T* row = pre + r * stride;
      if (cols) {
        if (bias)
          for (int64_t j = 0; j < n_cols; ++j) vals[j] = ld(row, cols[j]) + bias[cols[j]];
        else
          for (int64_t j = 0; j < n_cols; ++j) vals[j] = ld(row, cols[j]);
      } else if (bias) {
        for (int64_t j = 0; j < n_cols; ++j) vals[j] = ld(row, j) + bias[j];
      } else {
        for (int64_t j = 0; j < n_cols; ++j) vals[j] = ld(row, j);
      }
      const float* v = vals.data();
      float* zr = z ? z + r * n_cols : nullptr;
      float* ov = out_v ? out_v + r * k_aux : nullptr;
      int64_t* ol = out_v ? out_local + r * k_aux : nullptr;
      // Positives come before every other value: with at least k_aux of them the
      // threshold is the k_aux-th largest positive, found among the positives alone.
      const int64_t pos = compact_positives(v, n_cols, keys.data());
      if (pos >= 0 && pos <= k_aux && !ov) {
        // Only the ReLU'd block is wanted: every positive is kept, the rest give 0.
        for (int64_t j = 0; j < n_cols; ++j) zr[j] = v[j] > 0.0f ? v[j] : 0.0f;
        continue;
      }
      if (pos < k_aux) {  // a NaN, or too few positives to fill the sparse output
        aux_row_exact(v, n_cols, k_aux, keys.data(), zr, ov, ol);
        continue;
      }
      std::nth_element(keys.begin(), keys.begin() + (k_aux - 1), keys.begin() + pos, std::greater<float>());
      const float t = keys[k_aux - 1];  // > 0
      int64_t ge = 0;
      for (int64_t j = 0; j < n_cols; ++j) ge += v[j] >= t;
      if (ge != k_aux) {  // ties at the threshold: keep the first ones, as the exact path does
        aux_row_exact(v, n_cols, k_aux, keys.data(), zr, ov, ol);
        continue;
      }
      if (zr)
        for (int64_t j = 0; j < n_cols; ++j) zr[j] = v[j] >= t ? v[j] : 0.0f;
      if (ov) {
        int64_t m = 0;
        for (int64_t j = 0; j < n_cols; ++j) {
          if (v[j] >= t) {
            ov[m] = v[j];
            ol[m++] = j;
          }
        }
      }
    }
  });
}

extern "C" {

int sae_lit_abi_version() { return 6; }

// x: [rows, n] (float32 or bf16) with row stride `stride` (elements); bias: [n] float32
// added to every row (or nullptr); out_v [rows, k] float32, out_i [rows, k] int64.
void topk_f32(const float* x, const float* bias, int64_t rows, int64_t n, int64_t stride, int64_t k, float* out_v,
              int64_t* out_i, int nthreads) {
  topk_rows(x, bias, rows, n, stride, k, out_v, out_i, nthreads);
}
void topk_bf16(const bf16* x, const float* bias, int64_t rows, int64_t n, int64_t stride, int64_t k, float* out_v,
               int64_t* out_i, int nthreads) {
  topk_rows(x, bias, rows, n, stride, k, out_v, out_i, nthreads);
}

// pre: [rows, n] (float32 or bf16) with row stride `stride`; cols: n_cols column ids
// (nullptr: columns 0..n_cols-1); bias: [n] float32 added to pre's columns (or nullptr).
// z: dense [rows, n_cols] float32 output (may be nullptr); out_v / out_local: [rows, k_aux]
// float32 / int64 (may be nullptr).
void aux_select_f32(const float* pre, const float* bias, int64_t rows, int64_t stride, const int64_t* cols,
                    int64_t n_cols, int64_t k_aux, float* z, float* out_v, int64_t* out_local, int nthreads) {
  aux_select(pre, bias, rows, stride, cols, n_cols, k_aux, z, out_v, out_local, nthreads);
}
void aux_select_bf16(const bf16* pre, const float* bias, int64_t rows, int64_t stride, const int64_t* cols,
                     int64_t n_cols, int64_t k_aux, float* z, float* out_v, int64_t* out_local, int nthreads) {
  aux_select(pre, bias, rows, stride, cols, n_cols, k_aux, z, out_v, out_local, nthreads);
}


// out[b, j] = <rows[idx[b, j]], y[b]> for b < B, j < k: the gradient of a k-sparse decode
// with respect to its values, k dot products per token.
void gather_dot_f32(const int64_t* idx, const float* rows, const float* y, int64_t B, int64_t k, int64_t d,
                    float* out, int nthreads) {
  parallel_rows(B, nthreads, [=](int64_t s, int64_t e) {
    for (int64_t b = s; b < e; ++b) {
      const float* yb = y + b * d;
      const int64_t* ib = idx + b * k;
      int64_t j = 0;
      for (; j + 4 <= k; j += 4) {  // four rows at a time: independent FMA chains, y read once
        const float* r0 = rows + ib[j] * d;
        const float* r1 = rows + ib[j + 1] * d;
        const float* r2 = rows + ib[j + 2] * d;
        const float* r3 = rows + ib[j + 3] * d;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t t = 0; t < d; ++t) {
          const float yt = yb[t];
          a0 += r0[t] * yt;
          a1 += r1[t] * yt;
          a2 += r2[t] * yt;
          a3 += r3[t] * yt;
        }
        out[b * k + j] = a0;
        out[b * k + j + 1] = a1;
        out[b * k + j + 2] = a2;
        out[b * k + j + 3] = a3;
      }
      for (; j < k; ++j) {
        const float* r = rows + ib[j] * d;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t t = 0; t < d; ++t) acc += r[t] * yb[t];
        out[b * k + j] = acc;
      }
    }
  });
}

// g[i] = 0 where z[i] <= 0 (z >= 0 is a ReLU'd block: its zeros are the entries AuxK did not
// keep), in place over n values; one pass, no mask tensor.
void mask_nonpositive_f32(float* g, const float* z, int64_t n, int nthreads) {
  const int64_t block = 1 << 16;
  const int64_t blocks = (n + block - 1) / block;
  parallel_rows(blocks, nthreads, [=](int64_t s, int64_t e) {
    const int64_t lo = s * block, hi = std::min(n, e * block);
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) g[i] = z[i] > 0.0f ? g[i] : 0.0f;
  });
}

// g[r] -= (<g[r], w[r]> / max(<w[r], w[r]>, eps)) w[r] for every row: the decoder-gradient
// projection in one pass over g and w.
void project_rows_f32(float* g, const float* w, int64_t rows, int64_t d, float eps, int nthreads) {
  parallel_rows(rows, nthreads, [=](int64_t s, int64_t e) {
    for (int64_t r = s; r < e; ++r) {
      float* gr = g + r * d;
      const float* wr = w + r * d;
      float gw = 0.0f, ww = 0.0f;
#pragma omp simd reduction(+ : gw, ww)
      for (int64_t j = 0; j < d; ++j) {
        gw += gr[j] * wr[j];
        ww += wr[j] * wr[j];
      }
      const float c = gw / (ww > eps ? ww : eps);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) gr[j] -= c * wr[j];
    }
  });
}

}  // extern "C"
