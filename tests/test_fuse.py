"""@fused functions: their torch.compile form (CUDA) against the plain form, on fresh inputs.

Without CUDA, dynamo still traces each one whole (fullgraph, eager backend): a function that
would graph-break or fail to trace on the GPU fails here first.
"""
from __future__ import annotations

import pytest
import torch

from ds4tp import config as C
from ds4tp.fuse import static_shapes
from ds4tp.model import (attend, hc_combine_torch, hc_flat, hc_post_torch, hc_split, kv_row_quant,
                         local_expert_ids, route_select, select_rows)
from ds4tp.numerics import (fp4_e2m1_blocks, fp8_e4m3_blocks, hadamard_fp4, rms_norm, rope_cos_sin,
                            rope_tail, softplus, swiglu_clamped)

S = C.TINY


def cases(dev):
    g = torch.Generator(device="cpu").manual_seed(torch.seed() % (1 << 31))
    r = lambda *sh: torch.randn(*sh, generator=g).to(dev)
    pos = torch.tensor([37, 38], device=dev)
    cos, sin = rope_cos_sin(pos, 64, True)
    raw_pos = torch.arange(10, 42, device=dev)
    return [
        ("fp8", fp8_e4m3_blocks, (r(2, 192) * 3,)),
        ("fp4", fp4_e2m1_blocks, (r(3, 128),)),
        ("hadamard_fp4", hadamard_fp4, (r(2, 4, 128),)),
        ("rms_norm", rms_norm, (r(2, 256), r(256))),
        ("softplus", softplus, (r(2, 16) * 15,)),
        ("swiglu", swiglu_clamped, (r(2, 6, 64) * 8, r(2, 6, 64) * 8, 10.0)),
        ("rope", rope_tail, (r(2, 8, 256), cos[:, None], sin[:, None], True)),
        ("hc_split", hc_split, (r(2, 24), r(3).abs(), r(24), 4, 20)),
        ("hc_post", hc_post_torch, (r(2, 256), r(2, 4, 256), r(2, 4), r(2, 4, 4))),
        ("kv_row_quant", kv_row_quant, (r(2, 256), S)),
        ("select_rows", select_rows, (r(2, 40), torch.tensor([20, 40], device=dev), 16)),
        ("hc_flat", hc_flat, (r(2, 4, 256),)),
        ("hc_combine", hc_combine_torch, (r(2, 24), r(3).abs(), r(24), r(2, 4, 256), r(256), 4, 20)),
        ("route_select", route_select, (r(2, 16) * 3, r(16) * 0.1, None, 6)),
        ("route_hashed", route_select, (r(2, 16) * 3, None, torch.tensor([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]], device=dev), 6)),
        ("local_expert_ids", local_expert_ids, (torch.tensor([[3, 9, 12, 15, 1, 8]], device=dev).expand(2, 6).contiguous(), 8, 8)),
        ("attend", attend, (r(2, 8, 256) * 0.3, r(32, 256), raw_pos, r(9, 256), torch.rand(2, 9, generator=g).to(dev) > 0.3,
                            pos, r(8), S)),
    ]


def _close(a, b, name):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            _close(x, y, name)
        return
    if a.dtype in (torch.bool, torch.int64):
        assert torch.equal(a, b), name
    else:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=name)


def test_compiles_only_inside_static_shapes(monkeypatch):
    """The dispatch takes the compiled form only inside static_shapes() (and for one CUDA token
    row): the eager model's one-token forward stays plain."""
    import ds4tp.fuse as fuse
    monkeypatch.setattr(fuse, "_decode_on_cuda", lambda args: True)
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *a: calls.append(a) or fn(*a)))
    f = fuse.fused(lambda x: x + 1)
    x = torch.zeros(1, 3)
    assert torch.equal(f(x), x + 1) and not calls
    with static_shapes():
        assert torch.equal(f(x), x + 1) and len(calls) == 1
    assert torch.equal(f(x), x + 1) and len(calls) == 1


@pytest.mark.parametrize("i", range(17))
def test_traces_whole_on_cpu(i):
    torch._dynamo.reset()
    name, fn, args = cases("cpu")[i]
    got = torch.compile(fn.eager, backend="eager", fullgraph=True)(*args)
    _close(got, fn.eager(*args), name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled form runs on GPU only)")
@pytest.mark.parametrize("i", range(17))
def test_compiled_matches_plain_on_cuda(i):
    name, fn, args = cases("cuda")[i]
    args = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == 2 else a
                 for a in args)
    # FP8/FP4 grids: a contracted multiply can move a value across a rounding tie; allow a
    # rare one-step flip there and demand closeness everywhere else
    with static_shapes():
        got = fn(*args)
    want = fn.eager(*args)
    if name in ("fp8", "fp4", "hadamard_fp4", "kv_row_quant"):
        frac = ((got - want).abs() > 1e-5 * want.abs().clamp_min(1)).float().mean().item()
        assert frac < 0.01, (name, frac)
    else:
        _close(got, want, name)
