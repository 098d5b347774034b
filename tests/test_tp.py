"""Tensor parallelism: the shard plan, per-rank loading, collective counts, failure handling."""
from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest
import torch

from ds4tp import config as C
from ds4tp.bench import captured
from ds4tp.comm import CommError, free_port, init_dist, nccl_defaults, run_local_ranks
from ds4tp.gguf_file import open_ds4
from ds4tp.qtensor import QTensor
from ds4tp.shard.load import held_bytes, load_rank, rank_bytes_view
from ds4tp.shard.plan import PlanError, make_plan, plan_for_file, verify_plan
from ds4tp.synth import write_synthetic


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("tp") / "tiny.gguf"
    write_synthetic(p, C.TINY, seed=5)
    return p


def test_full_plan_halves_the_bytes():
    p1, p2 = make_plan(C.FULL, 1), make_plan(C.FULL, 2)
    verify_plan(p2)
    verify_plan(make_plan(C.FULL, 4))
    verify_plan(make_plan(C.FULL, 8))
    tp1 = p1.token_bytes(0)
    assert tp1 == 9_193_024_420          # spec 18.3, TP=1, indexer off
    for r in range(2):
        assert p2.token_bytes(r) <= 0.56 * tp1
    assert p2.routed_mode == "ff"        # the full model splits the expert FFN width
    # every input-dim split lands on a block boundary (verify_plan checks; spot-check two)
    t = p2.by_name()
    assert t["blk.5.ffn_down_exps.weight"].ranges == [(0, 1024), (1024, 2048)]
    assert t["blk.5.attn_output_b.weight"].ranges == [(0, 4096), (4096, 8192)]


def test_tiny_plan_uses_whole_experts():
    p = make_plan(C.TINY, 2)
    verify_plan(p)
    t = p.by_name()["blk.0.ffn_down_exps.weight"]
    assert p.routed_mode == "experts" and t.split.kind == "experts" and "Q2_K" in t.note
    assert make_plan(C.SMALL, 2).routed_mode == "ff"


def test_full_plan_splits_the_compressors_by_channel():
    """The compressors' kv, gate and position-bias tables are split by channel (the same range
    of each window half), which takes the per-rank bytes from spec 18.3's baseline 5.124 GB
    (compressors replicated) to 4.820 GB; their norms stay whole (applied after the gather)."""
    p = make_plan(C.FULL, 2)
    t = p.by_name()
    kv4, ape4 = t["blk.4.attn_compressor_kv.weight"], t["blk.4.attn_compressor_ape.weight"]
    assert (kv4.dim, kv4.blocks, kv4.ranges, kv4.local_shape(1)) == (0, 2, [(0, 256), (256, 512)], (512, 4096))
    assert (ape4.dim, ape4.blocks, ape4.local_shape(0)) == (1, 2, (4, 512))
    idx = t["blk.4.indexer_compressor_gate.weight"]
    assert (idx.blocks, idx.ranges) == (2, [(0, 64), (64, 128)])
    kv128 = t["blk.3.attn_compressor_kv.weight"]
    assert (kv128.blocks, kv128.local_shape(0)) == (1, (256, 4096))
    assert t["blk.4.attn_compressor_norm.weight"].dim is None
    assert [p.token_bytes(r) for r in range(2)] == [4_820_124_964] * 2


def test_plan_rejects_unaligned_world():
    with pytest.raises(PlanError):
        make_plan(C.TINY, 3)


