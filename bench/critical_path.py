"""Which launches does a graph-replayed decode step wait on? Builds the full-width synthetic
model (one rank's shard; at --world 2 with the collectives removed, bench.NullComm), captures the
static decoder's graphs as the bench runs them (programmatic dependent launch on), traces one
replay of the variant of a token that ends no window, and charges the span to its kernels: a
kernel's share is how far its end moves the latest end so far (kernels in end order). With PDL
a kernel is resident before the one ahead ends, so its traced duration includes that wait; the
shares do not, and they add up to the span. A replay's nodes run on many CUDA streams, so the
chain is found from the times, not from one stream.

Kernels are named by role: the sublayer (A: attention, F: FFN; a new one starts at each
_hc_step_kernel, which also ends the sublayer before) and the kernel's ordinal among same-named
ones in it, e.g. A:q8_0_matvec#1 is attn_q_b. A share's "gap" part is the time from the latest end before it to its start (a launch
that was not early, or a wait).

    python bench/critical_path.py [--world 2] [--layers 43] [--json OUT]
        [--variants base,l1hi,router,...]   # replay times of scheduling variants, then each traced
        [--old DIR]                          # variant old_experts: DIR/experts.cu in place of
                                             # ds4tp/kernels/experts.cu (cuda_c.SOURCE_OVERRIDES)

A variant switches a path of the static decoder off, or sets a launch constant, before its
graphs are captured (the names: VARIANTS). The variants' replays are timed round-robin, their logits compared with the first's.
The nineteenth session's variants (side-stream priorities, where the FFN's second stream goes)
are in git history (6c0f6f3).
"""
import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from ds4tp import config as C, decode_graph, streams
from ds4tp.kernels import (cuda_c, cuda_experts, cuda_matvec, pdl, triton_attn, triton_hc,
                           triton_pick, triton_route)
from ds4tp.bench import PLAIN_WEIGHT_LOADS, NullComm, build_model, prefilled
from ds4tp.comm import SingleComm
from ds4tp.decode_graph import StaticDecoder
from profile_common import traced_kernels

