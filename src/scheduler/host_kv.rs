//! The KV cache in host memory, in fixed-size pages: a sequence takes the pages its length needs,
//! nothing is padded to the longest, and finished sequences give their pages back.

use crate::cpu::attention::PagedRows;
use crate::cpu::simd::Values;
use crate::loader::config::ModelConfig;

pub struct HostKv {
    page_tokens: usize,
    /// Floats of one token's key and value in one layer (no values under MLA, whose cache row
    /// is all key).
    widths: [usize; 2],
    /// Bytes of one stored value: 4 (f32) or 2 (bf16, `--kv-dtype bf16`).
    value_bytes: usize,
    /// Per layer, every page's keys (values), page after page, in words so that the host
    /// attention reads f32 and bf16 rows in place.
    k: Vec<Vec<u32>>,
    v: Vec<Vec<u32>>,
    free: Vec<u32>,
    pages: usize,
}

impl HostKv {
    /// A store of as many pages as `bytes` holds. The memory is reserved lazily by the OS, so an
    /// unused store costs nothing.
    pub fn new(cfg: &ModelConfig, bytes: u64, page_tokens: usize) -> Self {
        let widths = cfg.kv_widths();
        let value_bytes = cfg.kv_value_bytes();
        let pages = (bytes / Self::page_bytes(cfg, page_tokens)) as usize;
        let slots = pages * page_tokens;
        HostKv {
            page_tokens,
            widths,
            value_bytes,
            k: (0..cfg.num_layers).map(|_| vec![0u32; (slots * widths[0] * value_bytes).div_ceil(4)]).collect(),
            v: (0..cfg.num_layers).map(|_| vec![0u32; (slots * widths[1] * value_bytes).div_ceil(4)]).collect(),
            free: (0..pages as u32).rev().collect(),
            pages,
        }
    }

    /// Bytes of one page: keys and values of `page_tokens` tokens in every layer.
    pub fn page_bytes(cfg: &ModelConfig, page_tokens: usize) -> u64 {
        (cfg.num_layers * page_tokens * cfg.kv_row() * cfg.kv_value_bytes()) as u64
    }

