#!/usr/bin/env bash
# One script for the GPU box: set up, check every kernel against its twin, golden parity on
# CUDA, and the full-size benchmark. Results land in $OUT (device tool) or ./bench-out.
# Usage: bash bench/device_run.sh [pdl|smoke|kernels|full|final|final2|load|prefill|decode|decode2|final3|final3b|i8|final5|h16|tp2h16|cudac|final6|final6b|depth]
#   full: the 43-layer bench, CUDA golden parity, kernel tests (one 2-GPU call, < 10 min)
#   final: a shorter full (depth 0; TP=2 golden on the graph path only; routed-kernel sweep)
#   load: synth the full GGUF, time its TP=2 load cold and warm, then the kernel sweep
#   final2: many-token kernel tests, TP=2,1 bench (TP=1 on one GPU), golden prefill, profile
#   decode: decode-kernel tests, TP=1 golden, TP=2,1 bench, decode profile (one 2-GPU call)
#   decode2: TP=2 golden, routed-expert launch sweep at T=1
#   final3 / final3b: the 2026-11-29 closing checks (tests and goldens; bench with depth 4096, profile)
#   i8: Q8_0 int8-word matvec tests, TP=2,1 bench, Q8_0 + routed T=1 check and sweep
#   final5: session 5 closing run: bench with depth 4096, TP=1 goldens, profile, decode tests
#   h16: float16 prefill path: golden prefill (all launches float16), bench, gemm tests
#   tp2h16: TP=2,1 bench, goldens TP=1/2, exact vs float16 prefill launches, prefill profile
#   cudac: CUDA C routed experts: twin tests, launch sweep vs Triton, ncu, traced graph, TP=1 bench
#   final6 / final6b: session 6 closing run (one GPU): tests, bench with depth 4096, goldens, profile
#   depth: the 43-layer graph replay traced at depth 1 and 4096 (where the depth cost goes)
#   q8c: CUDA C Q8_0 matvec: twin tests, launch sweep vs Triton, traced graph, TP=1 bench
#   q8c2: + CUDA C router, down + shared add, PRMT grid: tests, sweep, graph, bench, TP=1 goldens
#   q8c3: CUDA C Q8_0 at 16 warps / 4 loads, CUDA C router (add and PRMT grid removed): tests,
#         bench with the Triton A/B variants and the high-priority capture, graph, TP=1 goldens
#   final7: session 7 closing run (one GPU): graph/stream and router tests, bench with depth
#           4096 and the A/B variants, goldens TP=1, the 43-layer graph traced at depth 1, 4096
#   final7b: after the CUDA C router was removed: dispatch tests, bench at depth 0 (A/B variants)
#   final7c: the final code's golden parity on CUDA, TP=1
#   pdl: session 8, programmatic dependent launch: CUDA C twins (PDL on), the PDL on/off
#        bit-identity test, bench at depth 0 (PDL off/on A/B)
#   pdl2: session 8, padded down-kernel activations and the SwiGLU prologue of the shared
#         expert's down: twins, dispatch, down launch sweep, bench at depth 0
#   pdl3: session 8, the fused HC step (update + next mixer): tests, bench at depth 0, goldens
#   final8: session 8 closing run: twins, bench with depth 4096 and A/B variants, graph trace
#   final8b: every CUDA test of tests/test_kernels.py and tests/test_decode_graph.py
#   pf0: session 9, prefill baseline: 2048-token launches exact vs float16, a prefill profile
#   pf1: session 9, float16 routed experts in registers and cuBLAS dense: tests, launch
#        sweep, prefill profile, TP=1 golden prefill
#   pf2: session 9, tensor-core CUDA C routed experts: tests, launch timings, profile, golden
#   pf3: session 9, experts_mma.cu with shared-memory activations: tests, timings, ncu
#   pf4: session 9 closing run: tests, launch timings, prefill profile, TP=1 goldens, bench
#   pf5: session 9, experts_mma.cu variants (loads, sign masks, blocks per SM), twin tests
#   pf6: session 9 closing check: mma twins, TP=1 golden prefill, 43-layer prefill A/B
#   l2a, l2b: session 10, an L2 prefetch of later weights during decode and its probe (code
#        since removed, measured slower; in git history, 18a702b..4b7d173)
#   pa1: session 10, a prefill's attention in one Triton launch: its tests, launch shapes
#        against the twin, TP=1 golden prefill, the TP=1 bench
#   pa2: session 10, F16 weights' many-token products on cuBLAS (split activation): tests,
#        F16 launch timings, the 43-layer prefill A/B, TP=1 goldens, a prefill profile
#   pa3: session 10, a prefill without host syncs (the expert tile table built on the device):
#        tests, the 43-layer prefill A/B, a prefill profile with the host's side, TP=1 goldens
#   pa4: session 10 closing run: prefill attention with RoPE inside (tests, launch shapes),
#        TP=1 goldens, the TP=1 bench at depth 0 (decode and prefill A/B variants)
#   em1: session 11, a ratio-4 compressor's emission in one launch: twins, bench (emission A/B,
#        per-variant replay times), prefill A/B after the profiler, TP=1 golden (graphs)
#   em2, em3, em4: session 11, variants measured no faster and removed with their modes (in git
#        history): a software-pipelined Q8_0 row loop (7519d0f; twins, T=1 launch sweep), the
#        KV row's store on the side stream (a49dbe0; bench with depth 4096), decode attention
#        in head groups on tensor cores (823d933; launch shapes, bench)
#   em5: session 11 closing run: decode attention twins, bench with depth 4096
#   s12a: session 12, two GPUs: TP=2,1 bench at depth 0, TP=2 goldens, review-commit twins
#   s12b: session 12, two GPUs: where a TP=2 prefill's time goes (bench/prefill_tp2.py), twins
#   s12c: session 12, two GPUs: a TP=2 prefill's host side, after decode graphs, NCCL graph mixing
#   s12d: session 12, one GPU: a TP=2 rank's prefill alone (host vs GPU, host profile, kernels)
#   s12e: session 12, one GPU: fewer prefill launches (compressed rows, routing, tile table)
#   s12f: session 12 closing run, two GPUs: TP=2 bench, TP=2 golden prefill, prefill_tp2 with NCCL
#         graph mixing support on and off
#   s12g: session 12 closing run on one GPU: new twins, a TP=2 rank's prefill, TP=1 golden, bench
#   s12h / s12i: session 12, the last device time: TP=2 bench + prefill_tp2 without NCCL graph
#         mixing (two GPUs), or the TP=1 golden prefill (one GPU)
#   s13s: session 13, two GPUs: the served path end to end (bench/serve_e2e.py) on the full-size
#         synthetic GGUF: launch, workers' warm-up, chat/stream/concurrent/bad requests, a worker
#         killed mid-stream and the recovery (`s13s more`: then the second-GPU runtime test and
#         the TP=2 golden through the decode graphs)
#   s14w: session 14, one GPU: prefill time per prompt length, cold then warm caches (profiled)
#   s14s: session 14, two GPUs: the served path end to end after the switching, sampling,
#         lookahead and compile-cache changes (their CUDA tests first)
#   s13f: session 13 closing run, two GPUs: TP=2,1 bench at depth 0 and 4096
#   s15a: session 15, two GPUs: the do_not_specialize kernels' CUDA twins, prompts fed at
#         growing positions (one GPU, as s14c), the TP=2,1 bench at depth 0 and 4096 (no A/B)
#   s15b: session 15, two GPUs: chained greedy steps (the next step queued on the pick the
#         graph left on the device): their CUDA tests, then the served path end to end
#   s15c: session 15, two GPUs: the TP=2,1 bench (no A/B) with the chained decode timings, then
#         golden parity through the decode graphs (which now end with the greedy pick) at TP=2, 1
#   s15d: session 15, two GPUs: chaining for sampled requests too: CUDA tests, then the served
#         path end to end with a worker killed mid-stream
#   s15e: session 15, one GPU: sample_device queues without waiting (CUDA sampling tests)
#   s16a: session 16, two GPUs: the indexer's launches (scores over the visible rows, one-launch
#         top-512 selection): CUDA tests, the TP=2,1 bench (no A/B; depth 4096 at two decoder
#         capacities, with and without them), CUDA goldens through the graphs
#   s16b: session 16, two GPUs: runtime lanes (CUDA tests), then the served path (two streams on
#         two decoders, sampled rate after sample_device's fix, decode after a long prompt with
#         the indexer's launches), a killed rank
#   s16c: session 16, two GPUs: s16a again after the selection kept the visible rows in
#         registers whatever the decoder's capacity
#   s16d: session 16, two GPUs: the served path again, with each stream's own rate when two or
#         three run at once
#   s16e: session 16, two GPUs: short prompts fed through the decode graphs (graph_feed, set
#         by the warm-up), then the served path again
#   s16f: session 16, two GPUs: the served path with a prompt's short tail fed with the chunk
#         before it (a 2,175-token prompt in one forward), no kill (the last minutes of device time)
#   s17a: session 17, two GPUs: the compressors split by channel at TP=2 (their CUDA twins), the
#         TP=2,1 bench (no A/B), then TP=2 at depth 0 with the compressors replicated (the
#         split's comparison, same machine), CUDA goldens at TP=2 (graphs, prefill) and TP=1
#   s17b: session 17, two GPUs: one gather for both compressors of a ratio-4 layer (CUDA twins),
#         TP=2 bench at depth 0 and 4096 (split), then depth 0 replicated, both with the
#         per-kernel profile (the compressor step now counted as weight streaming), CUDA goldens
#         at TP=2 (graphs, prefill)
#   s17s: session 17, one GPU: the compressor step's launch shapes (bench/comp_step_sweep.py)
#   s17h: session 17, one GPU: the HC step's launch shapes (bench/hc_step_sweep.py)
#   s17d: session 17 closing run, two GPUs: the HC mixers' Sinkhorn beside the sublayer in the
#         decode graphs and the compressor step's launch shapes (CUDA twins, graph tests), the
#         TP=2,1 bench (no A/B but the Sinkhorn inline), CUDA goldens through the graphs
#   s17e: session 17, one GPU: the graph tests again after their shared helpers (review)
#   s17c: session 17, two GPUs: the served path on the full-size synthetic GGUF (each rank loads
#         its channels of the compressors from the file)
#   s18a: session 18, one GPU: where a graph-replayed step waits, launch by launch
#         (bench/critical_path.py, TP=2 rank-0 shard without collectives, then TP=1)
#   s18b: session 18, one GPU: the same with the HC mixers' Sinkhorn on a side stream of its
#         own (now the default) and on the shared expert's (before), TP=2 shard and TP=1
#   s19a: session 19, one GPU: the graph tests of session 18's review, then scheduling variants
#         (side-stream priorities, where the FFN's second stream goes) timed and traced at
#         world 2 (rank shard) and 1 (bench/critical_path.py --variants); those variants exist
#         only at 6c0f6f3, where it ran
#   s19b: session 19, one GPU: the greedy pick in one launch (tests, then replay A/B against the
#         torch twin at world 2 and 1)
#   s19c: session 19, one GPU: warps per program of the route and Sinkhorn launches (replay A/B)
#   s19d: session 19, one GPU: hc_step's tail loads issued with the partials' (tests, replay A/B;
#         its hc_tail_late variant exists only at the commit it ran on)
#   s19e: session 19 closing run, two GPUs: CUDA tests (pick, HC, PDL, streams, runtime), the TP=2,1
#         bench, CUDA goldens through the graphs
#   s19f: session 19, two GPUs: the served path on the full-size synthetic GGUF (as s17c)
#   s19h: session 19, one GPU: the shared expert on a side lane of its own at a higher priority
#   s20a: session 20, two GPUs: why an eager prefill is slower once decode graphs exist
#         (bench/prefill_after_graphs.py at TP=2, then on one GPU; its TP=2 run hung, rank 0 alone
#         profiled a prefill with collectives)
#   s20b: session 20, two GPUs: the same at TP=2 (every rank runs the profiled prefill; eager
#         collectives timed per phase), then with NCCL_GRAPH_REGISTER=0
#   s20c: session 20, two GPUs: the same at TP=2 twice with torch's default CPU threads per rank,
#         twice with OMP_NUM_THREADS=1 (host jitter from oversubscribed cores?)
#   s20e: session 20 closing run, two GPUs: the TP=2,1 bench (with the shared expert's lane A/B)
#         and CUDA goldens, then CUDA tests of the code since s19e (HC, route, side streams, PDL, lanes)
#   s20f: session 20, two GPUs: CUDA goldens at TP=2 (graphs, prefill) after DistComm.all_gather
#         moved to all_gather_into_tensor (the compressor rows' and the logits' gathers)
#   s20d: session 20, two GPUs: the CPU topology, then the same at TP=2 unpinned and with each
#         rank's main thread pinned to cores of its own, twice each (CPU and context switches)
#   s21a: session 21, one GPU: routed gate/up variants (grid-table copies, sign masks) timed
#         against the default in one process, twin tests (variants only at a2eb138's parent)
#   s21b: session 21, one GPU: the routed down kernel with its rows staged by cp.async and the
#         gate/up sign masks by PRMT: twin tests, launch timings against the previous kernels,
#         the 43-layer step replay-timed with and without each (TP=2 rank shard, TP=1); its
#         variants exist only at a2eb138, the commit it ran on
#   s21c: session 21, one GPU: the router's matvec and the expert choice in one launch
#         (triton_route.router_route): tests, the step replay-timed with and without, TP=1 goldens
#         (measured slower; its route_two variant exists only at 03e7aee, the commit it ran on)
#   s21d: session 21, one GPU: the routed down launch adding the shared expert's output (the join
#         moved before it): tests, the step replay-timed with and without (ran twice: the code of
#         2241fe5, first with the down launch programmatic, then plain as committed; reverted)
#   s21e: session 21 closing run, two GPUs: the TP=2,1 bench and CUDA goldens through the graphs
#         (the CUDA C twin tests of this experts.cu passed in s21c)
#   s22a-s22e ran at 335c4df-cb02b77 (their --down-add options and the down_add variant were
#         removed after, with that path: slower with PDL, s22e)
#   s22a: session 22, one GPU: bench/pdl_race_probe.py on the routed down launch adding the shared
#         expert's output (PDL on, CUDA C plain, Triton plain), the landed code as control;
#         lightweight GPU core dumps read by cuda-gdb (which kernel faulted)
#   s22b: session 22, one GPU: the landed code's TP=2 shard replayed 8,000 times with a wait and
#         a check after each (twice with PDL, once without): which replay fails, after which tokens
#   s22c: session 22, one GPU: pdl_race_probe with each phase waited on (prefill, eager step,
#         capture, replays): the landed code at TP=2 (PDL on, CUDA C plain, Triton plain), TP=1,
#         and the down-add variant
#   s22d: session 22, one GPU: the TP=1 probe under cuda-gdb (which kernel, which instruction)
#   s22e: session 22, one GPU, after the fix (common.cuh prior()): the PTX check, the CUDA C
#         twins, the race probe at TP=1 and TP=2 (and the down-add variant), replay A/B
#   s22f: session 22 closing run, two GPUs: the PTX check, the CUDA C twins, the TP=2,1 bench
#         and CUDA goldens through the graphs (after the fix)
#   s22g: session 22, one GPU, at 85b629c (reverted after): the gate/up kernel's ids and router
#         weights by shuffle, x by 16-byte loads: CUDA C twins, replay A/B against the fix's
#         version (gu_per_item) and L1-cached loads (prior_ca)
#   s22h: session 22, one GPU: the gate/up kernel's x by 16-byte loads and its ids by shuffle,
#         each alone: twin cases and replay A/B against the fix's version
#         (at 7193e33; the x loads landed after it, the variants were removed)
#   l1wait: bench/l1_wait_probe.py (written in session 22, not yet run): stale L1-cached and
#         read-only-path loads after griddepcontrol.wait, one GPU, under a minute
#   s27e: session 27, two GPUs: the closing run (bench TP=2,1 with depth 4096, the peer
#         all-reduce against NCCL inside it; CUDA goldens TP=2, TP=1)
#   s29b: session 29, two GPUs: the two-GPU twin tests on 647879c's review (not run on a GPU
#         before); the KV row riding in attn_q_b's matvec launch: CUDA twins and graph tests,
#         TP=2,1 bench (A/B against kv_store's own launch, logits compared)
#   s29c: session 29, two GPUs: the KV row's block first in attn_q_b's launch (block 0, its
#         norm weight loaded before the PDL wait): Q8_0 and kv_store twins, TP=2,1 bench A/B
#         (s29b and s29c: the KV row riding in attn_q_b's launch, measured slower and removed;
#         s29b's code at 0153a79, s29c's at eba7f4b)
#   s29d: session 29, one GPU: bench/iq2_layout_probe.py (the routed gate/up kernel on IQ2_XXS
#         rows re-laid out for decode, experts.cu A_DL, against the GGUF layout; prototype)
#   s29e: session 29, two GPUs: the routed gate/up rows in the decode order at load
#         (qtensor.IQ2_DECODE): CUDA twins (every reader of the order against GGUF's, bit for bit),
#         the kernel alone (iq2_layout_probe), TP=2,1 bench (A/B against GGUF's order, logits
#         compared), CUDA goldens
#   s29f: session 29 closing run, two GPUs: the prefill's tensor-core kernel taking the decode
#         order's steps in byte order; CUDA twins of the routed kernels; TP=2,1 bench with depth
#         4096 (A/B against GGUF's order)
#   s29g: session 29, two GPUs: the Triton kernels' GGUF-order copy taken only where they run
#         (the prefill's fix); the routed twins; TP=2,1 bench at depth 0 with the prefill
#   s30c: session 30, two GPUs: the gate/up tables per bank pair (experts.cu A_TAB): the kernel
#         alone (bench/iq2_layout_probe.py), CUDA twins, TP=2,1 bench (A/B: one table)
#   s31a: session 31, two GPUs: the decode attention with G heads a program (each shared key
#         row read once per group): CUDA twins, launch shapes alone (bench/attn_decode_sweep.py),
#         TP=2,1 bench with depth 4096 (A/B: one head a program); the kernel, the sweep and the
#         A/B only at 3d58381 (removed: slower)
#   s31b: session 31, two GPUs: the HC step's spread tail (every program finishes its own
#         columns after a barrier): CUDA twins (one GPU, two-GPU peer, graphs), the launch
#         alone (bench/hc_step_sweep.py), TP=2,1 bench at depth 0 (A/B: the one-program tail),
#         CUDA goldens
#   s31c: session 31, two GPUs: the HC step at 4 warps a program, the decode attention at 4
#         programs a head without the indexer's mask: CUDA twins (attention, HC step, graphs),
#         the HC step alone (bench/hc_step_sweep.py), TP=2,1 bench with depth 4096 (A/B: 8
#         warps; 8 programs a head), CUDA goldens
#   s31d: session 31 closing run, two GPUs: TP=2,1 bench with depth 4096 (A/B: the HC step at
#         8 warps), CUDA goldens
#   s33a: session 33, one GPU: a ratio-4 layer's two compressor steps in one launch
#         (triton_attn.compressor_pair): CUDA twins and graph tests, the pair alone against two
#         launches (bench/comp_step_sweep.py --pairs), replay A/B at TP=2 and TP=1 (base,
#         comp_two); then each weight kernel's time fitted over three rank widths on one GPU
#         (bench/streaming_sizes.py, TP=2, 1, 4 with the collectives removed)
#   s33b: session 33, one GPU: the pair at its swept launch shape (one row a program, 2048
#         columns a step, 8 warps): CUDA twins, replay A/B at TP=2 and TP=1 (base, comp_two),
#         the three-width fit again (copy measured on the bare GPU), the TP=1 bench at depth 0
#         (A/B: comp_two, logits compared), CUDA goldens at TP=1
#   s33c: session 33, one GPU (its variant at 4884735, removed after: slower): the KV row's
#         store ahead of attn_q_b: graph tests, replay A/B
#         at TP=2 and TP=1 (base, kv_after_q_b), the TP=1 bench at depth 0 (A/B: the store after
#         attn_q_b, logits compared)
#   s33d: session 33, one GPU: the final code's CUDA twins of the compressor steps (the pair at
#         its default launch) and the decode graph tests (s33c's stopped at its time limit)
#   s33f: session 33, one GPU: replay A/B at TP=2 and TP=1 of the decode attention's launch
#         shape (4 or 16 programs a head, 2 or 8 warps) and the Sinkhorn launch at 4 warps
#   s33g: session 33, one GPU: the decode attention at 2 warps a program for 64 heads: CUDA
#         attention twins, replay A/B at TP=1 (base, attn_many_w4, attn_s4), the TP=1 bench
#         at depth 0 (A/B: 4 warps, logits compared)
#   s34f: session 34, one GPU: the decode attention with its first blocks loaded before pos is
#         known and its merge by epoch-tagged partials: CUDA attention twins (NaN in the rows it
#         must not use), graph tests, replay A/B at TP=2 and TP=1 (each change off, both off),
#         CUDA goldens at TP=1
#   s35a: prepared in session 34, one GPU (~4 min): the decode attention in CUDA C with a head's
#         blocks in one thread-block cluster (cuda_attn, off by default): its CUDA twins, then
#         replay A/B at TP=2 and TP=1 against the Triton kernel (attn_cuda, attn_cuda_minb3)
#   s35b: prepared in session 34, one GPU (~6 min): the served path at TP=1 (as s32h) twice in
#         one call, the second with the attention's first ring block loaded late (ATTN_HOIST
#         off in this copy of the tree), to settle s34i / s34j (two machines, not one A/B)
#   s39a: session 39, one GPU (~5 min; its variants at 92b764a): replay A/B at TP=2 and TP=1 of the Q8_0 matvec's
#         prefetch before the PDL wait (2 steps, all of the warp's first rows), the routed
#         launches at 8 or 12 warps a block (the gate/up, the down, both), the compressors'
#         late join at priority -1
#   s42c: session 42 closing run, one GPU (~8 min): the TP=1 bench at depth 0 and 4096 on the
#         final code (the Sinkhorn as block 0), TP=1 goldens, a traced replay of an emitting
#         step (ratio-4 windows ending) at TP=1
#   s42b: session 42, one GPU (~3 min; its variant at 51b6ca0, removed): the router's rows in the
#         routed gate/up launch: its CUDA twins (and the choice's, the F16 matvec's), the decode
#         graphs' bit-identity tests, replay A/B at TP=2 and TP=1 (base: the rows in gate/up;
#         router_own; router_late)
#   s42a: prepared in session 41, one GPU (~4 min): the riding Sinkhorn as block 0 of its launch
#         (cuda_c.MIX_FIRST): its CUDA twins (both placements), the decode graphs' bit-identity
#         tests, replay A/B at TP=2 and TP=1 (base: the last block; mix_first; mix_beside)
#   s41f: session 41, one GPU (~5 min): the HC Sinkhorn riding in attn_output_b's and the routed
#         down's launches: its CUDA twins, the Q8_0 / routed kernels', the decode graphs' tests
#         (overlap and PDL bit-identity among them); replay A/B at TP=2 and TP=1 (mix_beside)
#   s41e: session 41 closing run, one GPU (~3 min): the TP=1 bench at depth 0 on the
#         final code (the embedding row read by the first hc_step, never benched), TP=1 goldens
#   s41d: session 41, one GPU (~2 min; its variant at 8fd13fb, removed): a Q8_0 launch of fewer blocks than SMs at 8 loads a lane
#         (cuda_matvec.FEW_LOADS): the CUDA twins of the matvecs, replay A/B at TP=2 and TP=1
#         against 4 (few_off)
#   s41c: session 41, one GPU (~2 min): replay A/B at TP=2 and TP=1 of the HC mixer's lane
#         priority and warps (mix_w1, mix_w2, prio_main_mix_hi, mix_hi2, mix_hi2_w1)
#   s41b: session 41, one GPU (~2 min; its probe at 05a54bf, removed): replay A/B at TP=2 and TP=1
#         of the HC mixer's joins (not a safe schedule: mix_join_step joined the Sinkhorn at the
#         step's end)
#   s41a: session 41, one GPU (~3 min; its variants at 8917913, reverted): the prologues' activation loads in fewer L2 round trips
#         (matvec X_PAIR, the down's B_PRO / B_EARLY, the gate/up's A_XPF): CUDA twins of the
#         Q8_0, routed and choice kernels and the graph tests that ride on them; replay A/B at
#         TP=2 and TP=1 against each earlier form (x_one, dn_pro2, dn_late, gu_nopf, pro_old)
#   s39e: session 39, one GPU (~5 min): the embedding row read by the first update's hc_step:
#         its CUDA twins and the HC kernels', replay A/B at TP=2 and TP=1 (embed_own: torch's
#         gather and conversion launches), two of the decode graphs' CUDA tests (PDL, overlap)
#   s39c: session 39 closing check, one GPU (~6 min): the decode graphs' CUDA tests (the late
#         join on again, the twins' rows listed), CUDA goldens at TP=1
#   s39d: session 39, one GPU (~5 min): the TP=1 bench with depth 4096 (A/B: the old join)
#   s39b: session 39, one GPU (~4 min): the decode graphs' indexer test with the compressors'
#         late join at capture priority -1 (s37f's configuration; s38a ran "step" at 0), three
#         times, then the overlap test
#   s38a: prepared in session 37, one GPU (~7 min): the decode graphs' indexer test (kernels
#         against the torch twins, each step from its own session) with the compressors joined
#         before the attention and at the step's end (decode_graph.COMP_JOIN), twice: s37f
#         failed its [listed] form with "step"; a race or a near tie in the selection
#   s37f: session 37 closing check, two GPUs (~6 min): the decode graphs' CUDA tests, then s37e
#         through the serve_synth helper
#   s37e: session 37, two GPUs (~5 min): the served path at TP=2 on a synthetic GGUF of the full
#         model's first 8 layers (load, gateway, sampling, worker 1 killed mid-stream) with the
#         compressors joined at the step's end
#   s37d: session 37 closing run, two GPUs (~7 min): TP=2,1 bench with depth 4096 (A/B: the
#         compressors' other join; it ran with the late join as the default, at 5ee6d3f), CUDA
#         goldens at TP=2, the overlap test, CUDA goldens at TP=1
#   s37c: session 37, one GPU (~5 min; its variants at d63dd8b): replay A/B at TP=2 and TP=1
#         (traced) of the compressors joined at the step's end or before the next layer's
#         attention, forked before attn_q_a or after attn_q_b, with and without the main stream
#         high; then at depth 4096 (it traced only TP=1 and wrote its tables itself)
#   s37b: session 37, one GPU (~5 min; comp_layer at efe09cf, the rest at 92b764a): the overlap test with the
#         compressors joined later (decode_graph.COMP_JOIN), replay A/B at TP=2 and TP=1 of the
#         joins after the layer and at the step's end (also with the main stream high), at
#         depth 1, on a step that emits, at depth 4096
#   s37a: prepared in session 36, one GPU (~4 min; its variants at 92b764a): replay A/B at TP=2 and TP=1 of the decode
#         graphs captured on a high-priority main stream (prio_main_hi; with the HC mixer's lane
#         as high, prio_main_mix_hi) and of the greedy pick's logits a program (pick_bv512,
#         1024, 4096), then the priorities at depth 4096
#   s36h: session 36 closing check, one GPU (~3 min): the decode graphs' indexer test with each
#         step from its own session, the overlap test, CUDA goldens at TP=1
#   s36g: session 36, one GPU (~6 min): the decode graphs' CUDA tests, replay A/B at TP=2 and TP=1
#         of the streams before layer 0 as one update (first_own: before), the TP=1 bench at depth 0
#   s36f: session 36, one GPU (~2 min): replay A/B at TP=2 and TP=1 of a step that emits, with the
#         emissions' programs at 2, 8 and 16 warps (triton_attn.EMIT_WARPS, 4)
#   s36e: session 36, one GPU (~8 min): closing: the decode graphs' CUDA tests, the TP=1 bench at
#         depth 0 and 4096, CUDA goldens at TP=1
#   s36d: session 36, one GPU (~5 min; comp_f16_step at 753b165): CUDA twins of the compressors' projections in CUDA C
#         (comp_f16_step), the last HC step with the output head's mix and the emissions' pair,
#         the decode graphs' CUDA tests; replay A/B at TP=2 and TP=1 of each against its previous
#         path (head_own, comp_triton; emit_two and comp_triton on a step that emits, --emit4)
#   s36b: prepared in session 35, one GPU (~4 min): the weight kernels fitted over three rank
#         widths (bench/streaming_sizes.py) with the streamed weights' .cs loads: the streaming
#         fraction and fixed time behind the Spark projection (s33a/s33b's fit was before them)
#   s36a: session 36, one GPU (~5 min; pf_ef, comp_wef, attn_rows_s16 at 57fdb52): CUDA twins of the decode attention with the
#         indexer's rows listed (ATTN_ROWS) and of the selection writing the list; replay A/B at
#         TP=2 and TP=1 of the weight kernels' L2 prefetches evict-first (pf_ef) and the
#         compressors' projections loaded evict-first (comp_wef), then at depth 4096 of the
#         rows' list against the mask (attn_rows; also with 16 programs a head), pf_ef, the
#         attention's first ring block loaded late (attn_nohoist) and the weights' loads as
#         plain __ldg (wld_ldg): s35b/s35d's served long-prompt row (depth ~2200) was faster
#         without the hoist in both orders, the short rows followed the order
#   s35h: session 35 closing check, one GPU (~4 min): the decode graphs' CUDA tests
#   s35g: session 35, one GPU (~3 min): replay A/B at TP=2 and TP=1 of the HC step's mixer
#         weight loaded evict-first (triton_hc.HC_W_EVICT)
#   s35f: session 35, one GPU (~6 min): the dispatch test's fixed twin, the TP=1 bench at depth 0
#         and 4096 with the weights' loads as plain __ldg as its A/B
#   s35e: session 35, one GPU (~6 min; its variants at 918c834): the weights' loads with .cs: CUDA
#         C twins, replay A/B at TP=2 and TP=1 against plain __ldg and single-level hints, the
#         TP=1 bench at depth 0, CUDA goldens at TP=1
#   s35d: session 35, one GPU (~5 min; variants at b2446cd): replay A/B, TP=2 and 1, of the weights'
#         loads with a cache policy (wld_ef, wld_cs, wld_na: common.cuh WEIGHT_LD), then s35c
#   s35c: session 35, one GPU (~4 min): s35b in the other order (ATTN_HOIST False first, on
#         the fresh machine's cold compile, then True): s35b's second run was faster in every row
#   s34h: session 34 closing run, one GPU: CUDA attention twins, the TP=1 bench at depth 0,
#         CUDA goldens at TP=1 (s34b-s34f ran variants and probes that are only at 5bc1507)
#   s34g: session 34, one GPU: the decode attention's first ring block loaded with q (the
#         hoist without the compressed block, no spills): CUDA attention twins, replay A/B at
#         TP=2 and TP=1 (hoist off; 32 keys a program at 4 and 8 warps)
#   s34e: session 34, one GPU: replay A/B at TP=1 and TP=2 of the decode attention with parts
#         left out (timing-only probes attn_p*: merge, compressed rows, float64 norm, ring rows,
#         the RoPE row's wait for pos)
#   s34d: session 34, one GPU: replay A/B at TP=1 and TP=2 of timing-only probes: the step with
#         no HC step launch (hc_skip), with no decode attention launch (attn_skip)
#   s34c: session 34, one GPU: replay A/B at TP=1 and TP=2 of timing-only probes (the HC step's
#         tail without x, no Sinkhorn launch) and of the Sinkhorn's placement and the attention's
#         split (1, 2 programs a head)
#   s34b: session 34, one GPU: replay A/B at TP=1 then TP=2 of the weight kernels asking L2 for
#         their next bytes (Q8_0 step, gate/up item, down row), the down prologue in one round,
#         the Q8_0 matvec's loads and warps, kv_store's warps and s34a's HC step shapes
#   s34a: prepared in session 33, one GPU: replay A/B at TP=2 and TP=1 of the HC step's warps
#         (2, 8) and columns a program (64, 256) against its defaults (4 warps, 128 columns)
#   s32a: session 32 (prepared in 31), two GPUs: the decode attention on the tensor cores
#         (triton_attn._attn_mqa_kernel, removed after: runs only at 5246a26): CUDA twins, launch shapes alone
#         (bench/attn_decode_sweep.py), TP=2,1 bench with depth 4096 (A/B: ds4tp.bench's
#         ATTN_MQA_AB against one head a program); no goldens (the default path is unchanged)
#   s32c: session 32, one GPU: s30i's stall reasons of the routed gate/up kernel, then the
#         critical path of the TP=2 rank's step (bench/critical_path.py, world 2, no variants)
#   s32d: session 32, one GPU or two (the first order's A/B at 5027909, removed after): the routed gate/up rows in a decode order whose 16-byte
#         loads read whole sectors (qtensor.IQ2_DECODE) against the first one (IQ2_DECODE_V1):
#         CUDA twins (both orders), the kernel alone (bench/iq2_layout_probe.py), the bench
#         at TP=2,1 (TP=1 on one GPU), depth 0 (A/B: decode_d0_iq2_v1, logits compared)
#   s32e: session 32, one GPU or two (code at 3682150, removed after): the routed down rows in a decode order (qtensor.Q2K_DECODE:
#         quants, scales, d|dmin; three loads a pass) against GGUF's, with s32d's gate/up order:
#         CUDA twins (both decode orders), the gate/up alone, the bench at TP=2,1 (TP=1 on one
#         GPU), depth 0 (A/B: decode_d0_down_gguf_order, decode_d0_iq2_v1; logits compared)
#   s32g: session 32, one GPU: the routed kernels' CUDA twins on the final code (both decode
#         orders' A/B code removed), the prefill's tensor-core kernels, the graph tests
#   s32h: session 32, one GPU: the served path at TP=1 on a synthetic GGUF of the full model's
#         first 8 layers (the one-GPU box's 64 GiB disk holds no full one): load from the file
#         with the routed rows re-ordered, gateway, sampling; the final code's integration check
#         where no two-GPU machine is lent
#   s32i: session 32, two GPUs, short: the TP=2,1 bench at depth 0 on the final code, CUDA
#         goldens at TP=2 (s32f where little device time is left)
#   s32f: session 32 closing run, two GPUs: TP=2,1 bench with depth 4096 on the final code
#         (no A/B variants but the bench's own), CUDA goldens
#   s32b: session 32 closing run, two GPUs: the served path and the full GGUF's load, as s30d
#   s30i: session 30, one GPU: Nsight Compute's stall reasons of the routed gate/up kernel on
#         the decode order with the tables (TP=2 rows, shared rows riding)
#   s30h: session 30, two GPUs: the down rows' prefetch after the first item's loads again,
#         without the 64-bit division: the pair alone, twins, TP=2,1 bench (A/B). The prefetch,
#         its A/B and bench/down_prefetch_probe.py were removed after (at 9acd530): s30e, s30g
#         and s30h run only there
#   s30g: session 30, two GPUs: x's first blocks before the choice (A_XE, removed after), the
#         down rows' prefetch by the picking warp without a 64-bit division (code at aa847e5):
#         twins, TP=2,1 bench (A/B)
#   s30f: session 30 closing run, two GPUs: TP=2,1 bench with depth 4096, CUDA goldens
#   s30e: session 30, two GPUs: the down rows' L2 prefetch from the gate/up launch (A_PF):
#         twins, the kernel pair alone (bench/down_prefetch_probe.py), TP=2,1 bench (A/B: without)
#   s30d: session 30, two GPUs: the full GGUF synthesised, its TP=2 load cold (bench
#         --load-only after dropping the page cache), then the served path (warm loads in the
#         workers' log) with worker 1 killed mid-stream: s30a and s30b in one call, one synth
#   s30a: prepared in session 29 for the next, not run (two GPUs): the decode order's twin cases
#         (the case's bound changed after s29g), the full GGUF's TP=2 load, cold and warm, with
#         the re-ordering (and its kernels' compiles) inside the load
#   s30b: prepared in session 29 for the next, not run (two GPUs): the served path on the
#         decode order, worker 1 killed mid-stream
#   s29a: session 29 (prepared in 28), one GPU: Nsight Compute's stall reasons
#         per issued instruction for the routed gate/up and down kernels at TP=2 and TP=1
#   s28a: session 28, two GPUs: the unrun twins (the peer path's misaligned view, the draw's
#         e_at), the all-reduce inside the HC step (its twins, TP=2 bench A/B against ar2_sum)
#   s28b: session 28, two GPUs: CUDA twins (HC step with the all-reduce inside on one GPU, the
#         Q8_0 matvec's rows prefetched), TP=2,1 bench: the prefetch after latency-bound kernels
#         (measured slower and removed: its code at a626382)
#   s28c: session 28 closing run, two GPUs: TP=2,1 bench with depth 4096, CUDA goldens
#   s28d: session 28, two GPUs: the served path on the final code, worker 1 killed mid-stream
#   s28e: session 28, two GPUs: TP=2 bench with depth 4096, the decode attention's launch
#         shapes (programs per head, keys per block, warps) as A/B variants
#   s28f: session 28, two GPUs: the KV row stored inside the attention launch: CUDA twins and
#         graph tests, TP=2,1 bench (A/B against kv_store's own launch), CUDA goldens (measured
#         slower and removed: its code at dfa435b; s28e's attention launch shapes at b967d10)
#   s27k: session 27, two GPUs: depth-4096 chained decode, peer all-reduce against NCCL
#   s27j: session 27, two GPUs: the served path on the final code
#   s27i: session 27, two GPUs: the all-reduce's release-only default (twin test, TP=2 bench)
#   s27h: session 27, two GPUs: the served path with the within-host all-reduce off (NCCL)
#   s27f: session 27, two GPUs: the served path end to end, a worker killed mid-stream
#   s27d: session 27, one GPU: the sampler's draw in CUDA C (twin tests, timings against the twin)
#   s27c: session 27, two GPUs: the within-host all-reduce's variants (bench/allreduce_ab.py)
#   s27b: session 27, two GPUs: the within-host all-reduce (twin test, TP=2 bench A/B against
#         NCCL with the logits compared, TP=2 goldens)
#   s27a: session 27, one GPU: where the device sampler's GPU time goes (bench/sampler_bench.py)
#   s26h: session 26, one GPU: every CUDA C twin and CUDA graph test on the final code
#   s26g (at 5e5eee8, its variant removed after): session 26, one GPU: the choice picked by every warp (A_PICK_ALL): the routed twins under
#         it, replay A/B at TP=2 and 1 (base, pick_all), the race probe under it at TP=2
#   s26f: session 26, two GPUs: after warp_min_u32 became ~warp_max_u32(~v), the routed twins and
#         the graph tests of the choice; the served path (full-size synthetic GGUF, ds4tp launch)
#   s26e: session 26 closing run, two GPUs: the TP=2,1 bench and CUDA goldens through the graphs
#   s26d: session 26, one GPU: the routed twins, the CUDA C twins and graph tests, the race probe
#         at TP=2 and TP=1 (1,000 checked replays each), CUDA goldens at TP=1 through the graphs
#   s26c: as s26b after the choice's inputs are read in place (the hash table contiguous at load)
#   s26b: session 26, one GPU: the choice in the gate/up launch with the own launch's arithmetic:
#         routed twins, route_probe, replay A/B at TP=2 and 1 (base, route_own), the CUDA C twins
#         and graph tests, CUDA goldens at TP=1 through the graphs
#   s26a: session 26, one GPU, diagnostic: bench/route_probe.py (the choice in the gate/up launch
#         checked call by call against its own launch, eager and graphs), the routed twins
#   s25j: session 25, one GPU: the graph tests s25i did not reach (the riding test with the
#         choice in its own launch; the choice in the gate/up launch against its own), the race
#         probe at TP=2 (1,000 checked replays)
#   s25i: session 25, one GPU: the final code's CUDA C twins and graph tests, the race probe at
#         TP=2 (1,000 checked replays), CUDA goldens at TP=1 through the graphs
#   s25h (with a timing-only fixed-choice define, removed after): session 25, one GPU: as s25g with the choice's scores computed by the whole block
#         (route_scores), then the pick by one warp (route_pick); the routed twins first
#   s25g (b0e0946's choice plus the timing-only define, removed after): session 25, one GPU, diagnostic: the choice
#         in the gate/up launch (b0e0946's) against its own launch and against a fixed choice
#   s25f (at 934022a, its variants removed after): session 25, one GPU: decode attention and the KV store without loads waiting on the
#         position (EARLY, the RoPE rows gathered once a step): their CUDA cases and the graph
#         tests, replay A/B at TP=2 and 1 (base, attn_before, rope_rows_off)
#   s25e: session 25, one GPU: bench/boundary_probe.py (a kernel boundary's cost: plain launches,
#         PDL's wait, a memory flag)
#   s25d (at its commit, the variant removed after): session 25, one GPU: the down kernel's ids and first rows before the PDL wait
#         (EARLY_IDS): twin cases under it, replay A/B at TP=2 and 1, the race probe under it
#   s25c (at 82954be, its variants removed after): session 25, one GPU: the routed gate/up decoding by the signed grid or with its sign
#         masks from a table (cuda_experts.SWIGLU_LUT 1, 2): twin cases, replay A/B at TP=2, 1
#   s25b (and s25a): run at b0e0946, whose kernels and variants were removed after:
#   s25b: session 25, one GPU: the PTX check; the new twins; hc_step_sweep --cuda (the HC step
#         alone: Triton, hc.cu with tagged words, with the barrier); replay A/B at TP=2 and 1
#         (base, hc_triton, hc_barrier, route_own, route_own_a1); CUDA C twins and graph tests
#   s25a: session 25, one GPU: the PTX check; the new CUDA C twins (the HC step with its grid
#         barrier, the gate/up launch choosing its experts) each reported; replay A/B at TP=2
#         and TP=1 (base, hc_triton, route_own); the CUDA C twins and graph tests
#   s24g: session 24, one GPU: the PTX check, CUDA C twins and CUDA graph tests on the final code
#   s24f: session 24, two GPUs: the served path (full-size synthetic GGUF, ds4tp launch --nodes 2)
#   s24e: session 24 closing run, two GPUs: the TP=2,1 bench and CUDA goldens through the graphs
#   s24d: session 24, one GPU: the PTX check, CUDA C twins and CUDA graph tests (the router's
#         matvec and expert choice in one launch), replay A/B at TP=2 and TP=1 (base, route_own),
#         the race probe at TP=2 and TP=1 (the code and variant at 7766346, removed)
#   s24c: session 24, one GPU: the PTX check, CUDA C twins, graph tests and the HC step's Triton
#         cases, the Q8_0 twins under PF_PIECES 4 and 16; replay A/B at TP=2 and TP=1: base (the
#         Q8_0 matvec prefetching 8 pieces per lane and its scales, the HC step's mixer weight
#         before the wait), mv_pf4, mv_pf16, hc_w_late (the code and variants at 9126560, removed)
#   s24b: session 24, one GPU: the PTX check, CUDA C twins and graph tests (the F16 one-token
#         matvec added), replay A/B at TP=2 and TP=1: base, c362271's experts.cu (old_experts),
#         the router on the Triton kernel; the race probe at TP=2 and TP=1 (carry .dbg/old with
#         c362271's experts.cu in it)
#   s24a: session 24, one GPU: the PTX check, CUDA C twins and graph tests (routed kernels with
#         loads issued earlier, the Q8_0 matvec's first step in registers), the twins under the
#         matvec's other first-step modes, replay A/B at TP=2: base, last session's kernels
#         (old: both files; old_experts), the matvec's first step into L2 / L1, one down row
#         in flight (.dbg/old carries c362271's experts.cu and matvec.cu; the variants old,
#         mv_first_* and down_rb1 were removed with the code they timed)
#   s23i: session 23, one GPU: the gate/up launch's shared rows after its routed items
#         (A_SH_LAST): twin cases, replay A/B at TP=2
#   s23h: session 23, one GPU: the race probe at TP=1 on the final code (.ca loads, riding)
#   s23g: session 23, one GPU: the routed gate/up with the next two items' rows in flight per
#         warp (A_DEPTH=2): twin cases, replay A/B at TP=2 and 1
#   s23f: session 23, one GPU: the routed gate/up at two blocks per SM (A_MINB, A_XS_SMEM):
#         twin cases, replay A/B at TP=2 and 1
#   s23e: session 23, one GPU: Nsight Compute on the routed kernels with the shared rows riding
#         (TP=2 shard, TP=1) and without (TP=2)
#   s23d: session 23, two GPUs: the served path on the full-size synthetic GGUF (as s19f), after
#         the race fix, the .ca loads and the shared expert riding in the routed launches
#   s23c: session 23 closing run, two GPUs: the race probe on the final code (TP=2 shard), the
#         TP=2,1 bench and CUDA goldens through the graphs (its tests ran in s23b on the same code)
#   s23b: session 23, one GPU: the shared rows prefetched into L2 before the PDL wait, prior() by
#         .ca: the PTX check, CUDA C twins, replay A/B (base, shared_own, prior_cg) at TP=2 and 1
#   s23a: session 23, one GPU: l1wait; the PTX check, the CUDA C twins and graph tests (the shared
#         expert riding in the routed launches); the race probe at TP=2; replay A/B at TP=2 and 1:
#         base (riding), the shared expert's own launches (before), prior() by .ca
#   s18d: session 18 closing run, two GPUs: graph tests (PDL bit-identity, side streams, Sinkhorn
#         beside the sublayer, the indexer in the graph), the TP=2,1 bench (its variants: Sinkhorn
#         inline, the mixer on the shared side stream), CUDA goldens through the graphs
#   prefill: many-token kernel tests and launch-shape sweep, a prefill profile, the TP=1 bench,
#            TP=1 golden (one GPU)
set -uo pipefail
MODE=${1:-smoke}
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
[ -d .golden ] && export DS4TP_GOLDEN=$PWD/.golden
log() { echo "== $(date +%T) $*"; }
two_gpus() { [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; }
# CUDA golden parity on tiny-a: golden TP PATHS TIMEOUT_S (appends to $OUT/golden_cuda.txt)
golden() {
  log "golden parity on CUDA, tiny-a, TP=$1 ($2)"
  timeout "$3" python3 tests/golden_eval.py --device cuda --tp "$1" --model tiny-a --paths "$2" 2>&1 | grep "^tiny-a\|Error" | tee -a "$OUT/golden_cuda.txt"
}
# CUDA twin tests: gate_tests TIMEOUT_S SELECTION FILE... ; stops the script unless they pass
gate_tests() {
  local t=$1 sel=$2; shift 2
  log "kernel tests (CUDA): $sel"
  timeout "$t" python3 -m pytest -q -x "$@" -k "$sel" > "$OUT/kernel_tests_full.txt" 2>&1
  tail -3 "$OUT/kernel_tests_full.txt" | tee "$OUT/kernel_tests.txt"
  grep -q " passed" "$OUT/kernel_tests.txt" && ! grep -q "failed\|error" "$OUT/kernel_tests.txt" || {
    grep -E "^E |Error|^FAILED" "$OUT/kernel_tests_full.txt" | head -30; echo "TESTS FAILED"; exit 1; }
}
# the bench's figures (bench.json, or the partial file of a run cut short): bench_summary
bench_summary() {
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
runs = json.load(open(f"{out}/bench.json"))["runs"] if os.path.exists(f"{out}/bench.json") else {}
for t in (2, 1):    # a run cut short left its partial file
    if f"tp{t}" not in runs and os.path.exists(f"{out}/bench.tp{t}.json"):
        runs[f"tp{t}"] = json.load(open(f"{out}/bench.tp{t}.json"))
for name, r in runs.items():
    print(name, {k: round(v["tok_s"], 1) for k, v in r.items() if isinstance(v, dict) and "tok_s" in v})
    print(name, "copy", r.get("copy_bw_GBs"), "collectives", r.get("collectives"))
    if "collectives_nccl" in r or r.get("peer_all_reduce") not in (None, "on"):
        print(name, "peer all-reduce", r.get("peer_all_reduce"), "NCCL collectives", r.get("collectives_nccl"),
              "logits equal to NCCL's", r.get("peer_logits_equal_nccl"))
    print(name, "profile", r.get("profile"), "spark", r.get("spark_projection"), "wall", r.get("wall_s"))
    if "prefill" in r:
        print(name, "prefill host / all seconds", r["prefill"].get("host_seconds"), r["prefill"]["all_seconds"])
PY
}
# the TP=2,1 bench without A/B variants (depth 0 and DEPTH, prefill 2048), then CUDA goldens
# through the decode graphs at TP=2 and TP=1: bench_goldens [DEPTH (4096)] [TIMEOUT_S (300)]
bench_goldens() {
  bench_only "${1:-4096}" "${2:-300}"
  golden 2 static 90
  golden 1 static 70
}
# the same bench without the goldens: bench_only DEPTH TIMEOUT_S
bench_only() {
  log "bench, 43 layers, TP=2,1, depth 0 and $1, prefill 2048 (no A/B variants)"
  timeout "$2" python3 -m ds4tp bench --tp 2,1 --depth "$1" --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary
}
# CUDA twins (-k SELECTION in FILES, default tests/test_kernels.py), then the TP=2,1 bench with
# the session's A/B variants: twins_bench SELECTION DEPTH TIMEOUT_S [FILES...] (session 29)
twins_bench() {
  local sel=$1; shift
  log "CUDA twins: $sel"
  local files=("${@:3}"); [ ${#files[@]} -eq 0 ] && files=(tests/test_kernels.py)
  timeout 200 python3 -m pytest -q -rf "${files[@]}" -k "$sel" > "$OUT/tests_kernels.txt" 2>&1
  tail -2 "$OUT/tests_kernels.txt"; grep -E "^FAILED|^E  " "$OUT/tests_kernels.txt" | head -16
  log "bench, 43 layers, TP=2,1, depth 0 and $1 (A/B variants: bench.json)"
  timeout "$2" python3 -m ds4tp bench --tp 2,1 --depth "$1" --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary 2>&1 | grep -v "profile\|prefill host"
  python3 -c "import json; rs=json.load(open('$OUT/bench.json'))['runs']; [print(t, {k: r.get(k) for k in ('decode_order_weights', 'iq2_decode_order_weights', 'decode_order_logits_equal_gguf', 'tables_logits_equal_one_table', 'down_prefetch_logits_equal_without', 'kv_row_logits_equal_own_launch', 'spark_projection', 'build_s', 'prefill') if k in r}, {k: v['us'] for k, v in r['profile']['kernels'].items() if v['us'] > 50}) for t, r in rs.items()]"
}
# the full-size GGUF synthesised, then the served path end to end at TP=2 on two GPUs:
# the served path end to end on a synthetic GGUF of the full model (LAYERS: all, or its first
# N layers), synthesised first, at TP=NODES on as many GPUs:
# serve_synth NODES LAYERS SYNTH_TIMEOUT_S SERVE_TIMEOUT_S [serve_e2e options, e.g. --kill 1]
serve_synth() {
  local nodes=$1 layers=$2 ts=$3 tv=$4; shift 4
  local lay=(); [ "$layers" = all ] || lay=(--layers "$layers")
  log "synth full, layers: $layers (parallel)"
  local t0=$(date +%s)
  timeout "$ts" python3 -m ds4tp synth --preset full "${lay[@]}" --seed 0 --jobs "$(nproc)" --out /tmp/full.gguf > "$OUT/synth_log.txt" 2>&1
  echo "synth: status $? in $(( $(date +%s) - t0 )) s"
  log "serve end to end, TP=$nodes on $nodes GPU(s) $*"
  timeout "$tv" python3 bench/serve_e2e.py --model /tmp/full.gguf --device cuda --nodes "$nodes" --ctx 8192 \
    --long-words 800 --tokens 256 "$@" --out "$OUT/serve_e2e.json" --log "$OUT/serve_launch.log" 2>&1 | cut -c1-900
  grep -i "loaded in\|warm-up\|ready in\|error\|Traceback" "$OUT/serve_launch.log" | head -20
  rm -f /tmp/full.gguf
}
# serve_full SYNTH_TIMEOUT_S SERVE_TIMEOUT_S [serve_e2e options]: serve_synth at TP=2, all layers
serve_full() {
  serve_synth 2 all "$@"
}
# Nsight Compute's stall reasons per issued instruction of the routed kernels matching REGEX
# (bench/ncu_experts.py ARGS, its first N launches after N skipped): ncu_stalls TIMEOUT_S REGEX N ARGS
ncu_stalls() {
  local t=$1 re=$2 n=$3 a=$4 f="$OUT/ncu_stalls_${4// /_}.txt"
  log "Nsight Compute, stall reasons of the routed kernels ($re): $a"
  timeout "$t" ncu -k regex:"$re" -s "$n" -c "$n" --section SpeedOfLight --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --section Occupancy \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    python3 bench/ncu_experts.py $a > "$f" 2>&1
  grep "Duration\|Issue Slots\|stalled\|iq2xxs\|q2k_down\|ERR\|Registers\|Achieved Occ\|Bank" "$f" \
    | awk '!/ratio +0(\.0+)?$/' | head -70
}
# the decode attention's CUDA twins (-k attention), then its launch shapes alone
# (bench/attn_decode_sweep.py, one GPU): attn_twins_sweep
attn_twins_sweep() {
  log "CUDA twins: decode attention"
  timeout 150 python3 -m pytest -q -rf tests/test_kernels.py -k "attention" > "$OUT/tests_kernels.txt" 2>&1
  tail -2 "$OUT/tests_kernels.txt"; grep -E "^FAILED|^E  " "$OUT/tests_kernels.txt" | head -16
  log "decode attention launch shapes alone (one GPU)"
  timeout 200 python3 bench/attn_decode_sweep.py --out "$OUT/attn_sweep.json" > "$OUT/attn_sweep.txt" 2>&1
  echo "status $?"; grep "==\|failed\|Error" "$OUT/attn_sweep.txt" | head -20
}
# session 31: CUDA twins (-k SELECTION in the kernel, two-GPU and graph tests), the HC step
# alone (bench/hc_step_sweep.py), the TP=2,1 bench at depth 0 and DEPTH (the session's A/B),
# the bench's KEYS and its larger kernels printed, CUDA goldens:
# s31_round SELECTION DEPTH BENCH_TIMEOUT_S KEY...
s31_round() {
  local sel=$1 depth=$2 tb=$3; shift 3
  log "CUDA twins: $sel"
  timeout 240 python3 -m pytest -q -rf tests/test_kernels.py tests/test_tp.py tests/test_decode_graph.py \
    -k "$sel" > "$OUT/tests_kernels.txt" 2>&1
  tail -2 "$OUT/tests_kernels.txt"; grep -E "^FAILED|^E  " "$OUT/tests_kernels.txt" | head -16
  log "the HC step alone (bench/hc_step_sweep.py, one GPU)"
  timeout 150 python3 bench/hc_step_sweep.py --out "$OUT/hc_step_sweep.json" > "$OUT/hc_step_sweep.txt" 2>&1
  echo "status $?"; grep "mix=False\|==\|failed\|Error" "$OUT/hc_step_sweep.txt" | head -20
  log "bench, 43 layers, TP=2,1, depth 0 and $depth (A/B: $*)"
  timeout "$tb" python3 -m ds4tp bench --tp 2,1 --depth "$depth" --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary 2>&1 | grep -v "prefill host\|profile"
  python3 - "$OUT/bench.json" "$@" <<'PY'
import json, sys
for t, r in json.load(open(sys.argv[1]))["runs"].items():
    print(t, {k: r.get(k) for k in sys.argv[2:]}, r.get("spark_projection"),
          {k: v["us"] for k, v in r["profile"]["kernels"].items() if v["us"] > 50})
PY
  golden 2 static 90
  golden 1 static 70
}
# CUDA C launches against the Triton default at T=1: cuda_c_sweep TIMEOUT_S BUDGET_S CASES
cuda_c_sweep() {
  log "T=1: Triton default vs CUDA C launches: $3"
  timeout "$1" python3 bench/kernels_check.py --out "$OUT/kernels.json" --tokens 1 --sweep-tokens 1 --budget-s "$2" --sweep-cuda-c-only --only "$3" 2>&1 | grep "us\|sweep\|FAIL" | grep -v "matvec_time" | tail -70
}
# bench/pdl_race_probe.py in a process of its own (a fault ends the CUDA context):
# race_probe TIMEOUT_S ARGS; its output in $OUT/probe_N.txt (N counts the probes), also appended
# to $OUT/pdl_race_probe.txt; prints the exit status and the last lines
PROBE_N=0
race_probe() {
  local t=$1; shift; PROBE_N=$((PROBE_N + 1)); log "race probe $PROBE_N: $*"
  timeout "$t" python3 bench/pdl_race_probe.py "$@" > "$OUT/probe_$PROBE_N.txt" 2> "$OUT/probe_$PROBE_N.err"
  echo "rc $?"; grep -v "^step" "$OUT/probe_$PROBE_N.txt" | tail -5
  grep -v "^ \\|cupy\\|^Traceback\\|^Exception ignored\\|^$\\|Warn\\|warn" "$OUT/probe_$PROBE_N.err" | tail -3
  cat "$OUT/probe_$PROBE_N.txt" >> "$OUT/pdl_race_probe.txt"
}
# the CUDA C twin cases whose names contain one of NAMES (comma-separated), compiled under each
# set of defines (a Python tuple of (name, value) tuples per argument; cuda_c.VARIANT_DEFINES):
# variant_twins NAMES DEFS...
variant_twins() {
  local names=$1; shift
  log "twin cases ($names) under: $*"
  timeout 90 python3 - "$names" "$@" <<'PY' 2>&1 | grep -v Warn | tail -4
import ast, sys, torch
sys.path.insert(0, "tests")
import kernel_cases as kc
from ds4tp.kernels import cuda_c
names = sys.argv[1].split(",")
for defs in map(ast.literal_eval, sys.argv[2:]):
    cuda_c.VARIANT_DEFINES = defs
    n = 0
    for name, fn, a in kc.cuda_c_cases():
        if any(k in name for k in names):
            fn("cuda", torch.Generator().manual_seed(7 + n), *a)
            n += 1
    print(defs or "default", n, "cases passed")
PY
}
# the CUDA C twin cases whose names contain one of NAMES (comma-separated), each run and
# reported on its own (a failure does not stop the others): new_twins TIMEOUT_S NAMES
new_twins() {
  log "twin cases ($2), each reported"
  timeout "$1" python3 - "$2" <<'PY' 2>&1 | grep -v Warn | tail -20
import sys, torch, traceback
sys.path.insert(0, "tests")
import kernel_cases as kc
names = sys.argv[1].split(",")
for i, (name, fn, a) in enumerate(kc.cuda_c_cases()):
    if any(k in name for k in names):
        try:
            print(f"ok   {name}: {fn('cuda', torch.Generator().manual_seed(7 + i), *a):.3g}", flush=True)
        except Exception as exc:
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
PY
}
# the 43-layer step's variants replay-timed round-robin and traced (bench/critical_path.py; TRACE:
# the variants to trace, base by default), at world 2 (rank 0's shard, collectives removed) then
# 1: [TRACE=V,..] replay_ab VARIANTS WHAT [critical_path ARGS]
replay_ab() {
  local variants=$1 what=$2; shift 2
  for w in 2 1; do
    log "$what: replay A/B, world $w"
    timeout 200 python3 bench/critical_path.py --world $w --variants "$variants" --trace "${TRACE:-base}" "$@" \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt" | head -12
    grep -A18 "span by role\|Error" "$OUT/critical_path_w$w.txt" | head -22
  done
}
# the last replay_ab's tables kept under a tag (critical_path_TAG_w1.txt, _w2.txt), its trace
# JSON dropped: replay_keep TAG
replay_keep() {
  for w in 1 2; do cp "$OUT/critical_path_w$w.txt" "$OUT/critical_path_$1_w$w.txt"; done
  rm -f "$OUT"/critical_path_w?.json
}
# CUDA tests with their skip reasons: cuda_tests TIMEOUT_S SELECTION OUTFILE FILES...
cuda_tests() {
  local t=$1 sel=$2 f="$OUT/$3"; shift 3
  timeout "$t" python3 -m pytest -q -rfs "$@" -k "$sel" > "$f" 2>&1
  tail -2 "$f"; grep -E "^FAILED|^E  |^SKIPPED" "$f" | head -12
}
# the TP=1 bench (43 layers; DEPTH 0: depth 0 only), then its summary: bench_tp1 TIMEOUT_S DEPTH WHAT
bench_tp1() {
  local t=$1 depth=$2 what=$3
  log "bench, 43 layers, TP=1, $what"
  timeout "$t" python3 -m ds4tp bench --tp 1 --depth "$depth" --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  if [ -f "$OUT/bench.json" ]; then rm -f "$OUT/bench.tp1.json"; fi   # a run cut short: its partial file
  bench_summary 2>&1 | grep -v "prefill host\|profile"
}
# the TP=1 bench at depth 0 with its A/B variants, then the named keys of its result:
# bench_tp1_ab TIMEOUT_S WHAT KEY...
bench_tp1_ab() {
  local t=$1 what=$2; shift 2
  bench_tp1 "$t" 0 "depth 0 (A/B: $what)"
  python3 - "$OUT/bench.json" "$@" <<'PY'
import json, sys
for t, r in json.load(open(sys.argv[1]))["runs"].items():
    print(t, {k: r.get(k) for k in sys.argv[2:]})
PY
}
# the weight kernels fitted over three rank widths on one GPU: sizes_fit TIMEOUT_S
sizes_fit() {
  log "weight kernels fitted over three rank widths (TP=2, 1, 4; collectives removed)"
  timeout "$1" python3 bench/streaming_sizes.py --out "$OUT/streaming_sizes.json" 2>&1 | grep -v Warn | tail -16
}
# a prefill's routed launches (2048 tokens, TP=1 shapes): the default path and the exact one
routed_launches() {
  log "2048-token routed launches: default (CUDA C tensor cores), exact path"
  timeout 100 python3 bench/gemm_sweep.py --out "$OUT/gemm_sweep.json" --budget-s 0 --only gate_up,down 2>&1 | grep -v Warn
}
# a traced graph replay of 6 full-width layers at depth 1: its per-kernel table
trace6() {
  log "graph-replayed decode step, 6 full-width layers, traced"
  timeout 100 python3 bench/profile_graph.py 6 1 2>&1 | grep -v Warn | tee "$OUT/profile_graph_6layers.txt" | sed -n '/kernels by/,$p' | head -30
}
# the 43-layer prefill, each piece on its previous path in turn: prefill_ab TIMEOUT_S
prefill_ab() {
  log "43-layer prefill, 2048 tokens: default, then one piece at a time on its previous path"
  timeout "$1" python3 bench/prefill_ab.py --out "$OUT/prefill_ab.json" 2>&1 | grep -v Warn
}
# a 4-layer prefill profile: prefill_profile TIMEOUT_S LINES (the table's last LINES lines)
prefill_profile() {
  log "prefill profile, 4 full-width layers"
  timeout "$1" python3 bench/profile_prefill.py 4 2048 2>&1 | grep -v Warn | tail -"$2" | tee "$OUT/profile_prefill.txt"
}
# the TP=1 bench at full size with its A/B variants: bench_tp1_full TIMEOUT_S DEPTH (decode
# variants, prefill 2048)
bench_tp1_full() {
  log "bench, 43 layers, TP=1, depth 0 and $2, prefill 2048"
  timeout "$1" python3 -m ds4tp bench --tp 1 --depth "$2" --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-200
  python3 -c "import json; r=json.load(open('$OUT/bench.json'))['runs']['tp1']; [print(k, round(v['tok_s'], 1), {a: round(b, 3) for a, b in v.get('variant_ms', {}).items()}) for k, v in r.items() if isinstance(v, dict) and 'tok_s' in v]; print(r.get('profile'))"
}
# one CUDA C round of the fifth session: cuda_c_round TEST_SELECTION SWEEP_TIMEOUT_S CASES BENCH_TIMEOUT_S
# (twin tests, the launch sweep against Triton, a traced 6-layer replay, the TP=1 bench)
cuda_c_round() {
  python3 -c "import cupy; print('cupy', cupy.__version__)"
  gate_tests 150 "$1" tests/test_kernels.py
  cuda_c_sweep "$2" $(( $2 - 30 )) "$3"
  trace6
  bench_tp1_full "$4" 0
}
# a TP=2 rank's prefill alone on one GPU (rank 0's shard, collectives removed): host enqueue
# against the GPU, host profile, kernel table: tp2_rank_prefill TIMEOUT_S
tp2_rank_prefill() {
  log "prefill, 43 layers, TP=2 rank 0 on one GPU: host enqueue against GPU"
  timeout "$1" python3 bench/profile_prefill.py 43 2048 2 > "$OUT/profile_prefill_tp2r0.txt" 2>&1
  grep "prefill\|host enqueue\|GPU kernels in" "$OUT/profile_prefill_tp2r0.txt" | head -8
}
# the full-size bench at depth 0 on two GPUs, each TP's figures from its partial file (kept if
# the run is cut short): bench_tp2 TIMEOUT_S TPS (2,1 or 2)
bench_tp2() {
  log "bench, 43 layers, TP=$2, depth 0, prefill 2048"
  timeout "$1" python3 -m ds4tp bench --tp "$2" --depth 0 --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  python3 - "$OUT" "$2" <<'PY'
import json, os, sys
for t in sys.argv[2].split(","):
    f = os.path.join(sys.argv[1], f"bench.tp{t}.json")
    if not os.path.exists(f):
        continue
    r = json.load(open(f))
    for k, v in r.items():
        if isinstance(v, dict) and "tok_s" in v:
            print(f"tp{t}", k, round(v["tok_s"], 1),
                  v.get("all_seconds", {a: round(b, 3) for a, b in v.get("variant_ms", {}).items()}))
    print(f"tp{t}", r.get("collectives"), r.get("profile"))
PY
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"

if [ "$MODE" = smoke ]; then
  log "NCCL graph-capture probe"
  timeout 200 python3 bench/nccl_graph_probe.py 2>&1 | tail -3 | tee "$OUT/nccl_probe.txt"
  log "kernel tests (CUDA)"
  timeout 300 python3 -m pytest -q tests/test_kernels.py -k "not interpreter" 2>&1 | tail -15 | tee "$OUT/kernel_tests.txt"
  log "golden parity on CUDA, tiny-a, TP=1 and TP=2 (decode, static/graphs, prefill)"
  for tp in 1 2; do
    timeout 400 python3 tests/golden_eval.py --device cuda --tp $tp --model tiny-a --paths decode,static,prefill 2>&1 | tail -5 | tee -a "$OUT/golden_cuda.txt"
  done
  log "bench, 4 layers, quick"
  timeout 600 python3 -m ds4tp bench --layers 4 --tp 1,2 --quick --out "$OUT/bench_quick.json" 2>&1 | tail -20
elif [ "$MODE" = kernels ]; then
  log "kernel tests (CUDA)"
  timeout 300 python3 -m pytest -q -x tests/test_kernels.py -k "not interpreter" 2>&1 | tail -8 | tee "$OUT/kernel_tests.txt"
  log "profile of a 4-layer full-width decode step"
  timeout 300 python3 bench/profile_step.py 4 2>&1 | tail -110 | tee "$OUT/profile_4layers.txt"
  log "kernels check + T=1 sweep (Q8_0 dense, routed experts)"
  timeout 300 python3 bench/kernels_check.py --out "$OUT/kernels.json" --tokens 1 --sweep-tokens 1 --budget-s 240 \
    --only attn_q_a,attn_kv,attn_q_b,attn_out_a,attn_out_b,shexp_gate_up,shexp_down,output_vocab,routed_gate_up,routed_down 2>&1 | tail -60
elif [ "$MODE" = full ]; then
  log "bench, 43 layers, TP=2 then TP=1, depth 0 and 4096, prefill 2048"
  timeout 330 python3 -m ds4tp bench --tp 2,1 --depth 4096 --out "$OUT/bench.json" 2>&1 | grep -v Warning | tail -8 | cut -c1-600
  log "golden parity on CUDA, tiny-a, TP=1 and TP=2 (decode, static/graphs, prefill)"
  for tp in 1 2; do
    timeout 110 python3 tests/golden_eval.py --device cuda --tp $tp --model tiny-a --paths decode,static,prefill 2>&1 | tail -6 | tee -a "$OUT/golden_cuda.txt"
  done
  log "kernel tests (CUDA): the HC mixer, routed experts, dispatch"
  timeout 100 python3 -m pytest -q tests/test_kernels.py -k "hc_combine or routed or dispatch or column_shard or grouped" 2>&1 | tail -4 | tee "$OUT/kernel_tests.txt"
elif [ "$MODE" = final ]; then
  log "smoke: the changed kernels against their twins on CUDA"
  if ! timeout 90 python3 -m pytest -q -x tests/test_kernels.py -k "hc_combine or (routed_experts and not tp2)" 2>&1 | tail -3 | tee "$OUT/smoke_tests.txt"; then
    if [ -f .fallback/triton_matvec.py ]; then
      echo "SMOKE FAILED: benchmarking with the previous triton_matvec.py (.fallback)"; cp .fallback/triton_matvec.py ds4tp/kernels/
    fi
  fi
  log "bench, 43 layers, TP=2 then TP=1, depth 0, prefill 2048"
  timeout 200 python3 -m ds4tp bench --tp 2,1 --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  log "golden parity on CUDA, tiny-a, TP=1 (static/graphs, prefill)"
  timeout 70 python3 tests/golden_eval.py --device cuda --tp 1 --model tiny-a --paths static,prefill 2>&1 | grep "^tiny-a" | tee -a "$OUT/golden_cuda.txt"
  log "kernel tests (CUDA): dispatch and determinism"
  timeout 60 python3 -m pytest -q tests/test_kernels.py -k "dispatch" 2>&1 | tail -2 | tee "$OUT/kernel_tests.txt"
  log "golden parity on CUDA, tiny-a, TP=2 (static/graphs)"
  timeout 90 python3 tests/golden_eval.py --device cuda --tp 2 --model tiny-a --paths static 2>&1 | grep "^tiny-a" | tee -a "$OUT/golden_cuda.txt"
  log "routed-expert kernels, T=1, with the sweep"
  timeout 60 python3 bench/kernels_check.py --out "$OUT/kernels.json" --tokens 1 --sweep-tokens 1 --budget-s 45 --only routed_gate_up,routed_down 2>&1 | grep -v "^ *\[\|^ *\]\|^ *\"\|^ *[0-9.]*,\?$" | tail -30
elif [ "$MODE" = prefill ]; then
  log "kernel tests (CUDA): many-token launch, dispatch"
  timeout 150 python3 -m pytest -q tests/test_kernels.py -k "gemm or dispatch" 2>&1 | tail -4 | tee "$OUT/kernel_tests.txt"
  for tp in 1 2; do
    log "many-token launch shapes at 2048 tokens, TP=$tp shapes"
    timeout 120 python3 bench/gemm_sweep.py --tp $tp --out "$OUT/gemm_sweep_tp$tp.json" --budget-s 70 2>&1 | grep -v Warn | tail -70
  done
  log "profile of a 2048-token prefill, 4 full-width layers"
  timeout 120 python3 bench/profile_prefill.py 4 2048 2>&1 | tail -45 | tee "$OUT/profile_prefill.txt"
  log "bench, 43 layers, TP=1, depth 0, prefill 2048"
  timeout 200 python3 -m ds4tp bench --tp 1 --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  log "golden parity on CUDA, tiny-a, TP=1 (prefill)"
  timeout 100 python3 tests/golden_eval.py --device cuda --tp 1 --model tiny-a --paths prefill 2>&1 | grep "^tiny-a" | tee -a "$OUT/golden_cuda.txt"
elif [ "$MODE" = final2 ]; then
  if two_gpus; then TPS="2,1"; else TPS="1"; fi
  log "kernel tests (CUDA): many-token launch, RMS scale, hc_post, split-f16 mm, dispatch, fused chains"
  timeout 150 python3 -m pytest -q tests/test_kernels.py tests/test_fuse.py -k "gemm or dispatch or rms_scale or f16_exact or hc_combine or fuse" 2>&1 | tail -3 | tee "$OUT/kernel_tests.txt"
  log "bench, 43 layers, TP=$TPS, depth 0, prefill 2048"
  timeout 240 python3 -m ds4tp bench --tp $TPS --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  golden 1 prefill,static 110
  if [ "$TPS" = "2,1" ]; then golden 2 prefill 70; fi
  prefill_profile 60 62
elif [ "$MODE" = decode ]; then
  # 2026-11-29: decode attention in three launches, paired projections, Q2_K slot sum at TP=1
  if two_gpus; then TPS="2,1"; else TPS="1"; fi
  gate_tests 150 "decode or kv_store or compressor or hc_combine or hc_logits or hc_post or normed or routed or q2k or dispatch" tests/test_kernels.py
  golden 1 static,prefill 100
  log "bench, 43 layers, TP=$TPS, depth 0, prefill 2048"
  timeout 260 python3 -m ds4tp bench --tp $TPS --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  log "profile of a 4-layer full-width decode step"
  timeout 90 python3 bench/profile_step.py 4 2>&1 | grep -v Warn | tail -60 | tee "$OUT/profile_4layers.txt"
elif [ "$MODE" = decode2 ]; then
  golden 2 static,prefill 150
  log "routed-expert kernels, T=1, with the sweep (TP=1 and TP=2 shapes)"
  timeout 200 python3 bench/kernels_check.py --out "$OUT/kernels.json" --tokens 1 --sweep-tokens 1 --budget-s 150 --only routed_gate_up,routed_down 2>&1 | grep -v "^ *\[\|^ *\]\|^ *\"\|^ *[0-9.]*,\?$" | tail -40
elif [ "$MODE" = final3 ]; then
  # 2026-11-29 closing checks, part 1 (< 10 min): tests, goldens at TP=1 and (two GPUs) TP=2
  gate_tests 260 "decode or kv_store or compressor or hc_combine or hc_logits or hc_post or normed or route or q2k or grid_codes or dispatch or side_stream" tests/test_kernels.py tests/test_decode_graph.py
  golden 1 static,prefill 100
  if two_gpus; then golden 2 static 110; fi
elif [ "$MODE" = final3b ]; then
  # part 2 (< 10 min): the TP=2,1 bench (TP=1 only on one GPU) with depth 4096, decode profile
  if two_gpus; then TPS="2,1"; else TPS="1"; fi
  log "bench, 43 layers, TP=$TPS, depth 0 and 4096, prefill 2048"
  timeout 360 python3 -m ds4tp bench --tp $TPS --depth 4096 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  log "profile of a 4-layer full-width decode step"
  timeout 90 python3 bench/profile_step.py 4 2>&1 | grep -v Warn | tail -40 | tee "$OUT/profile_4layers.txt"
elif [ "$MODE" = i8 ]; then
  # session 5: the Q8_0 one-token matvec on int8 dp4a words (the float path it replaced is gone)
  if two_gpus; then TPS="2,1"; else TPS="1"; fi
  gate_tests 120 "linear or normed or grouped or shard or dispatch" tests/test_kernels.py
  log "bench, 43 layers, TP=$TPS, depth 0, prefill 2048"
  timeout 150 python3 -m ds4tp bench --tp $TPS --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  log "Q8_0 kernels at T=1 with the sweep (float path first), routed experts"
  timeout 230 python3 bench/kernels_check.py --out "$OUT/kernels.json" --tokens 1 --sweep-tokens 1 --budget-s 200 \
    --only attn_q_b,attn_out_b,attn_out_a,attn_q_a,shexp_gate_up,shexp_down,output_vocab,routed_gate_up,routed_down 2>&1 | grep -v "^ *\[\|^ *\]\|^ *\"\|^ *[0-9.]*,\?$" | tail -30
elif [ "$MODE" = final5 ]; then
  # session 5 closing run (one GPU lent: TP=1; TP=2 too where two are): bench with depth 4096,
  # CUDA goldens, decode profile, decode kernel tests
  if two_gpus; then TPS="2,1"; else TPS="1"; fi
  log "bench, 43 layers, TP=$TPS, depth 0 and 4096, prefill 2048"
  timeout 170 python3 -m ds4tp bench --tp $TPS --depth 4096 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  golden 1 static,prefill 100
  log "profile of a 4-layer full-width decode step"
  timeout 60 python3 bench/profile_step.py 4 2>&1 | grep -v Warn | tail -40 | tee "$OUT/profile_4layers.txt"
  gate_tests 210 "decode or kv_store or compressor or hc_combine or hc_logits or hc_post or normed or route or q2k or grid_codes or dispatch or side_stream" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = h16 ]; then
  # session 5: the float16 prefill path (weights decoded to float16 once, float16 dots)
  if two_gpus; then TPS="2,1"; else TPS="1"; fi
  log "golden parity on CUDA, tiny-a, TP=1, prefill with every many-token launch on the float16 path"
  timeout 70 python3 tests/golden_eval.py --device cuda --tp 1 --model tiny-a --paths prefill --h16-all 2>&1 | grep "^tiny-a\|Error" | tee -a "$OUT/golden_cuda.txt"
  log "bench, 43 layers, TP=$TPS, depth 0, prefill 2048"
  timeout 110 python3 -m ds4tp bench --tp $TPS --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  gate_tests 110 "gemm or h16 or dequant or dispatch" tests/test_kernels.py
elif [ "$MODE" = tp2h16 ]; then
  # for the next two-GPU call: TP=2,1 bench, goldens at TP=1 and 2 on the current code (int8 Q8_0
  # matvec, float16 dense prefill), exact vs float16 prefill launches, a prefill profile
  if two_gpus; then TPS="2,1"; else TPS="1"; fi
  log "bench, 43 layers, TP=$TPS, depth 0, prefill 2048"
  timeout 170 python3 -m ds4tp bench --tp $TPS --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-300
  golden 1 static,prefill 90
  if two_gpus; then golden 2 static,prefill 110; fi
  log "prefill launches at 2048 tokens, TP=1 shapes: exact vs float16 path"
  timeout 90 python3 bench/gemm_sweep.py --tp 1 --out "$OUT/gemm_sweep_tp1.json" --budget-s 50 2>&1 | grep -v Warn | grep "path\|GMAC" | tail -12
  prefill_profile 60 30
elif [ "$MODE" = cudac ]; then
  # the CUDA C routed-expert kernels (cuda_experts, experts.cu): twin tests, launch sweep against
  # the Triton default, Nsight Compute (if present), a traced graph replay, the TP=1 bench (decode
  # with the CUDA C and the Triton experts in one run). (The session-6 variant runs cudac2-4 used
  # code since removed; see git history.)
  python3 -c "import cupy; print('cupy', cupy.__version__)"
  log "kernel tests (CUDA): CUDA C experts, routed, hc_logits, dispatch"
  timeout 150 python3 -m pytest -q tests/test_kernels.py -k "cuda_c or routed or dispatch or hc_logits" 2>&1 | tail -2 | tee "$OUT/kernel_tests.txt"
  log "routed-expert kernels at T=1: Triton default vs CUDA C launches (TP=1 and TP=2 shapes)"
  timeout 120 python3 bench/kernels_check.py --out "$OUT/kernels.json" --tokens 1 --sweep-tokens 1 --budget-s 90 --sweep-cuda-c-only --only routed_gate_up,routed_down 2>&1 | grep "us\|sweep\|FAIL" | grep -v "T=16\|matvec_time" | tail -40
  if command -v ncu >/dev/null; then
    log "Nsight Compute: routed kernels at TP=1 shapes"
    timeout 120 ncu -k regex:"iq2xxs_swiglu|q2k_down_sum" -c 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section SchedulerStats --section ComputeWorkloadAnalysis python3 bench/ncu_experts.py > "$OUT/ncu_experts.txt" 2>&1
    grep "Duration\|Throughput\|Issue Slots\|Theoretical Occ\|iq2xxs\|q2k_down" "$OUT/ncu_experts.txt" | head -30
  fi
  log "graph-replayed decode step, 6 full-width layers, traced"
  timeout 100 python3 bench/profile_graph.py 6 1 2>&1 | grep -v Warn | tee "$OUT/profile_graph_6layers.txt" | head -60
  log "bench, 43 layers, TP=1, depth 0, prefill 2048 (decode with CUDA C and with Triton experts)"
  timeout 170 python3 -m ds4tp bench --tp 1 --depth 0 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-200
elif [ "$MODE" = q8c ]; then
  # the CUDA C Q8_0 one-token matvec (cuda_matvec, matvec.cu): twin tests, its launches against
  # the Triton default on every Q8_0 decode shape, a traced graph replay, the TP=1 bench (decode
  # with the CUDA C and with the Triton Q8_0 matvec in one run)
  cuda_c_round "cuda_c or dispatch" 150 attn_q_a_kv,attn_q_b,attn_out_a,attn_out_b,shexp_gate_up_fused,shexp_down,output_vocab 170
elif [ "$MODE" = q8c2 ]; then
  # the second CUDA C round: the router in one launch (matvec + expert choice), the shared
  # expert added in the routed down launch, gate/up grid rows as PRMT selectors, Q8_0 launch
  # constants; twin tests, sweeps (Q8_0 and gate/up), a traced graph replay, the TP=1 bench,
  # TP=1 golden parity on the graph decoder
  cuda_c_round "cuda_c or dispatch or route" 170 attn_q_a_kv,attn_q_b,attn_out_a,attn_out_b,shexp_gate_up_fused,shexp_down,routed_gate_up 150
  golden 1 static 150
elif [ "$MODE" = q8c3 ]; then
  python3 -c "import cupy; print('cupy', cupy.__version__)"
  gate_tests 150 "cuda_c or dispatch or route" tests/test_kernels.py
  bench_tp1_full 200 0
  trace6
  golden 1 static 150
elif [ "$MODE" = final7 ]; then
  gate_tests 120 "side_stream or route or dispatch" tests/test_decode_graph.py tests/test_kernels.py
  bench_tp1_full 260 4096
  golden 1 static,prefill 150
  for d in 1 4096; do
    log "graph-replayed decode step, 43 layers, depth $d, traced"
    timeout 100 python3 bench/profile_graph.py 43 $d 2>&1 | grep -v Warn | tee "$OUT/profile_graph_43layers_d$d.txt" | sed -n '/kernels by/,$p' | head -25
  done
elif [ "$MODE" = pdl ]; then
  # (run as bench/pdl_diag.sh, folded in here) CUDA C twins with PDL on, the normed Q8_0 cases
  # with it off, the PDL on/off bit-identity test, the TP=1 bench at depth 0 (PDL A/B)
  gate_tests 120 "linear_normed or cuda_c_kernels" tests/test_kernels.py
  log "the same normed cases with PDL off"
  timeout 120 python3 -c "
from ds4tp.kernels import pdl; pdl.set_enabled(False)
import pytest, sys; sys.exit(pytest.main(['-x','-q','tests/test_kernels.py','-k','linear_normed']))" 2>&1 | tail -2
  gate_tests 150 "pdl" tests/test_decode_graph.py
  bench_tp1_full 200 0
elif [ "$MODE" = pdl2 ]; then
  # session 8: the down kernel's padded activation layout, the SwiGLU prologue of the shared
  # expert's down matvec: CUDA C twins and dispatch, PDL bit-identity, per-launch times of the
  # down launches, the TP=1 bench at depth 0 (PDL and capture-priority A/B)
  gate_tests 240 "cuda_c or dispatch or pdl" tests/test_kernels.py tests/test_decode_graph.py
  cuda_c_sweep 120 80 "routed_down,shexp_down"
  bench_tp1_full 200 0
elif [ "$MODE" = pdl3 ]; then
  # session 8: hc_post + next hc_logits + hc_combine in one launch (triton_hc.hc_step) with the
  # model's sublayer chain rearranged around it: twins, graphs/PDL tests, bench, TP=1 goldens
  gate_tests 240 "hc_ or pdl or side_stream or dispatch or graph" tests/test_kernels.py tests/test_decode_graph.py
  bench_tp1_full 200 0
  golden 1 static,prefill 200
elif [ "$MODE" = final8 ]; then
  # session 8 closing run: the fused HC step's twins and the PDL tests, the TP=1 bench with depth
  # 4096 and every A/B variant (PDL, hc_step, streams, priority), the 43-layer graph traced
  gate_tests 150 "hc_step or pdl or dispatch" tests/test_kernels.py tests/test_decode_graph.py
  bench_tp1_full 260 4096
  log "graph-replayed decode step, 43 layers, depth 1, traced"
  timeout 100 python3 bench/profile_graph.py 43 1 2>&1 | grep -v Warn | tee "$OUT/profile_graph_43layers_d1.txt" | sed -n '/kernels by/,$p' | head -25
elif [ "$MODE" = final8b ]; then
  # after the review refactor of the HC kernels and the priority change: every CUDA test of the
  # kernels and the decode graph
  gate_tests 300 "not interpreter" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = pf0 ]; then
  # session 9 baseline for the prefill work: the 2048-token launches (exact and float16 paths,
  # the float16 path's decoding alone), a 4-layer prefill profile
  log "2048-token launches: exact vs float16 path, cuBLAS references"
  timeout 150 python3 bench/gemm_sweep.py --out "$OUT/gemm_sweep.json" --budget-s 0 2>&1 | grep -v Warn
  prefill_profile 120 62
elif [ "$MODE" = pf1 ]; then
  # session 9: float16 routed experts decoded in registers, dense float16 GEMMs on cuBLAS
  gate_tests 200 "gemm or h16" tests/test_kernels.py
  log "2048-token launches: default (float16 experts in registers, cuBLAS dense), exact; fused shapes"
  timeout 200 python3 bench/gemm_sweep.py --out "$OUT/gemm_sweep.json" --budget-s 0 --fused-sweep 2>&1 | grep -v Warn
  prefill_profile 120 40
  golden 1 prefill 100
elif [ "$MODE" = pf2 ]; then
  # session 9: the tensor-core CUDA C routed experts of a prefill (experts_mma.cu)
  gate_tests 150 "mma or grouped_and_experts" tests/test_kernels.py
  routed_launches
  prefill_profile 100 30
  golden 1 prefill 100
elif [ "$MODE" = pf3 ]; then
  # session 9: experts_mma.cu with the activations staged in shared memory (cp.async ring)
  gate_tests 100 "mma" tests/test_kernels.py
  routed_launches
  if command -v ncu >/dev/null; then
    log "ncu: the tensor-core routed kernels"
    timeout 150 ncu -k regex:"_mma" -c 2 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section SchedulerStats --section ComputeWorkloadAnalysis python3 bench/ncu_prefill.py > "$OUT/ncu_prefill.txt" 2>&1
    grep -i "Duration\|Throughput\|Issue Slots\|Occupancy\|_mma\|Stall\|Warp Cycles\|Eligible\|Active Warps" "$OUT/ncu_prefill.txt" | head -60
  fi
elif [ "$MODE" = pf4 ]; then
  # session 9 closing run: tensor-core routed experts (quad-shared weight words, ksigns bytes)
  gate_tests 150 "mma or grouped_and_experts or h16" tests/test_kernels.py
  routed_launches
  prefill_profile 100 30
  golden 1 prefill,static 120
  bench_tp1_full 240 0
elif [ "$MODE" = pa1 ]; then
  gate_tests 200 "prefill_attention" tests/test_kernels.py
  log "prefill attention, 2048 tokens, full width: launch shapes against the query-chunk twin"
  timeout 200 python3 bench/prefill_attn.py --out "$OUT/prefill_attn.json" 2>&1 | grep -v Warn
  golden 1 prefill 100
  bench_tp1_full 240 0
elif [ "$MODE" = pa2 ]; then
  gate_tests 150 "f16_split or gemm_linear or prefill_attention" tests/test_kernels.py
  log "2048-token F16 launches: split activation on cuBLAS against 3xTF32"
  timeout 90 python3 bench/gemm_sweep.py --out "$OUT/gemm_sweep.json" --budget-s 0 --only idx_q_b,router,comp_kv,hc_fn 2>&1 | grep -v Warn
  prefill_ab 120
  golden 1 static,prefill 170
  prefill_profile 80 30
elif [ "$MODE" = pa3 ]; then
  gate_tests 200 "mma or grouped_and_experts or gemm_experts or routed_experts or expert_tiles" tests/test_kernels.py
  prefill_ab 120
  log "prefill profile, 4 full-width layers, GPU and host"
  timeout 100 python3 bench/profile_prefill.py 4 2048 2>&1 | grep -v Warn > "$OUT/profile_prefill.txt"
  grep -A12 "GPU kernels in" "$OUT/profile_prefill.txt"; grep -A40 "host profile" "$OUT/profile_prefill.txt" | cut -c1-150
  golden 1 static,prefill 170
elif [ "$MODE" = pa4 ]; then
  gate_tests 120 "prefill_attention" tests/test_kernels.py
  log "prefill attention with RoPE, 2048 tokens, full width: launch shapes against the twin"
  timeout 90 python3 bench/prefill_attn.py --out "$OUT/prefill_attn.json" 2>&1 | grep -v Warn
  golden 1 static,prefill 150
  bench_tp1_full 200 0
elif [ "$MODE" = em1 ]; then
  # session 11: a ratio-4 compressor's emission in one launch (triton_attn.compressor_emit):
  # twins (with the review commits of session 10 not yet run on a GPU), the bench at depth 0
  # (emission on its torch twin as an A/B, per-variant replay times), the prefill A/B with a
  # prefill after the profiler, TP=1 goldens on the graph decoder
  gate_tests 220 "compressor_emit or prefill_attention or f16_split or mma or expert_tiles or gemm or pdl_is or side_stream" tests/test_kernels.py tests/test_decode_graph.py
  bench_tp1_full 200 0
  prefill_ab 130
  golden 1 static 100
elif [ "$MODE" = em5 ]; then
  # session 11 closing run: decode attention twins (float16-valued cache rows, TP=2 heads), the
  # bench with depth 4096 on the final code
  gate_tests 100 "decode_attention" tests/test_kernels.py
  bench_tp1_full 330 4096
elif [ "$MODE" = s12a ]; then
  # session 12, the first two-GPU call since session 4: the TP=2,1 bench at depth 0 (same run),
  # TP=2 goldens (graph decoder and prefill), then the review commits' twins on what time is left
  bench_tp2 330 2,1
  golden 2 static,prefill 130
  gate_tests 110 "f16_split or compressor_emit or kv_store or decode_attention" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s12b ]; then
  # session 12: where a TP=2 prefill's time goes (bench/prefill_tp2.py: prefill-sized
  # all-reduces alone, the prefill with and without collectives, rank 0's kernel table; NCCL's
  # transport lines), then the review commits' remaining twins (gemm, experts, mma)
  log "TP=2 prefill, 43 layers, 2048 tokens: collectives, no-comm A/B, kernel table"
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P timeout 200 python3 bench/prefill_tp2.py --out "$OUT/prefill_tp2.json" > "$OUT/prefill_tp2_log.txt" 2>&1
  grep -i "via\|nccl version" "$OUT/prefill_tp2_log.txt" | sort | uniq | head -8
  grep -v "NCCL\|Warn\|warn\|^$\|softmax\|PyTorch" "$OUT/prefill_tp2_log.txt" | tail -45
  gate_tests 250 "gemm or experts or mma" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s12c ]; then
  # session 12: a TP=2 prefill's host side (enqueue vs GPU time, synchronising calls, cProfile)
  # and a prefill after the decode graphs; then the same without NCCL's graph-mixing support
  log "TP=2 prefill: host side, prefill after decode graphs, kernel table"
  timeout 220 python3 bench/prefill_tp2.py --out "$OUT/prefill_tp2.json" > "$OUT/prefill_tp2_log.txt" 2>&1
  grep -v "NCCL\|Warn\|warn\|^$\|softmax\|PyTorch" "$OUT/prefill_tp2_log.txt" | grep -v "^  *[0-9.]* us .*elementwise\|Memset\|Memcpy" | tail -62
  log "the same with NCCL_GRAPH_MIXING_SUPPORT=0 (no profiles)"
  NCCL_GRAPH_MIXING_SUPPORT=0 timeout 150 python3 bench/prefill_tp2.py --no-profiles --out "$OUT/prefill_tp2_nomix.json" 2>&1 | grep "^\[rank"
