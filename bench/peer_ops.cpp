// Kernel rates of a ggml build (ik_llama.cpp) on CUDA0 at the shapes graphir's cost model prices:
// MUL_MAT (dense GEMV n=1 and GEMM n=512/2048 by weight type), MUL_MAT_ID (MoE experts) and
// FLASH_ATTN_EXT (by KV type, head size, depth). bench/bench_peer.py compiles it inside the
// ik_llama.cpp build tree (its test-backend-ops is not built there and times only tiny shapes).
//
// Weights are random bytes: kernel time does not depend on the values. Each timed graph chains R
// ops over C copies of the weight (C*size > 4x a 50 MB L2), so a GEMV reads its weight from HBM
// as it does in a decode step, not from L2. Output, one CSV line per case:
//   op,type,m,n,k,extra,runs,us,tflops,gbps      (gbps counts the weight bytes each op reads)
// MUL_MAT: weight [m, k] times n columns; MUL_MAT_ID: each expert [m, k], n tokens, extra = experts/used;
// FLASH_ATTN_EXT: m = query heads, n = query rows, k = KV rows, extra = heads/kv heads and head size.
// DELTA_NET (third argument "delta"): the fused gated delta rule of one layer, m = value heads,
// n = tokens, k = head size, extra = key heads/value heads (Qwen3-Next: 16/32, 128).
// Third argument "sustain": only the 12288x4096 GEMM at 2048 tokens per weight type, computed again
// and again for 12 s; `us` is the mean of the last 6 s. A prefill keeps the GPU busy for minutes and its
// power limit lowers the clock by how much power the kernel draws, so this rate, not the burst above
// (best of 3 short computes), is the one a sweep sees. Its row names the op MUL_MAT_SUSTAINED.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cuda.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static ggml_backend_t g_backend;
static double g_sustain_s = 0;  // > 0: time computes for this long and report the mean of the second half

static void fill_random(ggml_tensor * t, std::mt19937 & rng) {
    // small bytes (< 0x40): finite f16/f32 patterns; a 16 MB random block repeated at random offsets
    static std::vector<uint8_t> pool;
    if (pool.empty()) {
        pool.resize(1 << 24);
        for (auto & b : pool) b = (uint8_t)(rng() & 0x3F);
    }
    const size_t n = ggml_nbytes(t);
    for (size_t off = 0; off < n; off += pool.size() / 2) {
        const size_t start = rng() % (pool.size() / 2);
        ggml_backend_tensor_set(t, pool.data() + start, off, std::min(pool.size() / 2, n - off));
    }
}

struct Case {
    std::string op, type, extra;
    int64_t m, n, k;
    double flop, bytes;  // per op
};

// builds R ops over C weight copies with `make`, times the best of 3 graph computes
template <class Make>
static void run_case(const Case & c, int C, int R, Make make) {
    ggml_init_params ip = {ggml_tensor_overhead() * (size_t)(4 * C + 2 * R + 64) + ggml_graph_overhead_custom(2 * R + 64, false),
                           nullptr, true};
    ggml_context * ctx = ggml_init(ip);
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, 2 * R + 64, false);
    std::vector<ggml_tensor *> inputs;
    make(ctx, gf, inputs);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, g_backend);
    if (!buf) {
        printf("%s,%s,%lld,%lld,%lld,%s,0,nan,nan,nan\n", c.op.c_str(), c.type.c_str(), (long long)c.m,
               (long long)c.n, (long long)c.k, "alloc-failed");
        ggml_free(ctx);
        return;
    }
    std::mt19937 rng(1234);
    for (auto * t : inputs) {
        if (t->type == GGML_TYPE_I32) continue;  // ids: set by make's caller below
        fill_random(t, rng);
    }
    for (auto * t : inputs) {
        if (t->type != GGML_TYPE_I32) continue;
        // expert ids: distinct per token, different per copy
        std::vector<int32_t> ids(ggml_nelements(t));
        const int n_used = (int)t->ne[0], n_exp = (int)t->op_params[0];
        std::vector<int32_t> perm(n_exp);
        for (int64_t r = 0; r < t->ne[1]; r++) {
            for (int i = 0; i < n_exp; i++) perm[i] = i;
            std::shuffle(perm.begin(), perm.end(), rng);
            for (int j = 0; j < n_used; j++) ids[r * n_used + j] = perm[j];
        }
        ggml_backend_tensor_set(t, ids.data(), 0, ids.size() * sizeof(int32_t));
    }
    double best = 1e30, late_us = 0;
    int late = 0;
    const int64_t start = ggml_time_us();
    for (int it = 0; it < 4 || (g_sustain_s > 0 && ggml_time_us() - start < g_sustain_s * 1e6); it++) {
        ggml_backend_synchronize(g_backend);  // the first compute captures / warms up
        int64_t t0 = ggml_time_us();
        ggml_backend_graph_compute(g_backend, gf);
        ggml_backend_synchronize(g_backend);
        const double dt = (double)(ggml_time_us() - t0);
        if (it) best = std::min(best, dt);
        if (t0 - start > g_sustain_s * 0.5e6) { late_us += dt; late++; }
    }
    double us = (g_sustain_s > 0 && late ? late_us / late : best) / R;
    printf("%s,%s,%lld,%lld,%lld,%s,%d,%.3f,%.3f,%.1f\n", c.op.c_str(), c.type.c_str(), (long long)c.m,
           (long long)c.n, (long long)c.k, c.extra.c_str(), R, us, c.flop / us * 1e-6, c.bytes / us * 1e-3);
    fflush(stdout);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
}

