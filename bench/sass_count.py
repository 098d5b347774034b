"""Count a CUDA C kernel's SASS instructions, by opcode, for static comparisons between versions
of a .cu file (e.g. the routed gate/up kernel's hot loop before and after a change).

    python bench/sass_count.py [--src ds4tp/kernels/experts.cu] [--old OLD.cu] \
        [--kernel iq2xxs_swiglu] [--define WARPS=16 ...] [--between POPC] [--margin 40] \
        [--loop IDP [--loop-min 64]] [--nvrtc] [--tools DIR]

Each file is compiled with common.cuh in front (as ds4tp.kernels.cuda_c does) by nvcc for sm_90
to a cubin and disassembled by cuobjdump (it needs nvdisasm on PATH; both come with the CUDA
toolkit or the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels: --tools DIR adds a folder to
PATH). With --nvrtc it compiles as the runtime does instead, by NVRTC (the nvidia-cuda-nvrtc
wheel) and ptxas (the nvidia-cuda-nvcc wheel). --between OPCODE counts only the span from the
first to the last instruction with that opcode, widened by --margin instructions each side;
--loop OPCODE counts the smallest loop with at least --loop-min (64) of them (--loop IDP: the
gate/up kernel's item loop; 843 instructions an item at e4eebe2, 1,178 for the two items a pass
of the twenty-eighth session's decode order). No GPU is needed.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

KDIR = Path(__file__).resolve().parent.parent / "ds4tp" / "kernels"
OP = re.compile(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def nvrtc_ptx(code: str, defines) -> str:
    """PTX for compute_90 by NVRTC (the test extra's nvidia-cuda-nvrtc wheel or the system's
    libnvrtc), as tests/test_ptx_loads.py compiles; defines as NAME=VALUE."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_ptx_loads import NVRTC, ptx_of
    if NVRTC is None:
        raise SystemExit("--nvrtc: no libnvrtc found")
    head = "".join(f"#define {d.replace('=', ' ', 1)}\n" for d in defines)
    with tempfile.TemporaryDirectory() as d:
        return ptx_of(head + code, Path(d))


def sass(src: Path, kernel: str, defines, tmp: Path, nvrtc: bool = False) -> list:
    """The kernel's opcodes, in order."""
    cu = tmp / (src.stem + ".cu")
    cu.write_text((KDIR / "common.cuh").read_text() + "\n" + src.read_text())
    cubin = tmp / (src.stem + ".cubin")
    if nvrtc:        # as the runtime compiles (CuPy's NVRTC), then ptxas for sm_90
        ptx = tmp / (src.stem + ".ptx")
        ptx.write_text(nvrtc_ptx(cu.read_text(), defines))
        subprocess.run(["ptxas", "-arch=sm_90", "-o", str(cubin), str(ptx)], check=True)
    else:
        subprocess.run(["nvcc", "-arch=sm_90", "-std=c++14", "-cubin", "-o", str(cubin), str(cu),
                        *(f"-D{d}" for d in defines)], check=True)
    out = subprocess.run(["cuobjdump", "-sass", "-fun", kernel, str(cubin)], check=True,
                         capture_output=True, text=True).stdout
    ops = [m.group(1) for m in map(OP.match, out.splitlines()) if m]
    if not ops:
        raise SystemExit(f"no SASS for {kernel} in {src} (is nvdisasm on PATH?)")
    return ops, out


LINE = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*);")


def loops(out: str, op: str, least: int = 1) -> list:
    """The loops of a cuobjdump listing (a backward branch and its target) whose body has at
    least `least` `op` instructions, smallest first, as opcode lists (an unrolled loop counts all
    its copies)."""
    ins = []
    for m in map(LINE.match, out.splitlines()):
        if m:
            t = re.search(r"\b0x[0-9a-f]+", m.group(3)) if m.group(2) == "BRA" else None
            ins.append((int(m.group(1), 16), m.group(2), t.group(0) if t else None))
    found = []
    for addr, _, tgt in ins:
        if tgt is not None and int(tgt, 16) < addr:
            body = [o for a, o, _ in ins if int(tgt, 16) <= a <= addr]
            if body.count(op) >= least:
                found.append(body)
    return sorted(found, key=len)


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
    ap.add_argument("--loop", default="", metavar="OPCODE",
                    help="count the smallest loop whose body has this opcode (e.g. IDP: the gate/up "
                         "kernel's item loop; unrolled twice in the decode order) instead of a span")
    ap.add_argument("--loop-min", type=int, default=64,
                    help="--loop: the least count of that opcode in the loop (default 64: the "
                         "gate/up item loop's 128 dp4a an item, not the shared rows' loop)")
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
            ops, out = sass(Path(path), args.kernel, args.define, Path(d) / name, args.nvrtc)
            if args.loop:
                body = loops(out, args.loop, args.loop_min)
                if not body:
                    raise SystemExit(f"no loop with {args.loop_min} {args.loop} instructions in the kernel")
                part = body[0]
            else:
                part = span(ops, args.between, args.margin) if args.between else ops
            rows.append((name, len(ops), Counter(part)))
    for name, total, c in rows:
        where = (f"its smallest loop with {args.loop_min}+ {args.loop}" if args.loop else
                 f"from the first to the last {args.between} (± {args.margin})")
        print(f"{name}: {args.kernel}, {total} instructions; {where}: {sum(c.values())}")
        print("   " + ", ".join(f"{o} {n}" for o, n in c.most_common(args.top)))
    if len(rows) == 2:
        a, b = sum(rows[0][2].values()), sum(rows[1][2].values())
        print(f"new / old there: {b} / {a} = {b / a:.3f}")


if __name__ == "__main__":
    main()
