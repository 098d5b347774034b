"""Count a CUDA C kernel's SASS instructions, by opcode, for static comparisons between versions
of a .cu file (e.g. the routed gate/up kernel's hot loop before and after a change).

    python bench/sass_count.py [--src ds4tp/kernels/experts.cu] [--old OLD.cu] \
        [--kernel iq2xxs_swiglu] [--define WARPS=16 ...] [--between POPC] [--margin 40]

Each file is compiled with common.cuh in front (as ds4tp.kernels.cuda_c does) by nvcc for sm_90
to a cubin and disassembled by cuobjdump (it needs nvdisasm on PATH; both come with the CUDA
toolkit or the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels: --tools DIR adds a folder to
PATH). --between OPCODE counts only the span from the first to the last instruction with that
opcode, widened by --margin instructions each side (the gate/up kernel's unrolled decode loop is
the span of its POPCs). No GPU is needed.
"""
import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

KDIR = Path(__file__).resolve().parent.parent / "ds4tp" / "kernels"
OP = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def nvrtc_ptx(code: str, opts: list) -> str:
    """PTX for compute_90 by NVRTC (the nvidia-cuda-nvrtc wheel or the system's libnvrtc)."""
    import ctypes
    import glob
    paths = []
    try:
        import nvidia
        for root in nvidia.__path__:
            paths += sorted(glob.glob(f"{root}/**/libnvrtc.so*", recursive=True))
    except ImportError:
        pass
    lib = None
    for name in paths + ["libnvrtc.so"]:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        raise SystemExit("--nvrtc: no libnvrtc found")
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), code.encode(), b"k.cu", 0, None, None)
    arr = (ctypes.c_char_p * (len(opts) + 1))(b"--gpu-architecture=compute_90", *map(str.encode, opts))
    rc = lib.nvrtcCompileProgram(prog, len(opts) + 1, arr)
    size = ctypes.c_size_t()
    if rc != 0:
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise SystemExit(f"NVRTC: {log.value.decode()[:3000]}")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.value.decode()


def sass(src: Path, kernel: str, defines, tmp: Path, nvrtc: bool = False) -> list:
    """The kernel's opcodes, in order."""
    cu = tmp / (src.stem + ".cu")
    cu.write_text((KDIR / "common.cuh").read_text() + "\n" + src.read_text())
    cubin = tmp / (src.stem + ".cubin")
    if nvrtc:        # as the runtime compiles (CuPy's NVRTC), then ptxas for sm_90
        ptx = tmp / (src.stem + ".ptx")
        ptx.write_text(nvrtc_ptx(cu.read_text(), ["--std=c++14", *(f"-D{d}" for d in defines)]))
        subprocess.run(["ptxas", "-arch=sm_90", "-o", str(cubin), str(ptx)], check=True)
    else:
        subprocess.run(["nvcc", "-arch=sm_90", "-std=c++14", "-cubin", "-o", str(cubin), str(cu),
                        *(f"-D{d}" for d in defines)], check=True)
    out = subprocess.run(["cuobjdump", "-sass", "-fun", kernel, str(cubin)], check=True,
                         capture_output=True, text=True).stdout
    ops = [m.group(1) for m in map(OP.match, out.splitlines()) if m]
    if not ops:
        raise SystemExit(f"no SASS for {kernel} in {src} (is nvdisasm on PATH?)")
    return ops


def span(ops: list, between: str, margin: int) -> list:
    idx = [i for i, o in enumerate(ops) if o == between]
    if not idx:
        raise SystemExit(f"no {between} instruction in the kernel")
    return ops[max(0, idx[0] - margin):idx[-1] + margin + 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(KDIR / "experts.cu"))
    ap.add_argument("--old", default="", help="an earlier version of the file to compare with")
    ap.add_argument("--kernel", default="iq2xxs_swiglu")
    ap.add_argument("--define", action="append", default=["WARPS=16"])
    ap.add_argument("--between", default="POPC")
    ap.add_argument("--margin", type=int, default=40)
    ap.add_argument("--tools", default="", help="a folder with cuobjdump and nvdisasm")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--nvrtc", action="store_true",
                    help="compile with NVRTC (as the runtime does) and ptxas instead of nvcc")
    args = ap.parse_args()
    if args.tools:
        os.environ["PATH"] = args.tools + os.pathsep + os.environ["PATH"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, path in (("old", args.old), ("new", args.src)):
            if not path:
                continue
            (Path(d) / name).mkdir()
            ops = sass(Path(path), args.kernel, args.define, Path(d) / name, args.nvrtc)
            part = span(ops, args.between, args.margin) if args.between else ops
            rows.append((name, len(ops), Counter(part)))
    for name, total, c in rows:
        print(f"{name}: {args.kernel}, {total} instructions; from the first to the last "
              f"{args.between} (± {args.margin}): {sum(c.values())}")
        print("   " + ", ".join(f"{o} {n}" for o, n in c.most_common(args.top)))
    if len(rows) == 2:
        a, b = sum(rows[0][2].values()), sum(rows[1][2].values())
        print(f"new / old in that span: {b} / {a} = {b / a:.3f}")


if __name__ == "__main__":
    main()
