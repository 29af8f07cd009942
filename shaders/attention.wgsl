// Attention over the key/value rows [kv_range[2q], kv_range[2q] + kv_range[2q+1]) of k and v for
// each query row q. The host builds the ranges: causal prefill gives query j of a prompt the
// prompt's first j+1 rows; decode gives a sequence its whole cache. So ragged batches of either
// kind, or both, run in one dispatch. One workgroup serves GS query heads that share a kv head
// (grouped-query attention), so each key and value row is read once for all of them. Keys go in
// blocks of BLOCK with an online softmax; large blocks keep workgroup barriers per key few.
// Values may be narrower than keys, and may be the keys' first columns (MLA's latent cache, where
// one row per token serves as key and value for every head). How a block's keys are scored,
// a thread per key or a subgroup per key, is `score_block` (shaders/lib/attention_scores_*.wgsl).
struct Params {
    n_queries: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    q_stride: u32,
    kv_stride: u32,
    v_dim: u32,
    v_stride: u32,
    out_stride: u32,
    v_head_stride: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> kv_range: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

const BLOCK: u32 = WG * KEYS_PER_THREAD;
var<workgroup> q_sh: array<f32, GS * HD_SLOTS * WG>;
var<workgroup> p_sh: array<f32, GS * BLOCK>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, lane: Lane) {
    let group = p.n_heads / p.n_kv_heads;
    let splits = group / GS;
    let item = flat_workgroup(wg, nwg);
    if item >= p.n_queries * p.n_kv_heads * splits {
        return;
    }
    let qi = item / (p.n_kv_heads * splits);
    let kvh = (item / splits) % p.n_kv_heads;
    let h0 = kvh * group + (item % splits) * GS;
    let start = kv_range[2u * qi];
    let len = kv_range[2u * qi + 1u];
    let hd = p.head_dim;
    let vd = p.v_dim;
    let v_head = kvh * p.v_head_stride;
    for (var i = lane.id; i < GS * hd; i += WG) {
        q_sh[i] = q[qi * p.q_stride + h0 * hd + i] * p.scale;
    }
    workgroupBarrier();

    var m: array<f32, GS>;
    var l: array<f32, GS>;
    var acc: array<f32, GS * HD_SLOTS>;
    for (var g = 0u; g < GS; g++) {
        m[g] = -3.4028235e38;
    }
    for (var kb = 0u; kb < len; kb += BLOCK) {
        let block = min(BLOCK, len - kb);
        // p_sh[g * BLOCK + jj] = the scores of the block's keys; each invocation's largest.
        var local_max = score_block(start + kb, block, kvh, lane);
        var correction: array<f32, GS>;
        for (var g = 0u; g < GS; g++) {
            let new_m = max(m[g], wg_max(local_max[g], lane));
            var local_sum = 0.0;
            for (var jj = lane.id; jj < block; jj += WG) {
                let pj = exp(p_sh[g * BLOCK + jj] - new_m);
                p_sh[g * BLOCK + jj] = pj;
                local_sum += pj;
            }
            correction[g] = exp(m[g] - new_m);
            l[g] = l[g] * correction[g] + wg_sum(local_sum, lane);
            m[g] = new_m;
        }
        workgroupBarrier();
        for (var slot = 0u; slot < HD_SLOTS; slot++) {
            let d = lane.id + slot * WG;
            if d < vd {
                var a: array<f32, GS>;
                for (var g = 0u; g < GS; g++) {
                    a[g] = acc[g * HD_SLOTS + slot] * correction[g];
                }
                let v_base = (start + kb) * p.v_stride + v_head + d;
                for (var jj = 0u; jj < block; jj++) {
                    let vv = v[v_base + jj * p.v_stride];
                    for (var g = 0u; g < GS; g++) {
                        a[g] = fma(p_sh[g * BLOCK + jj], vv, a[g]);
                    }
                }
                for (var g = 0u; g < GS; g++) {
                    acc[g * HD_SLOTS + slot] = a[g];
                }
            }
        }
        workgroupBarrier();
    }
    for (var g = 0u; g < GS; g++) {
        let inv = select(0.0, 1.0 / l[g], len > 0u);
        for (var slot = 0u; slot < HD_SLOTS; slot++) {
            let d = lane.id + slot * WG;
            if d < vd {
                out[qi * p.out_stride + (h0 + g) * vd + d] = acc[g * HD_SLOTS + slot] * inv;
            }
        }
    }
}
