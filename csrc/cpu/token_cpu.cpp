// CPU backend of the token ops: token_logprobs_forward (log-probs of chosen tokens, the
// entropy, the log-sum-exp) and token_logprobs_backward (the logits' gradient for those of the
// log-probs and the entropy). One pass over each row per op; the rules are those of rules.h
// (TokenStats and what follows it), the vector code token_kernels_impl.h.
#include <cmath>
#include <cstring>
#include <vector>

#include "../problem.h"
#include "../token_problem.h"
#include "driver.h"
#include "grad_buffer.h"
#include "token_kernels.h"

namespace fastce {
namespace {

// The element offsets of every position of a tensor's first `dims` dimensions, in row-major
// order: rows of any strides (slices, transposes, expanded views) are read where they are.
std::vector<int64_t> offsets(const Tensor& t, int64_t dims) {
  int64_t count = 1;
  for (int64_t d = 0; d < dims; ++d) count *= t.size(d);
  std::vector<int64_t> out(count);
  std::vector<int64_t> at(dims, 0);
  int64_t offset = 0;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = offset;
    for (int64_t d = dims - 1; d >= 0; --d) {  // the odometer's next position
      if (++at[d] < t.size(d)) {
        offset += t.stride(d);
        break;
      }
      offset -= (at[d] - 1) * t.stride(d);
      at[d] = 0;
    }
  }
  return out;
}

// The canonical view of a token op's arguments: logits (*, V) as rows of unit class stride,
// and the K chosen classes of each row, validated.
struct TokenProblem {
  Tensor logits;
  ScalarType dtype, acc_type;
  std::vector<int64_t> row_shape, index_shape;
  int64_t rows = 0, classes = 0, K = 0;
  std::vector<int64_t> row_offset;  // elements from logits' data to each row
  std::vector<int64_t> index;       // rows * K class indices

  const void* row(int64_t r) const {
    return static_cast<const char*>(logits.const_data_ptr()) + row_offset[r] * int64_t(element_size(dtype));
  }
};

std::vector<int64_t> read_index(const Tensor& index) {
  const std::vector<int64_t> at = offsets(index, index.dim());
  std::vector<int64_t> out(at.size());
  if (index.scalar_type() == ScalarType::Long) {
    const int64_t* p = index.const_data_ptr<int64_t>();
    for (size_t i = 0; i < at.size(); ++i) out[i] = p[at[i]];
  } else {
    const int32_t* p = index.const_data_ptr<int32_t>();
    for (size_t i = 0; i < at.size(); ++i) out[i] = p[at[i]];
  }
  return out;
}

TokenProblem prepare_tokens(const Tensor& logits, const Tensor& index) {
  TokenProblem p;
  const TokenShape s = check_token_args(logits, index);
  p.dtype = s.dtype;
  p.acc_type = s.acc_type;
  p.row_shape = s.row_shape;
  p.index_shape = s.index_shape;
  p.rows = s.rows;
  p.classes = s.classes;
  p.K = s.K;
  const int64_t lead = logits.dim() - 1;
  p.logits = logits.stride(lead) == 1 || p.classes <= 1 ? logits : torch::stable::contiguous(logits);
  p.row_offset = offsets(p.logits, lead);
  p.index = read_index(index);
  for (int64_t c : p.index)
    FASTCE_CHECK_INDEX(c >= 0 && c < p.classes, "index ", c, " is out of bounds for dimension ", lead,
                       " with size ", p.classes);
  return p;
}

cpu::TokenRowConfig row_config(const TokenProblem& p, const TokenOptions& o, bool entropy, bool argmax = false) {
  return cpu::TokenRowConfig{kernel_dtype(p.dtype), o, entropy, argmax};
}

const cpu::TokenKernels& token_kernels() { return cpu::token_kernels_for(cpu::kernels().isa); }

int64_t row_grain(const TokenProblem& p) { return std::max<int64_t>(1, cpu::kMinChunk / std::max<int64_t>(1, p.classes)); }

template <class A>
void write_forward(const TokenProblem& p, const cpu::TokenRowConfig& cfg, A* logprobs, A* entropy, double* lse,
                   int64_t* argmax) {
  const cpu::TokenKernels& k = token_kernels();
  cpu::parallel_rows(p.rows, row_grain(p), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const void* x = p.row(r);
      TokenStats st;
      if (p.classes > 0) k.stats(cfg, x, 0, p.classes, &st);
      lse[r] = token_lse(st);
      if (entropy) entropy[r] = A(token_entropy(st));
      if (argmax) argmax[r] = st.argmax;
      for (int64_t j = 0; j < p.K; ++j) logprobs[r * p.K + j] = A(token_logprob(k.z_one(cfg, x, p.index[r * p.K + j]), lse[r]));
    }
  });
}

