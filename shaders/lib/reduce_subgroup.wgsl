// Workgroup reductions: within each subgroup by subgroup operations, then across subgroups
// through workgroup memory. Works for any subgroup size the adapter picks.
struct Lane {
    @builtin(local_invocation_index) id: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg_id: u32,
    @builtin(num_subgroups) sg_count: u32,
    @builtin(subgroup_size) sg_size: u32,
}

var<workgroup> red_f32: array<f32, WG>;
var<workgroup> red_u32: array<u32, WG>;

fn wg_sum(v: f32, lane: Lane) -> f32 {
    let s = subgroupAdd(v);
    if lane.sg_lane == 0u {
        red_f32[lane.sg_id] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < lane.sg_count; i++) {
        total += red_f32[i];
    }
    workgroupBarrier();
    return total;
}

fn wg_max(v: f32, lane: Lane) -> f32 {
    let s = subgroupMax(v);
    if lane.sg_lane == 0u {
        red_f32[lane.sg_id] = s;
    }
    workgroupBarrier();
    var m = red_f32[0];
    for (var i = 1u; i < lane.sg_count; i++) {
        m = max(m, red_f32[i]);
    }
    workgroupBarrier();
    return m;
}

fn wg_min_u32(v: u32, lane: Lane) -> u32 {
    let s = subgroupMin(v);
    if lane.sg_lane == 0u {
        red_u32[lane.sg_id] = s;
    }
    workgroupBarrier();
    var m = red_u32[0];
    for (var i = 1u; i < lane.sg_count; i++) {
        m = min(m, red_u32[i]);
    }
    workgroupBarrier();
    return m;
}
