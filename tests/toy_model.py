"""A stand-in for DS4Model with the same interface, for tests of the serving machinery.

Its logits are a deterministic function of the whole token history (a rolling hash seeds a
normal draw), so two states agree exactly when they consumed the same tokens, prefix reuse is
observable, and it records every forward call. With a DistComm it all-gathers half of the logits
from each rank, so the collectives of a real tensor-parallel forward happen (and fail when a
peer dies).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from ds4tp.config import Shape

TOY_SHAPE = Shape(n_layer=1, n_embd=256, vocab=3072, n_head=8, head_dim=256, n_out_group=2,
                  q_lora=128, o_lora=128, n_expert=16, n_ff_exp=256, n_swa=32, n_indexer_head=8,
                  indexer_top_k=16)
_MASK = (1 << 63) - 1


@dataclass
class ToyState:
    n: int = 0
    h: int = 0

    def clone(self) -> "ToyState":
        return copy.deepcopy(self)


class ToyModel:
    def __init__(self, shape: Shape = TOY_SHAPE, comm=None, scale: float = 3.0,
                 delay_s: float = 0.0):
        self.shape, self.comm, self.scale = shape, comm, scale
        self.delay_s = delay_s          # per forward call: a slow model for timing tests
        self.calls: list[list[int]] = []

    @classmethod
    def load(cls, path, rank=0, world=1, comm=None, device="cpu"):
        return cls(comm=comm)

    def new_state(self) -> ToyState:
        return ToyState()

    def _logits(self, h: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(h)
        full = torch.randn(self.shape.vocab, generator=g) * self.scale
        if self.comm is None or self.comm.world == 1:
            return full
        part = full.chunk(self.comm.world)[self.comm.rank].contiguous()
        return self.comm.all_gather(part, dim=0)

    def forward(self, tokens: list[int], st: ToyState, all_logits: bool = False) -> torch.Tensor:
        self.calls.append(list(tokens))
        if self.delay_s:
            time.sleep(self.delay_s)
        rows = []
        for i, t in enumerate(tokens):
            st.h = (st.h * 1000003 + int(t) + 1) & _MASK
            st.n += 1
            if all_logits or i == len(tokens) - 1:
                rows.append(self._logits(st.h))
        return torch.stack(rows) if all_logits else rows[-1]


@dataclass
class ScriptState:
    n: int = 0
    k: int = 0          # how many script tokens the state has consumed in a row

    def clone(self) -> "ScriptState":
        return copy.deepcopy(self)


class ScriptedModel:
    """Says `script`, then `end`, whatever the prompt: the logits favour script[k] once the state
    has consumed script[:k] in a row (any other token restarts the script)."""

    def __init__(self, script: list[int], end: int, shape: Shape = TOY_SHAPE):
        self.script, self.end, self.shape = list(script), end, shape
        self.calls: list[list[int]] = []

    def new_state(self) -> ScriptState:
        return ScriptState()

    def forward(self, tokens, st: ScriptState, all_logits: bool = False) -> torch.Tensor:
        assert not all_logits
        self.calls.append(list(tokens))
        for t in tokens:
            st.n += 1
            st.k = st.k + 1 if st.k < len(self.script) and t == self.script[st.k] else 0
        logits = torch.zeros(self.shape.vocab)
        # 100 above the rest: sampling at temperature 1 picks it with probability 1 - 1e-40 per
        # step (at 20, a 119-token script strayed once in ~1,300 requests, restarted, and ran
        # into max_tokens)
        logits[self.script[st.k] if st.k < len(self.script) else self.end] = 100.0
        return logits
