// Scores of keys [row0, row0 + block) for every head of the workgroup into p_sh: each thread
// scores keys lane.id, lane.id + WG, ... over the whole head. Returns the thread's largest score
// per head (-max_f32 where it scored none).
fn score_block(row0: u32, block: u32, kvh: u32, lane: Lane) -> array<f32, GS> {
    let hd = p.head_dim;
    var local_max: array<f32, GS>;
    for (var g = 0u; g < GS; g++) {
        local_max[g] = -3.4028235e38;
    }
    for (var jj = lane.id; jj < block; jj += WG) {
        let k_base = (row0 + jj) * p.kv_stride + kvh * hd;
        var dot: array<f32, GS>;
        for (var d = 0u; d < hd; d++) {
            let kv = k[k_base + d];
            for (var g = 0u; g < GS; g++) {
                dot[g] = fma(q_sh[g * hd + d], kv, dot[g]);
            }
        }
        for (var g = 0u; g < GS; g++) {
            p_sh[g * BLOCK + jj] = dot[g];
            local_max[g] = max(local_max[g], dot[g]);
        }
    }
    return local_max;
}