    pub fn pages_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.page_tokens)
    }

    pub fn total_pages(&self) -> usize {
        self.pages
    }

    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages for a sequence of up to `tokens` tokens, or None when too few are free.
    pub fn alloc(&mut self, tokens: usize) -> Option<Vec<u32>> {
        let n = self.pages_for(tokens);
        if n > self.free.len() {
            return None;
        }
        Some(self.free.split_off(self.free.len() - n))
    }

    pub fn release(&mut self, pages: Vec<u32>) {
        self.free.extend(pages);
    }

    /// The token slot of position `pos`.
    fn slot(&self, pages: &[u32], pos: usize) -> usize {
        pages[pos / self.page_tokens] as usize * self.page_tokens + pos % self.page_tokens
    }

    /// Stores consecutive tokens' keys and values from position `pos` on (in 16 bits when the
    /// store is bf16: the values were rounded to bf16 on the GPU, so nothing is lost).
    pub fn write(&mut self, layer: usize, pages: &[u32], pos: usize, k: &[f32], v: &[f32]) {
        let [kw, vw] = self.widths;
        let vb = self.value_bytes;
        let put = |dst: &mut [u8], src: &[f32]| {
            for (d, &x) in dst.chunks_exact_mut(vb).zip(src) {
                if vb == 2 {
                    d.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
                } else {
                    d.copy_from_slice(&x.to_le_bytes());
                }
            }
        };
        for j in 0..k.len() / kw {
            let at = self.slot(pages, pos + j);
            let (keys, values) = (bytemuck::cast_slice_mut::<u32, u8>(&mut self.k[layer]), bytemuck::cast_slice_mut::<u32, u8>(&mut self.v[layer]));
            put(&mut keys[at * kw * vb..(at + 1) * kw * vb], &k[j * kw..(j + 1) * kw]);
            put(&mut values[at * vw * vb..(at + 1) * vw * vb], &v[j * vw..(j + 1) * vw]);
        }
    }

    /// Appends positions `from..to` of a sequence's keys and values, as stored, to `k` and `v`,
    /// a page run at a time.
    pub fn gather(&self, layer: usize, pages: &[u32], from: usize, to: usize, k: &mut Vec<u8>, v: &mut Vec<u8>) {
        let mut pos = from;
        let vb = self.value_bytes;
        while pos < to {
            let run = (self.page_tokens - pos % self.page_tokens).min(to - pos);
            let at = self.slot(pages, pos);
            let [kw, vw] = self.widths;
            k.extend_from_slice(&bytemuck::cast_slice::<u32, u8>(&self.k[layer])[at * kw * vb..(at + run) * kw * vb]);
            v.extend_from_slice(&bytemuck::cast_slice::<u32, u8>(&self.v[layer])[at * vw * vb..(at + run) * vw * vb]);
            pos += run;
        }
    }

    /// Layer `layer`'s rows in place, for the host attention.
    pub fn rows(&self, layer: usize) -> PagedRows<'_> {
        let slots = self.pages * self.page_tokens;
        fn view(words: &[u32], n: usize, bf16: bool) -> Values<'_> {
            if bf16 {
                Values::Bf16(&bytemuck::cast_slice::<u32, u16>(words)[..n])
            } else {
                Values::F32(&bytemuck::cast_slice::<u32, f32>(words)[..n])
            }
        }
        let bf16 = self.value_bytes == 2;
        PagedRows {
            keys: view(&self.k[layer], slots * self.widths[0], bf16),
            values: view(&self.v[layer], slots * self.widths[1], bf16),
            page_tokens: self.page_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        let v = serde_json::json!({
            "architectures": ["MixtralForCausalLM"], "hidden_size": 8, "num_attention_heads": 2,
            "num_key_value_heads": 1, "num_hidden_layers": 2, "num_local_experts": 4,
            "num_experts_per_tok": 2, "intermediate_size": 16, "vocab_size": 50
        });
        ModelConfig::parse(&v, std::path::Path::new("config.json")).unwrap()
    }

    #[test]
    fn pages_hold_rows_across_boundaries_and_come_back() {
        let c = cfg();
        let row = c.kv_widths()[0];
        let mut kv = HostKv::new(&c, HostKv::page_bytes(&c, 3) * 5, 3);
        assert_eq!(kv.total_pages(), 5);
        let a = kv.alloc(7).unwrap();
        assert_eq!(a.len(), 3);
        assert!(kv.alloc(7).is_none(), "two pages left, three needed");
        let b = kv.alloc(4).unwrap();
        let keys: Vec<f32> = (0..7 * row).map(|i| i as f32).collect();
        let vals: Vec<f32> = keys.iter().map(|x| -x).collect();
        kv.write(1, &a, 0, &keys[..2 * row], &vals[..2 * row]);
        kv.write(1, &a, 2, &keys[2 * row..], &vals[2 * row..]);
        kv.write(1, &b, 0, &vals[..4 * row], &keys[..4 * row]);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        kv.gather(1, &a, 1, 7, &mut k, &mut v);
        let floats = |b: &[u8]| -> Vec<f32> { bytemuck::pod_collect_to_vec(b) };
        assert_eq!(floats(&k), keys[row..].to_vec());
        assert_eq!(floats(&v), vals[row..].to_vec());
        kv.release(a);
        assert_eq!(kv.free_pages(), 3);
    }

    #[test]
    fn bf16_pages_take_half_the_bytes_and_keep_bf16_values() {
        let mut c = cfg();
        let full = HostKv::page_bytes(&c, 4);
        c.kv_bf16 = true;
        assert_eq!(HostKv::page_bytes(&c, 4) * 2, full);
        let row = c.kv_widths()[0];
        let mut kv = HostKv::new(&c, HostKv::page_bytes(&c, 4) * 2, 4);
        let a = kv.alloc(6).unwrap();
        let keys: Vec<f32> = (0..6 * row).map(|i| half::bf16::from_f32(i as f32 * 0.37).to_f32()).collect();
        let vals: Vec<f32> = keys.iter().map(|x| -x).collect();
        kv.write(0, &a, 0, &keys, &vals);
        let (mut k, mut v) = (Vec::new(), Vec::new());
        kv.gather(0, &a, 2, 6, &mut k, &mut v);
        let widen = |b: &[u8]| -> Vec<f32> { b.chunks_exact(2).map(|h| half::bf16::from_le_bytes([h[0], h[1]]).to_f32()).collect() };
        assert_eq!(k.len(), 4 * row * 2);
        assert_eq!(widen(&k), keys[2 * row..].to_vec());
        assert_eq!(widen(&v), vals[2 * row..].to_vec());
    }
}
