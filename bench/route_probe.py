"""Where the expert choice made in the routed gate/up launch (cuda_experts.swiglu_routed) and the
choice's own launch (triton_route) part ways in a decode step of a 4-layer full-width model
(the graph test's model): every call of the fused path is checked against the own launch on the
same inputs (ids, weights, mid, gate|up), eagerly and then through the graphs; and how far the
logits move when the own launch's weights are each moved up by one ulp.

    python3 bench/route_probe.py [--steps 3]
"""
from __future__ import annotations

import argparse

import torch

from ds4tp import config as C
from ds4tp import model as M
from ds4tp.bench import build_model
from ds4tp.comm import SingleComm
from ds4tp.decode_graph import StaticDecoder
from ds4tp.kernels import cuda_experts as ce
from ds4tp.kernels import triton_route


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    m = build_model(C.Shape(n_layer=4), 0, 1, SingleComm(), "cuda:0")
    for lw in m.w.layers:
        t = lw.tid2eid
        print(f"layer {lw.il}: tid2eid {None if t is None else (t.dtype, tuple(t.shape), t.stride(), t.is_contiguous())}"
              f" bias {None if lw.router_bias is None else tuple(lw.router_bias.shape)}")
    toks = [(37 * i + 11) % m.shape.vocab for i in range(2 + a.steps)]
    st = m.new_state()
    ce.set_route_enabled(False)
    m.forward(toks[:1], st)
    ce.set_route_enabled(True)

    fused = M.expert_swiglu_routed
    calls = []

    def checked(w_gate, w_up, w_sh, xn, logits, bias, tid2eid, tokens, k, floor, scale, clamp):
        got = fused(w_gate, w_up, w_sh, xn, logits, bias, tid2eid, tokens, k, floor, scale, clamp)
        if got is None or torch.cuda.is_current_stream_capturing():
            return got
        mid, gu, ids, w = got
        ids_t, w_t = triton_route.route(logits, bias, tid2eid, tokens.reshape(-1)[-1:], k, floor, scale)
        hashed = tid2eid[tokens.reshape(-1)[-1:]] if tid2eid is not None else None
        ids_r, w_r = M.route_select(logits, bias, hashed, k)
        mid_s, gu_s = ce.swiglu(w_gate, w_up, xn, ids, w, clamp, shared=w_sh)       # its own choice
        mid_t, gu_t = ce.swiglu(w_gate, w_up, xn, ids_t, w_t, clamp, shared=w_sh)   # the own launch's
        torch.cuda.synchronize()
        calls.append(dict(hash=tid2eid is not None, tok=tokens.reshape(-1)[-1:].tolist(),
                          ids=ids.tolist(), ids_t=ids_t.tolist(), ids_r=ids_r.tolist(),
                          dw_t=float((w - w_t).abs().max()), dw_r=float((w - w_r).abs().max()),
                          w=[round(v, 6) for v in w[0].tolist()],
                          mid_self=float((mid - mid_s).abs().max()), mid_t=float((mid - mid_t).abs().max()),
                          gu_t=float((gu - gu_t).abs().max()), mid_max=float(mid_t.abs().max())))
        return got

    M.expert_swiglu_routed = checked
    choose = M.choose

    def one_ulp_up(lw, logits, tokens, s):
        ids, w = choose(lw, logits, tokens, s)
        return ids, torch.nextafter(w, torch.full_like(w, float("inf")))

    ce.set_route_enabled(False)              # how far one ulp of every weight moves the logits
    runs = []
    for fn in (choose, one_ulp_up):
        M.choose = fn
        dec = StaticDecoder(m, max_ctx=64, use_graphs=False)
        dec.load_session(st.clone())
        runs.append(torch.stack([dec.step(t).clone() for t in toks[1:1 + a.steps]]))
    M.choose = choose
    d = (runs[0] - runs[1]).abs()
    print(f"own launch, every weight one ulp up: logits max |d| per step "
          f"{[round(float(v), 5) for v in d.amax(-1)]} of max {float(runs[0].abs().max()):.3f}")
    for graphs in (False, True):
        runs = []
        for on in (True, False):
            ce.set_route_enabled(on)
            calls.clear()
            dec = StaticDecoder(m, max_ctx=64, use_graphs=graphs)
            dec.load_session(st.clone())
            runs.append(torch.stack([dec.step(t).clone() for t in toks[1:1 + a.steps]]))
            if on and not graphs:
                for i, c in enumerate(calls):
                    print(f"eager call {i}: {c}")
        ce.set_route_enabled(True)
        d = (runs[0] - runs[1]).abs()
        print(f"graphs={graphs}: logits route in gate/up vs own launch: max |d| per step "
              f"{[round(float(v), 5) for v in d.amax(-1)]} of max {float(runs[1].abs().max()):.3f}")
    M.expert_swiglu_routed = fused


if __name__ == "__main__":
    main()