# name -> what it changes: switches (set_enabled functions) it turns off, (module, constant,
# value) it sets
VARIANTS = {
    "base": (),
    "mix_one_lane": (decode_graph.set_mix_lane_enabled,),    # Sinkhorn on the shared expert's lane
    "sinkhorn_inline": (decode_graph.set_mix_side_enabled,),  # Sinkhorn inside hc_step
    "pick_torch": (triton_pick.set_enabled,),                 # the greedy pick in torch ops
    **{f"route_w{w}": ((triton_route, "ROUTE_WARPS", w),) for w in (1, 2, 4, 8)},
    **{f"mix_w{w}": ((triton_hc, "MIX_WARPS", w),) for w in (1, 2, 4, 8)},
    # (session 23) the shared expert in launches of its own on its side lane (before), instead of
    # riding in the routed launches; the shared-lane variants of session 19 are in git history
    "shared_own": (cuda_experts.set_shared_enabled,),
    "pdl_off": (pdl.set_enabled,),                            # every launch plain (no PDL)
    "pdl_off_cuda_c": (pdl.set_cuda_c_enabled,),              # the CUDA C launches plain
    "pdl_off_triton": (pdl.set_triton_enabled,),              # the Triton launches plain
    # (session 23) earlier kernels' outputs read from L2 only (common.cuh prior, PRIOR_CG; before)
    "prior_cg": ((cuda_c, "VARIANT_DEFINES", (("PRIOR_CG", 1),)),),
    # (session 24) the router's matvec (and other one-token F16 linears) on the Triton tile
    # kernel (before) instead of matvec.cu's f16_matvec
    "router_triton": (cuda_matvec.set_f16_enabled,),
    # (session 25) the expert choice in its own (Triton) launch (before) instead of in the routed
    # gate/up launch (cuda_experts.swiglu_routed); s25g/s25h also timed that launch with a fixed
    # choice (experts.cu A_ROUTE_CHEAP, timing only, removed)
    "route_own": (cuda_experts.set_route_enabled,),
    # (session 31) a ratio-4 layer's two compressor steps in a launch each (before) instead of
    # one (triton_attn.compressor_pair)
    "comp_two": (triton_attn.set_pair_enabled,),
    # (sessions 31, 34) the decode attention's launch shape at TP=1's 64 heads (s28e swept it at
    # TP=2 only): programs a head, warps a program
    **{f"attn_s{n}": ((triton_attn, "ATTN_SPLIT", n),) for n in (1, 2, 4, 16)},
    **{f"attn_w{w}": ((triton_attn, "ATTN_WARPS", w),) for w in (2, 8)},
    # (session 31) 4 warps a program at 64 heads (before) instead of ATTN_WARPS_MANY
    "attn_many_w4": ((triton_attn, "ATTN_WARPS_MANY", 4),),
    # (session 31, prepared) the HC step's warps a program and columns a program, swept alone
    # (s31b) but timed in the step at one width only
    **{f"hc_w{w}": ((triton_hc, "HC_STEP_WARPS", w),) for w in (2, 8)},
    **{f"hc_be{b}": ((triton_hc, "HC_STEP_BE", b),) for b in (64, 256)},
    # (session 34) launch constants swept alone long ago (Q8_0: the fifth session) or never
    # (kv_store), timed in the step at both widths (s34b; its prefetch-ahead variants q8_pf,
    # gu_pf, down_pf, down_pro1, all_pf, all slower, are at 5bc1507)
    **{f"q8_l{n}": ((cuda_matvec, "LOADS", n),) for n in (2, 8)},
    **{f"q8_w{w}": ((cuda_matvec, "WARPS", w),) for w in (8, 32)},
    **{f"kv_w{w}": ((triton_attn, "KV_STORE_WARPS", w),) for w in (1, 2, 8)},
    # (session 34) the timing-only probes of s34c-s34e (hc_nox, mix_const, hc_skip, attn_skip,
    # attn_p*: parts of the HC step and the attention left out, wrong results) are at 5bc1507
    # (session 34) the decode attention's first ring block loaded with q (ATTN_HOIST) off; one
    # block of 32 keys a program (4 programs a head; 2 warps spill there, so 4 or 8)
    "attn_nohoist": ((triton_attn, "ATTN_HOIST", False),),
    **{f"attn_bk32_w{w}": ((triton_attn, "ATTN_BK", 32), (triton_attn, "ATTN_SPLIT", 4),
                           (triton_attn, "ATTN_WARPS", w), (triton_attn, "ATTN_WARPS_MANY", w))
       for w in (4, 8)},
    # (session 35) the streamed weights' loads as plain __ldg (before the .cs default, common.cuh
    # wld); s35d's and s35e's other cache policies (wld_ef, wld_na, wld_l2ef, wld_l1ef) are at
    # 918c834
    "wld_ldg": ((cuda_c, "VARIANT_DEFINES", PLAIN_WEIGHT_LOADS),),
    # (session 35, run in 36: s36a) the weight kernels' L2 prefetches as bulk prefetches with
    # an L2 evict-first policy (pf_ef, +0.1% / -0.2%) and the compressors' F16 projections loaded
    # evict-first (comp_wef, 0.0% / -0.2%) are at 57fdb52
    # (session 36) the attention walking every visible compressed row under the indexer's mask
    # (the default before s36a: the selected rows' list was -3.8% / -2.5% at depth 4096; 16
    # programs a head with the list, -1.4% / +0.2%, is at 57fdb52)
    "attn_mask": ((triton_attn, "ATTN_ROWS", False),),
    # (session 36) the output head's mix in its own launches (before: the last update's
    # hc_post, hc_logits and torch's sigmoid, sum and norm) instead of in the last hc_step
    "head_own": (triton_hc.set_head_enabled,),
    # (session 36) the compressors' projections in CUDA C (matvec.cu comp_f16_step, as
    # f16_matvec; against the Triton kernels, variant comp_triton of s36d: +0.4% / -0.1%, on a
    # step that emits +0.3% / -0.1%) are at 753b165
    # (session 36) a ratio-4 layer's two emissions in a launch each (before) instead of one
    # (triton_attn.compressor_emit_pair; --emit4 replays a step that emits)
    "emit_two": (triton_attn.set_emit_pair_enabled,),
    # (session 36) the streams before layer 0 as the embedding expanded and hc_pre's launches
    # (before) instead of an update of empty streams (one hc_step, Sinkhorn beside)
    "first_own": (decode_graph.set_first_update_enabled,),
    # (session 37) the compressors joined before the attention on a token that ends none of
    # their windows and the graphs captured at the default priority (both as up to the
    # thirty-sixth session, and from ceaa5f6 to session 39), each alone and both
    # (decode_graph.COMP_JOIN "step", CAPTURE_PRIORITY -1 otherwise). s37a: -1 alone was -0.4% /
    # +0.2%, -0.7% / -0.1% at depth 4096; also with the HC mixer's lane high -0.2% / +0.3%.
    # s37b, s37c, s39a (the late join against the old pair): at priority 0 -0.9% / -0.6%,
    # -1.5% / -0.4% (TP=2 rank / TP=1, depth 1), +0.3% / +0.1% at depth 4096; at -1 -1.4% /
    # -0.4%, -1.6% / 0.0%, -1.4% / 0.0%, at depth 4096 -0.7% / -0.9%, -1.0% / -0.9%. Joined after
    # the FFN update +4.9% / +4.9%; before the next layer's attention -0.1% / +0.2%; forked after
    # attn_q_b no faster (code at d63dd8b)
    "comp_attn": ((decode_graph, "COMP_JOIN", "attention"),),
    "prio_default": ((decode_graph, "CAPTURE_PRIORITY", 0),),
    "comp_attn_prio_default": ((decode_graph, "COMP_JOIN", "attention"), (decode_graph, "CAPTURE_PRIORITY", 0)),
    "prio_main_mix_hi": ((streams, "LANE_PRIORITY", (0, -1, -1)),),
    # (session 36, s37a) the greedy pick's logits per program (triton_pick.BV 2048: 64 programs
    # for 129,280; the pick is 9.8 us at TP=1): 512, 1024, 4096 within +0.6% / -0.2%
    **{f"pick_bv{b}": ((triton_pick, "BV", b),) for b in (512, 1024, 4096)},
    # (session 36) the emissions' programs at other warps (EMIT_WARPS 4; --emit4; s36f: all
    # slower)
    **{f"emit_w{w}": ((triton_attn, "EMIT_WARPS", w),) for w in (2, 8, 16)},
    # (session 35) the HC step's mixer weight loaded evict-first too (hc_wef, s35g: +0.3% /
    # +0.2%) is at bd884d1
    # (session 39) the Q8_0 matvec's prefetch into L2 before the PDL wait: the first 2 steps of
    # the warp's first rows, or all of them (matvec.cu Q_PRE; 1 step before), so that more of
    # its bytes come while the latency-bound launch ahead runs
    "q8_pre2": ((cuda_matvec, "Q_PRE", 2),),
    "q8_pre_all": ((cuda_matvec, "Q_PRE", 0),),
    # (session 39) the routed launches at fewer warps a block: at 16 each fills the register
    # file, so neither shares an SM with the launch ahead and its weight loads before the PDL
    # wait (the shared expert's rows) start only when that launch has left the SM
    **{f"gu_w{w}": ((cuda_experts, "A_WARPS", w),) for w in (8, 12)},
    "dn_w8": ((cuda_experts, "B_WARPS", 8),),
    **{f"exp_w{w}": ((cuda_experts, "A_WARPS", w), (cuda_experts, "B_WARPS", w)) for w in (8, 12)},
    # (session 39) the embedding row gathered and converted by torch's launches before the first
    # update (before) instead of read by its hc_step (f_row)
    "embed_own": (decode_graph.set_embed_row_enabled,),
    # (session 41, s41b) a probe, not a safe schedule: the HC mixer's Sinkhorn joined at the
    # step's end instead of before the update that reads it (TP=2 rank -1.6%, TP=1 -0.4%, logits
    # differed: the mixer ran late in most layers; code at 05a54bf, removed)
    # (session 41) the HC mixer's lane above the main stream (-2 against the capture's -1), so
    # that its one program is placed before the main stream's waiting blocks; and with its
    # program at one warp, which can sit beside two Q8_0 blocks on an SM (8 warps cannot)
    "mix_hi2": ((streams, "LANE_PRIORITY", (0, -2, -1)),),
    "mix_hi2_w1": ((streams, "LANE_PRIORITY", (0, -2, -1)), (triton_hc, "MIX_WARPS", 1)),
    # (session 41) the HC mixer's Sinkhorn beside the sublayer on its own lane, joined before
    # the update (before), instead of riding as one more block of attn_output_b's and the routed
    # down's launches (decode_graph's mix ride)
    "mix_beside": (decode_graph.set_mix_ride_enabled,),
    # (session 42, s42a: the first block 0.3% faster at TP=2, 0.2% at TP=1, now the default)
    # the riding Sinkhorn as the last block of its launch instead of block 0
    "mix_last": ((cuda_c, "MIX_FIRST", 0),),
    # (session 42, s42b) the router's rows in the routed gate/up launch (its blocks computed the
    # logits and waited on a counter for each other) instead of the router's own launch:
    # bit-identical, TP=1 +1.1%, TP=2 rank +0.4%; with x quantised before that wait, +1.5% / 0.0%
    # (the HC step ahead of gate/up took ~3.4 us a layer more: gate/up's blocks, a whole SM's
    # registers each, were no longer placed during the router's launch). Code at 51b6ca0, removed.
    # (session 41, s41d) attn_q_a|kv (96 blocks) at 8 loads a lane, one block an SM: +0.7% at
    # both widths (attn_q_b's blocks could not sit beside its blocks before the wait; code at
    # 8fd13fb, removed)
}


