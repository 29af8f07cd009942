// Quantises f32 rows with llama.cpp's own quantiser (ggml_quantize_chunk without an importance
// matrix, the call llama-quantize makes), for the bit-exactness fixtures of moegen's quantisers.
//   quantize_ref TYPE N_PER_ROW IN.f32 OUT.bin      TYPE: q8_0 | q4_0 | q4_k
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml.h"

int main(int argc, char ** argv) {
    if (argc != 5) { fprintf(stderr, "usage: %s TYPE N_PER_ROW IN.f32 OUT.bin\n", argv[0]); return 2; }
    enum ggml_type type;
    if (!strcmp(argv[1], "q8_0")) type = GGML_TYPE_Q8_0;
    else if (!strcmp(argv[1], "q4_0")) type = GGML_TYPE_Q4_0;
    else if (!strcmp(argv[1], "q4_k")) type = GGML_TYPE_Q4_K;
    else { fprintf(stderr, "unknown type %s\n", argv[1]); return 2; }
    long per_row = atol(argv[2]);
    FILE * f = fopen(argv[3], "rb");
    if (!f) { perror(argv[3]); return 1; }
    fseek(f, 0, SEEK_END);
    long n = ftell(f) / 4;
    fseek(f, 0, SEEK_SET);
    float * x = malloc(n * 4);
    if (fread(x, 4, n, f) != (size_t) n) { perror("read"); return 1; }
    fclose(f);
    long rows = n / per_row;
    size_t bytes = ggml_row_size(type, per_row) * rows;
    void * y = malloc(bytes);
    size_t wrote = ggml_quantize_chunk(type, x, y, 0, rows, per_row, NULL);
    if (wrote != bytes) { fprintf(stderr, "wrote %zu of %zu bytes\n", wrote, bytes); return 1; }
    FILE * o = fopen(argv[4], "wb");
    fwrite(y, 1, bytes, o);
    fclose(o);
    return 0;
}