elif [ "$MODE" = s12d ]; then
  # session 12, one GPU: a TP=2 rank's prefill alone (rank 0's shard, collectives removed): host
  # enqueue time against the GPU's, host profile, kernel table; TP=1's enqueue numbers beside it
  tp2_rank_prefill 200
  sed -n '/host profile/,/GPU kernels in/p' "$OUT/profile_prefill_tp2r0.txt" | grep -v "^$" | cut -c1-160 | head -75
  grep -A14 "GPU kernels in" "$OUT/profile_prefill_tp2r0.txt" | cut -c1-140
  log "prefill, 43 layers, TP=1: host enqueue against GPU"
  timeout 150 python3 bench/profile_prefill.py 43 2048 1 > "$OUT/profile_prefill_tp1.txt" 2>&1
  grep "prefill\|host enqueue\|GPU kernels in" "$OUT/profile_prefill_tp1.txt" | head -8
elif [ "$MODE" = s12e ]; then
  # session 12, one GPU: fewer host launches in a prefill (compressed rows in one launch, routing
  # of every token in one launch, the expert tile table in one kernel): twins, a TP=2 rank's
  # prefill alone (host enqueue vs GPU), the TP=1 bench at depth 0, TP=1 golden prefill
  gate_tests 150 "${S12E_TESTS:-compressor_rows or route or tiles}" tests/test_kernels.py
  tp2_rank_prefill 150
  sed -n '/by cumulative/,/Profiler clears/p' "$OUT/profile_prefill_tp2r0.txt" | cut -c1-150 | sed -n 8,32p
  golden 1 prefill 90
  bench_tp1_full 200 0
