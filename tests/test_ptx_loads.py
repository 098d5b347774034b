"""No CUDA C kernel reads an earlier kernel's output through the read-only (non-coherent) path.

Launched with PDL, a kernel is resident before the kernel ahead has written its output, so
that output is not read-only for the kernel's lifetime, which ld.global.nc requires. A
`const __restrict__` pointer lets the compiler choose that path on its own: q2k_down_sum read
stale expert ids that way and faulted in graph replays (common.cuh, `prior`; sessions 18-22).
This test compiles every .cu file to PTX (nvcc; it skips where there is none, as on CI's
machines) and follows each ld.global.nc address back to the kernel parameters it is computed
from: only weights and tables may be among them.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

KDIR = Path(__file__).resolve().parent.parent / "ds4tp" / "kernels"
SOURCES = ("experts.cu", "matvec.cu", "experts_mma.cu")
# parameters that hold weights or constant tables: read-only for a whole step
READ_ONLY = {"wg", "wu", "grid_g", "w", "w2", "grid64", "q", "d", "nw"}

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc to compile the kernels to PTX "
                                                      "(the GPU machine and developer machines have it)")


def _compile(src: str, tmp: Path, stage: str) -> str:
    code = (KDIR / "common.cuh").read_text() + "\n" + (KDIR / src).read_text()
    cu = tmp / ("k_" + src)
    cu.write_text(code)
    out = tmp / (src + "." + stage)
    flag = ["-ptx"] if stage == "ptx" else ["-E"]
    subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", *flag, "-o", str(out), str(cu)],
                   check=True, capture_output=True, text=True)
    return out.read_text()


def _strip_attributes(text: str) -> str:
    """__attribute__((global)) as __global__; other attributes and launch bounds removed."""
    text = text.replace("__attribute__((global))", "__global__")
    out, i = [], 0
    for m in re.finditer(r"__attribute__|__launch_bounds__", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        j, depth = m.end(), 0
        while j < len(text):            # skip the balanced parentheses that follow
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
            if depth == 0 and text[j - 1] == ")":
                break
        i = j
    out.append(text[i:])
    return "".join(out)


def kernel_params(pre: str) -> dict:
    """name -> [(param name, is pointer)] of every extern "C" __global__ kernel in preprocessed
    source."""
    out = {}
    for m in re.finditer(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)',
                         _strip_attributes(pre)):
        params = []
        for p in m.group(2).split(","):
            p = p.strip()
            name = re.findall(r"(\w+)\s*$", p)[0]
            params.append((name, "*" in p))
        out[m.group(1)] = params
    return out


def nc_load_sources(ptx: str) -> dict:
    """kernel -> [(PTX line of an ld.global.nc, the parameter indices its address comes from)]:
    a flow-insensitive walk of each entry's register dataflow (a loaded value starts afresh: it
    is data, not an address derived from the parameters)."""
    result = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)\s*(?:\.maxntid[^{]*)?\{(.*?)\n\}", ptx, re.S):
        name, body = m.group(1), m.group(3)
        lines = [ln.split("//")[0].strip() for ln in body.splitlines()]
        instrs = []
        for ln in lines:
            for part in ln.split(";"):
                part = part.strip().strip("{}").strip()
                if not part or part.endswith(":") or part.startswith("."):
                    continue
                part = re.sub(r"^@!?%\w+\s+", "", part)
                instrs.append(part)
        prov: dict = {}
        param_re = re.compile(re.escape(name) + r"_param_(\d+)")
        changed = True
        loads = []
        while changed:
            changed = False
            loads = []
            for ins in instrs:
                op = ins.split()[0]
                rest = ins[len(op):]
                regs = re.findall(r"%\w+", rest)
                if op.startswith(("st.", "bra", "ret", "bar", "red.", "atom.", "prefetch", "cp.",
                                  "griddepcontrol", "membar", "fence")) or not regs:
                    continue
                if op.startswith("ld.") or op.startswith("ldu."):
                    addr = re.search(r"\[([^\]]*)\]", rest)
                    src = set()
                    if addr:
                        pm = param_re.search(addr.group(1))
                        if pm and op.startswith("ld.param"):
                            src = {int(pm.group(1))}
                        else:
                            for r in re.findall(r"%\w+", addr.group(1)):
                                src |= prov.get(r, set())
                    if op.startswith("ld.param"):
                        dests = re.findall(r"%\w+", rest.split("[")[0])
                        for dreg in dests:
                            if not src <= prov.get(dreg, set()):
                                prov[dreg] = prov.get(dreg, set()) | src
                                changed = True
                    elif ".nc" in op:
                        loads.append((ins, frozenset(src)))
                    continue
                # dests: the first operand (or a {..} vector of them); sources: the rest
                head = rest.strip()
                if head.startswith("{"):
                    dest_txt, src_txt = head[1:].split("}", 1)
                else:
                    dest_txt, _, src_txt = head.partition(",")
                dests = re.findall(r"%\w+", dest_txt)
                src = set()
                for r in re.findall(r"%\w+", src_txt):
                    src |= prov.get(r, set())
                for dreg in dests:
                    if not src <= prov.get(dreg, set()):
                        prov[dreg] = prov.get(dreg, set()) | src
                        changed = True
        result[name] = loads
    return result


@needs_nvcc
@pytest.mark.parametrize("src", SOURCES)
def test_no_read_only_path_loads_of_earlier_outputs(src, tmp_path):
    params = kernel_params(_compile(src, tmp_path, "i"))
    loads = nc_load_sources(_compile(src, tmp_path, "ptx"))
    assert set(params) == set(loads), (sorted(params), sorted(loads))
    bad = []
    for kern, found in loads.items():
        assert found or kern, kern
        pointer = {i: n for i, (n, is_ptr) in enumerate(params[kern]) if is_ptr}
        for ins, srcs in found:
            names = {pointer[i] for i in srcs if i in pointer}
            assert names, f"{kern}: no parameter found behind {ins}"
            if not names <= READ_ONLY:
                bad.append(f"{kern}: {ins} reads from {sorted(names - READ_ONLY)}")
    assert not bad, "read-only-path loads of earlier kernels' outputs:\n" + "\n".join(bad)


@needs_nvcc
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
        cu = tmp_path / "probe.cu"
        cu.write_text(code.replace("LOAD_X", load_x))
        ptx = tmp_path / "probe.ptx"
        subprocess.run([NVCC, "-arch=sm_90", "-std=c++17", "-ptx", "-o", str(ptx), str(cu)],
                       check=True, capture_output=True, text=True)
        loads = nc_load_sources(ptx.read_text())["probe"]
        from_x = [ins for ins, srcs in loads if 1 in srcs]
        from_w = [ins for ins, srcs in loads if 0 in srcs]
        assert from_w, loads                       # the weight's __ldg is found either way
        assert bool(from_x) == expect_bad, (load_x, loads)