// token_logprobs_forward(logits, index, <token options>, compute_entropy, compute_argmax)
//   -> (logprobs, entropy, lse, argmax)
void forward_kernel(StableIValue* stack, uint64_t, uint64_t) {
  Args a(stack);
  const Tensor logits = a.tensor(), index = a.tensor();
  const TokenOptions opt = read_token_options(a);
  const bool compute_entropy = a.flag(), compute_argmax = a.flag();
  const TokenProblem p = prepare_tokens(logits, index);
  const cpu::TokenRowConfig cfg = row_config(p, opt, compute_entropy, compute_argmax);
  Tensor logprobs = host_empty(p.index_shape, p.acc_type);
  Tensor entropy = compute_entropy ? host_empty(p.row_shape, p.acc_type) : host_empty({0}, p.acc_type);
  Tensor lse = host_empty(p.row_shape, ScalarType::Double);
  // (host_empty sizes floating types only)
  Tensor argmax = torch::stable::new_empty(logits, compute_argmax ? p.row_shape : std::vector<int64_t>{0},
                                           ScalarType::Long);
  int64_t* argmax_out = compute_argmax ? argmax.mutable_data_ptr<int64_t>() : nullptr;
  if (p.acc_type == ScalarType::Double)
    write_forward(p, cfg, logprobs.mutable_data_ptr<double>(),
                  compute_entropy ? entropy.mutable_data_ptr<double>() : nullptr, lse.mutable_data_ptr<double>(),
                  argmax_out);
  else
    write_forward(p, cfg, logprobs.mutable_data_ptr<float>(),
                  compute_entropy ? entropy.mutable_data_ptr<float>() : nullptr, lse.mutable_data_ptr<double>(),
                  argmax_out);
  put_results(stack, logprobs, entropy, lse, argmax);
}

// token_logprobs_backward(grad_logprobs?, grad_entropy?, logits, index, lse, entropy,
//                         <token options>) -> grad_logits
void backward_kernel(StableIValue* stack, uint64_t, uint64_t) {
  Args a(stack);
  const std::optional<Tensor> grad_logprobs = a.optional_tensor(), grad_entropy = a.optional_tensor();
  const Tensor logits = a.tensor(), index = a.tensor(), lse_t = a.tensor(), entropy_t = a.tensor();
  const TokenOptions opt = read_token_options(a);
  const TokenProblem p = prepare_tokens(logits, index);
  const std::vector<double> lse = to_doubles(lse_t, p.rows, "lse");
  const std::vector<double> g_lp =
      grad_logprobs ? to_doubles(*grad_logprobs, p.rows * p.K, "grad_logprobs") : std::vector<double>();
  const std::vector<double> g_h = grad_entropy ? to_doubles(*grad_entropy, p.rows, "grad_entropy") : std::vector<double>();
  const std::vector<double> ent = grad_entropy ? to_doubles(entropy_t, p.rows, "entropy") : std::vector<double>();
  const cpu::TokenRowConfig cfg = row_config(p, opt, false);
  const cpu::TokenKernels& k = token_kernels();
  Tensor gx = cpu::new_grad_buffer(p.rows, p.classes, p.dtype, logits);
  char* gx_data = static_cast<char*>(gx.mutable_data_ptr());
  const int64_t row_bytes = p.classes * int64_t(element_size(p.dtype));
  cpu::parallel_rows(p.rows, row_grain(p), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const void* x = p.row(r);
      void* g_row = gx_data + r * row_bytes;
      const double* g_k = g_lp.empty() ? nullptr : &g_lp[r * p.K];
      const int64_t* idx = &p.index[r * p.K];
      cpu::TokenGrad g{lse[r], 0.0, 0.0, 0.0};
      for (int64_t j = 0; g_k && j < p.K; ++j) g.g_sum += g_k[j];
      if (!g_h.empty() && g_h[r] != 0.0) {
        g.g_h = g_h[r];
        g.mean_z = token_mean_z(lse[r], ent[r]);
      }
      if (p.classes > 0) k.grad(cfg, x, g_row, 0, p.classes, g);
      for (int64_t j = 0; g_k && j < p.K; ++j) {
        double onehot = 0.0;  // the same class chosen several times gets every share
        for (int64_t i = 0; i < p.K; ++i) onehot += idx[i] == idx[j] ? g_k[i] : 0.0;
        k.add_onehot(cfg, x, g_row, idx[j], g, onehot);
      }
    }
  });
  put_results(stack, torch::stable::reshape(gx, logits.sizes()));
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastce, CPU, m) {
  m.impl("token_logprobs_forward", &forward_kernel);
  m.impl("token_logprobs_backward", &backward_kernel);
}

}  // namespace fastce
