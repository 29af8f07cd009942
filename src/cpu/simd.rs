//! The vector primitives the host kernels are built from, one implementation per instruction set,
//! picked at run time: AVX-512 (16 f32 lanes), AVX2 with FMA (8 lanes), NEON (4 lanes) and a
//! portable path. bf16 is widened to f32 by a 16-bit shift. Every path is tested against the
//! portable one on awkward lengths (`tests` below), and the kernels take the path as a value so
//! that their tests can run each one.

use std::sync::OnceLock;

/// An instruction set the host kernels can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Isa {
    /// The widest path this CPU runs (detected once). `MOEGEN_CPU_ISA=portable|avx2|avx512|neon`
    /// narrows it, to compare paths on one machine.
    pub fn detected() -> Isa {
        static PICKED: OnceLock<Isa> = OnceLock::new();
        *PICKED.get_or_init(|| {
            let available = Isa::available();
            let best = *available.last().expect("the portable path is always available");
            match std::env::var("MOEGEN_CPU_ISA") {
                Ok(want) => available.iter().copied().find(|i| i.name() == want.trim()).unwrap_or_else(|| {
                    log::warn!("MOEGEN_CPU_ISA={want}: not one of {:?} on this CPU; using {}", available.iter().map(|i| i.name()).collect::<Vec<_>>(), best.name());
                    best
                }),
                Err(_) => best,
            }
        })
    }

    /// Every path this CPU can run, narrowest first.
    pub fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            // F16C (on every CPU with AVX2) decodes the block formats' f16 scales.
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                out.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c") {
                out.push(Isa::Avx512);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                out.push(Isa::Neon);
            }
        }
        out
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => "avx512",
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => "neon",
        }
    }
}

/// Rows of stored values: f32, or bf16 bit patterns.
#[derive(Clone, Copy, Debug)]
pub enum Values<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Values<'a> {
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `at..at + n`.
    #[inline]
    pub fn slice(&self, at: usize, n: usize) -> Values<'a> {
        match *self {
            Values::F32(v) => Values::F32(&v[at..at + n]),
            Values::Bf16(v) => Values::Bf16(&v[at..at + n]),
        }
    }
}

#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `sum(a[i] * b[i])`.
#[inline]
pub fn dot(isa: Isa, a: &[f32], b: Values) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    match (isa, b) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Values::F32(b)) => unsafe { x86::dot_f32_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Values::Bf16(b)) => unsafe { x86::dot_bf16_avx512(a, b) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Values::F32(b)) => unsafe { x86::dot_f32_avx2(a, b) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Values::Bf16(b)) => unsafe { x86::dot_bf16_avx2(a, b) },
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, Values::F32(b)) => unsafe { arm::dot_f32_neon(a, b) },
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, Values::Bf16(b)) => unsafe { arm::dot_bf16_neon(a, b) },
        (_, b) => portable::dot(a, b),
    }
}

/// `y[i] = y[i] * c + p * x[i]`: the online softmax's rescale and accumulate in one pass.
#[inline]
pub fn scale_add(isa: Isa, y: &mut [f32], c: f32, p: f32, x: Values) {
    debug_assert_eq!(y.len(), x.len());
    match (isa, x) {
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Values::F32(x)) => unsafe { x86::scale_add_f32_avx512(y, c, p, x) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx512, Values::Bf16(x)) => unsafe { x86::scale_add_bf16_avx512(y, c, p, x) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Values::F32(x)) => unsafe { x86::scale_add_f32_avx2(y, c, p, x) },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Values::Bf16(x)) => unsafe { x86::scale_add_bf16_avx2(y, c, p, x) },
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, Values::F32(x)) => unsafe { arm::scale_add_f32_neon(y, c, p, x) },
        #[cfg(target_arch = "aarch64")]
        (Isa::Neon, Values::Bf16(x)) => unsafe { arm::scale_add_bf16_neon(y, c, p, x) },
        (_, x) => portable::scale_add(y, c, p, x),
    }
}

