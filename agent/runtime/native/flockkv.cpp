// flockkv.cpp: reading kernel inputs in place: float32 views of MLX arrays and the KV cache's
// sides, float32 or MLX affine-quantized (declared in flockattn.h).

#include <cstring>
#include <stdexcept>
#include <vector>

#include "flockattn.h"

namespace fk {

View view_of(const mx::array& a) {
  View v;
  const auto& st = a.strides();
  v.strides.assign(st.begin(), st.end());
  if (a.ndim() == 0 || st.back() == 1 || a.shape().back() == 1) {
    v.data = a.data<float>();
    return v;
  }
  // Gather into row-major order (rare: every caller's last axis is contiguous today).
  size_t total = a.size();
  v.owned.resize(total);
  const float* src = a.data<float>();
  int nd = a.ndim();
  std::vector<int> idx(nd, 0);
  for (size_t i = 0; i < total; ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * st[d];
    v.owned[i] = src[off];
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < a.shape(d)) break;
      idx[d] = 0;
    }
  }
  int64_t stride = 1;
  for (int d = nd - 1; d >= 0; --d) {
    v.strides[d] = stride;
    stride *= a.shape(d);
  }
  v.data = v.owned.data();
  return v;
}

KvSource kv_source(const std::vector<mx::array>& parts, int bits, int group, int head_dim) {
  KvSource s;
  s.head_dim = head_dim;
  if (bits == 0) {
    s.plain = view_of(parts[0]);
    return s;
  }
  const auto& codes = parts[0];
  if (codes.strides().back() != 1 && codes.shape().back() != 1)
    throw std::invalid_argument("quantized cache: codes must be contiguous along head_dim");
  s.codes = codes.data<uint32_t>();
  s.code_strides.assign(codes.strides().begin(), codes.strides().end());
  s.scales = view_of(parts[1]);
  s.biases = view_of(parts[2]);
  s.bits = bits;
  s.group = group;
  return s;
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void dequantize_row(const uint32_t* codes, const float* scales, const float* biases, int bits,
                    int group, int d, float* dst) {
  // As mx.dequantize: w = scale * q + bias, element i in bits [(i % per) * bits, ...) of word
  // i / per, per = 32 / bits elements a word.
  const int per = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  for (int g0 = 0; g0 < d; g0 += group) {
    const float s = scales[g0 / group], b = biases[g0 / group];
#pragma omp simd
    for (int i = g0; i < g0 + group; ++i) {
      uint32_t q = (codes[i / per] >> ((i % per) * bits)) & mask;
      dst[i] = s * static_cast<float>(q) + b;
    }
  }
}

void KvSource::copy_rows(int b, int g, int j0, int n, float* dst) const {
  const int d = head_dim;
  if (!quantized()) {
    const float* src = plain.data + b * plain.strides[0] + g * plain.strides[1];
    for (int j = 0; j < n; ++j)
      std::memcpy(dst + static_cast<size_t>(j) * d, src + (j0 + j) * plain.strides[2],
                  sizeof(float) * d);
    return;
  }
  const uint32_t* c = codes + b * code_strides[0] + g * code_strides[1];
  const float* sc = scales.data + b * scales.strides[0] + g * scales.strides[1];
  const float* bi = biases.data + b * biases.strides[0] + g * biases.strides[1];
  for (int j = j0; j < j0 + n; ++j)
    dequantize_row(c + j * code_strides[2], sc + j * scales.strides[2], bi + j * biases.strides[2],
                   bits, group, d, dst + static_cast<size_t>(j - j0) * d);
}

const float* KvSource::rows(int b, int g, int j0, int n, float* scratch, int& ld) const {
  if (!quantized()) {
    ld = static_cast<int>(plain.strides[2]);
    return plain.data + b * plain.strides[0] + g * plain.strides[1] + j0 * plain.strides[2];
  }
  copy_rows(b, g, j0, n, scratch);
  ld = head_dim;
  return scratch;
}
// Inputs: q, then the keys' parts and the values' parts (one array each float32, three each
// quantized: codes, scales, biases).
std::pair<KvSource, KvSource> kv_sources(const std::vector<mx::array>& inputs, size_t first,
                                         int bits, int group, int head_dim) {
  size_t parts = bits ? 3 : 1;
  std::vector<mx::array> ks(inputs.begin() + first, inputs.begin() + first + parts);
  std::vector<mx::array> vs(inputs.begin() + first + parts, inputs.begin() + first + 2 * parts);
  return {kv_source(ks, bits, group, head_dim), kv_source(vs, bits, group, head_dim)};
}
}  // namespace fk
