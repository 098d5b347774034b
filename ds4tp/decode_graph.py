"""Decode with static state, for CUDA graphs.

`DS4Model.forward` keeps growing caches and decides on the host what a token does (emit a
compressed row, run the indexer). A CUDA graph replays fixed kernels on fixed buffers, so here
the same per-token math (the stage functions of ds4tp.model) runs on preallocated buffers
indexed by a device-side position:

  raw window    a ring of n_swa rows; row slot = pos % n_swa, masked by the stored position
  compressors   ds4's frontier layout: ratio 4 keeps [previous window | current window]
                (8 rows), ratio 128 the current window (128 rows); slot from pos on device
  caches        compressed and indexer rows preallocated for max_ctx, masked by a count

What a token does still depends on its position: whether it ends a ratio-4 window, a ratio-128
window, and whether the indexer is active. Those three facts pick one of a few graph
*variants*, each captured once and replayed with the position in a device scalar.

A session prefilled by DS4Model.forward is copied in with `load_session` (same numbers, new
layout); `step(token)` then decodes. Without CUDA (tests) the same code runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ds4tp import config as C, kernels
from ds4tp.fuse import static_shapes
from ds4tp.kernels import cuda_c
from ds4tp.kernels.cuda_c import MixJob, Switch
from ds4tp.model import (DS4Model, SessionState, attend, ffn, grouped_linear_out, hc_post_pre,
                         hc_pre, index_scores_torch, index_weight_scale, indexer_query,
                         kv_cache_row, kv_row_quant, output_head, output_logits, pack_rows,
                         pooled_channels, select_rows, unpack_rows)
from ds4tp.numerics import f16_round, hadamard_fp4, rms_norm, rope_cos_sin, rope_tail
from ds4tp.ops import linear, linear_normed
from ds4tp.streams import Side
from ds4tp.worker.sampling import bias_key, bias_table, greedy_pick


@dataclass
class _Frontier:
    kv: torch.Tensor     # [coff*r, width]
    sc: torch.Tensor


@dataclass
class Parked:
    """A StaticDecoder's session set aside (StaticDecoder.park / resume)."""
    n: int
    fed: list
    fixed: list                  # copies of the stacked fixed-size buffers
    grown: torch.Tensor | None   # the compressed caches' rows in use, flattened


@dataclass
class _Layer:
    raw: torch.Tensor            # [n_swa, D] ring
    raw_pos: torch.Tensor        # [n_swa] position of each slot (-2**40 = empty)
    comp: torch.Tensor | None    # [cap, D]
    front: _Frontier | None
    index: torch.Tensor | None   # [cap4, 128]
    ifront: _Frontier | None


# The priority of the streams graphs are captured on (CUDA: lower is higher; torch instantiates
# graphs with each kernel's captured priority, so below 0 the main stream's blocks are placed
# before the side lanes' where both wait for SMs). Session 8 measured -1 neutral before the side
# lanes (bench/results/bench_h200_tp1_s8_*); s37a measured it alone at -0.4% / +0.2% (TP=2 rank /
# TP=1 replay, depth 1). Since the compressors join at the step's end (COMP_JOIN), -1 keeps them
# from holding back the latency-bound main launches (with COMP_JOIN, below).
CAPTURE_PRIORITY = -1

# How the static decoder schedules the HC mixers' Sinkhorn (benchmarks switch each off in turn):
# beside the sublayer (hc_step without it, then hc_mix on a side stream) rather than inside
# hc_step, and there on a side stream of its own rather than the shared expert's.
_mix_side_switch = Switch()
set_mix_side_enabled = _mix_side_switch.set
_mix_lane_switch = Switch()
set_mix_lane_enabled = _mix_lane_switch.set
# ... and where the CUDA C launches take it, as one more block of the launch that ends the
# sublayer (attn_output_b, the routed down; kernels.cuda_c.MixJob) rather than on a side stream:
# the main stream then orders it before the update that reads post and M, with no join.
_mix_ride_switch = Switch()
set_mix_ride_enabled = _mix_ride_switch.set
# Benchmarks also switch off the streams before layer 0 as one update (_step_body) to time the
# expand copy and hc_pre's two launches it replaced.
_first_update_switch = Switch()
set_first_update_enabled = _first_update_switch.set
# ... and the embedding row read by that update's hc_step from the table (hc_step f_row) to time
# the gather and conversion launches it replaced (torch's index and copy kernels: ~9 us at the
# head of a TP=1 step in s39a's trace, no PDL).
_embed_row_switch = Switch()
set_embed_row_enabled = _embed_row_switch.set
# Where a layer's compressor steps on the side stream join the main stream on a token that ends
# none of its windows: "step" (at the step's end) or "attention" (before the layer's attention,
# as on a token that ends one, whose attention reads the emitted row). Nothing the attention
# reads is written on such a token: the frontier is read only by the next token's step and the
# emissions, in order on the same lane. At TP=1 the attention waited for the compressor pair's
# 1,280 programs beside attn_q_b (s37a's trace); joined at the step's end they stream beside
# the later launches. "step" with CAPTURE_PRIORITY -1 against "attention" at 0 (replays,
# bit-equal): TP=2 rank -1.4% / -1.6% / -1.4% at depth 1 (s37b, s37c, s39a), -0.7% / -1.0% at
# 4096; TP=1 -0.4% / 0.0% / 0.0%, -0.9% / -0.9%; in the bench (s37d) within its noise. It was
# off from ceaa5f6 to session 39 after s37f's test_index_kernels_in_the_graph_on_cuda[listed]
# failed with it: s39b showed that test's [listed] form failing or passing with the run's random
# weights, from the listed attention's own summation order (see the test), with either join.
# Removed after s37b/s37c: joined after the layer's FFN update (+4.9% at both widths), before the
# next layer's attention, forked after attn_q_b (no faster; code at d63dd8b). Read at capture.
COMP_JOIN = "step"


