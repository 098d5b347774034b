"""The Triton whole-matrix dequantiser against ds4tp.dequant (exact), on fresh random blocks:
on CUDA when present, and always under Triton's CPU interpreter (small shapes, subprocess)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

CASES = textwrap.dedent('''
    import torch
    from ds4tp import config as C
    from ds4tp.dequant import dequantize
    from ds4tp.kernels import triton_dequant as td
    from ds4tp.qtensor import QTensor

    def rand_q(qtype, lead, n_in, dev, g):
        epb, bpb = C.BLOCK[qtype]
        raw = torch.randint(0, 256, (*lead, n_in // epb * bpb), generator=g, dtype=torch.uint8)
        if qtype in (C.Q8_0, C.IQ2_XXS):      # sane f16 scales
            raw.view(-1, bpb)[:, 0:2] = torch.tensor([0x00, 0x2c], dtype=torch.uint8)
        if qtype == C.Q2_K:
            raw.view(-1, bpb)[:, 80:84] = torch.tensor([0x00, 0x2c, 0x66, 0x2e], dtype=torch.uint8)
        if qtype == C.F16:
            raw = torch.randn(*lead, n_in, generator=g).half().view(torch.uint8).reshape(*lead, n_in * 2)
        return raw.to(dev)

    def run(dev):
        g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
        n = 0
        for qtype in (C.Q8_0, C.Q2_K, C.IQ2_XXS, C.F16):
            for lead, n_in in (((3,), 512), ((2, 5), 256)):
                raw = rand_q(qtype, lead, n_in, dev, g)
                w = QTensor(qtype, (*lead, n_in), raw)
                got = td.launch(w)
                want = dequantize(raw, qtype, n_in)
                assert torch.equal(got, want), (C.type_name(qtype), lead, (got - want).abs().max())
                n += 1
            # a column shard (strided rows), as TP=2 down projections hold
            epb, bpb = C.BLOCK[qtype]
            raw = rand_q(qtype, (4,), 1024, dev, g)
            half = raw[:, (512 // epb) * bpb:]
            w = QTensor(qtype, (4, 512), half)
            assert torch.equal(td.launch(w), dequantize(half, qtype, 512)), C.type_name(qtype)
            n += 1
        return n
''')


try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install triton)")
def test_interpreter_matches_dequant():
    code = CASES + "\nprint('cases', run('cpu'))\n"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cases 12" in r.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_dequant():
    ns = {}
    exec(CASES, ns)
    assert ns["run"]("cuda") == 12
