// IEEE half <-> float in software (round to nearest even). Included inside the ISA namespace of
// the CPU kernels (simd_impl.h, token_kernels_impl.h), after bits_to_float / float_to_bits.
// Not _Float16: its conversions are libgcc functions of GCC 12, which the wheel would then
// require of every system it is installed on.
FASTCE_INLINE float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float v = float(mantissa) * 5.9604644775390625e-8f;
    return bits_to_float(float_to_bits(v) | sign);
  }
  if (exponent == 31) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}
FASTCE_INLINE uint16_t float_to_f16(float f) {  // round to nearest even
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00u;    // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00u;   // |f| >= 65520 rounds to infinity
  if (a < 0x38800000u) {                          // below 2^-14: a subnormal half
    return sign | uint16_t(std::nearbyint(bits_to_float(a) * 16777216.0f));
  }
  const uint32_t rounded = a + 0xFFFu + ((a >> 13) & 1u);
  return sign | uint16_t((rounded - (112u << 23)) >> 13);
}
