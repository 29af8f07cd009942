// The expert whose row tiles contain `tile`, among experts [first, first + count) of the grouped
// matmul: the last e with tile_starts[e] <= tile.
fn tile_expert(tile: u32, first: u32, count: u32) -> u32 {
    var lo = first;
    var hi = first + count;
    while hi - lo > 1u {
        let mid = (lo + hi) / 2u;
        if tile_starts[mid] <= tile {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}
