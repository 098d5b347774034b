"""Prefill attention in query chunks (model.query_chunks) equals one call over all queries."""
import torch

from ds4tp import config as C
from ds4tp.model import attend, query_chunks


def test_query_chunks_match_one_call():
    s = C.Shape(n_layer=1, n_embd=64, n_head=4, head_dim=32, n_rot=8, n_swa=8)
    g = torch.Generator().manual_seed(0)
    for raw_prev, T, chunk in ((0, 29, 7), (5, 20, 4), (8, 9, 16), (3, 1, 7)):
        p0 = 40
        q = torch.randn(T, s.n_head, s.head_dim, generator=g)
        raw = torch.randn(raw_prev + T, s.head_dim, generator=g)
        raw_pos = torch.arange(p0 - raw_prev, p0 + T)
        pos = torch.arange(p0, p0 + T)
        comp = torch.randn(6, s.head_dim, generator=g)
        mask = torch.rand(T, 6, generator=g) < 0.6
        sinks = torch.randn(s.n_head, generator=g)
        whole = attend.eager(q, raw, raw_pos, comp, mask, pos, sinks, s)
        parts = list(query_chunks(T, raw_prev, s.n_swa, chunk))
        assert parts[0][0] == 0 and parts[-1][1] == T
        for a, b, lo, hi in parts:          # every row a query of the chunk may see is kept
            assert lo <= max(0, raw_prev + a - s.n_swa + 1) and hi == raw_prev + b
        got = torch.cat([attend.eager(q[a:b], raw[lo:hi], raw_pos[lo:hi], comp, mask[a:b], pos[a:b],
                                      sinks, s) for a, b, lo, hi in parts])
        torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)
        # a chunk that dropped one visible row would differ
        if T > chunk and raw_prev + chunk - s.n_swa >= 0:
            a, b, lo, hi = parts[1]
            bad = attend.eager(q[a:b], raw[lo + 1:hi], raw_pos[lo + 1:hi], comp, mask[a:b], pos[a:b], sinks, s)
            assert not torch.allclose(bad, whole[a:b], atol=1e-4)


def test_rows_append_and_drop_keep_order():
    """model.Rows (the caches' and compressors' row store) against a plain list under random
    appends (growing and compacting its buffer) and drops of the oldest rows."""
    import random

    from ds4tp.model import Rows
    rnd = random.Random(0)
    rows, ref = Rows(3, "cpu", cap=4), []
    for _ in range(2000):
        if rnd.random() < 0.55:
            new = torch.randn(rnd.choice([1, 1, 2, 5, 9]), 3)
            rows.append(new)
            ref += list(new)
        else:
            k = rnd.randint(0, 6)
            rows.drop_front(k)
            ref = ref[k:]
        assert rows.n == len(ref) and rows.view().shape == (len(ref), 3)
        if ref:
            assert torch.equal(rows.view(), torch.stack(ref))