@pytest.mark.parametrize("world", [2])
def test_union_of_rank_slices_is_the_tensor(golden, world):
    """Reassembling every rank's bytes gives back exactly the original bytes of every tensor."""
    f = open_ds4(golden("small-a.gguf"))
    plan = plan_for_file(f, world)
    verify_plan(plan)
    for tp in plan.tensors:
        info = f.tensors[tp.name]
        whole = np.asarray(f.tensor_bytes(tp.name))
        parts = [np.ascontiguousarray(rank_bytes_view(f, tp, r)) for r in range(world)]
        if tp.dim is None:
            assert all(np.array_equal(p.reshape(-1), whole) for p in parts), tp.name
            continue
        row_bytes = C.nbytes_of(tp.qtype, tp.shape[-1])
        axis = tp.dim if tp.dim < len(tp.shape) - 1 else len(tp.shape) - 1
        if tp.blocks > 1:      # a channel split: every rank's range of block 0, then block 1...
            parts = [p.reshape(*p.shape[:axis], tp.blocks, -1, *p.shape[axis + 1:]) for p in parts]
            glued = np.concatenate(parts, axis=axis + 1)
            glued = glued.reshape(*glued.shape[:axis], -1, *glued.shape[axis + 2:])
        else:
            glued = np.concatenate(parts, axis=axis)
        assert np.array_equal(glued.reshape(-1), whole), tp.name
        assert sum(p.size for p in parts) == info.nbytes == whole.size
        assert glued.shape[-1] == row_bytes


def test_rank_holds_only_its_share(tiny_path):
    f = open_ds4(tiny_path)
    plan = plan_for_file(f, 2)
    for r in range(2):
        tensors = load_rank(f, plan, r)
        held = held_bytes(tensors)
        assert held == plan.load_bytes(r)
        assert held < 0.7 * f.total_tensor_bytes
        for name, t in tensors.items():   # own storage: copies of this rank's bytes, not mmap views
            raw = t.raw if isinstance(t, QTensor) else t
            assert raw.untyped_storage().nbytes() <= max(raw.numel() * raw.element_size(), 8) * 2, name
    # rank 0 and rank 1 hold different halves of a split tensor
    a = load_rank(f, plan, 0)["blk.0.attn_q_b.weight"].raw
    b = load_rank(f, plan, 1)["blk.0.attn_q_b.weight"].raw
    assert a.shape == b.shape and not torch.equal(a, b)


