"""Independent work of one step on a second CUDA stream, so that it overlaps the main stream.

Within a layer some work does not depend on the rest until a join point: the compressors run
beside the query path, the HC mixer's Sinkhorn beside the sublayer (where it does not ride in
the sublayer's last launch: decode_graph's mix ride), and the shared expert beside
the router and the routed experts (where it does not ride in the routed launches: model.ffn). Each of those
launches leaves most of the GPU's bandwidth unused (small matrices, few programs), so running
them side by side shortens the step (where both fit: two launches that each fill the GPU in
one wave of blocks mostly run one after the other, which lane priorities below arrange;
bench/critical_path.py). Inside a CUDA-graph capture the fork and join become parallel
branches of the graph.

    side = Side(x, enabled)      # the side stream starts after all work queued so far
    with side:
        ...                      # queued on the side stream
    ...                          # main stream, concurrently
    side.join()                  # main waits for the side work

Work on one side stream runs in order; `Side(x, lane=1)` takes a second side stream, so that
work there does not queue behind the first's (the decode graphs' HC mixer runs on lane 1,
beside the compressors on lane 0; the shared expert, when it has launches of its own, runs on
lane 2, whose priority is above the main stream's: its blocks are placed before the routed
experts' that wait for SMs).

Off CUDA, or when disabled, both are no-ops and the work runs in program order. Tensors made on
the side stream and used on the main stream are only read after the join, and every fork waits
for the main stream, so the caching allocator's per-stream reuse stays safe.
"""
from __future__ import annotations

import torch

_SIDE: dict = {}      # (device index, main stream handle, lane, priority) -> a side stream

# The CUDA priority of each lane's side stream (lower is higher; 0 is the default, which the
# decode graphs' main stream also has: decode_graph.CAPTURE_PRIORITY). Where kernels of two
# streams wait for SMs, the higher priority's blocks are placed first.
LANE_PRIORITY = (0, 0, -1)


def _side_stream(device: torch.device, main, lane: int) -> "torch.cuda.Stream":
    prio = LANE_PRIORITY[lane]
    key = (device.index, main.cuda_stream, lane, prio)
    s = _SIDE.get(key)
    if s is None:
        s = _SIDE[key] = torch.cuda.Stream(device, priority=prio)
    return s


class Side:
    def __init__(self, x: torch.Tensor, enabled: bool = True, lane: int = 0):
        """lane: which side stream (work on one lane runs in order; lanes run side by side)."""
        self.on = bool(enabled) and x.is_cuda and not torch.compiler.is_compiling()
        self._ctx = None
        if self.on:
            self.main = torch.cuda.current_stream(x.device)
            self.stream = _side_stream(x.device, self.main, lane)
            self.stream.wait_stream(self.main)

    def __enter__(self):
        if self.on:
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
            self._ctx = None
        return False

    def join(self) -> None:
        if self.on:
            self.main.wait_stream(self.stream)
