// attention on CUDA GPUs: what the kernels of attention_cuda.cuh do to scores — the (batch, head)
// slice and its general score transform (attention.h's masking rule), the attn_mask tile in shared
// memory, key padding as a key range, the per-tile choice between the plain and the general path,
// the dropout draws in the kernels' two register layouts, and the K / V / mask pipeline. Written
// against simt/simt.cuh only.
#pragma once
#include <cmath>
#include <cstdint>

#include "attention/attention.h"
#include "attention/attention_cuda_tiles.cuh"

namespace ff::attention::gpu {

// ---------------------------------------------------------------------------------------------
// Scores, masks and dropout
// ---------------------------------------------------------------------------------------------
// Value `idx` of attn_mask values stored from `base` in their own dtype (kind 0: float32,
// 1: float16, 2: bfloat16), in global or shared memory.
__device__ __forceinline__ float mask_value(const char* base, int64_t idx, int kind) {
  return kind == 0   ? reinterpret_cast<const float*>(base)[idx]
         : kind == 1 ? to_float(reinterpret_cast<const __half*>(base)[idx])
                     : to_float(reinterpret_cast<const __nv_bfloat16*>(base)[idx]);
}

// The (batch, head) slice a CTA works on and its score transform, in log2 units:
//   x -> x * scale * log2(e) + attn_mask[i, j] * log2(e) (masked_score: masking values), -inf where
//   a mask hides (i, j) or (i, j) is outside (Sq, Sk).
struct Slice {
  const char* mask = nullptr;  // attn_mask at (b, h), or nullptr
  int mask_kind = 0;           // 0: float32, 1: float16, 2: bfloat16
  int64_t mask_ss = 0, mask_sk = 0;
  const bool* pad = nullptr;   // key_padding_mask row b, or nullptr
  int Sq = 0, Sk = 0;
  float scale_log2 = 0.f;
  bool causal = false;

  __device__ __forceinline__ int mask_elem() const { return mask_kind == 0 ? 4 : 2; }

  // The score of (i, j) from x = q_i . k_j; `mask_value()` gives attn_mask[i, j] and is called only
  // where a mask exists and nothing else hides (i, j).
  template <typename MaskValue>
  __device__ __forceinline__ float score(int i, int j, float x, MaskValue mask_value) const {
    if (i >= Sq || j >= Sk || (causal && j > i) || (pad && pad[j])) return -INFINITY;
    float s = x * scale_log2;
    if (mask) s = masked_score(s, mask_value(), kLog2e);  // attention.h: masking values
    return s;
  }
  // The same with attn_mask[i, j] read from global memory.
  __device__ __forceinline__ float score(int i, int j, float x) const {
    return score(i, j, x, [&] { return mask_value(mask, i * mask_ss + j * mask_sk, mask_kind); });
  }
};

__device__ __forceinline__ Slice make_slice(const Problem& pb, int64_t b, int64_t h) {
  Slice s;
  if (pb.mask.ptr) {
    const bool f32 = pb.mask_dtype == c10::ScalarType::Float;
    s.mask_kind = f32 ? 0 : pb.mask_dtype == c10::ScalarType::Half ? 1 : 2;
    s.mask = static_cast<const char*>(pb.mask.ptr) + (f32 ? 4 : 2) * (b * pb.mask.stride_b + h * pb.mask.stride_h);
    s.mask_ss = pb.mask.stride_s;
    s.mask_sk = pb.mask_stride_k;
  }
  s.pad = pb.key_padding ? pb.key_padding + b * pb.Sk : nullptr;
  s.Sq = static_cast<int>(pb.Sq);
  s.Sk = static_cast<int>(pb.Sk);
  s.scale_log2 = pb.scale * kLog2e;
  s.causal = pb.causal;
  return s;
}

// The attn_mask tile of one (query tile, key tile) in shared memory (Tiles, mask_ld): rows of
// query i0 + r, columns of key j0 + c, in the mask's dtype. Single-buffered and filled by warps:
// each warp copies the part of the tile it reads (its query rows in the forward and dQ kernels, its
// key columns in the dK / dV kernel), so it may refill that part as soon as its own lanes have read
// it (__syncwarp), with no block barrier, and waits for its own copies only.
//   async    keys contiguous, the slice's base and row stride 16-byte aligned: 16-byte cp.async
//            chunks (zero-filled wholly outside (Sq, Sk)); the chunk that straddles Sk and every
//            chunk of any other layout (a key stride of 0, an unaligned view) take plain loads.
//   one_row  the mask is the same for every query (query stride 0, e.g. a (B, 1, 1, Sk) padding
//            mask expanded): one row is copied and read for every query.
struct MaskTile {
  char* smem = nullptr;
  int ld = 0;     // bytes from one row of the tile to the next
  int rstep = 0;  // bytes from one query's row to the next's: ld, 0 when one row serves every query
  bool async = false, one_row = false;

