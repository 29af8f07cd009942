// Workgroup reductions through workgroup memory (no subgroup support needed). WG is a power of two.
struct Lane {
    @builtin(local_invocation_index) id: u32,
}

var<workgroup> red_f32: array<f32, WG>;
var<workgroup> red_u32: array<u32, WG>;

fn wg_sum(v: f32, lane: Lane) -> f32 {
    red_f32[lane.id] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lane.id < s {
            red_f32[lane.id] += red_f32[lane.id + s];
        }
        workgroupBarrier();
    }
    let r = red_f32[0];
    workgroupBarrier();
    return r;
}

fn wg_max(v: f32, lane: Lane) -> f32 {
    red_f32[lane.id] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lane.id < s {
            red_f32[lane.id] = max(red_f32[lane.id], red_f32[lane.id + s]);
        }
        workgroupBarrier();
    }
    let r = red_f32[0];
    workgroupBarrier();
    return r;
}

fn wg_min_u32(v: u32, lane: Lane) -> u32 {
    red_u32[lane.id] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if lane.id < s {
            red_u32[lane.id] = min(red_u32[lane.id], red_u32[lane.id + s]);
        }
        workgroupBarrier();
    }
    let r = red_u32[0];
    workgroupBarrier();
    return r;
}
