// llama.cpp's greedy continuation of prompts given as token ids, one prompt at a time, for the
// agreement figures of moegen's GGUF fixtures.
//   greedy MODEL.gguf N_NEW < prompts.json-lines (one JSON array of ids per line)
// prints one JSON array of the new ids per line.
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>
#include "llama.h"

int main(int argc, char ** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s MODEL.gguf N_NEW < prompts\n", argv[0]); return 2; }
    int n_new = atoi(argv[2]);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    std::string line;
    while (std::getline(std::cin, line)) {
        std::vector<llama_token> ids;
        for (char & c : line) if (c == '[' || c == ']' || c == ',') c = ' ';
        std::istringstream in(line);
        for (int v; in >> v;) ids.push_back(v);
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 512;
        cp.n_batch = 512;
        cp.n_threads = 1;
        cp.n_threads_batch = 1;
        llama_context * ctx = llama_init_from_model(model, cp);
        std::vector<llama_token> out;
        llama_batch batch = llama_batch_get_one(ids.data(), (int) ids.size());
        for (int i = 0; i < n_new; i++) {
            if (llama_decode(ctx, batch)) { fprintf(stderr, "decode failed\n"); return 1; }
            const float * logits = llama_get_logits_ith(ctx, -1);
            int best = 0;
            for (int t = 1; t < n_vocab; t++) if (logits[t] > logits[best]) best = t;
            out.push_back(best);
            batch = llama_batch_get_one(&out.back(), 1);
        }
        printf("[");
        for (size_t i = 0; i < out.size(); i++) printf(i ? ", %d" : "%d", out[i]);
        printf("]\n");
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}
