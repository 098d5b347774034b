"""The Triton side of programmatic dependent launch (ds4tp.kernels.pdl): a decode kernel takes
`PDL: tl.constexpr = False`, calls `pdl_start(PDL)` first, and is launched with
`**pdl.triton_args(device)` (PDL and launch_pdl set together, or PDL=False)."""
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:           # an older Triton: pdl.triton_args never sets PDL there
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Let the next kernel launch (all of this one's programs are resident), then wait for the
    kernel ahead to finish: nothing before it reads an earlier kernel's output."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
