"""The CUDA kernels' machine-code report for .ci/cuda_build.sh:

    python .ci/kernel_report.py BUILD_LOG SASS_TXT

1. registers, stack frame and spills per kernel and architecture, from ptxas -v in the build log
   (docs/CUDA.md keeps a copy of this table);
2. each kernel's streaming loop in the sm_90 SASS (cuobjdump -sass): the innermost loop (a
   backward branch) with the most 16-byte loads (then stores: the aligned variant), and its
   instructions by kind, so that the first GPU run can compare variants against their
   instruction counts.
"""
import re
import subprocess
import sys


def demangle(mangled):
    names = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True,
                           text=True).stdout.splitlines()
    out = []
    for name in names:
        name = re.sub(r"fastce::cuda::(\(anonymous namespace\)::)?|^void |\(.*\)$", "", name)
        out.append(name.replace("__nv_bfloat16", "bf16").replace("__half", "half"))
    return out


def ptxas_table(log):
    rows, cur, frame = [], None, None
    for line in open(log):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur, frame = m.groups(), ("0", "0", "0")
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            frame = m.groups()
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            rows.append((cur[0], cur[1], m.group(1), *frame))
            cur = None
    table = {}
    for (_, arch, regs, stack, st, ld), name in zip(rows, demangle([r[0] for r in rows])):
        cell = f"{regs} regs" + (f", stack {stack} B" if stack != "0" else "")
        cell += f", spill {st}/{ld} B" if st != "0" or ld != "0" else ""
        table.setdefault(name, {})[arch] = cell
    out = ["| kernel <dtype, flags> | sm_80 | sm_90 |", "|---|---|---|"]
    for name in sorted(table):
        out.append(f"| `{name}` | {table[name].get('sm_80', '-')} | {table[name].get('sm_90', '-')} |")
    return out


def sass_functions(path, arch="sm_90"):
    """{mangled name: [(address, instruction)]} of one architecture's SASS."""
    funcs, cur_arch, fn = {}, None, None
    for line in open(path):
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            cur_arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1) if cur_arch == arch else None
            if fn:
                funcs[fn] = []
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m and fn:
            funcs[fn].append((int(m.group(1), 16), m.group(2)))
    return funcs


KINDS = [("LDG.128", r"LDG\.E\.128"), ("LDG other", r"LDG\.E(?!\.128)"), ("STG.128", r"STG\.E\.128"),
         ("STG other", r"STG\.E(?!\.128)"), ("MUFU", r"MUFU"), ("FFMA", r"\bFFMA"), ("DFMA/DADD", r"\bD(FMA|ADD|MUL)")]


def count(body, pattern):
    return sum(1 for _, ins in body if re.search(pattern, ins))


def streaming_loop(code):
    """The innermost loop (a backward branch with no other loop inside it) with the most 16-byte
    loads, then the most 16-byte stores (a kernel's aligned variant), then the smallest; or None.
    code: [(address, instruction)] in address order."""
    index = {addr: i for i, (addr, _) in enumerate(code)}
    loops = []
    for i, (addr, ins) in enumerate(code):
        m = re.search(r"\bBRA(?:\.\S+)?\s+0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            loops.append((index[int(m.group(1), 16)], i))
    inner = [(b, e) for b, e in loops if not any(b <= b2 and e2 <= e and (b2, e2) != (b, e) for b2, e2 in loops)]
    ranked = []
    for b, e in inner:
        body = code[b:e + 1]
        ranked.append((-count(body, KINDS[0][1]), -count(body, KINDS[2][1]), len(body), b, body))
    ranked = [r for r in ranked if r[0] < 0]
    return min(ranked, key=lambda r: r[:4])[4] if ranked else None
def sass_table(path):
    funcs = sass_functions(path)
    out = ["| kernel <dtype, flags> | all | loop | " + " | ".join(k for k, _ in KINDS) + " |",
           "|---|---|---|" + "---|" * len(KINDS)]
    lines = []
    for name, code in zip(demangle(list(funcs)), funcs.values()):
        body = streaming_loop(code)
        cells = ["-"] * (1 + len(KINDS)) if body is None else [str(len(body))] + [str(count(body, p)) for _, p in KINDS]
        lines.append(f"| `{name}` | {len(code)} | " + " | ".join(cells) + " |")
    return out + sorted(lines)


if __name__ == "__main__":
    print("\n".join(ptxas_table(sys.argv[1])))
    print("\nSASS (sm_90): each kernel's instructions, and those of its streaming loop by kind")
    print("\n".join(sass_table(sys.argv[2])))
