"""Can NCCL all-reduces be captured in a CUDA graph here, and what does one cost?

Two ranks (one GPU each). Eager all-reduce of a 16 KB row (one decode step's payload) is timed,
then 86 of them (one token's worth) are captured in a CUDA graph after an eager warm-up on the
capture stream (the communicator exists before capture), replayed and timed, and the sums
checked. Each rank arms a faulthandler watchdog so a hung capture ends the process instead of
the machine's time. Prints one JSON line per rank.
"""
import faulthandler
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, world, port, q):
    faulthandler.dump_traceback_later(90, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=dev)
    x = torch.ones(1, 4096, device=dev)
    out = {"rank": rank}
    for _ in range(20):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    out["eager_us"] = 1e6 * (time.perf_counter() - t) / n
    # graph capture on a side stream, communicator already warm
    y = torch.ones(1, 4096, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            dist.all_reduce(y)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        t = time.perf_counter()
        with torch.cuda.graph(g):
            for _ in range(86):
                y.mul_(0.5)
                dist.all_reduce(y)
        out["capture_s"] = time.perf_counter() - t
        y.fill_(1.0)
        g.replay()
        torch.cuda.synchronize()
        out["graph_value_ok"] = bool(torch.allclose(y, torch.ones_like(y)))   # (x*0.5)*2 = x
        reps = 50
        t = time.perf_counter()
        for _ in range(reps):
            g.replay()
        torch.cuda.synchronize()
        out["graph_us_per_allreduce"] = 1e6 * (time.perf_counter() - t) / (reps * 86)
        out["graph_ok"] = True
    except Exception as e:
        out["graph_ok"] = False
        out["graph_error"] = repr(e)[:500]
    q.put(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    import socket
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    ps = [ctx.Process(target=rank_main, args=(r, 2, port, q)) for r in range(2)]
    for p in ps:
        p.start()
    res = []
    try:
        for _ in range(2):
            res.append(q.get(timeout=150))
    except Exception as e:
        res.append({"error": f"no result: {e!r}"})
    for p in ps:
        p.join(20)
        if p.is_alive():
            p.kill()
    print(json.dumps({"nccl_graph_probe": res}))
    sys.exit(0)