elif [ "$MODE" = s12f ]; then
  # session 12 closing run on two GPUs: the KV-row twins, the TP=2 bench at depth 0 on the code
  # with fewer prefill launches (TP=1: s12e), the TP=2 golden prefill, then bench/prefill_tp2.py
  # without its profiles (decode graphs, prefill with/without collectives and after the decode
  # graphs), by default and with NCCL_GRAPH_MIXING_SUPPORT=0
  gate_tests 90 "kv_rows or rms_norm or rms_scale" tests/test_kernels.py
  bench_tp2 230 2
  golden 2 prefill 80
  for mix in 1 0; do
    log "TP=2 prefill_tp2.py, NCCL_GRAPH_MIXING_SUPPORT=$mix"
    NCCL_GRAPH_MIXING_SUPPORT=$mix timeout 100 python3 bench/prefill_tp2.py --no-profiles --out "$OUT/prefill_tp2_mix$mix.json" 2>&1 | grep "^\[rank 0"
  done
elif [ "$MODE" = s12g ]; then
  # session 12 closing run on one GPU (where two are not lent): the KV-row and RMS-norm twins,
  # a TP=2 rank's prefill alone (host enqueue vs GPU), TP=1 golden prefill, the TP=1 bench
  gate_tests 90 "kv_rows or rms_norm or rms_scale" tests/test_kernels.py
  tp2_rank_prefill 150
  golden 1 prefill 90
  bench_tp1_full 200 0