def _apply(changes, on: bool):
    """Make a variant's changes (on) or undo them; returns what undoes them."""
    undo = []
    for c in changes:
        if callable(c):
            c(not on)
        else:
            mod, name, value = c
            undo.append((mod, name, getattr(mod, name)))
            setattr(mod, name, value)
    return undo


ap = argparse.ArgumentParser()
ap.add_argument("--world", type=int, default=1)
ap.add_argument("--layers", type=int, default=C.Shape().n_layer)
ap.add_argument("--json", default="")
ap.add_argument("--depth", type=int, default=1, help="tokens prefilled before the 8 decode steps "
                                                    "(the replayed token's depth)")
ap.add_argument("--emit4", action="store_true", help="replay the graph of a token that ends a "
                                                     "ratio-4 window (its compressors emit rows)")
ap.add_argument("--variants", default="base", help="comma-separated names of " + ", ".join(VARIANTS))
ap.add_argument("--trace", default="", help="variants to trace (default: the first and the fastest; "
                                             "none: no trace)")
ap.add_argument("--old", default="", help="a folder with an earlier experts.cu: variant old_experts "
                                           "compiles it (the same kernel names and arguments)")
args = ap.parse_args()
if args.old:
    VARIANTS["old_experts"] = ((cuda_c, "SOURCE_OVERRIDES",
                                {"experts.cu": str((Path(args.old) / "experts.cu").resolve())}),)

