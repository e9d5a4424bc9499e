// Paged attention on the CPU: this step's K/V written into their slots, the step's partial prefix-cache
// hits copied (slots of one block into another), then every query attends
// over its sequence's K/V read straight out of the block pool (no gather into new tensors), in float32 with an online softmax, for prefill and
// decode alike. Sequences in one group share their first `shared_len` tokens (the same blocks):
// the group's queries read those blocks once, together, then each member carries on over its own
// blocks with the same softmax state (cascade attention without a merge).
//
// The pool is head-major within a block so that both products vectorise without reductions:
// K [blocks, kv_heads, head_dim, block_size] (tokens are the vector lanes of q.k) and
// V [blocks, kv_heads, block_size, head_dim] (dimensions are the lanes of p.v).
// bfloat16 on a CPU with AVX512-BF16 (medlava/kernels builds with it where the CPU has it): q.k
// runs on `vdpbf16ps`, two exact bf16 products per float32 lane and instruction (half the
// multiply-adds, and the keys stay bf16 pairs rather than being converted). p.v stays float32:
// rounding the softmax weights to bf16 (as torch's flash attention does) moved occlusion maps.
// Built on first use by medlava/kernels/__init__.py, with ATen's at::vec for the CPU it runs on.

#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common.h"

namespace medlava {
namespace {

constexpr int64_t kQueryTile = 16;  // prefill queries per task: each K/V chunk converted serves 16 x H/KVH rows
constexpr int64_t kRowTile = 4;     // rows computed together, their chains independent
constexpr int64_t kSegment = 128;   // tokens per softmax update (a multiple of every VS)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Row {
  int64_t out;  // index of this row's vector in q and out: token * heads + head
  int64_t pos;  // the query's position in its sequence
};

template <typename T>
struct Kernel {
  // inputs
  const T* q;
  T* out;
  const T* k_cache;
  const T* v_cache;
  const int32_t* tables;
  const int32_t* kv_lens;
  int64_t table_width, block_size, kv_heads, heads, head_dim, window;
  int64_t q_stride_tok, q_stride_head;  // q is [T, H, D] with any token/head strides
  float scale;

  // scratch, per thread
  int64_t dp = 0;          // head_dim rounded up to whole vectors
  std::vector<float> qf;   // [rows (+ a tile of zeros), head_dim] scaled queries
  std::vector<float> acc;  // [rows, dp] running sum of p * v
  std::vector<float> m, l; // [rows] running max and sum of exp
  std::vector<float> kt;   // [kSegment / VS, head_dim, VS] the segment's keys, VS tokens per vector
  const float* kp[kSegment / VS];  // where each chunk's keys are (kt or the pool), rows kstride apart
  int64_t kstride[kSegment / VS];
  std::vector<const float*> vrows;  // [kSegment] the segment's values, dp float32 each: in the pool or in vf
  std::vector<float> vf;   // [kSegment, dp] values converted to float32 (zero-padded to whole vectors)
  std::vector<float> p;    // [kRowTile, kSegment] scores, then their exponentials
  std::vector<Row> rows;

#if defined(__AVX512BF16__)
  static constexpr bool kDotTypes = std::is_same_v<T, c10::BFloat16> && VS == 16;
#else
  static constexpr bool kDotTypes = false;
#endif
  // The scores on bf16 dot products: pairs of bf16 (the operands of vdpbf16ps) as uint32.
  bool dot = false;              // this call takes it (kDotTypes, an even head_dim; set in run)
  std::vector<uint32_t> qb;      // [rows (+ a tile of zeros), head_dim / 2] the queries, unscaled
  std::vector<uint32_t> kb;      // [kSegment / VS, head_dim / 2, VS] dims (2i, 2i+1) of VS tokens

  void start(int64_t n_rows) {
    dp = (head_dim + VS - 1) / VS * VS;
    rows.clear();
    if (dot) {
      qb.assign((n_rows + kRowTile) * head_dim / 2, 0u);
      kb.resize(kSegment * head_dim / 2);
    } else {
      qf.assign((n_rows + kRowTile) * head_dim, 0.f);
      kt.resize(kSegment * head_dim);
    }
    acc.assign(n_rows * dp, 0.f);
    m.assign(n_rows, kNegInf);
    l.assign(n_rows, 0.f);
    vrows.resize(kSegment);
    vf.resize(kSegment * dp);
    p.resize(kRowTile * kSegment);
  }

