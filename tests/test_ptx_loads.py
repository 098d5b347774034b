"""No CUDA C kernel reads an earlier kernel's output through the read-only (non-coherent) path.

Launched with PDL, a kernel is resident before the kernel ahead has written its output, so
that output is not read-only for the kernel's lifetime, which ld.global.nc requires. A
`const __restrict__` pointer lets the compiler choose that path on its own: q2k_down_sum read
stale expert ids that way and faulted in graph replays (common.cuh, `prior`; sessions 18-22).
This test compiles every .cu file to PTX (NVRTC from the test extra's nvidia-cuda-nvrtc wheel,
or nvcc; no GPU needed) and follows each ld.global.nc address back to the kernel parameters it
is computed from: only weights and tables may be among them.
"""
import ctypes
import glob
import re
import shutil
import subprocess
from pathlib import Path

import pytest

KDIR = Path(__file__).resolve().parent.parent / "ds4tp" / "kernels"
SOURCES = ("experts.cu", "matvec.cu", "experts_mma.cu", "allreduce.cu", "sample.cu")
# parameters that hold weights or constant tables: read-only for a whole step
READ_ONLY = {"wg", "wu", "grid_g", "w", "w2", "grid64", "q", "d", "nw", "sq", "sd",  # sq, sd: shared expert
             "rbias", "tid2eid",                                   # the router's bias, hash table
             "sinks", "cos_t", "sin_t"}                            # attention sinks, RoPE tables


