// Expert choice per token: scores from the router logits (softmax or sigmoid), the top k by
// score + bias (the bias, DeepSeek-V3's correction, only steers the choice), weights from the
// unbiased scores, optionally renormalised to sum to one, then scaled. With groups (DeepSeek),
// only experts of the topk_group best groups are candidates, a group scoring its best key (V2)
// or the sum of its two best (V3). One thread per token.
struct Params {
    tokens: u32,
    n_experts: u32,
    top_k: u32,
    sigmoid: u32,
    renormalize: u32,
    has_bias: u32,
    scale: f32,
    n_group: u32,
    topk_group: u32,
    group_by_top_two: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> ids: array<u32>;
@group(0) @binding(4) var<storage, read_write> weights: array<f32>;

fn score(base: u32, e: u32, row_max: f32, inv_sum: f32) -> f32 {
    let z = logits[base + e];
    if p.sigmoid == 1u {
        return 1.0 / (1.0 + exp(-z));
    }
    return exp(z - row_max) * inv_sum;
}

fn choice_key(base: u32, e: u32, row_max: f32, inv_sum: f32) -> f32 {
    var key = score(base, e, row_max, inv_sum);
    if p.has_bias == 1u {
        key += bias[e];
    }
    return key;
}

// A bit per group that may be chosen from: the topk_group best, ties to the lower group.
fn allowed_groups(base: u32, row_max: f32, inv_sum: f32) -> u32 {
    if p.n_group <= 1u {
        return 0xffffffffu;
    }
    let per = p.n_experts / p.n_group;
    var chosen = 0u;
    for (var j = 0u; j < p.topk_group; j++) {
        var best_s = -3.4028235e38;
        var best_g = 0xffffffffu;
        for (var g = 0u; g < p.n_group; g++) {
            if (chosen & (1u << g)) != 0u {
                continue;
            }
            var first = -3.4028235e38;
            var second = -3.4028235e38;
            for (var e = g * per; e < (g + 1u) * per; e++) {
                let key = choice_key(base, e, row_max, inv_sum);
                if key > first {
                    second = first;
                    first = key;
                } else if key > second {
                    second = key;
                }
            }
            var s = first;
            if p.group_by_top_two == 1u && per > 1u {
                s = first + second;
            }
            if s > best_s || best_g == 0xffffffffu {
                best_s = s;
                best_g = g;
            }
        }
        chosen |= 1u << best_g;
    }
    return chosen;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = flat_workgroup(wg, nwg) * WG + lid;
    if t >= p.tokens {
        return;
    }
    let base = t * p.n_experts;
    var row_max = -3.4028235e38;
    for (var e = 0u; e < p.n_experts; e++) {
        row_max = max(row_max, logits[base + e]);
    }
    var sum = 0.0;
    for (var e = 0u; e < p.n_experts; e++) {
        sum += exp(logits[base + e] - row_max);
    }
    let inv_sum = 1.0 / sum;
    let allowed = allowed_groups(base, row_max, inv_sum);
    let per_group = p.n_experts / max(p.n_group, 1u);

    // The j-th pick is the best key strictly after the (j-1)-th in the order (key desc, index asc),
    // so no per-token array of taken experts is needed.
    var prev_key = 3.4028235e38;
    var prev_e = 0xffffffffu;
    var total = 0.0;
    for (var j = 0u; j < p.top_k; j++) {
        var best_key = -3.4028235e38;
        var best_e = 0xffffffffu;
        for (var e = 0u; e < p.n_experts; e++) {
            if (allowed & (1u << (e / per_group))) == 0u {
                continue;
            }
            let key = choice_key(base, e, row_max, inv_sum);
            let after_prev = key < prev_key || (key == prev_key && (prev_e == 0xffffffffu || e > prev_e));
            if after_prev && (key > best_key || best_e == 0xffffffffu) {
                best_key = key;
                best_e = e;
            }
        }
        if best_e == 0xffffffffu {
            best_e = 0u; // every score NaN: keep the index in range
        }
        prev_key = best_key;
        prev_e = best_e;
        let wgt = score(base, best_e, row_max, inv_sum);
        ids[t * p.top_k + j] = best_e;
        weights[t * p.top_k + j] = wgt;
        total += wgt;
    }
    var norm = p.scale;
    if p.renormalize == 1u {
        norm = p.scale / total;
    }
    for (var j = 0u; j < p.top_k; j++) {
        weights[t * p.top_k + j] *= norm;
    }
}