  void add_rows(int64_t q_row, int64_t pos, int64_t h) {  // the H/KVH query heads of KV head h at one query
    const int64_t per = heads / kv_heads;
    for (int64_t i = 0; i < per; ++i) {
      const int64_t head = h * per + i;
      const T* src = q + q_row * q_stride_tok + head * q_stride_head;
      if (dot) {  // the scale is applied to the scores instead: q stays exact
        std::memcpy(&qb[rows.size() * head_dim / 2], src, head_dim * sizeof(T));
      } else {
        float* dst = &qf[rows.size() * head_dim];
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<float>(src[d]) * scale;
      }
      rows.push_back({q_row * heads + head, pos});
    }
  }

  // Keys of tokens [t0, t0 + n) of the sequence with block table `table`, KV head h, as float32:
  // chunk c's [head_dim, VS] tokens at kp[c], a row every kstride[c] floats. In place where the
  // pool holds float32 and the chunk lies in one block (lanes past n then hold whatever the block
  // has there: softmax() masks them), else copied into kt (lanes past n hold zeros).
  void load_keys(const int32_t* table, int64_t t0, int64_t n, int64_t h) {
    const int64_t tile = head_dim * block_size;  // one KV head's keys (or values) in one block
    for (int64_t c = 0; c * VS < n; ++c) {
      float* dst = &kt[c * head_dim * VS];
      const int64_t t = t0 + c * VS, off = t % block_size, lanes = std::min(VS, n - c * VS);
      kp[c] = dst;
      kstride[c] = VS;
      if constexpr (std::is_same_v<T, float>) {
        if (off + VS <= block_size) {
          kp[c] = k_cache + (table[t / block_size] * kv_heads + h) * tile + off;
          kstride[c] = block_size;
          continue;
        }
      }
      if (lanes == VS && off + VS <= block_size) {  // VS tokens side by side in one block
        const T* k = k_cache + (table[t / block_size] * kv_heads + h) * tile + off;
        for (int64_t d = 0; d < head_dim; ++d) load_float(k + d * block_size).store(dst + d * VS);
      } else {
        for (int64_t j = 0; j < VS; ++j) {
          const int64_t tj = t + j;
          const T* k = k_cache + (table[tj / block_size] * kv_heads + h) * tile + tj % block_size;
          for (int64_t d = 0; d < head_dim; ++d) dst[d * VS + j] = j < lanes ? static_cast<float>(k[d * block_size]) : 0.f;
        }
      }
    }
  }

  // Where the values of tokens [t0, t0 + n) are as float32 rows: read in place where the pool holds
  // float32 in whole vectors, else converted into vf. Block by block (a block's values of one KV
  // head are one [block_size, head_dim] tile). In place is faster for float32 only: converting
  // bf16 once here beats converting it again for every tile of rows in values().
  void find_values(const int32_t* table, int64_t t0, int64_t n, int64_t h) {
    const int64_t tile = head_dim * block_size;
    for (int64_t j = 0; j < n;) {
      const int64_t t = t0 + j, off = t % block_size, count = std::min(n - j, block_size - off);
      const T* v = v_cache + (table[t / block_size] * kv_heads + h) * tile + off * head_dim;
      for (int64_t i = 0; i < count; ++i, ++j, v += head_dim) {
        if constexpr (std::is_same_v<T, float>) {
          if (dp == head_dim) {
            vrows[j] = v;
            continue;
          }
        }
        float* dst = &vf[j * dp];
        int64_t d = 0;
        for (; d + VS <= head_dim; d += VS) load_float(v + d).store(dst + d);
        for (; d < head_dim; ++d) dst[d] = static_cast<float>(v[d]);
        vrows[j] = dst;
      }
    }
  }

  // Rows [r0, r1) attend over tokens [t0, t1) of the sequence with block table `table`, KV head h:
  // a segment of tokens at a time, its scores for all rows first, then one softmax update per row
  // and segment (long independent multiply-add chains rather than a short dependent one per token).
  void attend(int64_t r0, int64_t r1, const int32_t* table, int64_t t0, int64_t t1, int64_t h) {
    for (int64_t seg = t0; seg < t1; seg += kSegment) {
      const int64_t n = std::min(kSegment, t1 - seg), chunks = (n + VS - 1) / VS;
      if (dot) load_keys_dot(table, seg, n, h); else load_keys(table, seg, n, h);
      find_values(table, seg, n, h);
      for (int64_t rt = r0; rt < r1; rt += kRowTile) {
        const int64_t nr = std::min(kRowTile, r1 - rt);
        float alpha[kRowTile];
        if (dot) scores_dot(rt, chunks); else scores(rt, chunks);
        softmax(rt, nr, seg, n, chunks, alpha);
        values(rt, nr, n, alpha);
      }
    }
  }