/// `out[i] = silu(gate[i]) * up[i]`, through [`exp_approx`] so that the compiler vectorises it
/// (the library's `expf` is one call per element: a SwiGLU took a twentieth of a CPU step).
/// Every path computes the same operations in the same order: the same bits on each.
pub fn swiglu(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "swiglu lengths");
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(gate: &[f32], up: &[f32], out: &mut [f32]) {
            swiglu_body(gate, up, out)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
            swiglu_body(gate, up, out)
        }
        match isa {
            // SAFETY: the path is only chosen where detection found its instructions.
            Isa::Avx512 => return unsafe { avx512(gate, up, out) },
            Isa::Avx2 => return unsafe { avx2(gate, up, out) },
            _ => {}
        }
    }
    let _ = isa;
    swiglu_body(gate, up, out)
}

#[inline(always)]
fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_approx(-g)) * u;
    }
}

/// `e^x` within 2 ulp (Cephes' `expf`: `x = n ln 2 + r`, a degree-7 polynomial in `r`, then
/// `2^n` by the exponent bits), with plain multiplies and adds (no fused ones, whose presence
/// would differ by path). Inputs past the normal f32 range give 0 below and infinity above; NaN stays
/// NaN.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in a few bits, so that `x - n ln 2` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_55, 88.376_26);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = p * r * r + r + 1.0;
    let scaled = e * f32::from_bits(((n as i32 + 127) as u32) << 23);
    // Past the range: the limits (and NaN through), outside the vector body's arithmetic.
    if x > 88.376_26 {
        f32::INFINITY
    } else if x < -87.336_55 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        scaled
    }
}

/// `silu(g) = g / (1 + e^-g)` in operations whose every result is fixed by IEEE rounding (plain
/// multiplies and adds, no division, whose accuracy GPUs do not promise), so that a GPU running
/// the same operations (`shaders/swiglu_portable.wgsl`, under `--gpu-compute int8`) gives the
/// same bits: [`exp_approx`]'s operations on `-g` clamped to `[-87.33655, 80]` (no branches:
/// above, `1 + e` rounds to 1), then `1 / (1 + e)` by three Newton steps from a linear start on
/// the mantissa (in [1/2, 1)), scaled by the exponent's power of two. Within 2e-7 of silu for
/// `g >= -80`; below, `g e^-80` (under 1e-32 in magnitude) for `g e^g`.
#[inline(always)]
pub fn silu_portable(g: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = (-g).clamp(-87.336_55, 80.0);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let e = (p * r * r + r + 1.0) * f32::from_bits(((n as i32 + 127) as u32) << 23);
    g * recip_portable(1.0 + e)
}

/// `1 / y` for `y` in `[1, 2^116)`, to within about an ulp, by fixed operations (see
/// [`silu_portable`]): `y = m 2^(e+1)` with `m` in `[1/2, 1)`, where the linear start is within
/// 1/17.
#[inline(always)]
fn recip_portable(y: f32) -> f32 {
    const START_A: f32 = f32::from_bits(0x4034_b4b5); // 48 / 17
    const START_B: f32 = f32::from_bits(0x3ff0_f0f1); // 32 / 17
    let bits = y.to_bits();
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let mut r = START_A - START_B * m;
    for _ in 0..3 {
        r = r + r * (1.0 - m * r);
    }
    let scale = f32::from_bits((253 - (bits >> 23)) << 23);
    r * scale
}

/// `out[i] = silu_portable(gate[i]) * up[i]`: the GPU's SwiGLU under `--gpu-compute int8`, bit
/// for bit (the host experts beside such a GPU).
pub fn swiglu_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len(), "swiglu lengths");
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_portable(g) * u;
    }
}

mod portable {
    use super::{bf16_to_f32, Values};

