//! Choosing the next token: greedy, or sampling with temperature, top-k and top-p from a
//! per-sequence random stream, so a sequence's output depends on the seed and its own id only,
//! never on which other sequences share its batch.

mod stop;

pub use stop::StopStrings;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// FNV-1a: a stable hash of a sequence's id, to derive its random stream.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

pub struct SequenceSampler {
    rng: StdRng,
}

impl SequenceSampler {
    /// The stream of the sequence whose id (as JSON text) is `id_key`.
    pub fn new(seed: u64, id_key: &str) -> Self {
        SequenceSampler { rng: StdRng::seed_from_u64(seed ^ stable_hash(id_key.as_bytes()).rotate_left(17)) }
    }

    /// Draws a token from `logits` as transformers does: temperature, then top-k, then top-p.
    pub fn sample(&mut self, logits: &[f32], p: &SamplingParams) -> u32 {
        if p.greedy() {
            return argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
        if order.is_empty() {
            return 0;
        }
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0]] as f64;
        let t = p.temperature as f64;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / t).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                mass += q;
                if mass >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (i, q) in probs.iter().enumerate() {
            u -= q;
            if u < 0.0 {
                return order[i] as u32;
            }
        }
        *order.last().expect("not empty") as u32
    }
}

/// One generated token's log-probability under the model (the raw logits, before temperature
/// and the top-k/top-p cuts, as the OpenAI API and vLLM report it) and the most likely
/// alternatives at that position.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// The `top` most likely tokens, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// The log-softmax of `logits` at `token`, and its `top` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
    let total: f64 = logits.iter().filter(|v| !v.is_nan()).map(|&v| (v as f64 - max).exp()).sum();
    let log_z = max + total.ln();
    let lp = |i: usize| (logits[i] as f64 - log_z) as f32;
    let mut best: Vec<usize> = Vec::with_capacity(top + 1);
    if top > 0 {
        for i in (0..logits.len()).filter(|&i| !logits[i].is_nan()) {
            if best.len() == top && logits[i] <= logits[best[top - 1]] {
                continue;
            }
            let at = best.partition_point(|&b| logits[b] >= logits[i]);
            best.insert(at, i);
            best.truncate(top);
        }
    }
    TokenLogprob { token, logprob: lp(token as usize), top: best.into_iter().map(|i| (i as u32, lp(i))).collect() }
}

/// The first index of the largest value (NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_id_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams { temperature: 0.8, top_k: 20, top_p: 0.9, seed: 7 };
        let draw = |id: &str| {
            let mut s = SequenceSampler::new(7, id);
            (0..30).map(|_| s.sample(&logits, &p)).collect::<Vec<_>>()
        };
        assert_eq!(draw("\"a\""), draw("\"a\""));
        assert_ne!(draw("\"a\""), draw("\"b\""));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        let mut s = SequenceSampler::new(1, "1");
        let p = SamplingParams { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 1 };
        assert!((0..20).all(|_| s.sample(&logits, &p) == 1));
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 1 };
        assert!((0..50).all(|_| s.sample(&logits, &p) == 1), "top-p 0.5 keeps only the first token (p > 0.5)");
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.95, seed: 1 };
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits, &p)).collect();
        assert!(draws.contains(&2) && !draws.contains(&3), "the 0.95 nucleus holds tokens 1 and 2 only");
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_best_first() {
        let logits = vec![1.0f32, 3.0, f32::NAN, 3.0, -2.0, 0.5];
        let got = token_logprob(&logits, 5, 3);
        let z: f64 = [1.0f64, 3.0, 3.0, -2.0, 0.5].iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((got.logprob as f64 - (0.5 - z)).abs() < 1e-6);
        assert_eq!(got.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 0]);
        assert!((got.top[0].1 as f64 - (3.0 - z)).abs() < 1e-6);
        let mass: f64 = (0..6).filter(|&i| i != 2).map(|i| (token_logprob(&logits, i, 0).logprob as f64).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 5.0, 5.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NAN, 2.0]), 1);
    }
}
