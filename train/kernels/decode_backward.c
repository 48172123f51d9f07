/* Backward of a sparse decode, out = Σ_pairs value · W_dec[latent] per row, on the CPU.

   Built and loaded by train/native.py (ctypes); train/sparse.py calls it and keeps a PyTorch path
   (a sampled dense-dense product and an embedding_bag) with the same results.

   Given the output's gradient G [rows, d], it returns both
     grad_values[p] = <G[row_p], W_dec[latent_p]>          (the code's gradient), and
     grad_W_dec[l]  = Σ_{p of latent l} value_p · G[row_p]  (the decoder's gradient)
   in one latent-major pass: each pair's G row is read once, for the dot product and the
   accumulation together, while the latent's decoder row and its gradient row stay in L1; pairs
   go two at a time (one load and store of the gradient row per two), the next pairs' G rows
   prefetched, as they come in no order. ≈1.5× the two PyTorch kernels at 4096 × 512, k 32. The
   PyTorch path reads every G row twice, in two kernels. Latents are shared out across OpenMP
   threads (PyTorch's, see topk_rows.c) in chunks; each writes only its latents' rows, so no two
   threads write the same memory. */

#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p) {
    v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static void latent_backward(const float *G, const float *w, const float *values, const int64_t *by_latent,
                            const int64_t *rows_by_latent, int64_t first, int64_t end, int64_t d,
                            float *grad_values, float *grad_w) {
    const int64_t vectorised = d / 8 * 8;
    memset(grad_w, 0, sizeof(float) * d);
    int64_t p = first;
    /* Two pairs at a time: one load and store of the gradient row per two pairs. */
    for (; p + 1 < end; p += 2) {
        const int64_t pair_a = by_latent[p], pair_b = by_latent[p + 1];
        const float *a = G + rows_by_latent[p] * d, *b = G + rows_by_latent[p + 1] * d;
        for (int64_t ahead = p + 2; ahead < end && ahead < p + 4; ahead++)
            for (int64_t line = 0; line < d; line += 16) __builtin_prefetch(G + rows_by_latent[ahead] * d + line);
        const float va = values[pair_a], vb = values[pair_b];
        const v8 va8 = {va, va, va, va, va, va, va, va}, vb8 = {vb, vb, vb, vb, vb, vb, vb, vb};
        v8 dot_a = {0}, dot_b = {0};
        int64_t c = 0;
        for (; c < vectorised; c += 8) {
            v8 a8 = load8(a + c), b8 = load8(b + c), w8 = load8(w + c);
            dot_a += a8 * w8;
            dot_b += b8 * w8;
            store8(grad_w + c, load8(grad_w + c) + va8 * a8 + vb8 * b8);
        }
        float sum_a = 0.0f, sum_b = 0.0f;
        for (int t = 0; t < 8; t++) {
            sum_a += dot_a[t];
            sum_b += dot_b[t];
        }
        for (; c < d; c++) {
            sum_a += a[c] * w[c];
            sum_b += b[c] * w[c];
            grad_w[c] += va * a[c] + vb * b[c];
        }
        grad_values[pair_a] = sum_a;
        grad_values[pair_b] = sum_b;
    }
    for (; p < end; p++) {
        const int64_t pair = by_latent[p];
        const float *g = G + rows_by_latent[p] * d;
        const float value = values[pair];
        const v8 value8 = {value, value, value, value, value, value, value, value};
        v8 dot8 = {0};
        int64_t c = 0;
        for (; c < vectorised; c += 8) {
            v8 g8 = load8(g + c);
            dot8 += g8 * load8(w + c);
            store8(grad_w + c, load8(grad_w + c) + value8 * g8);
        }
        float dot = 0.0f;
        for (int t = 0; t < 8; t++) dot += dot8[t];
        for (; c < d; c++) {
            dot += g[c] * w[c];
            grad_w[c] += value * g[c];
        }
        grad_values[pair] = dot;
    }
}

/* G [rows, d]; W_dec, grad_W_dec [d_sae, d]; values, grad_values [pairs] in pair order;
   by_latent [pairs] (pair order → latent-major order), rows_by_latent [pairs] (row of each
   latent-major pair), latent_starts [d_sae + 1]. */
void lexica_decode_backward_f32(const float *G, const float *W_dec, const float *values, const int64_t *by_latent,
                                const int64_t *latent_starts, const int64_t *rows_by_latent, int64_t d_sae,
                                int64_t d, float *grad_values, float *grad_W_dec, int threads) {
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 16)
    for (int64_t latent = 0; latent < d_sae; latent++)
        latent_backward(G, W_dec + latent * d, values, by_latent, rows_by_latent, latent_starts[latent],
                        latent_starts[latent + 1], d, grad_values, grad_W_dec + latent * d);
}