elif [ "$MODE" = s12h ]; then
  # session 12, the rest of the device time on two GPUs: the TP=2 bench at depth 0, then
  # prefill_tp2.py (no profiles) with NCCL_GRAPH_MIXING_SUPPORT=0; the RMS-norm twins first
  gate_tests 60 "rms_norm" tests/test_kernels.py
  bench_tp2 130 2
  log "TP=2 prefill_tp2.py, NCCL_GRAPH_MIXING_SUPPORT=0"
  NCCL_GRAPH_MIXING_SUPPORT=0 timeout 60 python3 bench/prefill_tp2.py --no-profiles --out "$OUT/prefill_tp2_mix0.json" 2>&1 | grep "^\[rank 0"
elif [ "$MODE" = s12i ]; then
  # session 12, the rest of the device time on one GPU: the RMS-norm twins (one read per row),
  # the TP=1 golden prefill on the final code
  gate_tests 60 "rms_norm" tests/test_kernels.py
  golden 1 prefill 150
elif [ "$MODE" = pf5 ]; then
  # session 9: compile-time variants of experts_mma.cu, then their twin tests (default variant)
  log "experts_mma.cu variants, 2048-token launches"
  timeout 120 python3 bench/experts_mma_variants.py --out "$OUT/experts_mma_variants.json" 2>&1 | grep -v Warn
  gate_tests 60 "mma" tests/test_kernels.py