  // Scores of rows [rt, rt + kRowTile) over the segment's chunks: kRowTile rows x two chunks of VS
  // tokens at a time (eight independent chains), into p.
  void scores(int64_t rt, int64_t chunks) {
    const int64_t D = head_dim;
    const float* __restrict qt = &qf[rt * D];
    for (int64_t c = 0; c < chunks; c += 2) {
      const bool two = c + 1 < chunks;
      const float* __restrict k0 = kp[c];
      const float* __restrict k1 = two ? kp[c + 1] : k0;
      const int64_t s0_stride = kstride[c], s1_stride = two ? kstride[c + 1] : s0_stride;
      Vec s0[kRowTile], s1[kRowTile];
      for (int64_t i = 0; i < kRowTile; ++i) s0[i] = s1[i] = Vec(0.f);
      for (int64_t d = 0; d < D; ++d) {
        const Vec a = Vec::loadu(k0 + d * s0_stride), b = Vec::loadu(k1 + d * s1_stride);
        for (int64_t i = 0; i < kRowTile; ++i) {
          const Vec qd(qt[i * D + d]);
          s0[i] = at::vec::fmadd(qd, a, s0[i]);
          s1[i] = at::vec::fmadd(qd, b, s1[i]);
        }
      }
      for (int64_t i = 0; i < kRowTile; ++i) {
        s0[i].store(&p[i * kSegment + c * VS]);
        if (two) s1[i].store(&p[i * kSegment + (c + 1) * VS]);
      }
    }
  }

  // Softmax update per row: mask what it may not see, new max, rescale, exponentials; alpha gets
  // each row's rescaling of what it had accumulated.
  void softmax(int64_t rt, int64_t nr, int64_t seg, int64_t n, int64_t chunks, float* alpha) {
    const Vec lanes = Vec::arange(0.f, 1.f);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t r = rt + i, pos = rows[r].pos;
      const int64_t a = window > 0 ? pos - window + 1 - seg : 0;  // lanes [a, b) are visible
      const int64_t b = std::min(n, pos + 1 - seg);
      float* __restrict pi = &p[i * kSegment];
      Vec mx(kNegInf);
      for (int64_t c = 0; c < chunks; ++c) {
        Vec sc = Vec::loadu(pi + c * VS);
        if (c * VS < a || (c + 1) * VS > b) {
          const Vec at = lanes + Vec(static_cast<float>(c * VS));
          sc = Vec::blendv(Vec(kNegInf), sc, (at >= Vec(static_cast<float>(a))) & (at < Vec(static_cast<float>(b))));
          sc.store(pi + c * VS);
        }
        mx = at::vec::maximum(mx, sc);
      }
      const float m_new = std::max(m[r], mx.reduce_max());
      if (m_new == kNegInf) {  // nothing visible in this segment
        alpha[i] = 1.f;
        for (int64_t c = 0; c < chunks; ++c) Vec(0.f).store(pi + c * VS);
        continue;
      }
      alpha[i] = std::exp(m[r] - m_new);  // 0 on the first segment a row sees
      Vec sum(0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const Vec e = (Vec::loadu(pi + c * VS) - Vec(m_new)).exp_u20();
        e.store(pi + c * VS);
        sum = sum + e;
      }
      l[r] = l[r] * alpha[i] + sum.reduce_add();
      m[r] = m_new;
    }
  }

