#include "token_problem.h"

#include <cmath>

namespace fastce {

TokenOptions read_token_options(Args& a) {
  TokenOptions o;
  o.temperature = a.real();
  o.logit_scale = a.real();
  const std::optional<double> softcap = a.optional_real();
  FASTCE_CHECK_VALUE(std::isfinite(o.temperature) && o.temperature > 0.0,
                     "temperature must be a positive finite number, got ", o.temperature);
  FASTCE_CHECK_VALUE(std::isfinite(o.logit_scale), "logit_scale must be finite, got ", o.logit_scale);
  FASTCE_CHECK_VALUE(!softcap.has_value() || (*softcap > 0.0 && std::isfinite(*softcap)),
                     "softcap must be a positive finite number or None, got ", softcap.value_or(0.0));
  o.softcap = softcap.value_or(0.0);
  return o;
}

TokenShape check_token_args(const Tensor& logits, const Tensor& index) {
  TokenShape s;
  FASTCE_CHECK(logits.device() == index.device(),
               "Expected all tensors to be on the same device, but found at least two devices, ",
               device_name(logits), " and ", device_name(index), "!");
  s.dtype = logits.scalar_type();
  FASTCE_CHECK_NOT_IMPLEMENTED(is_floating(s.dtype), "\"token_logprobs\" not implemented for '", s.dtype, "'");
  FASTCE_CHECK(logits.dim() >= 1, "token_logprobs: logits must have a class dimension, got a 0-d tensor");
  const ScalarType it = index.scalar_type();
  FASTCE_CHECK(it == ScalarType::Long || it == ScalarType::Int,
               "token_logprobs: expected index of dtype int64 or int32, got ", it);
  const int64_t lead = logits.dim() - 1;
  const IntArrayRef ls = logits.sizes(), is = index.sizes();
  s.row_shape.assign(ls.begin(), ls.end() - 1);
  s.index_shape.assign(is.begin(), is.end());
  const bool one = index.dim() == lead && std::vector<int64_t>(is.begin(), is.end()) == s.row_shape;
  const bool several = index.dim() == lead + 1 && std::vector<int64_t>(is.begin(), is.end() - 1) == s.row_shape;
  FASTCE_CHECK(one || several, "token_logprobs: index of shape ", is, " does not match logits of shape ", ls,
               ": expected ", s.row_shape, " or ", s.row_shape, " + [K]");
  s.K = one ? 1 : index.size(lead);
  s.classes = logits.size(lead);
  s.rows = 1;
  for (int64_t n : s.row_shape) s.rows *= n;
  s.acc_type = accumulation_type(s.dtype);
  return s;
}

}  // namespace fastce