elif [ "$MODE" = pf6 ]; then
  # session 9 closing check of the chosen experts_mma.cu: twins, TP=1 golden prefill, the
  # 43-layer prefill with and without the tensor-core experts (same run)
  gate_tests 60 "mma" tests/test_kernels.py
  golden 1 prefill 90
  prefill_ab 120
elif [ "$MODE" = final7b ]; then
  gate_tests 90 "dispatch" tests/test_kernels.py
  bench_tp1_full 200 0
elif [ "$MODE" = final7c ]; then
  golden 1 static,prefill 150
elif [ "$MODE" = final6 ]; then
  # session 6 closing run (one H200): twin tests of the changed kernels, TP=1 bench with depth
  # 4096, goldens TP=1, a 4-layer profile at depth 4096 (the indexer active)
  log "kernel tests (CUDA): CUDA C experts, top-k mask, decode stages, hc_logits, dispatch, graphs"
  timeout 170 python3 -m pytest -q tests/test_kernels.py tests/test_decode_graph.py -k "cuda_c or topk or decode or hc_logits or dispatch or routed or side_stream or graph" 2>&1 | tail -3 | tee "$OUT/kernel_tests.txt"
  log "bench, 43 layers, TP=1, depth 0 and 4096, prefill 2048"
  timeout 230 python3 -m ds4tp bench --tp 1 --depth 4096 --out "$OUT/bench.json" 2>&1 | grep '^{' | cut -c1-200
  golden 1 static,prefill 90
  log "profile of a 4-layer full-width decode step at depth 4096"
  timeout 90 python3 bench/profile_step.py 4 4096 > "$OUT/profile_4layers_d4096.txt" 2>&1
  grep -v Warn "$OUT/profile_4layers_d4096.txt" | tail -32
elif [ "$MODE" = final6b ]; then
  # the closing run's parts cut by their time limits: goldens at TP=1, the new kernels' tests
  golden 1 static,prefill 140
  log "kernel tests (CUDA): top-k mask, CUDA C experts, hc_logits"
  timeout 75 python3 -m pytest -q tests/test_kernels.py -k "topk or cuda_c or hc_logits" 2>&1 | tail -2 | tee "$OUT/kernel_tests.txt"
elif [ "$MODE" = depth ]; then
  # where the depth-4096 cost of a decode step goes: the 43-layer graph replay traced at depth 1
  # and at depth 4096 on the same code (see docs/performance.md, next steps)
  for d in 1 4096; do
    log "graph-replayed decode step, 43 layers, depth $d, traced"
    timeout 240 python3 bench/profile_graph.py 43 $d 2>&1 | grep -v Warn | tee "$OUT/profile_graph_43layers_d$d.txt" | head -45
  done
elif [ "$MODE" = s13s ]; then
  log "synth full (parallel)"
  t0=$(date +%s)
  timeout 260 python3 -m ds4tp synth --preset full --seed 0 --jobs 32 --out /tmp/full.gguf > "$OUT/synth_log.txt" 2>&1
  echo "synth: status $? in $(( $(date +%s) - t0 )) s"; ls -l /tmp/full.gguf
  log "serve end to end, TP=2 on two GPUs"
  TORCH_LOGS=recompiles timeout 420 python3 bench/serve_e2e.py --model /tmp/full.gguf --device cuda --nodes 2 --ctx 8192 \
    --long-words 800 --tokens 256 --kill 1 --out "$OUT/serve_e2e.json" --log "$OUT/serve_launch.log" 2>&1 | cut -c1-700
  grep -i "warm-up\|ready in\|error\|Traceback" "$OUT/serve_launch.log" | head -20
  echo "torch.compile recompiles logged: $(grep -c -i recompil "$OUT/serve_launch.log")"
  rm -f /tmp/full.gguf
  if [ "${2:-}" = more ]; then
    gate_tests 100 "second_gpu" tests/test_decode_graph.py
    golden 2 static 90
  fi
elif [ "$MODE" = s14w ]; then
  # session 14: where a worker's warm-up goes: prefills of 1-20 tokens and longer, twice (the
  # second process with Triton's and CuPy's on-disk caches warm), slow ones under cProfile
  for run in cold warm; do
    log "prefill per length, 4 layers, rank 0 of TP=2 shapes ($run caches)"
    timeout 200 python3 bench/warm_profile.py --layers 4 --out "$OUT/warm_profile_$run.json" 2>&1 | grep -v Warn | cut -c1-180
  done
elif [ "$MODE" = s14c ]; then
  # session 14, one GPU: prompts fed at growing positions on one state (a suffix after prefix
  # reuse), as the served probe of first prompts did, after the warm-up's lengths: time and new
  # Triton specialisations per feed (4 layers, rank 0 of TP=2's shapes)
  timeout 300 python3 bench/warm_profile.py --layers 4 --lengths 1,2,3,4,5,6,8,9,16,17,24,32,48,64,100 \
    --chain 7,1,2,3,8,3,16,37,53,203,778,1,1,5,130,1000 --out "$OUT/warm_chain.json" 2>&1 | grep -v Warn | grep -v "^ " | cut -c1-200
  python3 -c "import json; [print(s['tokens'], s['at'], s['seconds'], [r.split('(')[0] + '(' + r.split('(', 1)[1][:300] for r in s['specialisations']][:6]) for s in json.load(open('$OUT/warm_chain.json'))['steps'] if s['at'] > 0 or s['tokens'] == 7]"
elif [ "$MODE" = s14s ]; then
  # session 14, two GPUs: the served path again (switching parks the decoder state, sampling
  # on the GPU, lookahead, one Triton cache directory, more warm-up lengths), then the new CUDA
  # tests (lookahead through the graphs, sampling on the GPU) first
  gate_tests 120 "lookahead or park or cuda" tests/test_decode_graph.py tests/test_sampling.py
  serve_full 260 400 --kill 1
elif [ "$MODE" = s13f ]; then
  # session 13 closing run on two GPUs: the bench at TP=2 and TP=1 in one run, depth 0 and 4096,
  # with NCCL graph mixing support off (now init_dist's default)
  log "bench, 43 layers, TP=2,1, depth 0 and 4096, prefill 2048"
  timeout 340 python3 -m ds4tp bench --tp 2,1 --depth 4096 --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  for t in 2 1; do
    f="$OUT/bench.tp$t.json"; [ -f "$f" ] || continue
    python3 -c "import json; r=json.load(open('$f')); [print('tp$t', k, round(v['tok_s'], 1)) for k, v in r.items() if isinstance(v, dict) and 'tok_s' in v]; print('tp$t', r.get('collectives'), r.get('profile'), r.get('copy_bw_GBs'))"
  done
elif [ "$MODE" = s15a ]; then
  gate_tests 150 "prefill_attention_full_size or compressor_rows_full_size or f16_split or expert_tiles_kernel_full_size or small_vs_tiles" tests/test_kernels.py
  log "prompts fed at growing positions, 4 layers (new Triton specialisations per feed)"
  timeout 170 python3 bench/warm_profile.py --layers 4 --lengths 1,2,3,4,5,6,8,9,16,17,24,32,48,64,100 \
    --chain 7,1,2,3,8,3,16,37,53,203,778,1,1,5,130,1000 --out "$OUT/warm_chain.json" 2>&1 | grep -v Warn | grep -v "^ " | cut -c1-200
  [ -f "$OUT/warm_chain.json" ] && python3 -c "import json; [print(s['tokens'], s['at'], s['seconds'], [r.split('(')[0] for r in s['specialisations']][:6]) for s in json.load(open('$OUT/warm_chain.json'))['steps']]"
  log "bench, 43 layers, TP=2,1, depth 0 and 4096, prefill 2048 (no A/B variants)"
  timeout 330 python3 -m ds4tp bench --tp 2,1 --depth 4096 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary
elif [ "$MODE" = s15b ]; then
  gate_tests 200 "chained or lookahead or park or cuda" tests/test_decode_graph.py tests/test_sampling.py
  serve_full 200 330
elif [ "$MODE" = s15d ]; then
  gate_tests 120 "chained or lookahead or twin_on_cuda" tests/test_decode_graph.py tests/test_sampling.py
  serve_full 200 360 --kill 1
elif [ "$MODE" = s15e ]; then
  gate_tests 60 "queues or twin_on_cuda" tests/test_sampling.py
elif [ "$MODE" = s16a ]; then
  gate_tests 170 "index_scores or topk_mask or index_kernels or pdl_is_bit" tests/test_kernels.py tests/test_decode_graph.py
  bench_goldens
elif [ "$MODE" = s17a ]; then
  gate_tests 150 "compressor or index_kernels or pdl_is or side_stream" tests/test_kernels.py tests/test_decode_graph.py
  bench_goldens
  golden 2 prefill 60
  log "bench, TP=2, depth 0, compressors replicated (spec 18.3's baseline), no A/B"
  timeout 150 python3 -m ds4tp bench --tp 2 --depth 0 --no-ab --replicate-compressors --out "$OUT/bench_replicated.json" > "$OUT/bench_replicated_log.txt" 2>&1
  grep '^{' "$OUT/bench_replicated_log.txt" | python3 -c "import json,sys; r=json.loads(sys.stdin.readline())['tp2']; print('replicated', r['bytes_per_token'], {k: round(v['tok_s'], 1) for k, v in r.items() if isinstance(v, dict) and 'tok_s' in v}, r.get('profile'), r.get('spark_projection'))"