def _nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (or the system), or None."""
    paths = []
    try:
        import nvidia
        for root in nvidia.__path__:
            paths += sorted(glob.glob(f"{root}/**/libnvrtc.so*", recursive=True))
    except ImportError:
        pass
    for name in paths + ["libnvrtc.so"]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


NVRTC = _nvrtc()
NVCC = shutil.which("nvcc")
needs_compiler = pytest.mark.skipif(
    NVRTC is None and NVCC is None,
    reason="needs NVRTC (the test extra's nvidia-cuda-nvrtc wheel) or nvcc to compile the kernels to PTX")


def ptx_of(code: str, tmp: Path) -> str:
    """PTX for sm_90 of CUDA C source (no headers: the kernels are written for NVRTC)."""
    if NVRTC is not None:
        prog = ctypes.c_void_p()
        assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"k.cu", 0, None, None) == 0
        opts = [b"--gpu-architecture=compute_90", b"--std=c++17"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = NVRTC.nvrtcCompileProgram(prog, len(opts), arr)
        if rc != 0:
            size = ctypes.c_size_t()
            NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            NVRTC.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC: {log.value.decode()[:2000]}")
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetPTXSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetPTX(prog, buf)
        NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
        return buf.value.decode()
    cu, out = tmp / "k.cu", tmp / "k.ptx"
    cu.write_text(code)
    subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-ptx", "-o", str(out), str(cu)],
                   check=True, capture_output=True, text=True)
    return out.read_text()


def kernel_params(code: str) -> dict:
    """name -> [(param name, is pointer)] of every extern "C" __global__ kernel in the source
    (a parameter list given by a macro is expanded from its #define)."""
    macros = {m.group(1): m.group(2).replace("\\\n", " ")
              for m in re.finditer(r"#define\s+(\w+)\s+((?:.*\\\n)*.*)", code)}
    out = {}
    for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\b', code):
        rest = code[m.end():]
        # the kernel's name: the first identifier followed by "(" that is not a launch bound or
        # a cluster shape
        for nm in re.finditer(r"(\w+)\s*\(", rest):
            if nm.group(1) not in ("__launch_bounds__", "__cluster_dims__"):
                break
        depth, j = 0, nm.end() - 1
        for j in range(nm.end() - 1, len(rest)):
            depth += {"(": 1, ")": -1}.get(rest[j], 0)
            if depth == 0:
                break
        plist = rest[nm.end():j].strip()
        plist = macros.get(plist, plist)
        params = []
        for p in plist.split(","):
            p = p.strip()
            params.append((re.findall(r"(\w+)\s*$", p)[0], "*" in p))
        out[nm.group(1)] = params
    return out


def _instructions(body: str):
    """An entry's instructions, one string each, without predicates, labels and directives."""
    for ln in body.splitlines():
        for part in ln.split("//")[0].split(";"):
            part = part.strip().strip("{}").strip()
            if part and not part.endswith(":") and not part.startswith("."):
                yield re.sub(r"^@!?%\w+\s+", "", part)


_NO_DEST = ("st.", "bra", "ret", "bar", "red.", "atom.", "prefetch", "cp.", "griddepcontrol",
            "membar", "fence")


def _step(ins: str, prov: dict, param_re) -> tuple:
    """(registers it writes, parameter indices flowing into them, the parameter indices behind
    its address if it is an ld.global.nc, else None) for one instruction."""
    op = ins.split()[0]
    rest = ins[len(op):]
    if op.startswith(_NO_DEST) or "%" not in rest:
        return [], set(), None
    regs_prov = lambda txt: set().union(*(prov.get(r, set()) for r in re.findall(r"%\w+", txt)))  # noqa: E731
    if op.startswith(("ld.", "ldu.")):
        addr = re.search(r"\[([^\]]*)\]", rest)
        addr = addr.group(1) if addr else ""
        if op.startswith("ld.param"):
            pm = param_re.search(addr)
            return re.findall(r"%\w+", rest.split("[")[0]), {int(pm.group(1))} if pm else set(), None
        # a loaded value is data, not an address derived from the parameters
        return [], set(), (frozenset(regs_prov(addr)) if ".nc" in op else None)
    head = rest.strip()        # dests: the first operand (or a {..} vector of them); then sources
    dest_txt, _, src_txt = head[1:].partition("}") if head.startswith("{") else head.partition(",")
    return re.findall(r"%\w+", dest_txt), regs_prov(src_txt), None


def nc_load_sources(ptx: str) -> dict:
    """kernel -> [(PTX line of an ld.global.nc, the parameter indices its address comes from)]:
    a flow-insensitive walk of each entry's register dataflow, to a fixed point."""
    result = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)\s*(?:\.maxntid[^{]*)?\{(.*?)\n\}", ptx, re.S):
        name, instrs = m.group(1), list(_instructions(m.group(3)))
        param_re = re.compile(re.escape(name) + r"_param_(\d+)")
        prov: dict = {}
        changed = True
        while changed:
            changed = False
            for ins in instrs:
                dests, src, _ = _step(ins, prov, param_re)
                for d in dests:
                    if not src <= prov.get(d, set()):
                        prov[d] = prov.get(d, set()) | src
                        changed = True
        result[name] = [(ins, srcs) for ins in instrs
                        for srcs in [_step(ins, prov, param_re)[2]] if srcs is not None]
    return result


def _down_defines(K: int, kb: int, csh: int) -> str:
    """The host's compile-time shape of the down kernel (cuda_experts.down_defines), as the
    test's NAME=VALUE list."""
    from ds4tp.kernels.cuda_experts import down_defines
    return " ".join(f"{k}={v}" for k, v in down_defines(K, kb, csh))


# the down kernel's compile-time shapes at full size: DS4's 6 slots, TP=1 (2048 inputs, the
# shared down's 2048) and TP=2 (1024, 1024); the gate/up kernel with the expert choice
# (cuda_experts.swiglu_routed), also on rows in the decode order; the prefill's kernels on those
DEFINES = {"experts.cu": ("", _down_defines(6, 8, 4), _down_defines(6, 4, 2), "A_ROUTE=1",
                          "A_ROUTE=1 A_DL=1",         # (A_DL: gate/up rows in the decode order,
                          "A_ROUTE=1 A_DL=1 A_TAB=1", "A_DL=1 A_TAB=1",    # A_TAB: its tables;
                          _down_defines(6, 8, 4) + " MIX_FIRST=0"),    # the Sinkhorn as the last block)
           "matvec.cu": ("", "MIX_FIRST=0"),
           "experts_mma.cu": ("", "IQ2_DL=1")}


@needs_compiler
@pytest.mark.parametrize("src,defines", [(s, d) for s in SOURCES for d in DEFINES.get(s, ("",))])
def test_no_read_only_path_loads_of_earlier_outputs(src, defines, tmp_path):
    code = "".join(f"#define {d.replace('=', ' ')}\n" for d in defines.split())
    code += (KDIR / "common.cuh").read_text() + "\n" + (KDIR / src).read_text()
    params = kernel_params(code)
    loads = nc_load_sources(ptx_of(code, tmp_path))
    assert set(params) == set(loads), (sorted(params), sorted(loads))
    bad = []
    for kern, found in loads.items():
        pointer = {i: n for i, (n, is_ptr) in enumerate(params[kern]) if is_ptr}
        for ins, srcs in found:
            names = {pointer[i] for i in srcs if i in pointer}
            assert names, f"{kern}: no parameter found behind {ins}"
            if not names <= READ_ONLY:
                bad.append(f"{kern}: {ins} reads from {sorted(names - READ_ONLY)}")
    assert not bad, "read-only-path loads of earlier kernels' outputs:\n" + "\n".join(bad)


@needs_compiler
def test_checker_finds_a_read_only_path_load_of_an_output(tmp_path):
    """The checker itself: a kernel that reads a const __restrict__ activation (the pattern that
    faulted) is reported; the same kernel reading it with prior() is not."""
    code = (KDIR / "common.cuh").read_text() + r'''
extern "C" __global__ void probe(const float* __restrict__ w, const float* __restrict__ x,
                                 float* __restrict__ y, int n) {
    pdl_wait();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __ldg(w + i) * LOAD_X;
}
'''
    for load_x, expect_bad in (("x[i]", True), ("prior(x + i)", False)):
        probe = code.replace("LOAD_X", load_x)
        assert [n for n, _ in kernel_params(probe)["probe"]] == ["w", "x", "y", "n"]
        loads = nc_load_sources(ptx_of(probe, tmp_path))["probe"]
        from_x = [ins for ins, srcs in loads if 1 in srcs]
        from_w = [ins for ins, srcs in loads if 0 in srcs]
        assert from_w, loads                       # the weight's __ldg is found either way
        assert bool(from_x) == expect_bad, (load_x, loads)


def test_every_cuda_c_kernel_counts_as_a_weight_kernel_in_the_bench_profile():
    """Every CUDA C kernel but the within-host all-reduce (a collective) and the sampler's draw
    (after the step) streams weights, so ds4tp.bench's step profile (and the Spark projection
    built on it) must count its time with the matvec kernels: the router's f16_matvec was left
    out once, and the projection read 17.5 tok/s where 16.9 was right."""
    from ds4tp.bench import COLLECTIVE_KERNELS, WEIGHT_KERNELS
    names = {n for src in SOURCES for n in kernel_params((KDIR / src).read_text())}
    assert {"iq2xxs_swiglu", "q2k_down_sum", "q8_0_matvec", "f16_matvec", "ar2_sum"} <= names
    draw = {"draw_sum", "draw_scan"}          # sample.cu: a sampled token's draw, after the step
    assert draw <= names
    other = names - COLLECTIVE_KERNELS - draw
    assert other <= WEIGHT_KERNELS, sorted(other - WEIGHT_KERNELS)


def test_gate_up_tables_host_and_kernel_agree():
    """The routed gate/up's tables per bank pair (experts.cu A_TAB): the dynamic shared memory
    the host passes is the kernel's A_TAB_BYTES, and the host asks for them only with rows in the
    decode order and while they are switched on."""
    from ds4tp.kernels import cuda_experts as ce
    m = re.search(r"#define A_TAB_BYTES \((\d+) \* (\d+)\)", (KDIR / "experts.cu").read_text())
    assert m and int(m.group(1)) * int(m.group(2)) == ce.A_TAB_BYTES
    for route in (True, False):
        assert ("A_TAB", 1) in ce._swiglu_defines(route, True)
        assert all(k != "A_TAB" for k, _ in ce._swiglu_defines(route, False))
    ce.set_tables_enabled(False)
    try:
        assert all(k != "A_TAB" for k, _ in ce._swiglu_defines(True, True))
    finally:
        ce.set_tables_enabled(True)


@needs_compiler
def test_gate_up_tables_need_the_decode_order(tmp_path):
    """experts.cu refuses A_TAB without A_DL (the tables serve the decode order's loop only)."""
    code = "#define A_TAB 1\n" + (KDIR / "common.cuh").read_text() + "\n" + (KDIR / "experts.cu").read_text()
    with pytest.raises((RuntimeError, subprocess.CalledProcessError)):
        ptx_of(code, tmp_path)
    ptx_of("#define A_TAB 1\n#define A_DL 1\n" + code[len("#define A_TAB 1\n"):], tmp_path)


# the decode kernels' parameters that stream a weight's rows (read once a token)
STREAMED = {"q8_0_matvec": {"q", "d"}, "f16_matvec": {"w"}, "iq2xxs_swiglu": {"wg", "wu", "sq", "sd"},
            "q2k_down_sum": {"w", "sq", "sd"}}


@needs_compiler
@pytest.mark.parametrize("src,defines", [("matvec.cu", ""), ("experts.cu", "A_ROUTE=1 A_DL=1 A_TAB=1"),
                                         ("experts.cu", _down_defines(6, 8, 4)),
                                         ("experts.cu", _down_defines(6, 4, 2))])
def test_streamed_weights_load_evict_first(src, defines, tmp_path):
    """Every read of a streamed weight's rows in the decode kernels uses the streaming operator
    (common.cuh wld: ld.global.cs.nc, evict-first in L1 and L2), so the ~9 GB a token do not push
    the small data the latency-bound launches re-read out of L2 (-2.0% / -2.3% on the TP=2 /
    TP=1 step, s35d); tables and norm weights keep plain loads."""
    code = "".join(f"#define {d.replace('=', ' ')}\n" for d in defines.split())
    code += (KDIR / "common.cuh").read_text() + "\n" + (KDIR / src).read_text()
    params = kernel_params(code)
    loads = nc_load_sources(ptx_of(code, tmp_path))
    seen = set()
    for kern in set(loads) & set(STREAMED):
        pointer = {i: n for i, (n, is_ptr) in enumerate(params[kern]) if is_ptr}
        for ins, srcs in loads[kern]:
            names = {pointer[i] for i in srcs if i in pointer}
            if names & STREAMED[kern]:
                assert ins.split()[0].startswith("ld.global.cs.nc"), f"{kern}: {ins} ({sorted(names)})"
                seen |= names & STREAMED[kern]
    want = set().union(*(STREAMED[k] for k in set(loads) & set(STREAMED)))
    assert seen == want, f"no loads found of {sorted(want - seen)}"
