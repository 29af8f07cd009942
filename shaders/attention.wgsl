// Attention for one (query row, head) per workgroup, over the key/value rows
// [kv_range[2q], kv_range[2q] + kv_range[2q+1]) of k and v. The host builds the ranges: causal
// prefill gives query j of a prompt the prompt's first j+1 rows; decode gives a sequence its whole
// cache. So ragged batches of either kind, or both, run in one dispatch. Grouped-query heads share
// a kv head. Blocks of WG keys at a time with an online softmax.
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
var<workgroup> p_sh: array<f32, WG>;

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
    for (var kb = 0u; kb < len; kb += WG) {
        let j = kb + lane.id;
        var s = -3.4028235e38;
        if j < len {
            let k_base = (start + j) * p.kv_stride + kvh * hd;
            var dot = 0.0;
            for (var d = 0u; d < hd; d++) {
                dot = fma(q_sh[d], k[k_base + d], dot);
            }
            s = dot;
        }
        let new_m = max(m, wg_max(s, lane));
        var pj = 0.0;
        if j < len {
            pj = exp(s - new_m);
        }
        p_sh[lane.id] = pj;
        let correction = exp(m - new_m);
        l = l * correction + wg_sum(pj, lane);
        workgroupBarrier();
        let block = min(WG, len - kb);
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