  // Rows [r0, r0 + nrows) x columns [c0, c0 + NCOLS) (c0 a multiple of 16 bytes' worth of values)
  // of the tile of (i0, j0), by this warp's 32 lanes, once all of them are done with the part's
  // previous contents; the caller commits the copies. In 16-byte chunks: a chunk wholly inside
  // (Sq, Sk) is one cp.async (wholly outside, zero-filled); any other is copied as eight 16-bit
  // words with plain loads, zeros past Sk (the bits as they are: mask_value converts).
  template <int NCOLS>
  __device__ __forceinline__ void fill(const Slice& sl, int i0, int j0, int r0, int nrows, int c0, int lane) const {
    static_assert(NCOLS == 16 || NCOLS == 32 || NCOLS == 64, "MaskTile::fill: 16, 32 or 64 columns");
    __syncwarp();
    const int eshift = sl.mask_kind == 0 ? 2 : 1;  // log2 of the bytes per value
    const int vshift = 4 - eshift;                 // log2 of the values per chunk
    const int cshift = (NCOLS == 64 ? 6 : NCOLS == 32 ? 5 : 4) - vshift;  // log2 of the chunks per row
    const int n = (one_row ? 1 : nrows) << cshift;
    for (int u = lane; u < n; u += 32) {
      const int r = r0 + (u >> cshift), c = c0 + ((u & ((1 << cshift) - 1)) << vshift), i = i0 + r, j = j0 + c;
      const int left = i < sl.Sq && j < sl.Sk ? sl.Sk - j : 0;
      const int valid = left < (1 << vshift) ? left : 1 << vshift;  // values of the chunk inside (Sq, Sk)
      char* dst = smem + r * ld + (c << eshift);
      if (async && (valid == 0 || valid == 1 << vshift)) {
        ff::simt::cp_async_16(dst, valid ? sl.mask + ((i * sl.mask_ss + j) << eshift) : sl.mask, valid != 0);
        continue;
      }
#pragma unroll 1
      for (int w = 0; w < 8; ++w) {  // word w: value w >> (eshift - 1), its bytes 2w mod 2^eshift
        const int e = w >> (eshift - 1);
        const char* src =
            sl.mask + ((i * sl.mask_ss + (j + e) * sl.mask_sk) << eshift) + ((2 * w) & ((1 << eshift) - 1));
        reinterpret_cast<uint16_t*>(dst)[w] = e < valid ? *reinterpret_cast<const uint16_t*>(src) : uint16_t{0};
      }
    }
  }