elif [ "$MODE" = s17b ]; then
  gate_tests 150 "compressor or index_kernels or pdl_is or side_stream" tests/test_kernels.py tests/test_decode_graph.py
  log "bench, TP=2, depth 0 and 4096, compressors split, no A/B"
  timeout 200 python3 -m ds4tp bench --tp 2 --depth 4096 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  bench_summary | cut -c1-1500
  log "bench, TP=2, depth 0, compressors replicated, no A/B"
  timeout 150 python3 -m ds4tp bench --tp 2 --depth 0 --no-ab --replicate-compressors --out "$OUT/bench_replicated.json" > "$OUT/bench_replicated_log.txt" 2>&1
  grep '^{' "$OUT/bench_replicated_log.txt" | python3 -c "import json,sys; r=json.loads(sys.stdin.readline())['tp2']; print('replicated', r['bytes_per_token'], {k: round(v['tok_s'], 1) for k, v in r.items() if isinstance(v, dict) and 'tok_s' in v}, r['profile']['matvec_ms'], r['profile']['other_gpu_ms'], r.get('spark_projection'))"
  golden 2 static 90
  golden 2 prefill 60
elif [ "$MODE" = s17s ]; then
  log "compressor step launch shapes"
  timeout 400 python3 bench/comp_step_sweep.py --out "$OUT/comp_step.json" 2>&1 | grep "==\|failed\|Error\|error" | head -40
elif [ "$MODE" = s17h ]; then
  log "HC step launch shapes"
  timeout 300 python3 bench/hc_step_sweep.py --out "$OUT/hc_step.json" 2>&1 | tail -25
elif [ "$MODE" = s17d ]; then
  gate_tests 200 "compressor or hc_step or hc_mix or sinkhorn or pdl_is or side_stream or index_kernels" tests/test_kernels.py tests/test_decode_graph.py
  bench_goldens
elif [ "$MODE" = s17e ]; then
  gate_tests 150 "pdl_is or sinkhorn or index_kernels_in_the_graph or hc_step_full" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s17c ]; then
  serve_full 200 330
elif [ "$MODE" = s18b ]; then    # (as run: one critical_path.py call per world and lane, with --mix-one-lane)
  for w in 2 1; do
    log "critical path, world $w, the mixer on its own lane and on the shared expert's"
    timeout 250 python3 bench/critical_path.py --world $w --variants base,mix_one_lane --trace base,mix_one_lane \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    head -40 "$OUT/critical_path_w$w.txt"
  done
elif [ "$MODE" = s18d ]; then
  gate_tests 200 "pdl_is or side_stream or sinkhorn or index_kernels_in_the_graph" tests/test_decode_graph.py
  bench_goldens
elif [ "$MODE" = s19a ]; then
  gate_tests 130 "sinkhorn or index_kernels_in_the_graph or side_stream" tests/test_decode_graph.py
  for w in 2 1; do
    log "scheduling variants (side-stream priorities, the FFN's second stream), world $w"
    timeout 220 python3 bench/critical_path.py --world $w --variants base,l0hi,l1hi,hi,router,router_l1hi,one,one_l1hi \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt"; grep "^variant" "$OUT/critical_path_w$w.txt"
    grep -A12 "^one layer" "$OUT/critical_path_w$w.txt" | head -40; tail -3 "$OUT/critical_path_w$w.txt"
  done
elif [ "$MODE" = s19b ]; then
  gate_tests 300 "pick or chained or lookahead or pdl_is or twin_on_cuda" tests/test_sampling.py tests/test_kernels.py tests/test_decode_graph.py
  for w in 2 1; do
    log "the greedy pick in one launch against its torch twin, world $w"
    timeout 150 python3 bench/critical_path.py --world $w --variants base,pick_torch \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt" | head -4; grep "^variant" "$OUT/critical_path_w$w.txt"
    grep -E "^F:.*(reduce|elementwise|_pick|index)" "$OUT/critical_path_w$w.txt" | head -12
  done
elif [ "$MODE" = s19c ]; then
  for w in 2 1; do
    log "warps of the route and Sinkhorn programs, world $w"
    timeout 200 python3 bench/critical_path.py --world $w --variants base,route_w1,route_w2,mix_w1,mix_w2,mix_w4 --trace base \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt" | head -8
    grep -E "^(F|A):_(route|hc_mix)" "$OUT/critical_path_w$w.txt"
  done
elif [ "$MODE" = s19d ]; then
  gate_tests 200 "hc_ or pdl_is or sinkhorn" tests/test_kernels.py tests/test_decode_graph.py
  for w in 2 1; do
    log "hc_step's tail loads with the partials' or after z, world $w"
    timeout 150 python3 bench/critical_path.py --world $w --variants base,hc_tail_late \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt" | head -4; grep "^variant" "$OUT/critical_path_w$w.txt"
    grep -E "^(F|A):_hc_step" "$OUT/critical_path_w$w.txt"
  done
elif [ "$MODE" = s19e ]; then
  gate_tests 240 "pick or twin_on_cuda or hc_ or pdl_is or side_stream or sinkhorn or index_kernels_in_the_graph or chained or lookahead or lanes or second_gpu" \
    tests/test_sampling.py tests/test_kernels.py tests/test_decode_graph.py
  bench_goldens
elif [ "$MODE" = s19f ]; then
  serve_full 200 330
elif [ "$MODE" = s19h ]; then
  gate_tests 100 "side_stream or pdl_is" tests/test_decode_graph.py
  for w in 2 1; do
    log "the shared expert on a lane of its own above the main stream's priority, world $w"
    timeout 100 python3 bench/critical_path.py --world $w --variants base,shared_lane0,shared_lane2_prio0 --trace base \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt" | head -5
  done
elif [ "$MODE" = s21a ]; then
  gate_tests 150 "cuda_c or swiglu" tests/test_kernels.py
  cuda_c_sweep 200 170 routed_gate_up
elif [ "$MODE" = s21b ]; then
  gate_tests 150 "cuda_c or swiglu" tests/test_kernels.py
  cuda_c_sweep 150 120 routed_gate_up,routed_down
  replay_ab base,down_regs,swiglu_xor,both_old "routed down staged by cp.async, gate/up signs by PRMT"
elif [ "$MODE" = s21c ]; then
  gate_tests 150 "route or pick or cuda_c" tests/test_kernels.py
  replay_ab base,route_two "the router's matvec and the expert choice in one launch"
  golden 1 static 150
elif [ "$MODE" = s21d ]; then
  gate_tests 150 "down or pdl_is or side_stream" tests/test_kernels.py tests/test_decode_graph.py
  replay_ab base,shared_add "the routed down launch adding the shared expert's output"
elif [ "$MODE" = s22a ]; then
  export CUDA_ENABLE_COREDUMP_ON_EXCEPTION=1 CUDA_ENABLE_LIGHTWEIGHT_COREDUMP=1 \
         CUDA_ENABLE_CPU_COREDUMP_ON_EXCEPTION=0 CUDA_COREDUMP_FILE=/tmp/core_%p
  race_probe 200 --down-add --down-programmatic --replays 3000
  race_probe 100 --down-add --down-programmatic --replays 3000 --pdl cuda_c_off
  race_probe 100 --down-add --down-programmatic --replays 3000 --pdl triton_off
  race_probe 100 --replays 6000
  for c in /tmp/core_*; do
    [ -e "$c" ] || continue
    log "cuda-gdb on $c ($(du -h "$c" | cut -f1))"
    timeout 60 cuda-gdb -batch -ex "target cudacore $c" -ex "info cuda kernels" -ex "bt" -ex 'x/8i $pc-0x40' \
      -ex "info cuda warps" 2>&1 | head -60 | tee -a "$OUT/pdl_race_gdb.txt"
  done
elif [ "$MODE" = s22b ]; then
  race_probe 150 --replays 8000 --check
  race_probe 120 --replays 8000 --check
  race_probe 120 --replays 8000 --check --pdl off
elif [ "$MODE" = s22c ]; then
  race_probe 150 --replays 4000 --check
  race_probe 120 --replays 4000 --check --pdl cuda_c_off
  race_probe 120 --replays 4000 --check --pdl triton_off
  race_probe 120 --replays 4000 --check --world 1
  race_probe 120 --replays 4000 --check --down-add --down-programmatic
elif [ "$MODE" = s22d ]; then
  log "cuda-gdb: the landed code's TP=1 step, replays until the fault"
  timeout 300 cuda-gdb -q -batch -ex "set pagination off" -ex "set cuda break_on_launch none" -ex run \
    -ex "info cuda kernels" -ex "bt 6" -ex 'x/24i $pc-0x100' -ex 'x/4i $pc' -ex "info cuda lanes" \
    --args "$(command -v python3)" bench/pdl_race_probe.py --world 1 --replays 400 --check \
    > "$OUT/pdl_race_gdb.txt" 2>&1
  echo "rc $?"; grep -v "^\[New Thread\|^\[Thread\|Detaching\|^warning" "$OUT/pdl_race_gdb.txt" | tail -70
elif [ "$MODE" = s22e ]; then
  log "PTX: no read-only-path loads of earlier kernels' outputs"
  timeout 120 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -2
  gate_tests 200 "cuda_c" tests/test_kernels.py
  race_probe 120 --replays 3000 --check --world 1
  race_probe 120 --replays 3000 --check
  race_probe 120 --replays 3000 --check --down-add --down-programmatic
  log "replay A/B, world 2: base, the down launch adding the shared output, PDL off"
  timeout 150 python3 bench/critical_path.py --world 2 --variants base,down_add,pdl_off --trace none > "$OUT/critical_path_w2.txt" 2>&1
  grep -A6 "us per replay (best\\|Error" "$OUT/critical_path_w2.txt" | head -12