def _count_rank(comm, device, path, n_prompt):
    from ds4tp.model import DS4Model
    m = DS4Model.load(path, rank=comm.rank, world=comm.world, comm=comm, device=device)
    st = m.new_state()
    m.forward(list(range(3, 3 + n_prompt)), st)
    comm.counter.reset()
    m.forward([7], st)
    ratios = [m.shape.ratio(il) for il in range(m.shape.n_layer)]
    return dict(comm.counter.counts), m.plan.collectives_per_token(
        indexer_active_layers=sum(1 for r in ratios if r == 4 and (st.n // 4) > m.shape.indexer_top_k),
        emitting_layers=sum(1 for r in ratios if r and st.n % r == 0))


@pytest.mark.parametrize("n_prompt", [5, 70, 7, 127])
def test_collectives_per_decoded_token(tiny_path, n_prompt):
    """2 all-reduces per layer + the logits gather; + one per active indexer (pos >= 67 here);
    + a gather per layer whose compressors' windows the token ends (split by channel; one for
    both compressors of a ratio-4 layer): at position 7 the two ratio-4 layers, at 127 the two
    ratio-128 layers too."""
    counts, planned = run_local_ranks(2, _count_rank, str(tiny_path), n_prompt)
    assert counts == planned
    extra = 2 if n_prompt >= 67 else 0
    gathers = {5: 0, 70: 0, 7: 2, 127: 4}[n_prompt]
    assert counts == {"all_reduce": 2 * C.TINY.n_layer + extra, "all_gather": 1 + gathers}


def _lonely_rank(port, q):
    t = time.monotonic()
    try:
        init_dist(0, 2, master_addr="127.0.0.1", master_port=port, timeout_s=4)
        q.put(("joined", time.monotonic() - t))
    except CommError as e:
        q.put(("error", str(e), time.monotonic() - t))


def test_rank_that_never_joins_gives_clear_error():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_lonely_rank, args=(free_port(), q))
    p.start()
    status, *rest = q.get(timeout=60)
    p.join(10)
    assert status == "error", rest
    msg, elapsed = rest
    assert "could not join" in msg and elapsed < 30


def _dying_rank(rank, port, q):
    comm = init_dist(rank, 2, master_addr="127.0.0.1", master_port=port, timeout_s=10)
    if rank == 1:
        import os
        os._exit(3)                               # dies without a word
    t = time.monotonic()
    try:
        for _ in range(200):
            comm.all_reduce(torch.ones(4))
            time.sleep(0.05)
        q.put(("no error", "", time.monotonic() - t))
    except CommError as e:
        q.put(("error", str(e), time.monotonic() - t))


def test_peer_death_is_an_error_not_a_hang():
    """Rank 1 dies after joining; rank 0's next collective fails with CommError, in bounded time."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_dying_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        status, msg, elapsed = q.get(timeout=90)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert status == "error", msg
    assert "all_reduce failed" in msg and elapsed < 30


def _gather_rank(comm, device):
    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(2, 3, 5, generator=g)            # each rank's own values
    return {d: comm.all_gather(x, dim=d) for d in (0, 1, 2, -1)}, (comm.peer, comm.peer_why)


def test_all_gather_concatenates_in_rank_order_along_any_dim():
    """DistComm.all_gather is torch.cat of the ranks' tensors (rank order) along `dim`, whatever
    the dim (the model gathers logits and compressor rows along the last one). On gloo the
    within-host all-reduce is off, with the reason."""
    got, peer = run_local_ranks(2, _gather_rank)
    assert peer == (None, "not a CUDA process group")
    parts = [torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    for d, t in got.items():
        assert torch.equal(t, torch.cat(parts, dim=d)), d


def _replay_on(graph, x, g):
    """Fresh normal values into x, one replay, then wait for it (no eager NCCL call while a
    graph runs)."""
    x.copy_(torch.randn(x.shape, generator=g, device=x.device))
    graph.replay()
    torch.cuda.synchronize(x.device)


def _nccl_sums(x):
    """NCCL's all-reduces of the captured bodies: a = sum(2x), then sum(tanh(a) + x)."""
    import torch.distributed as dist
    a = x * 2.0
    dist.all_reduce(a)
    b = a.tanh() + x
    dist.all_reduce(b)
    return a, b


def _peer_rank(comm, dev):
    """The within-host all-reduce (kernels.cuda_allreduce) against NCCL's on the same inputs:
    eager over sizes and magnitudes and for a view off 16-byte alignment, then captured in a
    CUDA graph between other kernels and replayed on fresh inputs; NCCL's results as the
    reference, eager, after each replay."""
    import torch.distributed as dist
    assert comm.peer is not None, comm.peer_why
    g = torch.Generator(device=dev).manual_seed(1000 + comm.rank)     # each rank's own values
    equal, taken = [], []
    for n in (4, 12, 4096, 8192, 16384, 65536, 6):                    # 6: not a multiple of 4
        for scale in (1e-3, 1.0, 1e4):
            x = torch.randn(n, generator=g, device=dev) * scale
            ref = x.clone()
            dist.all_reduce(ref)
            taken.append(comm.peer.takes(x))
            got = comm.all_reduce(x)
            equal.append(bool(torch.equal(got, ref)))
    x = torch.randn(4100, generator=g, device=dev)[1:4097]         # 4 bytes past 16-aligned
    ref = x.clone()
    dist.all_reduce(ref)
    taken.append(comm.peer.takes(x))
    equal.append(bool(torch.equal(comm.all_reduce(x), ref)))
    x = torch.zeros(1, 4096, device=dev)

    def body():
        a = comm.all_reduce(x * 2.0)
        return a, comm.all_reduce(a.tanh() + x)
    graph, (a, b) = captured(body, dev)      # (one warm-up on a side stream first)
    for _ in range(20):
        _replay_on(graph, x, g)
        ra, rb = _nccl_sums(x)
        equal.append(bool(torch.equal(a, ra) and torch.equal(b, rb)))
    return equal, taken


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the within-host all-reduce)")
def test_within_host_all_reduce_gives_nccls_bits():
    """Two ranks of one host sum through each other's memory in one kernel (cuda_allreduce);
    its twin is NCCL's all-reduce, and for two ranks the sums are the same bits (a + b = b + a):
    eager at every size it takes, and replayed from a CUDA graph on fresh inputs."""
    equal, taken = run_local_ranks(2, _peer_rank, device="cuda")
    assert all(equal), equal
    assert taken == [True] * 18 + [False] * 3 + [True], taken  # 6 elements: NCCL's; a view
                                                               # off 16-byte alignment: copied