static int copies(double bytes) { return (int)std::max(1.0, std::min(64.0, 2.0e8 / bytes + 1)); }
static int repeats(double out_bytes, int C) {
    int r = (int)std::max(8.0, std::min(400.0, 2.0e9 / std::max(out_bytes, 1.0)));
    return std::max(r / C, 1) * C;
}

static ggml_type type_by_name(const std::string & s) {
    for (int t = 0; t < GGML_TYPE_COUNT; t++) {
        const char * n = ggml_type_name((ggml_type)t);
        if (n && s == n) return (ggml_type)t;
    }
    fprintf(stderr, "unknown type %s\n", s.c_str());
    exit(2);
}

int main(int argc, char ** argv) {
    // usage: peer_ops TYPES(comma) [FA_KV_TYPES(comma)] [delta]
    std::string types = argc > 1 ? argv[1] : "f16,q8_0,q4_0,iq4_xs,q4_K,q6_K,iq4_ks";
    std::string fa_types = argc > 2 ? argv[2] : "f16,q8_0";
    const bool delta = argc > 3 && std::string(argv[3]) == "delta";
    const bool sustain = argc > 3 && std::string(argv[3]) == "sustain";
    if (sustain) g_sustain_s = 12.0;
    g_backend = ggml_backend_cuda_init(0, nullptr, nullptr);
    if (!g_backend) { fprintf(stderr, "no CUDA0\n"); return 1; }
    printf("op,type,m,n,k,extra,runs,us,tflops,gbps\n");
    auto split = [](const std::string & s) {
        std::vector<std::string> out; size_t a = 0;
        while (a <= s.size()) { size_t b = s.find(',', a); if (b == std::string::npos) b = s.size(); if (b > a) out.push_back(s.substr(a, b - a)); a = b + 1; }
        return out;
    };
    const int64_t shapes[][2] = {{4096, 4096}, {12288, 4096}, {4096, 12288}, {151936, 4096}};  // (m, k)
    for (auto & tn : split(types)) {
        ggml_type t = type_by_name(tn);
        for (auto & s : shapes) {
            for (int64_t n : {1, 2, 4, 8, 512, 2048}) {
                int64_t m = s[0], k = s[1];
                if (m == 151936 && n != 1 && n != 512) continue;
                if (sustain && (m != 12288 || n != 2048)) continue;
                double wbytes = (double)ggml_row_size(t, k) * m;
                Case c{sustain ? "MUL_MAT_SUSTAINED" : "MUL_MAT", tn, "", m, n, k, 2.0 * m * n * k, wbytes};
                int C = copies(wbytes), R = repeats(4.0 * m * n, C);
                run_case(c, C, R, [&](ggml_context * ctx, ggml_cgraph * gf, std::vector<ggml_tensor *> & in) {
                    std::vector<ggml_tensor *> w(C);
                    for (auto & x : w) { x = ggml_new_tensor_2d(ctx, t, k, m); in.push_back(x); }
                    ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n); in.push_back(b);
                    for (int r = 0; r < R; r++) ggml_build_forward_expand(gf, ggml_mul_mat(ctx, w[r % C], b));
                });
            }
        }
        if (sustain) continue;
        // MoE experts, Qwen3-Next (512 experts, top 10, 2048 <-> 512) and Qwen3-30B-A3B-like (128, top 8, 2048 <-> 768)
        const int64_t moe[][4] = {{512, 10, 512, 2048}, {512, 10, 2048, 512}, {128, 8, 768, 2048}, {128, 8, 2048, 768}};
        for (auto & e : moe) {
            for (int64_t n : {1, 512, 2048}) {
                int64_t ne = e[0], nu = e[1], m = e[2], k = e[3];
                if (k % ggml_blck_size(t)) continue;
                double touched = std::min<double>(ne, (double)nu * n);
                double wbytes = (double)ggml_row_size(t, k) * m * touched;
                Case c{"MUL_MAT_ID", tn, "e" + std::to_string(ne) + "u" + std::to_string(nu), m, n, k,
                       2.0 * m * k * nu * n, wbytes};
                double all = (double)ggml_row_size(t, k) * m * ne;
                int C = n == 1 ? 32 : std::max(1, std::min(4, (int)(4.0e8 / all) + 1));  // n=1: many id sets
                int WC = n == 1 ? std::max(1, std::min(4, (int)(4.0e8 / all) + 1)) : C;
                int R = repeats(4.0 * m * nu * n, C);
                run_case(c, C, R, [&](ggml_context * ctx, ggml_cgraph * gf, std::vector<ggml_tensor *> & in) {
                    std::vector<ggml_tensor *> w(WC), ids(C);
                    for (auto & x : w) { x = ggml_new_tensor_3d(ctx, t, k, m, ne); in.push_back(x); }
                    ggml_tensor * b = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, k, nu, n); in.push_back(b);
                    for (auto & x : ids) {
                        x = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, nu, n);
                        x->op_params[0] = (int32_t)ne;  // read by run_case when it fills the ids
                        in.push_back(x);
                    }
                    for (int r = 0; r < R; r++) ggml_build_forward_expand(gf, ggml_mul_mat_id(ctx, w[r % WC], b, ids[r % C]));
                });
            }
        }
    }
    // flash attention: (heads, kv heads, head size) of Qwen3-8B / Qwen3-32B and Qwen3-Next, n_q = 1 and 2048
    const int64_t fa[][3] = {{32, 8, 128}, {64, 8, 128}, {16, 2, 256}};
    for (auto & kvn : split(fa_types)) {
        ggml_type tkv = type_by_name(kvn);
        for (auto & h : fa) {
            for (int64_t nkv : {2048, 8192, 16384, 32768}) {
                for (int64_t nq : {1, 2048}) {
                    int64_t nh = h[0], nhk = h[1], d = h[2];
                    double kvbytes = 2.0 * ggml_row_size(tkv, d) * nkv * nhk;
                    Case c{"FLASH_ATTN_EXT", kvn, "h" + std::to_string(nh) + "/" + std::to_string(nhk) + "d" + std::to_string(d),
                           nh, nq, nkv, 4.0 * nh * nq * nkv * d, kvbytes};
                    int C = copies(kvbytes), R = repeats(4.0 * d * nh * nq + kvbytes / 8, C);
                    run_case(c, C, R, [&](ggml_context * ctx, ggml_cgraph * gf, std::vector<ggml_tensor *> & in) {
                        ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, d, nq, nh, 1); in.push_back(q);
                        ggml_tensor * mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, nkv, GGML_PAD(nq, GGML_KQ_MASK_PAD), 1, 1);
                        in.push_back(mask);  // small random bytes: finite, never -inf (no block is skipped)
                        std::vector<ggml_tensor *> ks(C), vs(C);
                        for (int i = 0; i < C; i++) {
                            ks[i] = ggml_new_tensor_4d(ctx, tkv, d, nkv, nhk, 1); in.push_back(ks[i]);
                            vs[i] = ggml_new_tensor_4d(ctx, tkv, d, nkv, nhk, 1); in.push_back(vs[i]);
                        }
                        for (int r = 0; r < R; r++) {
                            ggml_tensor * o = ggml_flash_attn_ext(ctx, q, ks[r % C], vs[r % C], mask, 1.0f / 16, 0.0f, 0.0f);
                            ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
                            ggml_build_forward_expand(gf, o);
                        }
                    });
                }
            }
        }
    }
    // gated delta rule (ggml_delta_net): q, k [S, T, Hk]; v [S, T, Hv]; g [T, 1, Hv]; beta [1, T, Hv];
    // state [S, S*Hv]. The tokens of a u-batch are a dependent chain: time per token is the step.
    if (delta) {
        const int64_t S = 128, Hk = 16, Hv = 32;
        for (int64_t T : {1, 64, 512, 2048}) {
            double state_bytes = 4.0 * S * S * Hv, io = 4.0 * T * S * (2 * Hk + 2 * Hv);
            Case c{"DELTA_NET", "f32", std::to_string(Hk) + "/" + std::to_string(Hv), Hv, T, S,
                   6.0 * T * Hv * S * S, 2 * state_bytes + io};
            int C = 1, R = T >= 512 ? 8 : 64;
            run_case(c, C, R, [&](ggml_context * ctx, ggml_cgraph * gf, std::vector<ggml_tensor *> & in) {
                ggml_tensor * q = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, T, Hk, 1); in.push_back(q);
                ggml_tensor * k = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, T, Hk, 1); in.push_back(k);
                ggml_tensor * v = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, T, Hv, 1); in.push_back(v);
                ggml_tensor * g = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, T, 1, Hv, 1); in.push_back(g);
                ggml_tensor * b = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, 1, T, Hv, 1); in.push_back(b);
                ggml_tensor * st = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, S, S * Hv, 1, 1); in.push_back(st);
                for (int r = 0; r < R; r++) ggml_build_forward_expand(gf, ggml_delta_net(ctx, q, k, v, g, b, st, nullptr));
            });
        }
    }
    ggml_backend_free(g_backend);
    return 0;
}
