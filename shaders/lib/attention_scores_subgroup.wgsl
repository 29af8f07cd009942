// Scores of keys [row0, row0 + block) for every head of the workgroup into p_sh: each subgroup
// takes keys sg_id, sg_id + sg_count, ...; its lanes read consecutive elements of the key row
// (one coalesced load per step) and subgroupAdd sums their products. Every lane of a subgroup
// sees the same keys, so the loops stay uniform across it. Returns the invocation's largest score
// per head (-max_f32 where its subgroup scored none).
fn score_block(row0: u32, block: u32, kvh: u32, lane: Lane) -> array<f32, GS> {
    let hd = p.head_dim;
    // A workgroup smaller than the subgroup size is one partial subgroup of WG lanes.
    let lanes = min(lane.sg_size, WG);
    var local_max: array<f32, GS>;
    for (var g = 0u; g < GS; g++) {
        local_max[g] = -3.4028235e38;
    }
    for (var jj = lane.sg_id; jj < block; jj += lane.sg_count) {
        let k_base = (row0 + jj) * p.kv_stride + kvh * hd;
        var dot: array<f32, GS>;
        for (var d0 = 0u; d0 < hd; d0 += lanes) {
            let d = d0 + lane.sg_lane;
            if d < hd {
                let kv = k[k_base + d];
                for (var g = 0u; g < GS; g++) {
                    dot[g] = fma(q_sh[g * hd + d], kv, dot[g]);
                }
            }
        }
        for (var g = 0u; g < GS; g++) {
            let s = subgroupAdd(dot[g]);
            if lane.sg_lane == 0u {
                p_sh[g * BLOCK + jj] = s;
            }
            local_max[g] = max(local_max[g], s);
        }
    }
    return local_max;
}