elif [ "$MODE" = s22f ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  gate_tests 120 "cuda_c" tests/test_kernels.py
  bench_goldens
elif [ "$MODE" = s22h ]; then
  log "gate/up variants against the twin (x by 16-byte loads; ids by shuffle)"
  timeout 90 python3 - <<'PY' 2>&1 | grep -v Warn | tail -6
import sys, torch
sys.path.insert(0, "tests")
import kernel_cases as kc
from ds4tp.kernels import cuda_experts as ce
for defs in ((), (("A_X_VEC", 1),), (("A_IDS_SHUFFLE", 1),)):
    ce.SWIGLU_DEFINES = defs
    n = 0
    for name, fn, a in kc.cuda_c_cases():
        if "swiglu" in name:
            fn("cuda", torch.Generator().manual_seed(7 + n), *a)
            n += 1
    print(defs or "default", n, "swiglu cases passed")
PY
  for w in 2 1; do
    log "replay A/B, world $w: the fix's gate/up, x by 16-byte loads, ids by shuffle"
    timeout 100 python3 bench/critical_path.py --world $w --variants base,gu_xvec,gu_shuffle --trace none \
      > "$OUT/critical_path_w$w.txt" 2>&1
    grep -A4 "us per replay (best\|Error" "$OUT/critical_path_w$w.txt" | head -8
  done
elif [ "$MODE" = s23a ]; then
  log "does griddepcontrol.wait invalidate L1 lines a PDL consumer cached before the write?"
  timeout 90 python3 bench/l1_wait_probe.py --rounds 200 --out "$OUT/l1_wait.json" 2>&1 | tail -3
  timeout 60 python3 bench/l1_wait_probe.py --rounds 200 --spin-us 20 2>&1 | tail -1
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  gate_tests 200 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
  race_probe 100 --replays 3000 --check
  replay_ab base,shared_own,prior_ca "the shared expert riding in the routed launches; prior by .ca"
elif [ "$MODE" = s23b ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  gate_tests 120 "cuda_c or shared_expert_riding" tests/test_kernels.py tests/test_decode_graph.py
  replay_ab base,shared_own,prior_cg "the shared rows prefetched into L2 before the wait; prior by .ca"
elif [ "$MODE" = s23c ]; then
  race_probe 100 --replays 3000 --check
  bench_goldens
elif [ "$MODE" = s23d ]; then
  serve_full 200 330
elif [ "$MODE" = s23e ]; then
  for a in "--tp 2 --shared" "--tp 1 --shared" "--tp 2"; do
    log "Nsight Compute, routed kernels: $a"
    timeout 150 ncu -k regex:"iq2xxs_swiglu|q2k_down_sum" -s 2 -c 2 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section SchedulerStats --section ComputeWorkloadAnalysis \
      --section LaunchStats python3 bench/ncu_experts.py $a > "$OUT/ncu_experts_${a// /_}.txt" 2>&1
    grep "Duration\|Throughput\|Issue Slots\|Registers Per\|Achieved Occ\|Stall\|iq2xxs\|q2k_down\|Bank" "$OUT/ncu_experts_${a// /_}.txt" | head -40
  done
elif [ "$MODE" = s23f ]; then
  variant_twins swiglu,rides "(('A_MINB', 2), ('A_XS_SMEM', 1))" "(('A_MINB', 2),)"
  replay_ab base,gu_2blocks,gu_2blocks_spill "the routed gate/up at two blocks per SM"
elif [ "$MODE" = s23g ]; then
  variant_twins swiglu,rides "()" "(('A_DEPTH', 2),)"
  replay_ab base,gu_depth2 "the routed gate/up with two items in flight per warp"
elif [ "$MODE" = s23h ]; then
  race_probe 100 --replays 3000 --check --world 1
elif [ "$MODE" = s23i ]; then
  variant_twins rides "(('A_SH_LAST', 1),)"
  log "replay A/B, world 2: the gate/up launch's shared rows first (base) or last"
  timeout 100 python3 bench/critical_path.py --world 2 --variants base,gu_shared_last --trace none > "$OUT/critical_path_w2.txt" 2>&1
  grep -A3 "us per replay (best\|Error" "$OUT/critical_path_w2.txt" | head -5
elif [ "$MODE" = s28a ]; then
  log "twins: the peer path (misaligned view), the all-reduce inside the HC step, the draw"
  timeout 150 python3 -m pytest -q tests/test_tp.py -k "within_host or inside_the_hc_step" > "$OUT/tests_tp.txt" 2>&1
  tail -3 "$OUT/tests_tp.txt"; grep -E "^E |Error" "$OUT/tests_tp.txt" | head -12
  timeout 150 python3 -m pytest -q tests/test_kernels.py -k "hc_step or peer_all_reduce or hc_kernels" 2>&1 | tail -3
  timeout 150 python3 -m pytest -q tests/test_sampling.py tests/test_ptx_loads.py 2>&1 | tail -2
  log "bench, 43 layers, TP=2, depth 0: the all-reduce inside the HC step against ar2_sum and NCCL"
  timeout 200 python3 -m ds4tp bench --tp 2 --depth 0 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary
  python3 -c "import json; r=json.load(open('$OUT/bench.json'))['runs']['tp2']; print({k: r.get(k) for k in ('decode_d0_ar2', 'decode_d0_chained_ar2', 'peer_fused_logits_equal_ar2')})"
elif [ "$MODE" = s30c ]; then
  log "routed gate/up alone: GGUF order, decode order with one table, with the tables per bank pair"
  timeout 80 python3 bench/iq2_layout_probe.py --json "$OUT/iq2_layout_probe.json" 2>&1 | grep -v Warn | tail -3
  twins_bench "order or rides or routed" 0 280
elif [ "$MODE" = s30h ] || [ "$MODE" = s30g ]; then
  timeout 80 python3 bench/down_prefetch_probe.py --json "$OUT/down_prefetch_probe.json" 2>&1 | grep -v Warn | tail -3
  twins_bench "order or rides or routed" 0 300
elif [ "$MODE" = s30f ]; then
  bench_goldens 4096 330
elif [ "$MODE" = s30e ]; then
  log "routed gate/up then down alone: without and with the down rows' prefetch"
  timeout 80 python3 bench/down_prefetch_probe.py --json "$OUT/down_prefetch_probe.json" 2>&1 | grep -v Warn | tail -3
  twins_bench "order or rides or routed" 0 300
elif [ "$MODE" = s33a ]; then
  log "CUDA twins and graph tests: the compressor steps, the graphs"
  cuda_tests 220 "compressor or graph or on_cuda" tests_kernels.txt tests/test_kernels.py tests/test_decode_graph.py
  log "a ratio-4 layer's compressor steps alone: two launches against one"
  timeout 100 python3 bench/comp_step_sweep.py --pairs --out "$OUT/comp_pair_sweep.json" 2>&1 | grep -v Warn \
    > "$OUT/comp_pair_sweep.txt"
  grep "==\|failed\|Error" "$OUT/comp_pair_sweep.txt" | head -8
  replay_ab base,comp_two "compressor pair"
  sizes_fit 200
elif [ "$MODE" = s33b ]; then
  log "CUDA twins: the compressor steps"
  cuda_tests 60 compressor tests_kernels.txt tests/test_kernels.py
  replay_ab base,comp_two "compressor pair"
  sizes_fit 150
  log "bench, 43 layers, TP=1, depth 0 (A/B: comp_two)"
  timeout 230 python3 -m ds4tp bench --tp 1 --depth 0 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary 2>&1 | grep -v "prefill host"
  python3 -c "import json; rs=json.load(open('$OUT/bench.json'))['runs']; [print(t, r.get('comp_pair_logits_vs_two')) for t, r in rs.items()]"
  golden 1 static 80
elif [ "$MODE" = s33c ]; then
  log "CUDA graph tests"
  cuda_tests 150 "graph or cuda" tests_kernels.txt tests/test_decode_graph.py
  replay_ab base,kv_after_q_b "the KV row's store ahead of attn_q_b"
  bench_tp1_ab 230 "comp_two, kv_after_q_b" comp_pair_logits_vs_two kv_first_logits_equal_after
elif [ "$MODE" = s33d ]; then
  log "CUDA twins: the compressor steps"
  cuda_tests 90 compressor tests_compressor.txt tests/test_kernels.py
  log "CUDA decode graph tests"
  cuda_tests 330 "" tests_graph.txt tests/test_decode_graph.py
elif [ "$MODE" = s33f ]; then
  replay_ab base,attn_s4,attn_s16,attn_w2,attn_w8,mix_w4 "attention launch shapes"
elif [ "$MODE" = s33g ]; then
  log "CUDA twins: the decode attention"
  cuda_tests 90 "attention or attn" tests_attn.txt tests/test_kernels.py
  log "replay A/B, world 1"
  timeout 120 python3 bench/critical_path.py --world 1 --variants base,attn_many_w4,attn_s4 \
    --json "$OUT/critical_path_w1.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w1.txt"
  sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w1.txt" | head -6
  bench_tp1_ab 200 "attention at 4 warps" attn_warps_logits_vs_4 comp_pair_logits_vs_two
elif [ "$MODE" = s35a ]; then
  log "CUDA twins: the decode attention (Triton and the CUDA C cluster kernel)"
  cuda_tests 200 "attention" tests_attn.txt tests/test_kernels.py
  replay_ab base,attn_cuda,attn_cuda_minb3 "the decode attention in CUDA C, a cluster a head"
elif [ "$MODE" = s35b ] || [ "$MODE" = s35c ] || [ "$MODE" = s35d ]; then
  if [ "$MODE" = s35d ]; then
    replay_ab base,wld_ef,wld_cs,wld_na "the streamed weights' loads with a cache policy"
  fi
  log "synth full (parallel)"
  timeout 150 python3 -m ds4tp synth --preset full --layers 8 --seed 0 --jobs 16 --out /tmp/full.gguf > "$OUT/synth_log.txt" 2>&1
  order="True False"
  [ "$MODE" != s35b ] && order="False True"
  for hoist in $order; do
    sed -i "s/^ATTN_HOIST = \(True\|False\)/ATTN_HOIST = $hoist/" ds4tp/kernels/triton_attn.py
    grep -c "^ATTN_HOIST = $hoist" ds4tp/kernels/triton_attn.py
    log "serve end to end, TP=1 on one GPU, ATTN_HOIST = $hoist"
    timeout 260 python3 bench/serve_e2e.py --model /tmp/full.gguf --device cuda --nodes 1 --ctx 8192 \
      --long-words 800 --tokens 256 --out "$OUT/serve_e2e_hoist_$hoist.json" --log "$OUT/serve_launch_$hoist.log" 2>&1 \
      | grep -E "ready|stream_short|stream_sampled:|two_streams:|stream_long:" | cut -c1-300
  done
  sed -i "s/^ATTN_HOIST = False/ATTN_HOIST = True/" ds4tp/kernels/triton_attn.py
  rm -f /tmp/full.gguf
elif [ "$MODE" = s36d ]; then
  log "CUDA twins: the compressors' projections in CUDA C, the head's mix in the last HC step, the emissions' pair"
  cuda_tests 200 "comp_steps or hc_step or emit" tests_new.txt tests/test_kernels.py
  log "CUDA tests: the decode graphs"
  cuda_tests 230 "cuda" tests_graph.txt tests/test_decode_graph.py
  replay_ab base,head_own,comp_triton "the head's mix in the last HC step, the compressors' projections in CUDA C"
  replay_keep d1
  replay_ab base,emit_two,comp_triton "a step that emits: the emissions' pair, the compressors in CUDA C" --emit4
  replay_keep emit
  rm -f "$OUT"/critical_path_w?.txt
elif [ "$MODE" = s39a ]; then
  TRACE=base,q8_pre_all,gu_w12 replay_ab base,q8_pre2,q8_pre_all,gu_w8,gu_w12,dn_w8,exp_w8,exp_w12,comp_step_hi "the Q8_0 prefetch before the wait, the routed launches' warps, the late join"
  replay_keep d1
elif [ "$MODE" = s42c ]; then
  bench_tp1 340 4096 "depth 0 and 4096, the final code"
  golden 1 static 80
  log "a traced replay of an emitting step, world 1"
  timeout 100 python3 bench/critical_path.py --world 1 --variants base --trace base --emit4 \
    --json "$OUT/critical_path_emit4_w1.json" 2>&1 | grep -v Warn > "$OUT/critical_path_emit4_w1.txt"
  grep -A60 "span by role" "$OUT/critical_path_emit4_w1.txt" | head -70
  rm -f "$OUT"/critical_path_emit4_w1.json
elif [ "$MODE" = s42b ]; then
  log "CUDA twins: the router's rows in the gate/up launch, the choice there, the F16 matvec"
  cuda_tests 240 "cuda_c_kernels and (router or routed or f16) or route_full" tests_k.txt tests/test_kernels.py
  log "CUDA tests: the decode graphs (the router's rows, the choice, PDL bit-identity, overlap)"
  cuda_tests 240 "router_rows or expert_choice or pdl_is_bit or overlap" tests_graph.txt tests/test_decode_graph.py
  TRACE=base,router_own replay_ab base,router_own,router_late "the router's rows in the gate/up launch"
  replay_keep d1
elif [ "$MODE" = s42a ]; then
  log "CUDA twins: the Sinkhorn riding (last and first block)"
  cuda_tests 150 "sinkhorn_riding" tests_k.txt tests/test_kernels.py
  log "CUDA tests: the decode graphs' overlap and PDL bit-identity"
  cuda_tests 150 "overlap or pdl_is_bit" tests_graph.txt tests/test_decode_graph.py
  # (run as base,mix_first,mix_beside when the last block was the default; now base is block 0)
  TRACE=base,mix_last replay_ab base,mix_last,mix_beside "the riding Sinkhorn's block"
  replay_keep d1
elif [ "$MODE" = s41f ]; then
  log "CUDA twins: the Sinkhorn riding, the Q8_0 and routed kernels"
  cuda_tests 200 "sinkhorn_riding or c_kernels or routed_experts or grouped_output or q_b or hc_step_full" tests_k.txt tests/test_kernels.py
  log "CUDA tests: the decode graphs (overlap and PDL bit-identity, the shared rows, the choice, Sinkhorn beside)"
  cuda_tests 200 "overlap or pdl_is_bit or riding or expert_choice or sinkhorn_beside" tests_graph.txt tests/test_decode_graph.py
  TRACE=base,mix_beside replay_ab base,mix_beside "the HC Sinkhorn riding in the launches"
  replay_keep d1
elif [ "$MODE" = s41e ]; then
  bench_tp1 240 0 "depth 0, the final code"
  golden 1 static 80
elif [ "$MODE" = s41d ]; then
  log "CUDA twins: the Q8_0 matvecs"
  cuda_tests 200 "c_kernels or linear_ds4 or grouped_output or q_b or dispatch_and" tests_k.txt tests/test_kernels.py
  TRACE=base,few_off replay_ab base,few_off "attn_q_a|kv at 8 loads a lane"
  replay_keep d1
elif [ "$MODE" = s41c ]; then
  python3 -c "import torch; print('stream priority range', torch.cuda.Stream.priority_range())"
  TRACE=base,mix_hi2_w1 replay_ab base,mix_w1,mix_w2,prio_main_mix_hi,mix_hi2,mix_hi2_w1 "the HC mixer's lane priority and warps"
  replay_keep d1
elif [ "$MODE" = s41b ]; then
  TRACE=base,mix_join_step replay_ab base,mix_join_step "the HC mixer's joins (a probe)"
  replay_keep d1
elif [ "$MODE" = s41a ]; then
  log "CUDA twins: the Q8_0 matvec, the routed kernels, the choice in the gate/up; graph tests"
  cuda_tests 240 "c_kernels or routed_experts or linear_ds4 or grouped_output or q_b or dispatch_and or route_full" tests_k.txt tests/test_kernels.py
  cuda_tests 150 "riding or expert_choice or pdl_is_bit" tests_graph.txt tests/test_decode_graph.py
  TRACE=base,pro_old replay_ab base,x_one,dn_pro2,dn_late,gu_nopf,pro_old "the prologues' activation loads"
  replay_keep d1
elif [ "$MODE" = s39e ]; then
  log "CUDA tests: hc_step (the table's row as f)"
  cuda_tests 120 "hc_step or hc_kernels" tests_hc.txt tests/test_kernels.py
  replay_ab base,embed_own "the embedding row read by the first update's hc_step"
  replay_keep d1
  log "CUDA tests: the decode graphs' PDL bit identity and overlap"
  cuda_tests 120 "pdl_is_bit or side_stream" tests_graph.txt tests/test_decode_graph.py
elif [ "$MODE" = s39c ]; then
  log "CUDA tests: the decode graphs (the compressors joined at the step's end, priority -1; the twins' rows listed)"
  cuda_tests 300 "cuda" tests_graph.txt -s tests/test_decode_graph.py
  grep "per step max" "$OUT/tests_graph.txt" | cut -c1-300
  golden 1 static 80
elif [ "$MODE" = s39d ]; then
  bench_tp1 330 4096 "depth 0 and 4096 (A/B: the compressors' old join)"
  python3 -c "import json; r=json.load(open('$OUT/bench.json'))['runs']['tp1']; print({k: (round(v['tok_s'], 1) if isinstance(v, dict) else v) for k, v in r.items() if 'comp_join' in k})"
elif [ "$MODE" = s39b ]; then
  for i in 1 2 3; do
    log "CUDA test, run $i of 3: the decode graphs' indexer against its torch twins, the compressors joined at the step's end, priority -1"
    cuda_tests 200 "index_kernels and step_hi" tests_index_$i.txt -s tests/test_decode_graph.py
    grep "per step max" "$OUT/tests_index_$i.txt" | cut -c1-400
  done
  log "CUDA tests: the overlap's bit identity with both joins"
  cuda_tests 120 "side_stream" tests_overlap.txt tests/test_decode_graph.py
elif [ "$MODE" = s38a ]; then
  for i in 1 2; do
    log "CUDA test, run $i of 2: the decode graphs' indexer against its torch twins, the compressors joined before the attention and at the step's end"
    cuda_tests 260 "index_kernels" tests_index_$i.txt tests/test_decode_graph.py
  done
  log "CUDA tests: the overlap's bit identity with both joins"
  cuda_tests 120 "side_stream" tests_overlap.txt tests/test_decode_graph.py
elif [ "$MODE" = s37f ]; then
  log "CUDA tests: the decode graphs on the final code (the compressors joined at the step's end, priority -1)"
  cuda_tests 200 "cuda" tests_graph.txt tests/test_decode_graph.py
  serve_synth 2 8 150 300 --kill 1
elif [ "$MODE" = s37e ]; then
  serve_synth 2 8 150 330 --kill 1
elif [ "$MODE" = s37d ]; then
  log "bench, 43 layers, TP=2,1, depth 0 and 4096, prefill 2048 (A/B: the compressors' other join, decode_graph.COMP_JOIN)"
  timeout 400 python3 -m ds4tp bench --tp 2,1 --depth 4096 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary
  python3 -c "import json; rs=json.load(open('$OUT/bench.json'))['runs']; [print(t, {k: (round(v['tok_s'], 1) if isinstance(v, dict) else v) for k, v in r.items() if 'comp_join' in k}) for t, r in rs.items()]"
  golden 2 static 90
  log "CUDA tests: the overlap's bit identity (compressors joined at the step's end, before the attention), a runtime on the second GPU"
  cuda_tests 130 "side_stream or second_gpu" tests_graph.txt tests/test_decode_graph.py
  golden 1 static 70
elif [ "$MODE" = s37c ]; then
  TRACE=base,comp_step_hi,comp_qb_step_hi replay_ab base,comp_step,comp_step_hi,comp_next,comp_next_hi,comp_qb_step,comp_qb_step_hi,comp_qb_next,comp_qb_next_hi "the compressors joined at the step's end or before the next layer's attention, forked before attn_q_a or after attn_q_b"
  replay_keep d1
  replay_ab base,comp_step_hi,comp_next_hi,comp_qb_step_hi,comp_qb_next_hi "depth 4096: the compressors joined later" --depth 4096
  replay_keep d4096
  rm -f "$OUT"/critical_path_w?.txt
elif [ "$MODE" = s37b ]; then
  log "CUDA test: the overlap's bit identity with the compressors joined before the attention, after the layer, at the step's end"
  cuda_tests 150 "side_stream" tests_graph.txt tests/test_decode_graph.py
  replay_ab base,comp_layer,comp_layer_hi,comp_step,comp_step_hi "the compressors joined after the layer or at the step's end (also with the main stream high)"
  replay_keep d1
  replay_ab base,comp_layer,comp_step,comp_step_hi "a step that emits: the ratio-128 layers' compressors joined later" --emit4
  replay_keep emit4
  replay_ab base,comp_layer,comp_step,comp_step_hi "depth 4096: the compressors joined later" --depth 4096
  replay_keep d4096
  rm -f "$OUT"/critical_path_w?.txt
elif [ "$MODE" = s37a ]; then
  replay_ab base,prio_main_hi,prio_main_mix_hi,pick_bv512,pick_bv1024,pick_bv4096 "the main stream's priority above the side lanes', the pick's logits a program"
  replay_keep d1
  replay_ab base,prio_main_hi,prio_main_mix_hi "depth 4096: the main stream's priority above the side lanes'" --depth 4096
  replay_keep d4096
  rm -f "$OUT"/critical_path_w?.txt
elif [ "$MODE" = s36h ]; then
  log "CUDA tests: the decode graphs' indexer (each step from its own session) and overlap"
  cuda_tests 150 "index_kernels or side_stream" tests_graph.txt tests/test_decode_graph.py
  golden 1 static 60
elif [ "$MODE" = s36g ]; then
  log "CUDA tests: the decode graphs (the streams before layer 0 as an update of empty streams)"
  cuda_tests 200 "cuda" tests_graph.txt tests/test_decode_graph.py
  replay_ab base,first_own "the streams before layer 0: one hc_step against the expand and hc_pre's launches"
  rm -f "$OUT"/critical_path_w?.json
  bench_tp1 200 0 "depth 0 (no A/B variants; the closing run's second reading)"
elif [ "$MODE" = s36f ]; then
  replay_ab base,emit_w2,emit_w8,emit_w16 "a step that emits: the emissions' programs at 2, 8, 16 warps" --emit4
  rm -f "$OUT"/critical_path_w?.json
elif [ "$MODE" = s36e ]; then
  log "CUDA tests: the decode graphs (the head's update now the same launch with and without overlap)"
  cuda_tests 200 "cuda" tests_graph.txt tests/test_decode_graph.py
  bench_tp1 300 4096 "depth 0 and 4096 (no A/B variants)"
  golden 1 static 80
elif [ "$MODE" = s36b ]; then
  sizes_fit 240
elif [ "$MODE" = s36a ]; then
  log "CUDA twins: the decode attention (mask and row list), the indexer's selection, the decode graphs' indexer"
  cuda_tests 240 "attention or topk or indexer" tests_attn.txt tests/test_kernels.py tests/test_decode_graph.py
  replay_ab base,pf_ef,comp_wef "the weights' L2 prefetches evict-first, the compressors' projections evict-first"
  replay_keep d1
  replay_ab base,attn_rows,attn_rows_s16,attn_nohoist,wld_ldg,pf_ef "depth 4096: the selected rows' list, the attention's first ring block with q, the weights' .cs loads, evict-first prefetches" --depth 4096
  replay_keep d4096
  rm -f "$OUT"/critical_path_w?.txt
elif [ "$MODE" = s35h ]; then
  log "CUDA tests: the decode graphs on the final code (the weights' .cs loads)"
  cuda_tests 230 "cuda" tests_graph.txt tests/test_decode_graph.py
elif [ "$MODE" = s35g ]; then
  replay_ab base,hc_wef "the HC step's mixer weight loaded evict-first"
elif [ "$MODE" = s35f ]; then
  log "CUDA test: ops dispatch and determinism (its T=40 experts' twin: the exact product)"
  cuda_tests 150 "dispatch_and_determinism" tests_dispatch.txt tests/test_kernels.py
  bench_tp1 400 4096 "depth 0 and 4096 (A/B: the weights' loads as plain __ldg)"
elif [ "$MODE" = s35e ]; then
  log "CUDA twins: the CUDA C weight kernels (the streamed weights' loads with .cs)"
  cuda_tests 240 "cuda_c or routed or linear or grouped or column_shard or dispatch" tests_cuda_c.txt tests/test_kernels.py
  replay_ab base,wld_ldg,wld_l2ef,wld_l1ef "the streamed weights' loads: .cs (base) against others"
  bench_tp1 260 0 "depth 0 (no A/B variants)"
  golden 1 static 80
elif [ "$MODE" = s34h ]; then
  log "CUDA twins: the decode attention"
  cuda_tests 150 "attention" tests_attn.txt tests/test_kernels.py
  bench_tp1 260 0 "depth 0 (no A/B variants)"
  golden 1 static 80
elif [ "$MODE" = s34g ]; then
  log "CUDA twins: the decode attention"
  cuda_tests 150 "attention" tests_attn.txt tests/test_kernels.py
  replay_ab base,attn_nohoist,attn_bk32_w4,attn_bk32_w8 "attention: first ring block with q; 32 keys a program"
elif [ "$MODE" = s34f ]; then
  log "CUDA twins: the decode attention"
  cuda_tests 150 "attention" tests_attn.txt tests/test_kernels.py
  log "decode graph tests on CUDA"
  cuda_tests 200 "cuda" tests_graph.txt tests/test_decode_graph.py
  replay_ab base,attn_old,attn_nohoist,attn_noepoch "attention: loads hoisted, merge by epochs"
  golden 1 static 80
elif [ "$MODE" = s34e ]; then
  replay_ab base,attn_p1,attn_p2,attn_p4,attn_p8,attn_p16,attn_p31 "the attention's parts (probes)"
elif [ "$MODE" = s34d ]; then
  replay_ab base,hc_skip,attn_skip "what the HC step and the attention cost the step (probes)"
elif [ "$MODE" = s34c ]; then
  replay_ab base,hc_nox,mix_const,sinkhorn_inline,mix_one_lane,attn_s1,attn_s2 "HC tail and Sinkhorn probes, attention split"
elif [ "$MODE" = s34b ]; then
  for w in 1 2; do
    log "replay A/B, world $w: prefetch-ahead variants and launch constants"
    timeout 285 python3 bench/critical_path.py --world $w --trace base \
      --variants base,q8_pf,gu_pf,down_pf,down_pro1,all_pf,q8_l2,q8_l8,q8_w8,q8_w32,kv_w1,kv_w2,kv_w8,hc_w2,hc_w8,hc_be64,hc_be256 \
      --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt" | head -20
    grep -i "error\|Traceback" "$OUT/critical_path_w$w.txt" | head -5
  done
elif [ "$MODE" = s34a ]; then
  replay_ab base,hc_w2,hc_w8,hc_be64,hc_be256 "HC step launch shapes"
elif [ "$MODE" = s32c ]; then
  ncu_stalls 150 "iq2xxs_swiglu" 1 "--tp 2 --shared --decode-order"
  log "critical path, world 2 (rank 0's shard, collectives removed), final code"
  timeout 200 python3 bench/critical_path.py --world 2 --variants base --trace base \
    --json "$OUT/critical_path_w2.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w2.txt"
  sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w2.txt" | head -4
  grep -A24 "span by role\|Error" "$OUT/critical_path_w2.txt" | head -28
elif [ "$MODE" = s32h ]; then
  serve_synth 1 8 150 300
elif [ "$MODE" = s32g ]; then
  log "CUDA twins: the routed kernels on the decode order, the prefill's tensor-core kernels, graphs"
  timeout 400 python3 -m pytest -q -rf tests/test_kernels.py tests/test_decode_graph.py \
    -k "order or mma or rides or routed or down or graph or on_cuda" > "$OUT/tests_kernels.txt" 2>&1
  tail -2 "$OUT/tests_kernels.txt"; grep -E "^FAILED|^E  " "$OUT/tests_kernels.txt" | head -16
elif [ "$MODE" = s32i ]; then
  log "bench, 43 layers, TP=2,1, depth 0 (no A/B variants)"
  timeout 230 python3 -m ds4tp bench --tp 2,1 --depth 0 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary 2>&1 | grep -v "prefill host"
  golden 2 static 90
elif [ "$MODE" = s32f ]; then
  bench_goldens 4096 330
elif [ "$MODE" = s32d ] || [ "$MODE" = s32e ]; then
  log "CUDA twins: the routed kernels on the decode orders, the prefill's tensor-core kernels"
  timeout 170 python3 -m pytest -q -rf tests/test_kernels.py -k "order or mma or rides or routed or down" > "$OUT/tests_kernels.txt" 2>&1
  tail -2 "$OUT/tests_kernels.txt"; grep -E "^FAILED|^E  " "$OUT/tests_kernels.txt" | head -16
  log "the gate/up kernel alone on GGUF's order and both decode orders"
  timeout 120 python3 bench/iq2_layout_probe.py --json "$OUT/iq2_layout.json" 2>&1 | grep -v Warn | tail -4
  tps=1; [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && tps=2,1
  log "bench, 43 layers, TP=$tps, depth 0 (A/B: the first decode order; the down rows in GGUF's)"
  timeout 330 python3 -m ds4tp bench --tp $tps --depth 0 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary 2>&1 | grep -v "profile\|prefill host"
  python3 -c "import json; rs=json.load(open('$OUT/bench.json'))['runs']; [print(t, {k: r.get(k) for k in ('decode_order_weights', 'iq2_v1_logits_equal', 'down_order_logits_equal_gguf', 'decode_order_logits_equal_gguf', 'tables_logits_equal_one_table')}, {k: v['us'] for k, v in r['profile']['kernels'].items() if v['us'] > 50}) for t, r in rs.items()]"
elif [ "$MODE" = s30d ] || [ "$MODE" = s32b ]; then
  log "synth full (parallel)"
  t0=$(date +%s)
  timeout 220 python3 -m ds4tp synth --preset full --seed 0 --jobs 32 --out /tmp/full.gguf > "$OUT/synth_log.txt" 2>&1
  echo "synth: status $? in $(( $(date +%s) - t0 )) s"
  if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo "page cache dropped: cold load"; else echo "could not drop the page cache: warm load"; fi
  timeout 110 python3 -m ds4tp bench --tp 2 --load-only --gguf /tmp/full.gguf --out "$OUT/load.json" 2>&1 | grep load | cut -c1-400
  log "serve end to end, TP=2 on two GPUs, worker 1 killed mid-stream"
  timeout 290 python3 bench/serve_e2e.py --model /tmp/full.gguf --device cuda --nodes 2 --ctx 8192 \
    --long-words 800 --tokens 256 --kill 1 --out "$OUT/serve_e2e.json" --log "$OUT/serve_launch.log" 2>&1 | cut -c1-900
  grep -i "loaded in\|ready in\|error\|Traceback" "$OUT/serve_launch.log" | head -20
  rm -f /tmp/full.gguf
elif [ "$MODE" = s30a ]; then
  log "CUDA twins: the routed kernels on the decode order (the case's bound since s29g)"
  timeout 100 python3 -m pytest -q -rf tests/test_kernels.py -k "order or mma or rides" > "$OUT/tests_kernels.txt" 2>&1
  tail -2 "$OUT/tests_kernels.txt"; grep -E "^FAILED|^E  " "$OUT/tests_kernels.txt" | head -16
  log "synth full (parallel) then load at TP=2, cold and warm"
  timeout 250 python3 -m ds4tp synth --preset full --seed 0 --jobs 32 --out /tmp/full.gguf > "$OUT/synth_log.txt" 2>&1
  echo "synth: status $?"
  if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo "page cache dropped: cold load"; else echo "could not drop the page cache: warm load"; fi
  timeout 100 python3 -m ds4tp bench --tp 2 --load-only --gguf /tmp/full.gguf --out "$OUT/load.json" 2>&1 | grep load | cut -c1-400
  timeout 80 python3 -m ds4tp bench --tp 2 --load-only --gguf /tmp/full.gguf --out "$OUT/load_warm.json" 2>&1 | grep load | cut -c1-400
  rm -f /tmp/full.gguf
elif [ "$MODE" = s30b ]; then
  serve_full 200 370 --kill 1
elif [ "$MODE" = s29g ]; then
  twins_bench "order or mma" 0 240
elif [ "$MODE" = s29f ]; then
  twins_bench "order or swiglu or mma or rides or down" 4096 360
elif [ "$MODE" = s29e ]; then      # (as run, its -k was "decode order or ...": invalid, no tests ran)
  twins_bench "order or swiglu or mma or rides or down" 0 300
  timeout 60 python3 bench/iq2_layout_probe.py --json "$OUT/iq2_layout_probe.json" 2>&1 | grep -v Warn | tail -3
  golden 2 static 90
  golden 1 static 70
elif [ "$MODE" = s29d ]; then
  log "routed gate/up: IQ2_XXS rows in a decode layout against the GGUF layout (prototype)"
  timeout 200 python3 bench/iq2_layout_probe.py --json "$OUT/iq2_layout_probe.json" 2>&1 | grep -v Warn | tail -8
  python3 - <<'PY' 2>&1 | tail -8
import sys, torch
sys.path.insert(0, "tests")
import kernel_cases as kc
for i, (name, fn, a) in enumerate(kc.cuda_c_cases()):
    if "swiglu" in name and "mma" not in name:
        print(f"ok   {name}: {fn('cuda', torch.Generator().manual_seed(7 + i), *a):.3g}")
PY
elif [ "$MODE" = s29c ]; then
  twins_bench "q8_0 or kv_store" 0 330
elif [ "$MODE" = s29b ]; then
  log "two-GPU twin tests: the within-host all-reduce, in its own launch and inside the HC step"
  timeout 150 python3 -m pytest -q -rf tests/test_tp.py -k "within_host or inside_the_hc_step" > "$OUT/tests_tp.txt" 2>&1
  tail -2 "$OUT/tests_tp.txt"; grep -E "^FAILED|^E  " "$OUT/tests_tp.txt" | head -10
  twins_bench "q8_0 or kv_store or graph or on_cuda" 0 330 tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s31a ]; then
  attn_twins_sweep
  log "bench, 43 layers, TP=2,1, depth 0 and 4096 (A/B: one head a program)"
  timeout 300 python3 -m ds4tp bench --tp 2,1 --depth 4096 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary 2>&1 | grep -v "prefill host"
  python3 -c "import json; rs=json.load(open('$OUT/bench.json'))['runs']; [print(t, r.get('attn_group_logits_vs_per_head'), r.get('spark_projection')) for t, r in rs.items()]"
elif [ "$MODE" = s31b ]; then
  s31_round "hc_step or hc_kernels or sinkhorn_beside or all_reduce_inside" 0 240 hc_spread_logits_vs_one_program
elif [ "$MODE" = s31c ]; then
  s31_round "attention or hc_step or hc_kernels or sinkhorn_beside or all_reduce_inside or index_kernels_in_the_graph" \
    4096 330 hc_step_warps_logits_vs_8 attn_split_logits_vs_masked
elif [ "$MODE" = s31d ]; then
  bench_goldens 4096 330
  python3 -c "import json; rs=json.load(open('$OUT/bench.json'))['runs']; [print(t, r.get('hc_step_warps_logits_vs_8'), {k: v['us'] for k, v in r['profile']['kernels'].items() if v['us'] > 50}) for t, r in rs.items()]"
elif [ "$MODE" = s32a ]; then
  attn_twins_sweep                    # (no goldens: the default path's SASS is unchanged)
  bench_only 4096 330
  python3 -c "import json; rs=json.load(open('$OUT/bench.json'))['runs']; [print(t, r.get('attn_mqa_logits_vs_per_head'), r.get('attn_mqa_error'), {k: v['us'] for k, v in r['profile']['kernels'].items() if v['us'] > 50}) for t, r in rs.items()]"
elif [ "$MODE" = s30i ]; then
  ncu_stalls 130 "iq2xxs_swiglu" 1 "--tp 2 --shared --decode-order"
elif [ "$MODE" = s29a ]; then
  for a in "--tp 2 --shared" "--tp 1 --shared"; do ncu_stalls 200 "iq2xxs_swiglu|q2k_down_sum" 2 "$a"; done
elif [ "$MODE" = s28f ]; then
  log "CUDA twins and graph tests: attention with the new KV row, kv_store, HC step, decode graphs"
  timeout 240 python3 -m pytest -q -x tests/test_kernels.py tests/test_decode_graph.py \
    -k "attention or kv_store or hc_step or hc_kernels or cuda_c or on_cuda or graph or pdl" > "$OUT/tests.txt" 2>&1
  tail -2 "$OUT/tests.txt"; grep -E "^FAILED|^E  " "$OUT/tests.txt" | head -20
  bench_goldens 0 240      # (the KV row inside attention against kv_store's launch)
elif [ "$MODE" = s28e ]; then
  log "bench, 43 layers, TP=2, depth 0 and 4096: the decode attention's launch shapes"
  timeout 330 python3 -m ds4tp bench --tp 2 --depth 4096 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary
elif [ "$MODE" = s28c ]; then
  bench_goldens
elif [ "$MODE" = s28d ]; then
  serve_full 200 370 --kill 1
elif [ "$MODE" = s28b ]; then
  log "CUDA twins: the HC step with the all-reduce inside (one GPU), the Q8_0 matvec (prefetched rows)"
  timeout 200 python3 -m pytest -q -rf tests/test_kernels.py -k "hc_step or peer_all_reduce or hc_kernels or cuda_c" > "$OUT/tests_kernels.txt" 2>&1
  tail -2 "$OUT/tests_kernels.txt"; grep -E "^FAILED|^E  " "$OUT/tests_kernels.txt" | head -24
  log "bench, 43 layers, TP=2,1, depth 0: matvec rows into L2 before the wait (EARLY_BYTES) A/B"
  timeout 330 python3 -m ds4tp bench --tp 2,1 --depth 0 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary
elif [ "$MODE" = s27e ]; then
  bench_goldens
elif [ "$MODE" = s27k ]; then
  timeout 200 python3 bench/depth_ab.py 2>&1 | tail -14
elif [ "$MODE" = s27j ]; then
  serve_full 200 330
elif [ "$MODE" = s27i ]; then
  log "within-host all-reduce without the per-thread fences (the default now): twin test, TP=2 bench"
  timeout 120 python3 -m pytest -q tests/test_tp.py -k "within_host" 2>&1 | tail -2
  timeout 200 python3 -m ds4tp bench --tp 2 --depth 0 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  bench_summary
elif [ "$MODE" = s27h ]; then
  export DS4TP_PEER_ALLREDUCE=0      # the served path on NCCL alone: s27f's A/B
  serve_full 200 330
elif [ "$MODE" = s27f ]; then
  serve_full 200 370 --kill 1
elif [ "$MODE" = s27d ]; then
  log "sampler on CUDA C (kernels.cuda_sample): twin tests, PTX check, then timings against the twin"
  timeout 300 python3 -m pytest -q tests/test_sampling.py tests/test_ptx_loads.py 2>&1 | tail -4
  timeout 200 python3 bench/sampler_bench.py --json "$OUT/sampler.json" 2>&1 | grep -v "^ *\"host\"\|^ *\"gpu\"" | tail -60
elif [ "$MODE" = s27c ]; then
  log "within-host all-reduce: twin test, then its variants against NCCL (bench/allreduce_ab.py)"
  timeout 200 python3 -m pytest -q tests/test_tp.py -k "within_host" 2>&1 | tail -3
  timeout 400 python3 bench/allreduce_ab.py --out "$OUT/allreduce_ab.json" 2>&1 | tail -60
elif [ "$MODE" = s27b ]; then
  log "within-host all-reduce: its twin test against NCCL (two GPUs), the PTX check"
  timeout 200 python3 -m pytest -q tests/test_tp.py -k "within_host" tests/test_ptx_loads.py 2>&1 | tail -3
  log "bench, 43 layers, TP=2, depth 0, prefill 2048: peer all-reduce against NCCL in the same run"
  timeout 300 python3 -m ds4tp bench --tp 2 --depth 0 --no-ab --out "$OUT/bench.json" > "$OUT/bench_log.txt" 2>&1
  grep -v '^{' "$OUT/bench_log.txt" | grep -i "error\|Traceback" | tail -5
  bench_summary
  golden 2 static 90
elif [ "$MODE" = s27a ]; then
  log "sampler: where sample_device's GPU time goes"
  timeout 200 python3 bench/sampler_bench.py --json "$OUT/sampler.json" 2>&1 | tail -80
  timeout 120 python3 -m pytest -q tests/test_sampling.py 2>&1 | tail -3
elif [ "$MODE" = s26h ]; then
  gate_tests 240 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s26g ]; then
  variant_twins "routed" "()" "(('A_PICK_ALL', 1),)"
  replay_ab base,pick_all "the choice picked by every warp"
  race_probe 60 --replays 1000 --check --define A_PICK_ALL=1
elif [ "$MODE" = s26f ]; then
  new_twins 90 "routed"
  gate_tests 120 "gate_up_launch or riding or pdl" tests/test_decode_graph.py
  serve_full 200 290
elif [ "$MODE" = s26e ]; then
  bench_goldens
elif [ "$MODE" = s26d ]; then
  new_twins 90 "routed"
  gate_tests 240 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
  race_probe 70 --replays 1000 --check
  race_probe 70 --replays 1000 --check --world 1
  golden 1 static 60
elif [ "$MODE" = s26b ] || [ "$MODE" = s26c ]; then
  new_twins 90 "routed"
  log "route probe"
  timeout 200 python3 bench/route_probe.py --steps 3 2>&1 | grep -v "Warn\|warn\|eager call" | tail -8 | tee "$OUT/route_probe.txt"
  replay_ab base,route_own "the choice in the gate/up launch, its own launch"
  gate_tests 200 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
  golden 1 static 60
elif [ "$MODE" = s26a ]; then
  log "route probe"
  timeout 200 python3 bench/route_probe.py --steps 3 2>&1 | grep -v "Warn\|warn" | tail -60 | tee "$OUT/route_probe.txt"
  new_twins 90 "routed"
elif [ "$MODE" = s25j ]; then
  gate_tests 60 "riding or gate_up_launch" tests/test_decode_graph.py
  race_probe 60 --replays 1000 --check
elif [ "$MODE" = s25i ]; then
  gate_tests 170 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
  race_probe 70 --replays 1000 --check
  golden 1 static 60
elif [ "$MODE" = s25h ]; then
  new_twins 90 "routed"
  replay_ab base,route_own,route_cheap "the choice in the gate/up launch (scores by the block), its own launch, a fixed choice"
elif [ "$MODE" = s25g ]; then
  replay_ab base,route_own,route_cheap "the choice in the gate/up launch, its own launch, a fixed choice"
elif [ "$MODE" = s25f ]; then
  gate_tests 200 "attention or kv_store or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
  replay_ab base,attn_before,rope_rows_off "attention and the KV store without waiting on the position"
elif [ "$MODE" = s25e ]; then
  log "a kernel boundary's cost in a graph-replayed chain"
  timeout 150 python3 bench/boundary_probe.py --out "$OUT/boundary.json" 2>&1 | grep -v Warn | tail -12
elif [ "$MODE" = s25d ]; then
  variant_twins swiglu,down,rides "(('EARLY_IDS', 1),)"
  replay_ab base,early_ids "the down kernel's ids and first rows before the wait"
  race_probe 100 --replays 2000 --check --define EARLY_IDS=1
  race_probe 100 --replays 2000 --check --world 1 --define EARLY_IDS=1
elif [ "$MODE" = s25c ]; then
  log "gate/up twin cases under SWIGLU_LUT 1 and 2"
  timeout 90 python3 - <<'PY' 2>&1 | grep -v Warn | tail -4
import sys, torch
sys.path.insert(0, "tests")
import kernel_cases as kc
from ds4tp.kernels import cuda_experts as ce
for lut in (1, 2):
    ce.SWIGLU_LUT = lut
    n = 0
    for i, (name, fn, a) in enumerate(kc.cuda_c_cases()):
        if "swiglu" in name or "rides" in name:
            fn("cuda", torch.Generator().manual_seed(7 + i), *a)
            n += 1
    print("SWIGLU_LUT", lut, n, "cases passed")
PY
  replay_ab base,gu_lut,gu_masks "the routed gate/up by the signed grid / the sign masks from a table"
elif [ "$MODE" = s25b ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  new_twins 90 "hc_step,routed"
  log "the HC step alone, graph-timed: Triton against hc.cu"
  timeout 90 python3 bench/hc_step_sweep.py --cuda --out "$OUT/hc_step_cuda.json" 2>&1 | grep -v Warn | tail -8
  for w in 2 1; do
    log "replay A/B, world $w: the HC step in CUDA C; the expert choice in the gate/up launch"
    timeout 200 python3 bench/critical_path.py --world $w --variants base,hc_triton,hc_barrier,route_own,route_own_a1 \
      --trace base,hc_triton,route_own --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn > "$OUT/critical_path_w$w.txt"
    sed -n '/us per replay (best/,/^variant/p' "$OUT/critical_path_w$w.txt" | head -8
  done
  python3 - "$OUT" <<'PY'
import json, sys
for w in (2, 1):
    d = json.load(open(f"{sys.argv[1]}/critical_path_w{w}.json"))
    for v in ("base", "hc_triton", "route_own"):
        roles = d.get(v, {}).get("roles", {})
        top = sorted(roles.items(), key=lambda kv: -kv[1]["share_us"])[:9]
        print(f"w{w} {v:10s}", "  ".join(f"{r.split('#')[0]}:{x['share_us'] / x['n']:.2f}" for r, x in top))
PY
  gate_tests 150 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s25a ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  new_twins 90 "hc_step,routed"
  replay_ab base,hc_triton,route_own "the HC step in CUDA C; the expert choice in the gate/up launch"
  gate_tests 150 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s24d ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  gate_tests 240 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
  replay_ab base,route_own "the router's matvec and choice in one launch"
  race_probe 100 --replays 3000 --check
  race_probe 100 --replays 3000 --check --world 1
elif [ "$MODE" = s24g ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  gate_tests 200 "cuda_c or on_cuda" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s24f ]; then
  serve_full 200 290
elif [ "$MODE" = s24e ]; then
  bench_goldens
elif [ "$MODE" = s24c ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  gate_tests 200 "cuda_c or shared_expert_riding or hc_step" tests/test_kernels.py tests/test_decode_graph.py
  variant_twins "q8_0" "(('PF_PIECES', 4),)" "(('PF_PIECES', 16),)"
  replay_ab base,mv_pf4,mv_pf16,hc_w_late "the Q8_0 matvec's prefetch before the wait, the HC step's weight"
elif [ "$MODE" = s24b ]; then
  timeout 60 python3 -m pytest -q tests/test_ptx_loads.py 2>&1 | tail -1
  gate_tests 150 "cuda_c or shared_expert_riding" tests/test_kernels.py tests/test_decode_graph.py
  replay_ab base,old_experts,router_triton "this session's routed kernels and F16 matvec against c362271's" --old .dbg/old
  race_probe 100 --replays 3000 --check
  race_probe 100 --replays 3000 --check --world 1
elif [ "$MODE" = l1wait ]; then
  log "does griddepcontrol.wait invalidate L1 lines a PDL consumer cached before the write?"
  timeout 120 python3 bench/l1_wait_probe.py --rounds 200 --out "$OUT/l1_wait.json" 2>&1 | tail -3
  timeout 120 python3 bench/l1_wait_probe.py --rounds 200 --spin-us 20 2>&1 | tail -1
elif [ "$MODE" = s21e ]; then
  bench_goldens
elif [ "$MODE" = s20a ]; then
  for w in 2 1; do
    log "eager prefill before and after the decode graphs, world $w"
    timeout 280 python3 bench/prefill_after_graphs.py --world $w --out "$OUT/prefill_after_graphs_w$w.json" > "$OUT/prefill_after_graphs_w$w.txt" 2>&1
    grep "^\[rank 0\]\|Error\|Traceback" "$OUT/prefill_after_graphs_w$w.txt" | head -40
    sed -n '/^---- rank 0/,$p' "$OUT/prefill_after_graphs_w$w.txt" | grep -v "^$" | head -50
  done
elif [ "$MODE" = s20b ]; then
  for reg in 1 0; do
    log "eager prefill before and after the decode graphs, TP=2, NCCL_GRAPH_REGISTER=$reg"
    NCCL_GRAPH_REGISTER=$reg timeout 240 python3 bench/prefill_after_graphs.py --world 2 --out "$OUT/prefill_after_graphs_reg$reg.json" > "$OUT/prefill_after_graphs_reg$reg.txt" 2>&1
    grep "^\[rank 0\]\|Error\|Traceback" "$OUT/prefill_after_graphs_reg$reg.txt" | head -40
  done
  sed -n '/^---- rank 0/,$p' "$OUT/prefill_after_graphs_reg1.txt" | grep -v "^$" | head -50
elif [ "$MODE" = s20c ]; then
  for th in default 1 default 1; do
    log "eager prefill before and after the decode graphs, TP=2, OMP_NUM_THREADS=$th"
    if [ $th = default ]; then unset OMP_NUM_THREADS; else export OMP_NUM_THREADS=$th; fi
    python3 -c "import torch; print('torch threads', torch.get_num_threads())"
    timeout 150 python3 bench/prefill_after_graphs.py --world 2 > "$OUT/prefill_after_graphs_th$th.txt" 2>&1
    grep "^\[rank [01]\] \(before\|graphs\|frozen\|freed\)  prefill\|Error\|Traceback" "$OUT/prefill_after_graphs_th$th.txt" | cut -c1-120 | head -40
  done
  unset OMP_NUM_THREADS
elif [ "$MODE" = s20d ]; then
  lscpu | grep -i "^CPU(s)\|thread\|core\|socket\|numa\|model name\|MHz"
  nvidia-smi topo -m | head -5
  for pin in no yes no yes; do
    log "eager prefill before and after the decode graphs, TP=2, pinned: $pin"
    timeout 150 python3 bench/prefill_after_graphs.py --world 2 $([ $pin = yes ] && echo --pin) > "$OUT/prefill_after_graphs_pin$pin.txt" 2>&1
    grep "^\[rank [01]\] \(pinned\|before  prefill\|graphs  prefill\|frozen  prefill\)\|Error\|Traceback" "$OUT/prefill_after_graphs_pin$pin.txt" | sed 's/ gc ms \[[^]]*\]//; s/total \[[^]]*\] //' | cut -c1-150 | head -40
  done
elif [ "$MODE" = s20e ]; then
  bench_goldens
  gate_tests 170 "hc_ or route or side_stream or pdl_is or lanes" tests/test_kernels.py tests/test_decode_graph.py
elif [ "$MODE" = s20f ]; then
  golden 2 static,prefill 150
elif [ "$MODE" = s18a ]; then
  for w in 2 1; do
    log "critical path of a graph-replayed step, world $w (collectives removed)"
    timeout 200 python3 bench/critical_path.py --world $w --json "$OUT/critical_path_w$w.json" 2>&1 | grep -v Warn | tee "$OUT/critical_path_w$w.txt" | head -60
  done
elif [ "$MODE" = s16c ]; then
  gate_tests 130 "topk_mask or index_scores or index_kernels" tests/test_kernels.py tests/test_decode_graph.py
  bench_goldens
elif [ "$MODE" = s16d ]; then
  serve_full 200 370 --kill 1
elif [ "$MODE" = s16e ]; then
  gate_tests 90 "short_prompts or graph_feed or lanes" tests/test_decode_graph.py
  serve_full 200 330
elif [ "$MODE" = s16f ]; then
  serve_full 100 200
elif [ "$MODE" = s16b ]; then
  gate_tests 110 "lanes or chained or lookahead" tests/test_decode_graph.py
  serve_full 200 370 --kill 1
elif [ "$MODE" = s15c ]; then
  bench_goldens      # (s15c ran it with golden limits of 100 and 80 s)
elif [ "$MODE" = load ]; then
  log "golden parity on CUDA, tiny-a, TP=2 (static/graphs, prefill)"
  timeout 200 python3 tests/golden_eval.py --device cuda --tp 2 --model tiny-a --paths static,prefill 2>&1 | grep "tiny-a" | tee -a "$OUT/golden_cuda_tp2.txt"
  log "synth full (parallel) then load at TP=2"
  df -h /tmp | tail -1
  free -g | head -2
  time timeout 250 python3 -m ds4tp synth --preset full --seed 0 --jobs 32 --out /tmp/full.gguf
  ls -l /tmp/full.gguf
  if sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then echo "page cache dropped: cold load"; else echo "could not drop the page cache: warm load"; fi
  timeout 100 python3 -m ds4tp bench --tp 2 --load-only --gguf /tmp/full.gguf --out "$OUT/load.json" 2>&1 | grep load | cut -c1-400
  log "load again (page cache warm)"
  timeout 80 python3 -m ds4tp bench --tp 2 --load-only --gguf /tmp/full.gguf --out "$OUT/load_warm.json" 2>&1 | grep load | cut -c1-400
  rm -f /tmp/full.gguf
  log "kernels check (full-size shapes, T=1 sweep of the main decode shapes)"
  timeout 100 python3 bench/kernels_check.py --out "$OUT/kernels.json" --tokens 1 --no-sweep --budget-s 80 2>&1 | tail -40
fi
log done