class StaticDecoder:
    """One sequence, decode only, static buffers; graphs on CUDA when use_graphs."""

    def __init__(self, model: DS4Model, max_ctx: int, *, use_graphs: bool | None = None,
                 priority: int | None = None):
        """priority: of the streams the graphs are warmed up and captured on (CUDA: lower is
        higher; None: CAPTURE_PRIORITY, read here). torch instantiates graphs with each kernel's
        captured priority, so below 0 the main stream's kernels go before the side stream's
        (ds4tp.streams, default priority) where both wait for SMs."""
        self.m, self.s = model, model.shape
        self.priority = CAPTURE_PRIORITY if priority is None else priority
        s, dev = self.s, model.device
        self.max_ctx = max_ctx
        self.dev = dev
        f32 = torch.float32
        # Every layer's fixed-size state is a view of a few stacked tensors (one copy each parks
        # or resumes all layers); the compressed caches grow with the tokens, one per layer.
        n4 = sum(s.ratio(il) == 4 for il in range(s.n_layer))
        n128 = sum(s.ratio(il) == 128 for il in range(s.n_layer))
        hd, ihd = s.head_dim, s.indexer_head_dim
        # frontier widths: the channels this rank pools (both halves for ratio 4; shard.plan)
        w4 = next((lw.comp.kv.shape[0] for lw in model.w.layers if lw.ratio == 4), 2 * hd)
        w128 = next((lw.comp.kv.shape[0] for lw in model.w.layers if lw.ratio == 128), hd)
        wi = next((lw.icomp.kv.shape[0] for lw in model.w.layers if lw.ratio == 4), 2 * ihd)
        ring = torch.zeros(s.n_layer, s.n_swa, hd, dtype=f32, device=dev)
        ring_pos = torch.full((s.n_layer, s.n_swa), -(1 << 40), dtype=torch.long, device=dev)
        fronts = {4: (torch.zeros(n4, 8, w4, dtype=f32, device=dev),
                      torch.full((n4, 8, w4), C.NEG_INF, dtype=f32, device=dev)),
                  128: (torch.zeros(n128, 128, w128, dtype=f32, device=dev),
                        torch.full((n128, 128, w128), C.NEG_INF, dtype=f32, device=dev)),
                  "index": (torch.zeros(n4, 8, wi, dtype=f32, device=dev),
                            torch.full((n4, 8, wi), C.NEG_INF, dtype=f32, device=dev))}
        self._fixed = [ring, ring_pos, *fronts[4], *fronts[128], *fronts["index"]]
        self._growing = []            # (cache, ratio): rows in use after n tokens = n // ratio
        self.layers = []
        seen = {4: 0, 128: 0}
        for il in range(s.n_layer):
            r = s.ratio(il)
            lay = _Layer(ring[il], ring_pos[il], None, None, None, None)
            if r:
                j = seen[r]
                seen[r] += 1
                lay.comp = torch.zeros(max_ctx // r + 1, hd, dtype=f32, device=dev)
                lay.front = _Frontier(fronts[r][0][j], fronts[r][1][j])
                self._growing.append((lay.comp, r))
            if r == 4:
                lay.index = torch.zeros(max_ctx // 4 + 1, ihd, dtype=f32, device=dev)
                lay.ifront = _Frontier(fronts["index"][0][j], fronts["index"][1][j])
                self._growing.append((lay.index, 4))
            self.layers.append(lay)
        # device scalars the graphs read
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        # the greedy pick every step makes after the head (sampling.greedy_pick): [token,
        # logprob], the token also written to `token`, so a next step may consume it without
        # the host (step(None)); the logit_bias it adds (set_bias)
        self.pick = torch.zeros(2, dtype=torch.float64, device=dev)
        self.bias_ids, self.bias_vals = bias_table({}, dev)
        # the streams before layer 0 as an update of empty ones (zero streams, post 1, M 0): the
        # token's embedding in every stream, exactly (_step_body)
        self._empty = (torch.zeros(1, s.n_hc, s.n_embd, device=dev),
                       torch.ones(1, s.n_hc, device=dev), torch.zeros(1, s.n_hc, s.n_hc, device=dev))
        self.bias_key: tuple = ()
        self.n = 0
        self.fed: list[int] = []
        # RoPE tables for every position (looked up with the device position)
        allpos = torch.arange(max_ctx + 1, device=dev)
        self.rope = {False: rope_cos_sin(allpos, s.n_rot, False), True: rope_cos_sin(allpos, s.n_rot, True)}
        self.use_graphs = (dev.type == "cuda") if use_graphs is None else use_graphs
        self.graphs: dict = {}
        self._pool = None
        self._streams = None
        self.logits = None

    # ---- session transfer ----------------------------------------------------------------
    def load_session(self, st: SessionState) -> None:
        """Copy a session (built by DS4Model.forward) into the static buffers."""
        s = self.s
        if st.n > self.max_ctx:
            raise ValueError(f"session of {st.n} tokens exceeds max_ctx {self.max_ctx}")
        for il, (lay, ls) in enumerate(zip(self.layers, st.layers)):
            r = s.ratio(il)
            raw = ls.raw.view()
            n_raw = raw.shape[0]
            pos = torch.arange(st.n - n_raw, st.n, device=self.dev)
            lay.raw_pos.fill_(-(1 << 40))
            lay.raw[pos % s.n_swa] = raw
            lay.raw_pos[pos % s.n_swa] = pos
            if r:
                lay.comp[: ls.comp.n] = ls.comp.view()
                _load_front(lay.front, ls.comp_state, st.n, r)
            if r == 4:
                lay.index[: ls.index.n] = ls.index.view()
                _load_front(lay.ifront, ls.index_state, st.n, 4)
        self.n = st.n

    def store_session(self, st: SessionState) -> None:
        """Write the decoder's state back into a SessionState (the inverse of load_session), so
        eager forward passes, cloning and prefix reuse continue from it."""
        from ds4tp.model import Rows
        s, n = self.s, self.n
        for il, (lay, ls) in enumerate(zip(self.layers, st.layers)):
            r = s.ratio(il)
            k = min(n, s.n_swa)
            pos = torch.arange(n - k, n, device=self.dev)
            ls.raw = Rows(s.head_dim, self.dev, cap=2 * s.n_swa)
            ls.raw.append(lay.raw[pos % s.n_swa])
            if r:
                n_comp = n // r
                ls.comp = Rows(s.head_dim, self.dev, cap=max(64, 2 * n_comp))
                ls.comp.append(lay.comp[:n_comp])
                _store_front(lay.front, ls.comp_state, n, r)
            if r == 4:
                ls.index = Rows(s.indexer_head_dim, self.dev, cap=max(64, 2 * (n // 4)))
                ls.index.append(lay.index[: n // 4])
                _store_front(lay.ifront, ls.index_state, n, 4)
        if None in self.fed:
            raise RuntimeError("a token fed from the device was never confirmed")
        st.tokens.extend(self.fed)
        self.fed = []
        st.n = n

    def park(self) -> "Parked":
        """A copy of the session this decoder holds, for `resume`: switching the decoder between
        live sequences costs a few copies instead of store_session + load_session (Python loops
        over layers and frontier rows; ~45 ms a switch on two H200s, where two streams served
        at once ran at 9 tok/s together). The fixed-size buffers are copied whole, the
        compressed caches up to the rows in use (rows past them are masked by the count, so a
        step run between park and resume leaves nothing that a later step reads)."""
        grown = [t[: self.n // r].reshape(-1) for t, r in self._growing]
        return Parked(self.n, list(self.fed), [t.clone() for t in self._fixed],
                      torch.cat(grown) if grown else None)

    def resume(self, p: "Parked") -> None:
        """Put a parked session back: the decoder continues exactly where `park` left it."""
        for t, saved in zip(self._fixed, p.fixed):
            t.copy_(saved)
        off = 0
        for t, r in self._growing:
            rows = t[: p.n // r]
            rows.copy_(p.grown[off: off + rows.numel()].view_as(rows))
            off += rows.numel()
        self.n, self.fed = p.n, list(p.fed)

    # ---- one token ---------------------------------------------------------------------------
    def _variant(self, p: int) -> tuple[bool, bool, bool]:
        s = self.s
        return ((p + 1) % 4 == 0, (p + 1) % 128 == 0, (p + 1) // 4 > s.indexer_top_k)

    def variants(self) -> dict:
        """Every variant a position below max_ctx takes, with the first position that takes it.
        Once the indexer is on, the pattern repeats every 128 positions."""
        out: dict = {}
        for p in range(min(self.max_ctx, 4 * self.s.indexer_top_k + 4 + 256)):
            out.setdefault(self._variant(p), p)
        return out

    def warm_up(self) -> list:
        """Run every variant once (on CUDA: warm up and capture its graph) so that no later step
        compiles kernels or captures a graph. The buffers are restored after each run, and the
        decoder must be empty (no session loaded). Returns the variants."""
        if self.n:
            raise RuntimeError("warm_up needs an empty decoder (no session loaded)")
        table = self.variants()
        for var, p in table.items():
            self.pos.fill_(p)
            self.token.fill_(0)
            if self.use_graphs:
                if var not in self.graphs:
                    self.graphs[var] = self._capture(var)
            else:
                saved = self.park()
                self._step(var)
                self.resume(saved)
        self.pos.zero_()
        return list(table)

    def set_bias(self, bias: dict) -> None:
        """The logit_bias (at most sampling._FEW_BIASES entries) the next steps' greedy pick
        adds; copied to the device only when it changes."""
        key = bias_key(bias)
        if key != self.bias_key:
            ids, vals = bias_table(bias, "cpu")
            pinned = self.dev.type == "cuda"       # no wait for the stream's earlier work
            self.bias_ids.copy_(ids.pin_memory() if pinned else ids, non_blocking=pinned)
            self.bias_vals.copy_(vals.pin_memory() if pinned else vals, non_blocking=pinned)
            self.bias_key = key

    def step(self, token: int | None) -> torch.Tensor:
        """Consume one token at position self.n; returns logits [V] (a device buffer that the
        next step overwrites). token None: the previous step's greedy pick, still on the device
        (its id is unknown to the host until it reads `pick`; `fed` holds None for it until
        `confirm`)."""
        if self.n >= self.max_ctx:
            raise ValueError(f"context full ({self.max_ctx} tokens)")
        if token is not None and not 0 <= token < self.s.vocab:
            raise ValueError(f"token id {token} out of range [0, {self.s.vocab})")
        p = self.n
        self.pos.fill_(p)
        if token is not None:
            self.token.fill_(token)
        var = self._variant(p)
        if not self.use_graphs:
            self.logits = self._step(var)
        else:
            if var not in self.graphs:
                self.graphs[var] = self._capture(var)
            g, out = self.graphs[var]
            g.replay()
            self.logits = out
        self.n += 1
        self.fed.append(token)
        return self.logits

    def confirm(self, token: int) -> None:
        """The id of the last token consumed by step(None), once the host has read it."""
        if not self.fed or self.fed[-1] is not None:
            raise RuntimeError("no token fed from the device awaits its id")
        self.fed[-1] = token

    def _capture(self, var):
        """Warm up once on a side stream (allocator, kernel compilation, communicators; the
        state is restored after), then capture. Capturing does not run the kernels."""
        saved, token = self.park(), self.token.clone()
        if self._streams is None:    # one warm-up and one capture stream for all variants (the
            self._streams = tuple(torch.cuda.Stream(self.dev, priority=self.priority)  # kernels
                                  for _ in range(2))                     # keep buffers per stream)
        warm, capture = self._streams
        cur = torch.cuda.current_stream()
        warm.wait_stream(cur)
        with torch.cuda.stream(warm):
            self._step(var)
        cur.wait_stream(warm)
        self.resume(saved)
        self.token.copy_(token)       # the warm-up step left its pick there: this step's token back
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool, stream=capture):
            out = self._step(var)
        self._pool = g.pool()
        return g, out

    def _step(self, var) -> torch.Tensor:
        with static_shapes():     # fixed buffer shapes: the @fused chains compile once each
            return self._step_body(var)

    def _step_body(self, var) -> torch.Tensor:
        emit4, emit128, idx_on = var
        s, m = self.s, self.m
        pos, tok = self.pos, self.token
        if _first_update_switch.on:
            # the chain of DS4Model.forward (the embedding in every stream, hc_pre) as an update
            # of empty streams: on CUDA one hc_step (its Sinkhorn in layer 0's attn_output_b),
            # which reads the token's row of the embedding table itself
            hc, xn, post, mix, pending = self._update(None, *self._empty, m.w.layers[0].attn_mixer,
                                                      None, reduce=False, row=(m.w.token_embd, tok))
        else:
            e = m.w.token_embd[tok].float()                                  # [1, E]
            hc = e[:, None, :].expand(1, s.n_hc, s.n_embd).contiguous()
            xn, post, mix = hc_pre(hc, *m.w.layers[0].attn_mixer, s)
            pending = None
        comps = []       # compressor steps not yet joined: (side, its input xn, kept alive)
        for lw, lay in zip(m.w.layers, self.layers):
            r = lw.ratio
            emit = (r == 4 and emit4) or (r == 128 and emit128)
            # each sublayer's output is this rank's part; _update sums it (its all-reduce)
            out = self._attention(lw, lay, xn, pos, emit, idx_on and r == 4, comps, _ride(pending))
            hc, xn, post, mix, pending = self._update(out, hc, post, mix, lw.ffn_mixer, pending)
            f = ffn(lw, xn, tok, s, m.comm, m.rank, overlap=m.overlap, reduce=False,
                    mix=_ride(pending))
            mixer = m.w.mixer_after(lw.il)
            hc, xn, post, mix, pending = self._update(f, hc, post, mix, mixer or m.w.head_mixer,
                                                      pending, head=mixer is None)
        # the head's input xn from the last update's launch (CUDA), else the head mixes hc
        logits = (output_logits(m.w, xn, m.comm) if xn is not None
                  else output_head(m.w, hc, s, m.comm))[0]
        # the pick, and its token as the next step's input if fed from here
        greedy_pick(logits, self.bias_ids, self.bias_vals, out=self.pick, token=self.token)
        _join_all(comps)
        return logits

    def _update(self, part, hc, post, mix, mixer, pending, head: bool = False, reduce: bool = True,
                row=None):
        """The sublayer's all-reduce of this rank's part, then model.hc_post_pre for this token,
        with the next mixer's Sinkhorn (post and M, which only the update after the sublayer
        reads) left to the sublayer on CUDA: hc_step(mix=False), then a MixJob that the
        sublayer's last launch carries (the mix ride), or hc_mix on a side stream beside it.
        Two ranks of one host sum inside that hc_step (comm.peer_sum; one launch fewer).
        pending: the previous call's (side, z), joined here before its post and M are read (z
        is kept alive until then), or its MixJob, which the sublayer's last launch carried (if
        no launch took it, its Sinkhorn runs here). head: after the last layer, mixer is the
        output head's (Weights.head_mixer): on CUDA the same hc_step gives the head's normed
        input as xn (its ~8 launches in one), elsewhere xn is None and output_head mixes the
        new streams.
        reduce=False: part is the whole output already (the embedding before layer 0); row =
        (table, index) in place of part: the part is that row of the table, read by the hc_step
        launch itself where it runs (float16 rows: f_row), else gathered here."""
        s, comm = self.s, self.m.comm
        if isinstance(pending, MixJob):
            if not pending.done:          # (no launch of the sublayer took it)
                from ds4tp.kernels import triton_hc
                post, mix = triton_hc.hc_mix(pending.z, pending.scale, pending.base, s.n_hc,
                                             s.sinkhorn_iters, C.HC_EPS)
        elif pending is not None:
            pending[0].join()
        # the head's update has no Sinkhorn to run beside: one launch whether or not the
        # sublayers overlap (the same bits either way)
        beside = ((head or (_mix_side_switch.on and self.m.overlap)) and kernels.on_gpu(hc)
                  and mixer[0].qtype == C.F16)
        if beside:
            from ds4tp.kernels import triton_hc
            beside = triton_hc.step_enabled() and (not head or triton_hc.head_enabled())
        f_row = None
        if row is not None:             # (reduce is False)
            table, idx = row
            if (beside and _embed_row_switch.on and table.dtype == torch.float16
                    and table.is_contiguous()):
                part, f_row = table, idx
            else:
                part = table[idx].float()                                    # [1, E]
        peer = comm.peer_sum(part) if beside and reduce else None
        f = part if peer is not None or not reduce else comm.all_reduce(part)   # its all-reduce
        if not beside:
            return (*hc_post_pre(f, hc, post, mix, None if head else mixer, s), None)
        fn, scale, base, norm = mixer
        hc, xn, z = triton_hc.hc_step(f, hc, post, mix, fn.raw, scale, base, norm, s.n_hc,
                                      s.sinkhorn_iters, C.HC_EPS, C.RMS_EPS, mix=False,
                                      peer=peer, f_row=f_row)   # with peer: f is the part, summed inside
        if head:
            return hc, xn, None, None, None
        if _mix_ride_switch.on and cuda_c.available():
            job = MixJob(z, scale, base, C.HC_EPS, s.sinkhorn_iters)
            return hc, xn, job.post, job.m, job
        # its own side stream: on the one the shared expert and the compressors use, it went
        # first and held them back by its ~4 us (bench/critical_path.py)
        side = Side(z, lane=1 if _mix_lane_switch.on else 0)
        with side:
            post, mix = triton_hc.hc_mix(z, scale, base, s.n_hc, s.sinkhorn_iters, C.HC_EPS)
        return hc, xn, post, mix, (side, z)

    def _attention(self, lw, lay: _Layer, xn, pos, emit: bool, idx_on: bool, comps: list,
                   mix=None):
        """The attention sublayer of one token: its input xn [1, E] -> its output [1, E].
        comps: where its compressor steps' side is left to be joined at the step's end
        (COMP_JOIN "step"), with xn, which they read. mix: a MixJob for attn_output_b."""
        s, comm = self.s, self.m.comm
        n_vis = (pos + 1) // lw.ratio if idx_on else None                    # [1] rows visible
        side = self._compressors(lw, lay, xn, pos, emit)         # beside the q/kv path
        qa, kv_lin = linear(lw.q_a_kv, xn).split([lw.q_a.shape[0], s.head_dim], -1)
        qb = linear_normed(lw.q_b, qa, lw.q_a_norm)                          # [1, H_l*D]
        rope = self.rope[lw.ratio > 0]                                       # cos, sin tables
        store_kv_row(kv_lin, lw.kv_norm, *rope, pos, lay.raw, lay.raw_pos, s)
        if emit or COMP_JOIN == "attention":
            side.join()
        else:
            comps.append((side, xn))          # joined at the step's end (COMP_JOIN "step")
        comp = mask = rows = None
        if lw.ratio:
            comp = lay.comp
            if idx_on:
                qrn = rms_norm(qa, lw.q_a_norm)
                cos, sin = (t[pos] for t in rope)
                q, w = indexer_query(lw, qrn, xn, cos, sin, s)
                score = index_scores(q, w, lay.index, n_vis, index_weight_scale(s))
                score = comm.all_reduce(score)                               # indexer-score all-reduce
                mask, rows = indexer_select(score, n_vis, s.indexer_top_k)
        o = decode_attention(qb, lay.raw, lay.raw_pos, comp, lw.ratio, mask, lw.sinks, *rope, pos, s,
                             rows=rows)
        return grouped_linear_out(lw, o, s, mix)     # this rank's part: _update all-reduces it

    def _compressors(self, lw, lay: _Layer, xn, pos, emit: bool) -> Side:
        """The layer's compressor steps on xn (and on a token ending their window, the emissions)
        on a side stream forked here: the Side to join before anything reads their caches."""
        side = Side(xn, self.m.overlap and lw.ratio > 0)
        with side:
            jobs = [(lw.comp, lay.front, lay.comp, False)] if lw.ratio else []
            if lw.ratio == 4:
                jobs.append((lw.icomp, lay.ifront, lay.index, True))
            compressor_steps([(cw, front) for cw, front, _, _ in jobs], xn, pos)
            if jobs and emit:
                self._emit(jobs, pos)
        return side

    def _emit(self, jobs, pos):
        """On a token ending its layer's compressor windows (jobs [(weights, frontier, cache,
        is_index)], one ratio): pool each window into the cache row (pos+1)/r - 1 and (ratio 4)
        shift it. Compressors split by channel pool this rank's channels; one all-gather for
        the layer brings every rank's, then each row is finished."""
        cw0, front0, cache0, _ = jobs[0]
        if pooled_channels(front0.kv.shape[1], cw0.ratio) == cache0.shape[1]:   # all channels here
            compressor_emits(jobs, pos, *self.rope[True], self.s)
            return
        pooled = [compressor_pool(cw, front.kv, front.sc, pos) for cw, front, _, _ in jobs]
        sizes = [p.shape[1] for p in pooled]
        rows = unpack_rows(self.m.comm.all_gather(pack_rows(pooled)), sizes)   # compressor rows all-gather
        for (cw, _, cache, is_index), row in zip(jobs, rows):
            compressor_finish(cw, row, cache, pos, *self.rope[True], is_index, self.s)


def _ride(pending):
    """The MixJob that the next sublayer's last launch is to carry, if pending is one."""
    return pending if isinstance(pending, MixJob) else None


def _join_all(comps: list) -> None:
    """The main stream waits for each side left in comps; then their inputs may be freed."""
    for side, _ in comps:
        side.join()
    comps.clear()


# ---- one token's attention stages: dispatch points (one Triton launch each on CUDA) and their
# torch twins. cos_t / sin_t are RoPE tables over all positions; pos is a device scalar [1].
def store_kv_row_torch(kv_lin, kv_norm, cos_t, sin_t, pos, ring, ring_pos, s) -> None:
    """The token's raw KV row (normed, RoPE, FP8/F16 as the cache holds it, sec. 9.3) into the
    ring slot pos % n_swa, with its position."""
    kv = kv_cache_row(rms_norm(kv_lin, kv_norm), cos_t[pos], sin_t[pos], s)
    slot = pos % s.n_swa
    ring.index_copy_(0, slot, kv)
    ring_pos.index_copy_(0, slot, pos)


def store_kv_row(kv_lin, kv_norm, cos_t, sin_t, pos, ring, ring_pos, s) -> None:
    if kernels.on_gpu(kv_lin):
        from ds4tp.kernels import triton_attn
        return triton_attn.kv_store(kv_lin, kv_norm, cos_t, sin_t, pos, ring, ring_pos, C.RMS_EPS)
    return store_kv_row_torch(kv_lin, kv_norm, cos_t, sin_t, pos, ring, ring_pos, s)


def compressor_step_torch(cw, xn, pos, front_kv, front_sc) -> None:
    """The token's kv and gate (+ positional bias) projections into its frontier slot: ratio 4
    keeps [previous | current] window, so slot 4 + pos % 4; ratio 128 slot pos % 128."""
    r = cw.ratio
    kv = linear(cw.kv, xn)
    sc = linear(cw.gate, xn) + cw.ape[pos % r]
    slot = (pos % 4 + 4) if r == 4 else (pos % r)
    front_kv.index_copy_(0, slot, kv)
    front_sc.index_copy_(0, slot, sc)


def compressor_step(cw, xn, pos, front_kv, front_sc) -> None:
    if kernels.on_gpu(xn) and cw.kv.qtype == C.F16 and cw.gate.qtype == C.F16:
        from ds4tp.kernels import triton_attn
        return triton_attn.compressor_step(xn, cw.kv.raw, cw.gate.raw, cw.ape, pos, front_kv, front_sc)
    return compressor_step_torch(cw, xn, pos, front_kv, front_sc)


def compressor_steps(steps, xn, pos) -> None:
    """A layer's compressor steps on one token, steps [(weights, frontier)]: a ratio-4 layer's
    two (attention's, then the indexer's) take one launch on CUDA (triton_attn.compressor_pair;
    the same input x and ratio), any other one compressor_step each."""
    if (len(steps) == 2 and kernels.on_gpu(xn)
            and all(cw.kv.qtype == C.F16 and cw.gate.qtype == C.F16 for cw, _ in steps)):
        from ds4tp.kernels import triton_attn
        if triton_attn.pair_enabled():
            a, b = ((cw.kv.raw, cw.gate.raw, cw.ape, front.kv, front.sc) for cw, front in steps)
            return triton_attn.compressor_pair(xn, a, b, pos)
    for cw, front in steps:
        compressor_step(cw, xn, pos, front.kv, front.sc)


def compressor_emit_torch(cw, front_kv, front_sc, cache, pos, cos_t, sin_t, is_index, s) -> None:
    """At a token ending its compressor's window (pos % r == r - 1): pool the frontier into the
    compressed row (pos+1)/r - 1 of cache (softmax of the gates per channel; ratio 4 takes the
    previous window through the first half of the projection and the current one through the
    second), RMS norm, RoPE at the window's first position, FP8 (kv) or Hadamard + FP4
    (indexer), F16; ratio 4 then moves the current window into the previous one's rows."""
    pooled = compressor_pool_torch(cw, front_kv, front_sc, pos)
    compressor_finish_torch(cw, pooled, cache, pos, cos_t, sin_t, is_index, s)


def compressor_pool_torch(cw, front_kv, front_sc, pos) -> torch.Tensor:
    """compressor_emit's pooling over the frontier's channels (this rank's, where split) ->
    [1, channels]; ratio 4 then shifts the window."""
    r, ch = cw.ratio, pooled_channels(front_kv.shape[1], cw.ratio)
    if r == 4:
        v = torch.cat((front_kv[:4, :ch], front_kv[4:, ch:]), 0)
        w = torch.cat((front_sc[:4, :ch], front_sc[4:, ch:]), 0)
    else:
        v, w = front_kv, front_sc
    pooled = (torch.softmax(w, dim=0) * v).sum(0, keepdim=True)
    if r == 4:
        front_kv[:4] = front_kv[4:].clone()
        front_sc[:4] = front_sc[4:].clone()
    return pooled


def compressor_pool(cw, front_kv, front_sc, pos) -> torch.Tensor:
    if kernels.on_gpu(front_kv) and cw.ratio == 4:    # ratio 128 emits once per 128 tokens
        from ds4tp.kernels import triton_attn
        if triton_attn.emit_enabled():
            return triton_attn.compressor_pool(front_kv, front_sc, pos)
    return compressor_pool_torch(cw, front_kv, front_sc, pos)


def compressor_finish_torch(cw, pooled, cache, pos, cos_t, sin_t, is_index, s) -> None:
    """A pooled row [1, hd] (every rank's channels) finished into cache row (pos+1)/r - 1."""
    r = cw.ratio
    row = rms_norm(pooled, cw.norm)
    row = rope_tail(row, cos_t[pos + 1 - r], sin_t[pos + 1 - r])
    row = f16_round(hadamard_fp4(row) if is_index else kv_row_quant(row, s))
    cache.index_copy_(0, (pos + 1) // r - 1, row)


def compressor_finish(cw, pooled, cache, pos, cos_t, sin_t, is_index, s) -> None:
    if kernels.on_gpu(pooled) and cw.ratio == 4:
        from ds4tp.kernels import triton_attn
        if triton_attn.emit_enabled():
            return triton_attn.compressor_finish(pooled, cw.norm, cos_t, sin_t, is_index, C.RMS_EPS,
                                                 pos=pos, cache=cache, ratio=cw.ratio)
    return compressor_finish_torch(cw, pooled, cache, pos, cos_t, sin_t, is_index, s)


def compressor_emit(cw, front_kv, front_sc, cache, pos, cos_t, sin_t, is_index, s) -> None:
    if kernels.on_gpu(front_kv) and cw.ratio == 4:    # ratio 128 emits once per 128 tokens
        from ds4tp.kernels import triton_attn
        if triton_attn.emit_enabled():
            return triton_attn.compressor_emit(front_kv, front_sc, cw.norm, cos_t, sin_t, pos,
                                               cache, is_index, C.RMS_EPS)
    return compressor_emit_torch(cw, front_kv, front_sc, cache, pos, cos_t, sin_t, is_index, s)


def compressor_emits(jobs, pos, cos_t, sin_t, s) -> None:
    """A layer's emissions at a token ending its windows, jobs [(weights, frontier, cache,
    is_index)] of one ratio with all channels on this rank: a ratio-4 layer's two in one launch
    on CUDA (triton_attn.compressor_emit_pair), else compressor_emit each."""
    if len(jobs) == 2 and all(cw.ratio == 4 for cw, _, _, _ in jobs) and kernels.on_gpu(pos):
        from ds4tp.kernels import triton_attn
        if triton_attn.emit_enabled() and triton_attn.emit_pair_enabled():
            a, b = ((front.kv, front.sc, cw.norm, cache, is_index)
                    for cw, front, cache, is_index in jobs)
            return triton_attn.compressor_emit_pair(a, b, cos_t, sin_t, pos, C.RMS_EPS)
    for cw, front, cache, is_index in jobs:
        compressor_emit(cw, front.kv, front.sc, cache, pos, cos_t, sin_t, is_index, s)


def index_scores(q, w, keys, n_vis, wscale: float):
    """One token's partial indexer scores [1, cap] over the whole index cache: on CUDA one
    launch that reads only the visible rows (0 past them), else the twin, which scores every
    row (the selection masks the rest either way)."""
    if kernels.on_gpu(q):
        from ds4tp.kernels import triton_attn
        if triton_attn.index_enabled():
            return triton_attn.index_scores(q.contiguous(), w.contiguous(), keys, n_vis, wscale)
    return index_scores_torch(q, w, keys, wscale)


def indexer_select(score, n_vis, top_k):
    """The indexer's allowed-row mask [1, cap] for one token, and on CUDA the same rows listed
    for the attention (int32 [top_k], ascending, -1 past them; None elsewhere): on CUDA one
    launch (a radix select over the visible rows), else the twin, model.select_rows (a stable
    sort of the row), whose rows are listed from its mask where the kernel would list them, so
    that the attention walks the selection the same way on either path."""
    listed = False
    if kernels.on_gpu(score) and score.shape[1] > top_k:
        from ds4tp.kernels import triton_attn
        listed = triton_attn.ATTN_ROWS
        if triton_attn.index_enabled():
            rows = torch.empty(top_k, dtype=torch.int32, device=score.device) if listed else None
            return triton_attn.topk_mask(score, n_vis, top_k, rows=rows), rows
    mask = select_rows(score, n_vis, top_k)[0]
    return mask, (_listed_rows(mask, top_k) if listed else None)


def _listed_rows(mask, top_k: int) -> torch.Tensor:
    """The rows a one-token mask [1, cap] (at most top_k set) allows, ascending, as int32
    [top_k] with -1 past them (topk_mask's list), with fixed shapes (graph capture)."""
    cap = mask.shape[1]
    idx = torch.arange(cap, device=mask.device)
    first = torch.sort(torch.where(mask[0], idx, cap)).values[:top_k]
    return torch.where(first < cap, first, -1).to(torch.int32)


def decode_attention_torch(qb, ring, ring_pos, comp, ratio, mask, sinks, cos_t, sin_t, pos, s):
    """One token's heads: per-head RMS norm and RoPE of q, attention with sinks over the raw
    window and the visible compressed rows (or those `mask` selects), inverse RoPE."""
    D = ring.shape[1]
    cos, sin = cos_t[pos][:, None], sin_t[pos][:, None]
    q = rope_tail(rms_norm(qb.view(1, -1, D)), cos, sin)
    if comp is not None and mask is None:
        mask = torch.arange(comp.shape[0], device=pos.device)[None, :] < ((pos + 1) // ratio)[:, None]
    o = attend(q, ring, ring_pos, comp, mask, pos, sinks, s)
    return rope_tail(o, cos, sin, inverse=True)


def decode_attention(qb, ring, ring_pos, comp, ratio, mask, sinks, cos_t, sin_t, pos, s, rows=None):
    """decode_attention_torch's result; rows (CUDA: indexer_select's list of the rows mask sets)
    lets the kernel walk only those."""
    if kernels.on_gpu(qb):
        from ds4tp.kernels import triton_attn
        return triton_attn.attention(qb, ring, ring_pos, comp, ratio, mask, sinks, cos_t, sin_t,
                                     pos, C.RMS_EPS, rows=rows)
    return decode_attention_torch(qb, ring, ring_pos, comp, ratio, mask, sinks, cos_t, sin_t, pos, s)


def _load_front(front: _Frontier, cs, n: int, r: int) -> None:
    """Rebuild ds4's frontier layout from a CompressorState (positions [start, n))."""
    kv, sc = cs.kv.view(), cs.sc.view()
    front.kv.zero_()
    front.sc.fill_(C.NEG_INF)
    if kv.shape[0]:      # one indexed copy for all rows (a ratio-128 window holds up to 127)
        slots = torch.tensor([_front_slot(cs.start + i, n, r) for i in range(kv.shape[0])],
                             dtype=torch.long, device=front.kv.device)
        front.kv[slots] = kv
        front.sc[slots] = sc


def _front_slot(p: int, n: int, r: int) -> int:
    """Frontier row of position p after n tokens: ratio 4 keeps the last complete window in
    rows 0-3 and the current one in rows 4-7; ratio 128 the current window."""
    if r == 4:
        return 4 + p % 4 if p >= (n // 4) * 4 else p % 4
    return p % r


def _store_front(front: _Frontier, cs, n: int, r: int) -> None:
    from ds4tp.model import Rows
    start = max(0, (n // r - (1 if r == 4 else 0)) * r)
    slots = torch.tensor([_front_slot(p, n, r) for p in range(start, n)], dtype=torch.long,
                         device=front.kv.device)
    width = front.kv.shape[1]
    cs.kv, cs.sc = Rows(width, front.kv.device, cap=2 * r), Rows(width, front.kv.device, cap=2 * r)
    if len(slots):
        cs.kv.append(front.kv[slots])
        cs.sc.append(front.sc[slots])
    cs.start = start