  // The row of query row `first` + k of the tile (row `first` when one row serves every query).
  __device__ __forceinline__ const char* row(int first, int k) const { return smem + first * ld + k * rstep; }
};

// The tile for slice `sl` at `smem` with rows of `keys` values (Tiles, mask_ld).
__device__ __forceinline__ MaskTile make_mask_tile(const Slice& sl, char* smem, int keys) {
  MaskTile t;
  const int elem = sl.mask_elem();
  t.smem = smem;
  t.ld = mask_ld(keys, elem);
  t.one_row = sl.mask_ss == 0;
  t.rstep = t.one_row ? 0 : t.ld;
  t.async = sl.mask && sl.mask_sk == 1 && reinterpret_cast<uintptr_t>(sl.mask) % 16 == 0 &&
            (sl.mask_ss * elem) % 16 == 0;
  return t;
}

// Key padding as a key range: the keys of one padding row (Sk entries, True = padding) that can be
// seen. Keys >= end are all hidden (padding, or past the row); keys < clean are never padded.
// Without padding {Sk, Sk}; right padding to length L gives {L, L}; any other pattern has
// clean < end and the tiles between them take the general path. Every thread of the block gets the
// result (two barriers; `scratch` is two ints of shared memory).
struct KeyRange {
  int clean = 0, end = 0;
};

__device__ __forceinline__ KeyRange key_range(const bool* pad, int n, int* scratch) {
  if (!pad) return {n, n};
  int clean = n, end = 0;
  for (int j = threadIdx.x; j < n; j += static_cast<int>(blockDim.x)) {
    if (pad[j]) {
      clean = clean < j ? clean : j;
    } else {
      end = j + 1;  // j grows: the last unpadded key so far
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const int c = __shfl_xor_sync(0xffffffffu, clean, o), e = __shfl_xor_sync(0xffffffffu, end, o);
    clean = clean < c ? clean : c;
    end = end > e ? end : e;
  }
  if (threadIdx.x == 0) {
    scratch[0] = n;
    scratch[1] = 0;
  }
  __syncthreads();
  if ((threadIdx.x & 31) == 0) {
    atomicMin(scratch, clean);
    atomicMax(scratch + 1, end);
  }
  __syncthreads();
  return {scratch[0], scratch[1]};
}

// How a kernel treats the scores of a key tile.
//   kAuto    what fusedformer._C builds: per tile, kPlain where nothing can hide a score of the tile
//            (no attn_mask, no padded or missing key, no causal cut), kMasked elsewhere.
//   kPlain   every tile plain, kMasked every tile general: probe instantiations for the static
//            counts of scripts/attention_sass.py only (kPlain is wrong on tiles that need masking).
enum class TilePath : int { kAuto = 0, kPlain = 1, kMasked = 2 };

template <TilePath kPath>
__device__ __forceinline__ bool plain_tile(bool nothing_hidden) {
  return kPath == TilePath::kPlain || (kPath == TilePath::kAuto && nothing_hidden);
}

// Dropout keep bits (common/philox.h, the one definition of the mask: eight 16-bit draws a Philox
// block) in the two register layouts of the kernels, for two neighbouring n-tiles at a time.
// `shared`: offset and Sk are multiples of 8, so the keys 8v .. 8v + 7 of a row are the eight
// draws of one block: the lanes that hold them compute each block once, and a transpose over
// shuffles hands every lane its draws — one Philox call per 8 scores.
//
// The helpers give keep bits; the kernels apply 1 / (1 - p) where it costs least (the forward and
// dV once per row, at the end).
//
// The transposes are butterflies: lane L holds row L of a matrix M (M[b][j] in slot j), and stage p
// swaps, with lane L ^ (1 << p), the slots whose bit p differs from L's; after a stage for every
// bit of the index, slot b holds M[b][L].

// One butterfly stage on whole words: for each pair of slots (a, a ^ m), bit p of a clear, the lane
// whose bit p is set sends slot a and takes the partner's a ^ m into it, the other the reverse.
template <int kSlotBit, int kLaneXor, int N>
__device__ __forceinline__ void butterfly_words(uint32_t (&w)[N], bool upper) {
  constexpr int m = 1 << kSlotBit;
#pragma unroll
  for (int a = 0; a < N; ++a) {
    if (a & m) continue;
    const uint32_t got = __shfl_xor_sync(0xffffffffu, upper ? w[a] : w[a ^ m], kLaneXor);
    w[a] = upper ? got : w[a];
    w[a ^ m] = upper ? w[a ^ m] : got;
  }
}

// Row layout (forward, dQ): this lane's scores (i0, j + 8u), (i0, j + 8u + 1), (i1, j + 8u),
// (i1, j + 8u + 1) into keep[4u .. 4u + 3] for the two tiles u = 0, 1; j = the first tile's key
// 2t; base0 / base1 = the logical index of (i0, 0) / (i1, 0). Shared: this lane's key pair is word
// t of its row's block, and the quad's four lanes need the same four blocks (rows i0, i1 x the two
// tiles): lane t computes block t (row t & 1, tile t >> 1), and a 4 x 4 transpose of words (lanes
// t ^ 1, t ^ 2) gives it word t of every block.
__device__ __forceinline__ void dropout_row_octs(const DropoutParams& d, uint64_t base0, uint64_t base1, int j,
                                                 int t, bool shared, bool (&keep)[8]) {
  if (shared) {
    const Philox4 blk = philox_block(d, ((t & 1) ? base1 : base0) + static_cast<uint64_t>(j - 2 * t + 8 * (t >> 1)));
    uint32_t w[4] = {blk.w[0], blk.w[1], blk.w[2], blk.w[3]};
    butterfly_words<0, 1>(w, t & 1);
    butterfly_words<1, 2>(w, t & 2);
#pragma unroll
    for (int b = 0; b < 4; ++b) {  // block b: row b & 1, tile b >> 1; low half = key 2t, high = 2t + 1
      keep[4 * (b >> 1) + 2 * (b & 1)] = keep_low(w[b], d.threshold);
      keep[4 * (b >> 1) + 2 * (b & 1) + 1] = keep_high(w[b], d.threshold);
    }
  } else {  // philox.h's own pair draw (z = 0 exactly where dropped; 1 / (1 - p) > 0 otherwise)
    float z[8];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      dropout_pair(d, base0 + j + 8 * u, z[4 * u], z[4 * u + 1]);
      dropout_pair(d, base1 + j + 8 * u, z[4 * u + 2], z[4 * u + 3]);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) keep[e] = z[e] != 0.f;
  }
}

// Column layout (dK / dV kernel, S^T): the keep bits of this lane's scores (i + 8u + (e & 1),
// key + 8 (e >> 1)), bit 4u + e, for the two tiles u = 0, 1 (as bits: the DP 256 kernel keeps a
// step's bits in one register); i = the first 8-query tile's row 2t, key = this lane's
// first key (g = lane >> 2 within its 8); rowlen = Sk, base = the logical index of (query 0, key 0)
// of the (batch, head). Shared: the eight lanes g of one t hold the eight keys of a block, for the
// same eight (query, key block) pairs b = 4u + e: lane g computes block g, and a transpose of
// 16-bit draws over lanes g ^ 1, g ^ 2, g ^ 4 gives it draw g of every block. Slot j of the
// transpose is half j & 1 of word j >> 1, so the first stage swaps halves (byte permutes: one
// shuffle carries two halves) and the other two whole words.
__device__ __forceinline__ uint32_t dropout_col_octs(const DropoutParams& d, uint64_t base, int64_t rowlen, int i,
                                                     int key, int lane, bool shared) {
  uint32_t bits = 0;
  if (shared) {
    const int g = lane >> 2;
    const int qi = i + 8 * (g >> 2) + (g & 1), kb = key - g + 8 * ((g >> 1) & 1);
    const Philox4 blk = philox_block(d, base + static_cast<uint64_t>(qi) * rowlen + kb);
    uint32_t w[4] = {blk.w[0], blk.w[1], blk.w[2], blk.w[3]};
    // Stage 0 (lanes g ^ 1): an odd g sends the low halves of its words and takes the partner's
    // high halves into them; an even g the reverse. __byte_perm(x, y, s): byte k of the result is
    // byte (s >> 4k) & 7 of y:x.
    const bool odd = g & 1;
    const uint32_t s_send = odd ? 0x5410u : 0x7632u, s_lo = odd ? 0x3254u : 0x5410u, s_hi = odd ? 0x3276u : 0x7610u;
#pragma unroll
    for (int a = 0; a < 4; a += 2) {
      const uint32_t got = __shfl_xor_sync(0xffffffffu, __byte_perm(w[a], w[a + 1], s_send), 4);
      w[a] = __byte_perm(w[a], got, s_lo);
      w[a + 1] = __byte_perm(w[a + 1], got, s_hi);
    }
    butterfly_words<0, 8>(w, g & 2);   // slot bit 1 = word bit 0
    butterfly_words<1, 16>(w, g & 4);  // slot bit 2 = word bit 1
#pragma unroll
    for (int b = 0; b < 8; ++b) {
      const bool keep = (b & 1) ? keep_high(w[b >> 1], d.threshold) : keep_low(w[b >> 1], d.threshold);
      bits |= static_cast<uint32_t>(keep) << b;
    }
  } else {  // philox.h's own per-element draw, one at a time (eight interleaved: a DP 256 stack frame)
#pragma unroll 1
    for (int b = 0; b < 8; ++b) {
      const int u = b >> 2, e = b & 3;
      const uint64_t n = base + static_cast<uint64_t>(i + 8 * u + (e & 1)) * rowlen + key + 8 * (e >> 1);
      bits |= static_cast<uint32_t>(dropout_keep(d, n)) << b;
    }
  }
  return bits;
}

__device__ __forceinline__ bool shared_draws(const Problem& pb) {
#ifdef FF_ATTENTION_COUNT_SHARED_DRAWS  // scripts/attention_sass.py: the static count of this case alone
  return true;
#else
  return (pb.dropout.offset & 7) == 0 && (pb.Sk & 7) == 0;  // true for the ops' default offset 0 and Sk % 8 == 0
#endif
}

// The K / V / mask pipeline of the forward and dQ kernels. Tile `it` of `ntiles` has three cp.async
// groups, committed in this order: K(it), V(it) into buffer it & 1 (kv_prefetch, at the top of
// iteration it - 1), then the mask tile M(it) (single-buffered: each warp copies its rows once it
// has read M(it - 1), after the V wait of iteration it - 1; an empty group without a mask tile).
// Tile 0's groups are committed before the loop in the same order. So S = Q K^T waits for K(it)
// only, and the scores for M(it).
template <int BK, int DP, int NTHREADS = kThreads, typename T>
__device__ __forceinline__ void kv_prefetch(T* sK, T* sV, const T* K, const T* V, const Problem& pb, int it,
                                            int ntiles) {
  constexpr int LD = Tiles<DP>::kLd;
  if (it + 1 >= ntiles) return;
  const int kn = (it + 1) * BK, buf = (it + 1) & 1, Sk = static_cast<int>(pb.Sk);
  load_tile_async<BK, DP, NTHREADS>(sK + buf * BK * LD, K + kn * pb.k.stride_s, pb.k.stride_s, Sk - kn,
                                    static_cast<int>(pb.D));
  ff::simt::cp_async_commit();
  load_tile_async<BK, DP, NTHREADS>(sV + buf * BK * LD, V + kn * pb.v.stride_s, pb.v.stride_s, Sk - kn,
                                    static_cast<int>(pb.Dv));
  ff::simt::cp_async_commit();
}

// Wait in iteration `it` (`last`: it + 1 == ntiles) until K(it), V(it) or the mask tile M(it) has
// landed; K and V are copied by the whole block (then a barrier), M(it) by the warp that reads it
// (then __syncwarp). In flight after K(it): V(it), M(it) and, unless last, K(it + 1), V(it + 1); after
// V(it): M(it), K(it + 1), V(it + 1) (M(it + 1) is committed after the V wait); after M(it):
// K(it + 1), V(it + 1).
enum class Copy { kK, kV, kMask };

template <Copy kWhat>
__device__ __forceinline__ void pipe_wait(bool last) {
  constexpr int kAfter = kWhat == Copy::kK ? 2 : kWhat == Copy::kV ? 1 : 0;  // groups of tile it after it
  if (last) {
    ff::simt::cp_async_wait<kAfter>();
  } else {
    ff::simt::cp_async_wait<kAfter + 2>();
  }
  if constexpr (kWhat == Copy::kMask) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// The query tile of this CTA in the forward's and the deterministic dQ's one-dimensional grid of
// B * H * ceil(Sq / BQ) CTAs: query tiles fastest, so the CTAs running together share one head's
// K / V in L2; under causal masking the longest rows (the last query tiles) first.
struct QueryTile {
  int q0;              // first query row
  int64_t bh, b, h, hk;  // (batch * head), batch, query head, its key / value head
};

__device__ __forceinline__ QueryTile query_tile(const Problem& pb, int BQ) {
  const int nq = (static_cast<int>(pb.Sq) + BQ - 1) / BQ, qt = static_cast<int>(blockIdx.x % nq);
  QueryTile q;
  q.bh = blockIdx.x / nq;
  q.b = q.bh / pb.H;
  q.h = q.bh % pb.H;
  q.hk = q.h / (pb.H / pb.Hk);
  q.q0 = (pb.causal ? nq - 1 - qt : qt) * BQ;
  return q;
}

// The key tiles a query tile q0 visits, and which of them take the plain path: key
// tiles past the last visible key (padding, causal) are never loaded.
struct KeyTiles {
  int ntiles = 0;     // key tiles to visit
  int plain_end = 0;  // tiles wholly below this key take the plain path
};

__device__ __forceinline__ KeyTiles key_tiles(const Problem& pb, const KeyRange& kr, int q0, int BQ, int BK) {
  int kend = kr.end;
  if (pb.causal && q0 + BQ < kend) kend = q0 + BQ;
  KeyTiles kt;
  kt.ntiles = (kend + BK - 1) / BK;
  const int visible = pb.causal && q0 + 1 < kr.clean ? q0 + 1 : kr.clean;  // causal: keys <= every row of the tile
  kt.plain_end = pb.mask.ptr ? 0 : visible;
  return kt;
}

}  // namespace ff::attention::gpu
