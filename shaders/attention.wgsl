// Attention for one (query row, head) per workgroup, over the key/value rows
// [kv_range[2q], kv_range[2q] + kv_range[2q+1]) of k and v. The host builds the ranges: causal
// prefill gives query j of a prompt the prompt's first j+1 rows; decode gives a sequence its whole
// cache. So ragged batches of either kind, or both, run in one dispatch. Grouped-query heads share
// a kv head. Blocks of keys at a time with an online softmax.
struct Params {
    n_queries: u32,
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    scale: f32,
    q_stride: u32,
    kv_stride: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> kv_range: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> q_sh: array<f32, HD_SLOTS * WG>;
// Scores, then probabilities, of one block of BLOCK = WG * KEYS_PER_THREAD keys: large blocks
// keep the number of workgroup barriers per key low (they dominate on software adapters).
const BLOCK: u32 = WG * KEYS_PER_THREAD;
var<workgroup> p_sh: array<f32, BLOCK>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, lane: Lane) {
    let item = flat_workgroup(wg, nwg);
    if item >= p.n_queries * p.n_heads {
        return;
    }
    let qi = item / p.n_heads;
    let h = item % p.n_heads;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let start = kv_range[2u * qi];
    let len = kv_range[2u * qi + 1u];
    let hd = p.head_dim;
    let q_base = qi * p.q_stride + h * hd;
    for (var d = lane.id; d < hd; d += WG) {
        q_sh[d] = q[q_base + d] * p.scale;
    }
    workgroupBarrier();

    var m = -3.4028235e38;
    var l = 0.0;
    var acc: array<f32, HD_SLOTS>;
    for (var kb = 0u; kb < len; kb += BLOCK) {
        let block = min(BLOCK, len - kb);
        // Each thread scores keys lane.id, lane.id + WG, ... of the block.
        var local_max = -3.4028235e38;
        for (var jj = lane.id; jj < block; jj += WG) {
            let k_base = (start + kb + jj) * p.kv_stride + kvh * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot = fma(q_sh[d], k[k_base + d], dot);
            }
            p_sh[jj] = dot;
            local_max = max(local_max, dot);
        }
        let new_m = max(m, wg_max(local_max, lane));
        var local_sum = 0.0;
        for (var jj = lane.id; jj < block; jj += WG) {
            let pj = exp(p_sh[jj] - new_m);
            p_sh[jj] = pj;
            local_sum += pj;
        }
        let correction = exp(m - new_m);
        l = l * correction + wg_sum(local_sum, lane);
        workgroupBarrier();
        for (var slot = 0u; slot < HD_SLOTS; slot++) {
            let d = lane.id + slot * WG;
            if d < hd {
                var a = acc[slot] * correction;
                let v_base = (start + kb) * p.kv_stride + kvh * hd + d;
                for (var jj = 0u; jj < block; jj++) {
                    a = fma(p_sh[jj], v[v_base + jj * p.kv_stride], a);
                }
                acc[slot] = a;
            }
        }
        workgroupBarrier();
        m = new_m;
    }
    let inv = select(0.0, 1.0 / l, len > 0u);
    for (var slot = 0u; slot < HD_SLOTS; slot++) {
        let d = lane.id + slot * WG;
        if d < hd {
            out[qi * p.q_stride + h * hd + d] = acc[slot] * inv;
        }
    }
}
