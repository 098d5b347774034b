"""Shared by the profile scripts: every GPU kernel of a torch.profiler run, by name."""


def kernel_table(prof, n_layer: int, top: int, what: str) -> None:
    """Print the launch count and GPU time of `what`, then the `top` kernels by total time."""
    kern = {}
    for ev in prof.events():
        if str(getattr(ev, "device_type", "")).endswith("CUDA") and ev.device_time_total > 0:
            k = kern.setdefault(ev.name[:90], [0, 0.0])
            k[0] += 1
            k[1] += ev.device_time_total
    tot_n = sum(v[0] for v in kern.values())
    tot_us = sum(v[1] for v in kern.values())
    print(f"GPU kernels in {what}: {tot_n} launches, {tot_us / 1e3:.2f} ms GPU time "
          f"({n_layer} layers: {tot_n / n_layer:.0f} launches per layer)")
    for name, (n, us) in sorted(kern.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{us:10.1f} us {n:6d}x {us / n:9.2f} us  {name}")