    /// Eight partial sums, as the vector paths keep lanes, so the compiler can vectorise it too
    /// (plain multiply-adds: `mul_add` without FMA hardware is a library call).
    pub fn dot(a: &[f32], b: Values) -> f32 {
        let mut acc = [0f32; 8];
        match b {
            Values::F32(b) => {
                let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
                let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
                for (x, y) in ac.zip(bc) {
                    for l in 0..8 {
                        acc[l] += x[l] * y[l];
                    }
                }
                acc.iter().sum::<f32>() + tail
            }
            Values::Bf16(b) => {
                let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
                let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, &y)| x * bf16_to_f32(y)).sum();
                for (x, y) in ac.zip(bc) {
                    for l in 0..8 {
                        acc[l] += x[l] * bf16_to_f32(y[l]);
                    }
                }
                acc.iter().sum::<f32>() + tail
            }
        }
    }

    pub fn scale_add(y: &mut [f32], c: f32, p: f32, x: Values) {
        match x {
            Values::F32(x) => y.iter_mut().zip(x).for_each(|(y, &x)| *y = *y * c + p * x),
            Values::Bf16(x) => y.iter_mut().zip(x).for_each(|(y, &x)| *y = *y * c + p * bf16_to_f32(x)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::bf16_to_f32;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len() / 16 * 16;
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i + 16)), _mm512_loadu_ps(b.as_ptr().add(i + 16)), s1);
            i += 32;
        }
        if i < n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)), s0);
        }
        let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
        for j in n..a.len() {
            sum += a[j] * b[j];
        }
        sum
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn widen16(p: *const u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)), 16))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dot_bf16_avx512(a: &[f32], b: &[u16]) -> f32 {
        let n = a.len() / 16 * 16;
        let mut s = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            s = _mm512_fmadd_ps(_mm512_loadu_ps(a.as_ptr().add(i)), widen16(b.as_ptr().add(i)), s);
            i += 16;
        }
        let mut sum = _mm512_reduce_add_ps(s);
        for j in n..a.len() {
            sum += a[j] * bf16_to_f32(b[j]);
        }
        sum
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn scale_add_f32_avx512(y: &mut [f32], c: f32, p: f32, x: &[f32]) {
        let n = y.len() / 16 * 16;
        let (vc, vp) = (_mm512_set1_ps(c), _mm512_set1_ps(p));
        let mut i = 0;
        while i < n {
            let yp = y.as_mut_ptr().add(i);
            _mm512_storeu_ps(yp, _mm512_fmadd_ps(vp, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_mul_ps(_mm512_loadu_ps(yp), vc)));
            i += 16;
        }
        for j in n..y.len() {
            y[j] = p.mul_add(x[j], y[j] * c);
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn scale_add_bf16_avx512(y: &mut [f32], c: f32, p: f32, x: &[u16]) {
        let n = y.len() / 16 * 16;
        let (vc, vp) = (_mm512_set1_ps(c), _mm512_set1_ps(p));
        let mut i = 0;
        while i < n {
            let yp = y.as_mut_ptr().add(i);
            _mm512_storeu_ps(yp, _mm512_fmadd_ps(vp, widen16(x.as_ptr().add(i)), _mm512_mul_ps(_mm512_loadu_ps(yp), vc)));
            i += 16;
        }
        for j in n..y.len() {
            y[j] = p.mul_add(bf16_to_f32(x[j]), y[j] * c);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum256(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn widen8(p: *const u16) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len() / 8 * 8;
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i + 8)), _mm256_loadu_ps(b.as_ptr().add(i + 8)), s1);
            i += 16;
        }
        if i < n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)), s0);
        }
        let mut sum = hsum256(_mm256_add_ps(s0, s1));
        for j in n..a.len() {
            sum += a[j] * b[j];
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16_avx2(a: &[f32], b: &[u16]) -> f32 {
        let n = a.len() / 8 * 8;
        let mut s = _mm256_setzero_ps();
        let mut i = 0;
        while i < n {
            s = _mm256_fmadd_ps(_mm256_loadu_ps(a.as_ptr().add(i)), widen8(b.as_ptr().add(i)), s);
            i += 8;
        }
        let mut sum = hsum256(s);
        for j in n..a.len() {
            sum += a[j] * bf16_to_f32(b[j]);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scale_add_f32_avx2(y: &mut [f32], c: f32, p: f32, x: &[f32]) {
        let n = y.len() / 8 * 8;
        let (vc, vp) = (_mm256_set1_ps(c), _mm256_set1_ps(p));
        let mut i = 0;
        while i < n {
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(yp, _mm256_fmadd_ps(vp, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_mul_ps(_mm256_loadu_ps(yp), vc)));
            i += 8;
        }
        for j in n..y.len() {
            y[j] = p.mul_add(x[j], y[j] * c);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scale_add_bf16_avx2(y: &mut [f32], c: f32, p: f32, x: &[u16]) {
        let n = y.len() / 8 * 8;
        let (vc, vp) = (_mm256_set1_ps(c), _mm256_set1_ps(p));
        let mut i = 0;
        while i < n {
            let yp = y.as_mut_ptr().add(i);
            _mm256_storeu_ps(yp, _mm256_fmadd_ps(vp, widen8(x.as_ptr().add(i)), _mm256_mul_ps(_mm256_loadu_ps(yp), vc)));
            i += 8;
        }
        for j in n..y.len() {
            y[j] = p.mul_add(bf16_to_f32(x[j]), y[j] * c);
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::bf16_to_f32;
    use std::arch::aarch64::*;

    #[target_feature(enable = "neon")]
    unsafe fn widen4(p: *const u16) -> float32x4_t {
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p)))
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_f32_neon(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len() / 8 * 8;
        let (mut s0, mut s1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        let mut i = 0;
        while i < n {
            s0 = vfmaq_f32(s0, vld1q_f32(a.as_ptr().add(i)), vld1q_f32(b.as_ptr().add(i)));
            s1 = vfmaq_f32(s1, vld1q_f32(a.as_ptr().add(i + 4)), vld1q_f32(b.as_ptr().add(i + 4)));
            i += 8;
        }
        let mut sum = vaddvq_f32(vaddq_f32(s0, s1));
        for j in n..a.len() {
            sum += a[j] * b[j];
        }
        sum
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn dot_bf16_neon(a: &[f32], b: &[u16]) -> f32 {
        let n = a.len() / 4 * 4;
        let mut s = vdupq_n_f32(0.0);
        let mut i = 0;
        while i < n {
            s = vfmaq_f32(s, vld1q_f32(a.as_ptr().add(i)), widen4(b.as_ptr().add(i)));
            i += 4;
        }
        let mut sum = vaddvq_f32(s);
        for j in n..a.len() {
            sum += a[j] * bf16_to_f32(b[j]);
        }
        sum
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn scale_add_f32_neon(y: &mut [f32], c: f32, p: f32, x: &[f32]) {
        let n = y.len() / 4 * 4;
        let (vc, vp) = (vdupq_n_f32(c), vdupq_n_f32(p));
        let mut i = 0;
        while i < n {
            let yp = y.as_mut_ptr().add(i);
            vst1q_f32(yp, vfmaq_f32(vmulq_f32(vld1q_f32(yp), vc), vp, vld1q_f32(x.as_ptr().add(i))));
            i += 4;
        }
        for j in n..y.len() {
            y[j] = p.mul_add(x[j], y[j] * c);
        }
    }

    #[target_feature(enable = "neon")]
    pub unsafe fn scale_add_bf16_neon(y: &mut [f32], c: f32, p: f32, x: &[u16]) {
        let n = y.len() / 4 * 4;
        let (vc, vp) = (vdupq_n_f32(c), vdupq_n_f32(p));
        let mut i = 0;
        while i < n {
            let yp = y.as_mut_ptr().add(i);
            vst1q_f32(yp, vfmaq_f32(vmulq_f32(vld1q_f32(yp), vc), vp, widen4(x.as_ptr().add(i))));
            i += 4;
        }
        for j in n..y.len() {
            y[j] = p.mul_add(bf16_to_f32(x[j]), y[j] * c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Every path against an f64 sum, on lengths around each lane count.
    #[test]
    fn every_path_matches_f64_on_awkward_lengths() {
        for isa in Isa::available() {
            for n in [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64, 127, 257, 576] {
                let a = random(n, n as u64);
                let b = random(n, n as u64 + 99);
                let b16: Vec<u16> = b.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
                let want16: f64 = a.iter().zip(&b16).map(|(&x, &y)| x as f64 * bf16_to_f32(y) as f64).sum();
                let scale = a.iter().map(|x| x.abs() as f64).sum::<f64>().max(1.0);
                let got = dot(isa, &a, Values::F32(&b));
                let got16 = dot(isa, &a, Values::Bf16(&b16));
                assert!((got as f64 - want).abs() / scale < 1e-6, "{isa:?} f32 dot n={n}: {got} vs {want}");
                assert!((got16 as f64 - want16).abs() / scale < 1e-6, "{isa:?} bf16 dot n={n}: {got16} vs {want16}");

                for (x, widened) in [(Values::F32(&b), b.clone()), (Values::Bf16(&b16), b16.iter().map(|&v| bf16_to_f32(v)).collect())] {
                    let mut y = a.clone();
                    scale_add(isa, &mut y, 0.75, -1.5, x);
                    for i in 0..n {
                        let want = 0.75f64 * a[i] as f64 - 1.5 * widened[i] as f64;
                        assert!((y[i] as f64 - want).abs() < 1e-6, "{isa:?} scale_add n={n} i={i}: {} vs {want}", y[i]);
                    }
                }
            }
        }
    }

    /// Every path's SwiGLU against f64, on lengths around each lane count and at the edges of
    /// exp's range; the paths give the same bits.
    #[test]
    fn swiglu_matches_f64_on_every_path() {
        let mut gate: Vec<f32> = random(1000, 5).iter().map(|v| v * 30.0).collect();
        gate.extend([0.0, -0.0, 1e-30, -1e-30, 87.0, -87.0, 88.3, -88.3, 89.0, -89.0, 100.0, -100.0, 1e30, -1e30, f32::INFINITY, f32::NEG_INFINITY]);
        let up = random(gate.len(), 6);
        let mut first: Option<Vec<u32>> = None;
        for isa in Isa::available() {
            for n in [0, 1, 7, 8, 9, 15, 16, 17, 33, 257, gate.len()] {
                let mut out = vec![f32::NAN; n];
                swiglu(isa, &gate[..n], &up[..n], &mut out);
                for i in 0..n {
                    let g = gate[i] as f64;
                    // -inf gives NaN (-inf / inf), as the formula does in f64 and in torch.
                    let want = g / (1.0 + (-g).exp()) * up[i] as f64;
                    let same = out[i] as f64 == want || (want.is_nan() && out[i].is_nan());
                    let err = (out[i] as f64 - want).abs();
                    assert!(same || err <= 4e-7 * want.abs() + 1e-30, "{isa:?} swiglu({}) * {}: {} vs {want}", gate[i], up[i], out[i]);
                }
                if n == gate.len() {
                    let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(first.get_or_insert_with(|| bits.clone()), &bits, "{isa:?} differs from the first path");
                }
            }
        }
        for x in [-87.0f32, -10.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 10.0, 50.0, 88.0] {
            let (got, want) = (exp_approx(x) as f64, (x as f64).exp());
            assert!((got - want).abs() <= 2.5e-7 * want, "exp({x}): {got} vs {want}");
        }
        assert_eq!(exp_approx(89.0), f32::INFINITY);
        assert_eq!(exp_approx(-90.0), 0.0);
        assert!(exp_approx(f32::NAN).is_nan());
    }

    #[test]
    fn detection_picks_an_available_path() {
        assert!(Isa::available().contains(&Isa::detected()));
        // NEON is part of every aarch64 CPU (and of qemu-aarch64, where scripts/test-aarch64.sh
        // runs these tests): its path must be among those tested.
        #[cfg(target_arch = "aarch64")]
        assert_eq!(Isa::detected(), Isa::Neon);
    }
}