  // acc = acc * alpha + p . v, kRowTile rows x four vectors of head_dim at a time.
  void values(int64_t rt, int64_t nr, int64_t n, const float* alpha) {
    for (int64_t d = 0; d < dp; d += 4 * VS) {
      const int64_t nv = std::min<int64_t>(4, (dp - d) / VS);
      Vec o[kRowTile][4];
      for (int64_t i = 0; i < kRowTile; ++i)
        for (int64_t w = 0; w < 4; ++w)
          o[i][w] = i < nr && w < nv ? Vec::loadu(&acc[(rt + i) * dp + d + w * VS]) * Vec(alpha[i]) : Vec(0.f);
      for (int64_t j = 0; j < n; ++j) {
        const float* __restrict v = vrows[j] + d;
        Vec vj[4];
        for (int64_t w = 0; w < 4; ++w) vj[w] = w < nv ? Vec::loadu(v + w * VS) : Vec(0.f);
        for (int64_t i = 0; i < kRowTile; ++i) {
          const Vec pj(p[i * kSegment + j]);
          for (int64_t w = 0; w < 4; ++w) o[i][w] = at::vec::fmadd(pj, vj[w], o[i][w]);
        }
      }
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t w = 0; w < nv; ++w) o[i][w].store(&acc[(rt + i) * dp + d + w * VS]);
    }
  }

#if defined(__AVX512BF16__)
  static uint32_t bits(const T* x) {  // a bf16's 16 bits (only called where T is bf16)
    uint16_t b;
    std::memcpy(&b, x, sizeof b);
    return b;
  }

  // Dims (2i, 2i+1) of 16 tokens side by side, from two rows of 16 bf16: [a0 b0 a1 b1 ...].
  static __m512i interleave(__m256i a, __m256i b) {
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    return _mm512_permutex2var_epi16(_mm512_castsi256_si512(a), idx, _mm512_castsi256_si512(b));
  }

  // load_keys() as bf16 pairs in kb: dims (2i, 2i+1) of each token.
  void load_keys_dot(const int32_t* table, int64_t t0, int64_t n, int64_t h) {
    const int64_t tile = head_dim * block_size, half = head_dim / 2;
    for (int64_t c = 0; c * VS < n; ++c) {
      uint32_t* dst = &kb[c * half * VS];
      const int64_t t = t0 + c * VS, off = t % block_size, lanes = std::min(VS, n - c * VS);
      if (lanes == VS && off + VS <= block_size) {  // VS tokens side by side in one block
        const T* k = k_cache + (table[t / block_size] * kv_heads + h) * tile + off;
        for (int64_t i = 0; i < half; ++i) {
          const auto a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 2 * i * block_size));
          const auto b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + (2 * i + 1) * block_size));
          _mm512_storeu_si512(dst + i * VS, interleave(a, b));
        }
      } else {
        for (int64_t j = 0; j < VS; ++j) {
          const int64_t tj = t + j;
          const T* k = k_cache + (table[tj / block_size] * kv_heads + h) * tile + tj % block_size;
          for (int64_t i = 0; i < half; ++i)
            dst[i * VS + j] = j < lanes ? bits(k + 2 * i * block_size) | bits(k + (2 * i + 1) * block_size) << 16 : 0u;
        }
      }
    }
  }

  // scores() on vdpbf16ps: each instruction adds two dimensions' products per token; scaled after.
  void scores_dot(int64_t rt, int64_t chunks) {
    const int64_t half = head_dim / 2;
    const uint32_t* __restrict qt = &qb[rt * half];
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t c = 0; c < chunks; c += 2) {
      const bool two = c + 1 < chunks;
      const uint32_t* __restrict k0 = &kb[c * half * VS];
      const uint32_t* __restrict k1 = two ? k0 + half * VS : k0;
      __m512 s0[kRowTile], s1[kRowTile];
      for (int64_t i = 0; i < kRowTile; ++i) s0[i] = s1[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < half; ++d) {
        const auto a = (__m512bh)_mm512_loadu_si512(k0 + d * VS), b = (__m512bh)_mm512_loadu_si512(k1 + d * VS);
        for (int64_t i = 0; i < kRowTile; ++i) {
          const auto qd = (__m512bh)_mm512_set1_epi32(static_cast<int>(qt[i * half + d]));
          s0[i] = _mm512_dpbf16_ps(s0[i], qd, a);
          s1[i] = _mm512_dpbf16_ps(s1[i], qd, b);
        }
      }
      for (int64_t i = 0; i < kRowTile; ++i) {
        _mm512_storeu_ps(&p[i * kSegment + c * VS], _mm512_mul_ps(s0[i], sc));
        if (two) _mm512_storeu_ps(&p[i * kSegment + (c + 1) * VS], _mm512_mul_ps(s1[i], sc));
      }
    }
  }

