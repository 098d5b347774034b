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


def sass(src: Path, kernel: str, defines, tmp: Path) -> list:
    """The kernel's opcodes, in order."""
    cu = tmp / (src.stem + ".cu")
    cu.write_text((KDIR / "common.cuh").read_text() + "\n" + src.read_text())
    cubin = tmp / (src.stem + ".cubin")
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
    args = ap.parse_args()
    if args.tools:
        os.environ["PATH"] = args.tools + os.pathsep + os.environ["PATH"]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, path in (("old", args.old), ("new", args.src)):
            if not path:
                continue
            (Path(d) / name).mkdir()
            ops = sass(Path(path), args.kernel, args.define, Path(d) / name)
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