def _peer_hc_rank(comm, dev):
    """The HC step with the all-reduce inside (hc_step's peer) against NCCL's all-reduce and the
    plain HC step on its sum: eager, with ar2_sum all-reduces between (the counter and slots
    both kinds share), then captured in a CUDA graph and replayed on fresh parts."""
    import torch.distributed as dist
    from ds4tp.config import HC_EPS, RMS_EPS
    from ds4tp.kernels import triton_hc
    assert comm.peer is not None, comm.peer_why
    E = 4096
    g = torch.Generator(device=dev).manual_seed(2000 + comm.rank)    # each rank's own part
    gs = torch.Generator(device=dev).manual_seed(7)                   # the same on both ranks
    fn = ((torch.randn(24, 4 * E, generator=gs, device=dev) * 3 / (4 * E) ** 0.5).half()
          .view(torch.uint8).reshape(24, 8 * E))
    scale = torch.rand(3, generator=gs, device=dev) + 0.2
    base = torch.randn(24, generator=gs, device=dev)
    norm = torch.rand(E, generator=gs, device=dev) + 0.5

    def step(f, hc, post, m, peer):
        return triton_hc.hc_step(f, hc, post, m, fn, scale, base, norm, 4, 20, HC_EPS, RMS_EPS,
                                 mix=False, peer=peer)

    def state():
        return (torch.randn(1, 4, E, generator=gs, device=dev), torch.randn(1, 4, generator=gs, device=dev),
                torch.rand(1, 4, 4, generator=gs, device=dev))

    equal = []
    for k, mag in enumerate((1e-3, 1.0, 1e4, 1.0)):
        f = torch.randn(1, E, generator=g, device=dev) * mag
        hc, post, m = state()
        ref = f.clone()
        dist.all_reduce(ref)
        got = step(f, hc, post, m, comm.peer_sum(f))
        equal.append(all(torch.equal(a, b) for a, b in zip(got, step(ref, hc, post, m, None))))
        if k % 2:                                     # an all-reduce of its own in between
            y = torch.randn(E, generator=g, device=dev)
            r = y.clone()
            dist.all_reduce(r)
            equal.append(bool(torch.equal(comm.all_reduce(y), r)))
    f = torch.zeros(1, E, device=dev)
    hc, post, m = state()

    def body():
        a = comm.all_reduce(f * 2.0)
        part = a.tanh() + f
        return a, step(part, hc, post, m, comm.peer_sum(part))
    graph, (a, got) = captured(body, dev)
    for _ in range(10):
        _replay_on(graph, f, g)
        ra, rp = _nccl_sums(f)
        want = step(rp, hc, post, m, None)
        equal.append(bool(torch.equal(a, ra)) and all(torch.equal(x, y) for x, y in zip(got, want)))
    return equal


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (the within-host all-reduce)")
def test_all_reduce_inside_the_hc_step_gives_nccls_bits():
    """The decode graphs' HC step sums the sublayer's two parts itself on two ranks of one host
    (cuda_allreduce.PeerAllReduce.fused): the same bits as NCCL's all-reduce, then the plain HC
    step, eager between ar2_sum all-reduces and replayed from a CUDA graph."""
    equal = run_local_ranks(2, _peer_hc_rank, device="cuda")
    assert all(equal) and len(equal) == 4 + 2 + 10, equal


def test_nccl_defaults_fill_only_what_is_unset():
    """The NCCL settings init_dist applies before the communicator exists; an operator's own
    value (environment file, shell) wins."""
    env = {}
    assert nccl_defaults(env) == {"NCCL_GRAPH_MIXING_SUPPORT": "0"} == env
    env = {"NCCL_GRAPH_MIXING_SUPPORT": "1", "NCCL_DEBUG": "WARN"}
    assert nccl_defaults(env) == {"NCCL_GRAPH_MIXING_SUPPORT": "1"}
    assert env == {"NCCL_GRAPH_MIXING_SUPPORT": "1", "NCCL_DEBUG": "WARN"}