#else
  void load_keys_dot(const int32_t*, int64_t, int64_t, int64_t) {}
  void scores_dot(int64_t, int64_t) {}
#endif

  void finish() {
    for (size_t r = 0; r < rows.size(); ++r) {
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      T* o = out + rows[r].out * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<T>(acc[r * dp + d] * inv);
    }
  }
};

template <typename T>
void run(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
         const at::Tensor& block_tables, const at::Tensor& kv_lens, const at::Tensor& q_starts,
         const at::Tensor& order, const at::Tensor& group_starts, const at::Tensor& shared_lens, int64_t window,
         double scale) {
  Kernel<T> proto;
  proto.q = q.data_ptr<T>();
  proto.out = out.data_ptr<T>();
  proto.k_cache = k_cache.data_ptr<T>();
  proto.v_cache = v_cache.data_ptr<T>();
  proto.tables = block_tables.data_ptr<int32_t>();
  proto.kv_lens = kv_lens.data_ptr<int32_t>();
  proto.table_width = block_tables.size(1);
  proto.kv_heads = k_cache.size(1);
  proto.head_dim = k_cache.size(2);
  proto.block_size = k_cache.size(3);
  proto.heads = q.size(1);
  proto.window = window;
  proto.q_stride_tok = q.stride(0);
  proto.q_stride_head = q.stride(1);
  proto.scale = static_cast<float>(scale);
  proto.dot = Kernel<T>::kDotTypes && proto.head_dim % 2 == 0;

  const int32_t* qs = q_starts.data_ptr<int32_t>();
  const int32_t* ord = order.data_ptr<int32_t>();
  const int32_t* gs = group_starts.data_ptr<int32_t>();
  const int32_t* shared = shared_lens.data_ptr<int32_t>();
  const int64_t n_groups = group_starts.size(0) - 1;
  const int64_t per = proto.heads / proto.kv_heads;

  // A task: one KV head of a group of several sequences (all their queries), or of a tile of
  // one sequence's queries.
  struct Task {
    int64_t group, head, q_begin, q_end;
  };
  std::vector<Task> tasks;
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t seq = ord[gs[g]], n = qs[seq + 1] - qs[seq];
    for (int64_t h = 0; h < proto.kv_heads; ++h) {
      if (gs[g + 1] - gs[g] > 1) {
        tasks.push_back({g, h, 0, 0});
      } else {
        for (int64_t i = 0; i < n; i += kQueryTile) tasks.push_back({g, h, i, std::min(n, i + kQueryTile)});
      }
    }
  }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    Kernel<T> k = proto;
    std::vector<int64_t> member_rows;
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      const int64_t first = gs[task.group], last = gs[task.group + 1];
      const bool whole = last - first > 1;  // a group: every query of every member
      int64_t n_rows = 0;
      for (int64_t i = first; i < last; ++i) {
        const int64_t seq = ord[i];
        n_rows += (whole ? qs[seq + 1] - qs[seq] : task.q_end - task.q_begin) * per;
      }
      k.start(n_rows);
      member_rows.assign(1, 0);
      for (int64_t i = first; i < last; ++i) {
        const int64_t seq = ord[i], q_len = qs[seq + 1] - qs[seq];
        for (int64_t j = whole ? 0 : task.q_begin; j < (whole ? q_len : task.q_end); ++j) {
          k.add_rows(qs[seq] + j, k.kv_lens[seq] - q_len + j, task.head);
        }
        member_rows.push_back(k.rows.size());
      }
      const int64_t shared_len = shared[task.group];
      if (shared_len > 0) k.attend(0, k.rows.size(), k.tables + ord[first] * k.table_width, 0, shared_len, task.head);
      for (int64_t i = first; i < last; ++i) {
        const int64_t seq = ord[i], r0 = member_rows[i - first], r1 = member_rows[i - first + 1];
        if (r0 == r1) continue;
        // Tokens this member's rows may see: up to its newest query, within the window of its oldest.
        int64_t lo = shared_len;
        if (k.window > 0) lo = std::max(lo, k.rows[r0].pos - k.window + 1);
        k.attend(r0, r1, k.tables + seq * k.table_width, lo, k.rows[r1 - 1].pos + 1, task.head);
      }
      k.finish();
    }
  });
}

