// The MoE dispatch pre-pass, in one workgroup: count the (token, slot) assignments per expert,
// prefix them into row offsets, number each expert's BM-row tiles for the grouped matmul, and give
// every assignment its row in expert order. Rows within an expert come in no fixed order; each row
// is computed on its own, so results do not depend on it.
struct Params {
    n_assign: u32,
    n_experts: u32,
    tile_rows: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> expert_ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> offsets: array<u32>;
@group(0) @binding(3) var<storage, read_write> tile_starts: array<u32>;
@group(0) @binding(4) var<storage, read_write> assign_row: array<u32>;
@group(0) @binding(5) var<storage, read_write> row_assign: array<u32>;

var<workgroup> counts: array<atomic<u32>, MAX_EXPERTS>;
var<workgroup> cursor: array<atomic<u32>, MAX_EXPERTS>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32) {
    for (var e = lid; e < MAX_EXPERTS; e += WG) {
        atomicStore(&counts[e], 0u);
    }
    workgroupBarrier();
    for (var a = lid; a < p.n_assign; a += WG) {
        let e = expert_ids[a];
        if e < p.n_experts {
            atomicAdd(&counts[e], 1u);
        }
    }
    workgroupBarrier();
    if lid == 0u {
        var rows = 0u;
        var tiles = 0u;
        for (var e = 0u; e < p.n_experts; e++) {
            let c = atomicLoad(&counts[e]);
            offsets[e] = rows;
            tile_starts[e] = tiles;
            atomicStore(&cursor[e], rows);
            rows += c;
            tiles += (c + p.tile_rows - 1u) / p.tile_rows;
        }
        offsets[p.n_experts] = rows;
        tile_starts[p.n_experts] = tiles;
    }
    workgroupBarrier();
    for (var a = lid; a < p.n_assign; a += WG) {
        let e = expert_ids[a];
        if e < p.n_experts {
            let row = atomicAdd(&cursor[e], 1u);
            assign_row[a] = row;
            row_assign[row] = a;
        } else {
            assign_row[a] = 0xffffffffu;
        }
    }
}