def _warm_rank(comm, dev, path, ctxs):
    from ds4tp.model import DS4Model
    from ds4tp.worker.runtime import Runtime
    m = DS4Model.load(path, rank=comm.rank, world=comm.world, comm=comm)
    rt = Runtime(m, comm, ctx=ctxs[comm.rank], fast_decode=True)
    try:
        return rt.warm_up(lengths=(2, 5))
    except RuntimeError as e:
        return str(e)


def test_warm_up_at_tp2_runs_the_same_steps_on_both_ranks(tiny_path):
    """Runtime.warm_up at TP=2 (gloo): its prefills and decode variants run collectives, so both
    ranks must run the same ones; ranks started with different contexts get a clear error, not a
    hang in a mismatched collective."""
    done = run_local_ranks(2, _warm_rank, str(tiny_path), (64, 64))
    assert done["prefill"] == [2, 5, "+5", "+3"] and done["decode_variants"] == 2, done
    msg = run_local_ranks(2, _warm_rank, str(tiny_path), (64, 96))
    assert msg == "the ranks were started with different --ctx: [64, 96]"


def _lookahead_rank(comm, dev, path, ahead, decoders=2, graph_feed=0):
    from ds4tp.model import DS4Model
    from ds4tp.worker.runtime import Runtime
    from ds4tp.worker.sampling import SamplingParams
    m = DS4Model.load(path, rank=comm.rank, world=comm.world, comm=comm)
    rt = Runtime(m, comm, ctx=64, fast_decode=True, lookahead=ahead, decoders=decoders,
                 graph_feed=graph_feed)
    params = {"a": SamplingParams(), "b": SamplingParams(temperature=0.8, top_p=0.9, seed=11)}
    toks = {"a": [0, 5, 9, 14], "b": [0, 3]}
    for sid in toks:
        toks[sid].append(rt.prefill(1, sid, toks[sid], params=params[sid]).sample.token)
    for step in range(1, 7):
        for sid in toks:          # interleaved: one lane each (one decoder: parked and resumed)
            r = rt.decode(10 * step + len(sid), sid, [toks[sid][-1]], step, params[sid],
                          lookahead=step < 6)
            toks[sid].append(r.sample.token)
    rt.release(90, "b")
    for step in range(7, 13):     # "a" alone, greedy: its steps chain (queued on the device's pick)
        r = rt.decode(100 + step, "a", [toks["a"][-1]], step, params["a"], lookahead=step < 12)
        toks["a"].append(r.sample.token)
    rt.release(99, "a")
    return toks, rt.steps, rt.chained


def test_lookahead_at_tp2_gives_the_same_tokens(tiny_path):
    """Lookahead at TP=2 (gloo): both ranks feed the same token ahead (each operation's digest
    agreement would fail otherwise), and the tokens are those without lookahead, with two
    decoders or one (parking); steps with a token fed ahead chain (queued on a token the host
    has not read). Prompts fed as graph steps run on both ranks alike."""
    on = run_local_ranks(2, _lookahead_rank, str(tiny_path), True)
    off = run_local_ranks(2, _lookahead_rank, str(tiny_path), False)
    one = run_local_ranks(2, _lookahead_rank, str(tiny_path), True, 1)    # one decoder, parking
    assert on[:2] == off[:2] == one[:2]
    assert on[2] == one[2] == 2 * 4 + 4 and off[2] == 0   # every step with a token fed ahead
    # the prompts fed as graph steps (Runtime.graph_feed): both ranks take the same path (their
    # digests would disagree otherwise), and the same steps chain
    fed = run_local_ranks(2, _lookahead_rank, str(tiny_path), True, 2, 4)
    assert fed[1] == on[1] and fed[2] == on[2]