comm = SingleComm() if args.world == 1 else NullComm(0, args.world)
m = build_model(C.Shape(n_layer=args.layers), 0, args.world, comm, "cuda:0")


def capture(name):
    """The graph of a token that ends no window (--emit4: a ratio-4 window), at the last steps'
    depth (the indexer on past 4 * top_k tokens), captured under variant `name`."""
    undo = _apply(VARIANTS[name], True)
    try:
        dec = StaticDecoder(m, max_ctx=args.depth + 256, priority=decode_graph.CAPTURE_PRIORITY)
        dec.load_session(prefilled(m, args.depth))
        for _ in range(8):
            logits = dec.step(11).clone()
    finally:
        _apply([c for c in VARIANTS[name] if callable(c)] + undo, False)
    g, _ = dec.graphs[(args.emit4, False, dec._variant(max(args.depth, 1) + 7)[2])]
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    return dec, g, logits


def replay_us(g, n=50):
    t_ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    t_ev[0].record()
    for _ in range(n):
        g.replay()
    t_ev[1].record()
    torch.cuda.synchronize()
    return 1e3 * t_ev[0].elapsed_time(t_ev[1]) / n


def critical_path(name, g, us):
    kern = traced_kernels(g.replay, tempfile.mktemp(suffix=".json"))
    t0 = kern[0]["ts"]
    span = max(e["ts"] + e["dur"] for e in kern) - t0
    # A graph replay spreads its nodes over many CUDA streams, so the chain is not one stream's:
    # charge the span to whichever kernel moves the frontier (the latest end so far) forward.
    share = defaultdict(lambda: [0, 0.0, 0.0])      # role -> [count, share us, gap us]
    seg, ordinal, role_of = "-", defaultdict(int), {}
    for i, e in enumerate(kern):                     # roles in start order
        kname = e["name"][:40]
        if kname == "_hc_step_kernel":               # the first one ends layer 0's attention
            seg = "A" if seg == "F" else "F"
            ordinal = defaultdict(int)
        role_of[i] = f"{seg}:{kname}#{ordinal[kname]}"
        ordinal[kname] += 1
    frontier = t0
    seq = []
    for i in sorted(range(len(kern)), key=lambda i: kern[i]["ts"] + kern[i]["dur"]):
        e = kern[i]
        end = e["ts"] + e["dur"]
        s = share[role_of[i]]
        s[0] += 1
        s[1] += max(0.0, end - frontier)
        s[2] += max(0.0, e["ts"] - frontier)
        seq.append((role_of[i], round(max(0.0, end - frontier), 2), round(e["dur"], 2)))
        frontier = max(frontier, end)

    print(f"variant {name}, world {args.world}, {args.layers} layers, depth {args.depth}{' (emit4)' if args.emit4 else ''}: {us:.1f} us per replay (50 back to back); "
          f"the traced one: {len(kern)} kernels, span {span:.1f} us ({span / args.layers:.1f} us per layer)")
    print("the span by role (share: how far the kernel moved the latest end; gap: idle before it):")
    print(f"{'role':48s} {'n':>4s} {'share us':>9s} {'per launch':>10s} {'gap us':>8s}")
    rows = sorted(share.items(), key=lambda kv: -kv[1][1])
    for role, (n, sh, gap) in rows:
        if sh > 0.5:
            print(f"{role:48s} {n:4d} {sh:9.1f} {sh / n:10.2f} {gap:8.1f}")
    print(f"{'total':48s} {len(kern):4d} {sum(v[1] for v in share.values()):9.1f}")
    mid = len(seq) // 2
    print("one layer near the middle, in end order (role, share us, traced us):")
    start = next(i for i in range(mid, len(seq)) if seq[i][0].startswith("F:_hc_step"))
    stop = next(i for i in range(start + 1, len(seq)) if seq[i][0].startswith("F:_hc_step"))
    for r in seq[start:stop + 1]:
        print("   ", r)
    return {"replay_us": us, "span_us": span,
            "roles": {r: {"n": n, "share_us": sh, "gap_us": gap} for r, (n, sh, gap) in rows},
            "layer_sequence": seq[start:stop]}