// Stores this step's k, v [T, kv_heads, head_dim] (any token and head strides) in their slots.
template <typename T>
void write_kv(const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots, const at::Tensor& k_cache,
              const at::Tensor& v_cache) {
  const int64_t n = k.size(0), kv_heads = k.size(1), d = k.size(2), bs = k_cache.size(3);
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t blk = sp[t] / bs, off = sp[t] % bs;
      for (int64_t h = 0; h < kv_heads; ++h) {
        const T* ks = kp + t * k.stride(0) + h * k.stride(1);
        const T* vs = vp + t * v.stride(0) + h * v.stride(1);
        T* kd = kc + (blk * kv_heads + h) * d * bs + off;
        std::copy(vs, vs + d, vc + ((blk * kv_heads + h) * bs + off) * d);
        for (int64_t i = 0; i < d; ++i) kd[i * bs] = ks[i];
      }
    }
  });
}

// Copies slots [0, n) of block src into block dst for every (src, dst, n) row of `copies`, all KV heads.
template <typename T>
void copy_slots(const at::Tensor& copies, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  const int64_t kv_heads = k_cache.size(1), d = k_cache.size(2), bs = k_cache.size(3), tile = d * bs;
  const int32_t* c = copies.data_ptr<int32_t>();
  T* kc = k_cache.data_ptr<T>();
  T* vc = v_cache.data_ptr<T>();
  for (int64_t i = 0; i < copies.size(0); ++i) {
    const int64_t src = c[3 * i], dst = c[3 * i + 1], n = c[3 * i + 2];
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t from = (src * kv_heads + h) * tile, to = (dst * kv_heads + h) * tile;
      for (int64_t r = 0; r < d; ++r) std::copy(kc + from + r * bs, kc + from + r * bs + n, kc + to + r * bs);  // K: [d, bs]
      std::copy(vc + from, vc + from + n * d, vc + to);  // V: [bs, d], its first n rows
    }
  }
}

// Writes k, v into their slots of the pool, copies the partial prefix-cache hits (after the writes:
// a copy's source may be written in this very step), then returns q's attention over it (see the top).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                           const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& copies,
                           const at::Tensor& block_tables,
                           const at::Tensor& kv_lens, const at::Tensor& q_starts, const at::Tensor& order,
                           const at::Tensor& group_starts, const at::Tensor& shared_lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [tokens, heads, head_dim] with contiguous head_dim");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous 4-d tensors");
  TORCH_CHECK(v_cache.size(0) == k_cache.size(0) && v_cache.size(1) == k_cache.size(1) &&
                  v_cache.size(2) == k_cache.size(3) && v_cache.size(3) == k_cache.size(2),
              "k_cache must be [blocks, kv_heads, head_dim, block_size] and v_cache [blocks, kv_heads, block_size, head_dim]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.size(0) == q.size(0) && k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(2),
              "k and v must be [tokens, kv_heads, head_dim] with contiguous head_dim");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == q.size(0),
              "slots must be contiguous int64, one per token");
  for (const auto* t : {&q, &k, &v, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), "q, k, v and the caches must share a dtype");
  }
  TORCH_CHECK(q.size(2) == k_cache.size(2) && q.size(1) % k_cache.size(1) == 0, "q's heads do not fit the cache's");
  TORCH_CHECK(copies.dim() == 2 && copies.size(1) == 3, "copies must be [n, 3]: (source block, block, slots)");
  for (const auto* t : {&copies, &block_tables, &kv_lens, &q_starts, &order, &group_starts, &shared_lens}) {
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "index tensors must be contiguous int32");
  }
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  dispatch(q.scalar_type(), "paged_attention", [&](auto tag) {
    using T = decltype(tag);
    write_kv<T>(k, v, slots, k_cache, v_cache);
    copy_slots<T>(copies, k_cache, v_cache);
    run<T>(out, q, k_cache, v_cache, block_tables, kv_lens, q_starts, order, group_starts, shared_lens, window, scale);
  });
  return out;
}

}  // namespace
}  // namespace medlava

TORCH_LIBRARY(medlava, m) {
  m.def(
      "paged_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor copies, Tensor block_tables, Tensor kv_lens, Tensor q_starts, Tensor order, Tensor group_starts, Tensor shared_lens, "
      "int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(medlava, CPU, m) { m.impl("paged_attention", &medlava::paged_attention); }