names = args.variants.split(",")
graphs = {n: capture(n) for n in names}           # decoders kept alive with their graphs
times = {n: [] for n in names}
for _ in range(3):                                # round-robin against drift
    for n in names:
        times[n].append(replay_us(graphs[n][1]))
best = {n: min(t) for n, t in times.items()}
print(f"world {args.world}: us per replay (best of 3 x 50), variant: times; the eighth step's "
      f"logits against {names[0]}'s (the same math on other streams: equal bits)")
for n in names:
    same = torch.equal(graphs[n][2], graphs[names[0]][2])
    print(f"  {n:14s} {best[n]:8.1f}  ({best[n] / best[names[0]]:.3f} of {names[0]})  "
          + " ".join(f"{t:.1f}" for t in times[n]) + ("  logits equal" if same else "  LOGITS DIFFER"))
traced = ([] if args.trace == "none" else args.trace.split(",") if args.trace
          else list(dict.fromkeys([names[0], min(best, key=best.get)])))
out = {"world": args.world, "layers": args.layers, "depth": args.depth, "emit4": args.emit4,
       "variants": {n: {"replay_us": times[n]} for n in names}}
for n in traced:
    out[n] = critical_path(n, graphs[n][1], best[n])
if args.json:
    json.dump(out, open(args.json, "w"), indent=1)
