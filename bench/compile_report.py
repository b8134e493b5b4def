"""Compile-time performance evidence, no GPU needed: every kernel built for sm_80 and sm_90a.

    python -m bench.compile_report [--arch sm_80,sm_90a] [--json PATH] [--no-cache]
                                   [--triton-module MOD_OR_PATH ...] [--csrc-dir DIR ...]
                                   [--no-default-triton] [--no-default-csrc]

For every Triton kernel (each ``kernels/<family>.py``'s ``compile_specs()``: the launch configurations the
launchers really use at BERT shapes) and every CUDA kernel in ``csrc/*.cu`` (template instances included),
for each arch it collects: registers per thread, spill stores/loads, static + dynamic shared memory,
tensor-core instructions (``mma`` / ``wgmma`` in PTX, ``HMMA`` / ``HGMMA`` in SASS), global load/store
vector widths (``ld.global.v4`` etc. vs scalar), and the theoretical occupancy that registers, shared
memory and threads allow on an A100 (sm_80) / H100 (sm_90). It prints a Markdown table and writes JSON
(default ``bench/results/compile-report.json``). This is compile-time evidence, not measured speed.
Every record also carries ``facts`` (``bench.perf_static.kernel_facts``: main-loop instructions, tensor-core
work, async copies, shared-memory wavefronts), the input of ``bench.perf_model``; ``collect()`` is the
compile step both use.

Exit status 1, naming each offending kernel, when:

* a kernel fails to compile for an arch;
* a hot kernel spills (waived by a spec ``note`` that mentions "spill", or a source comment
  ``fastbert: spill-ok: <pattern>: <why>``);
* shared memory exceeds the arch's per-block limit;
* a ``tensor_core`` kernel (attention, any ``tl.dot`` kernel) has no tensor-core instruction;
* a ``bandwidth`` kernel issues only scalar global loads (Triton: per spec, waived by a ``note`` that
  mentions "scalar"; CUDA: when no bf16 instance of the kernel template has a vector load, waived by
  ``fastbert: scalar-ok: <pattern>: <why>``).

How the pieces are compiled:

* Triton: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 80|90,
  32), options={"num_warps", "num_stages"})``; the spec's ``attrs`` carry the divisibility-by-16
  specialisation the JIT would apply (without it the AOT compile loses vectorisation). When a spec has no
  ``attrs``, pointer arguments are assumed 16-byte aligned (torch allocations are) and integers are not.
  A spec with a ``capability`` key (80 / 90) is the config of that GPU generation and is compiled for that
  arch only; others for every arch. Registers and spills come from the same ``ptxas -v`` Triton uses.
* CUDA: ``nvcc -cubin -arch=sm_80|sm_90a -O3 -std=c++17 -Xptxas -v`` per file (``-I`` the file's
  directory), PTX kept for the instruction counts, ``cuobjdump -sass`` for SASS.

CUDA source annotations (comments anywhere in the ``.cu``; ``<pattern>`` is an fnmatch pattern against
the demangled kernel name, e.g. ``*layer_norm_bwd_kernel<*, 1>*``):
``fastbert: kind: <pattern>: tensor_core|bandwidth|other``, ``fastbert: cold: <pattern>: <why>`` (not
hot: spills allowed), ``fastbert: spill-ok: <pattern>: <why>``, ``fastbert: scalar-ok: <pattern>: <why>``,
``fastbert: dynamic-smem: <pattern>: <bytes>`` (launch-time shared memory, for occupancy and the limit).
Without a ``kind`` annotation: kernels in files named for padding / bias_gelu / geglu / layer_norm are
``bandwidth``; ``*attn*`` kernels in attention files are ``tensor_core`` unless their name says they are
a helper (preprocess, postprocess, convert, dot, delta, reduce, zero); everything else is ``other``.
CUDA kernels are hot unless annotated ``cold``.

Results are cached per kernel source hash in ``$FASTBERT_CACHE/compile_report``
(default ``~/.cache/fastbert``), so a rerun with unchanged sources takes seconds.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import fnmatch
import glob
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from bench.perf_static import FACTS_VERSION, kernel_facts

REPORT_VERSION = "4"  # 2: SASS / PTX facts for bench.perf_model in every record; 3, 4: .func prototypes, trailing definitions
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_JSON = os.path.join(ROOT, "bench", "results", "compile-report.json")
ARCHS = ("sm_80", "sm_90a")

# Published per-SM limits (CUDA C Programming Guide, compute capability tables).
LIMITS = {
    "sm_80": {"gpu": "A100", "regs_per_sm": 65536, "max_regs_per_thread": 255, "smem_per_sm": 164 * 1024,
              "smem_per_block": 163 * 1024, "smem_reserved_per_block": 1024, "threads_per_sm": 2048,
              "warps_per_sm": 64, "blocks_per_sm": 32},
    "sm_90a": {"gpu": "H100", "regs_per_sm": 65536, "max_regs_per_thread": 255, "smem_per_sm": 228 * 1024,
               "smem_per_block": 227 * 1024, "smem_reserved_per_block": 1024, "threads_per_sm": 2048,
               "warps_per_sm": 64, "blocks_per_sm": 32},
}
BANDWIDTH_FILES = ("padding", "bias_gelu", "geglu", "layer_norm")
HELPER_WORDS = ("preprocess", "postprocess", "convert", "dot", "delta", "reduce", "zero")


# ----------------------------------------------------------------------------------------------
# occupancy
# ----------------------------------------------------------------------------------------------
def occupancy(arch: str, regs: int, smem_bytes: int, threads: int) -> dict:
    """Theoretical resident blocks / warps per SM from registers, shared memory and threads.

    Registers are allocated per warp in units of 256; each block also reserves 1 KB of shared memory.
    """
    lim = LIMITS[arch]
    warps = max(1, -(-threads // 32))
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by = {"threads": lim["threads_per_sm"] // (warps * 32), "blocks": lim["blocks_per_sm"],
          "registers": (lim["regs_per_sm"] // regs_per_warp) // warps}
    per_block = smem_bytes + lim["smem_reserved_per_block"]
    by["shared memory"] = lim["smem_per_sm"] // per_block
    blocks = max(0, min(by.values()))
    limiter = min(by, key=lambda k: (by[k], k != "registers"))
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": blocks * warps / lim["warps_per_sm"], "limiter": limiter}


# ----------------------------------------------------------------------------------------------
# parsing ptxas -v, PTX and SASS
# ----------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> Dict[str, dict]:
    """Per entry function: registers, stack, spill stores / loads, static shared memory (``ptxas -v``)."""
    out: Dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"regs": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0,
                                              "smem_static": 0})
            continue
        if cur is None:
            continue
        m = _PROPS.search(line)
        if m and "Function properties for" not in line:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = (int(g) for g in m.groups())
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["smem_static"] = int(s.group(1)) if s else 0
    return out


def ptx_entries(ptx: str) -> Dict[str, str]:
    """Split PTX into ``{entry name: text}`` (a file's device ``.func``s are appended to every entry)."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"\.entry\s+([\w$.]+)\s*\(", ptx)]
    # definitions only: a prototype (``.func name(...);``, emitted before the entries for every non-inlined
    # function) has no body, and matching across its ``;`` swallowed the whole first entry into funcs
    defs = list(re.finditer(r"\.func[^{;]*\{.*?\n\}", ptx, re.S))
    funcs = "".join(m.group(0) for m in defs)
    out = {}
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(ptx)
        end = min([end] + [m.start() for m in defs if m.start() > pos])  # definitions after it: appended once
        out[name] = ptx[pos:end] + funcs
    return out


_LDST = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def ptx_stats(ptx: str) -> dict:
    """Tensor-core instructions and global load/store widths of one entry's PTX."""
    stats = {"mma": len(re.findall(r"\bmma\.sync", ptx)), "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
             "ld_vector": 0, "ld_scalar": 0, "st_vector": 0, "st_scalar": 0, "ld_max_bytes": 0, "st_max_bytes": 0,
             "cp_async": len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx)),
             "tma": len(re.findall(r"cp\.async\.bulk", ptx))}
    for m in _LDST.finditer(ptx):
        op, quals = m.group(1), m.group(2).split(".")
        vec = next((int(q[1:]) for q in quals if re.fullmatch(r"v\d", q)), 1)
        bits = next((int(re.sub(r"\D", "", q)) for q in reversed(quals) if re.fullmatch(r"[bsuf]\d+", q)), 32)
        nbytes = vec * bits // 8
        is_vec = vec > 1 or bits >= 128
        stats[f"{op}_{'vector' if is_vec else 'scalar'}"] += 1
        stats[f"{op}_max_bytes"] = max(stats[f"{op}_max_bytes"], nbytes)
    return stats


def sass_functions(sass: str) -> Dict[str, str]:
    out, cur, buf = {}, None, []
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            if cur:
                out[cur] = "\n".join(buf)
            cur, buf = m.group(1), []
        elif cur:
            buf.append(line)
    if cur:
        out[cur] = "\n".join(buf)
    return out


def sass_stats(sass: str) -> dict:
    return {"hmma": len(re.findall(r"\bHMMA\.", sass)), "hgmma": len(re.findall(r"\bHGMMA\.", sass))}


def demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if r.returncode == 0 and len(out) == len(names) else {n: n for n in names}


# ----------------------------------------------------------------------------------------------
# tools and cache
# ----------------------------------------------------------------------------------------------
def _triton_tools():
    """(ptxas for a capability, cuobjdump path or None) from the triton package."""
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    def cuobjdump():
        try:
            p = knobs.nvidia.cuobjdump.path
            return p if p and os.path.exists(p) else shutil.which("cuobjdump")
        except Exception:  # noqa: BLE001
            return shutil.which("cuobjdump")
    return (lambda cap: get_ptxas(cap).path), cuobjdump()


def find_nvcc() -> Optional[str]:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


def nvcc_version(nvcc: Optional[str]) -> Optional[str]:
    if not nvcc:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else None


def _cache_dir() -> str:
    from fastbert.paths import cache_dir
    d = str(cache_dir("compile_report"))
    os.makedirs(d, exist_ok=True)
    return d


def _cache_get(key: str, use: bool):
    if not use:
        return None
    p = os.path.join(_cache_dir(), key + ".json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cache_put(key: str, value) -> None:
    p = os.path.join(_cache_dir(), key + ".json")
    tmp = p + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, p)


def _hash(*parts) -> str:
    h = hashlib.sha256((REPORT_VERSION + FACTS_VERSION).encode())
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


def _dir_sources(d: str, exts: Tuple[str, ...]) -> bytes:
    out = b""
    for p in sorted(glob.glob(os.path.join(d, "*"))):
        if p.endswith(exts):
            with open(p, "rb") as f:
                out += p.encode() + f.read()
    return out


# ----------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------
def triton_modules(default: bool, extra: List[str]) -> List[Tuple[str, object]]:
    """(label, module) for kernels/<family>.py (when ``default``) and each extra module / .py path."""
    mods = []
    if default:
        kdir = os.path.join(ROOT, "kernels")
        for p in sorted(glob.glob(os.path.join(kdir, "*.py"))):
            fam = os.path.basename(p)[:-3]
            if fam.startswith("_"):
                continue
            mods.append((f"kernels/{fam}.py", f"fastbert.kernels.{fam}"))
    for e in extra:
        mods.append((e, e))
    out = []
    for label, name in mods:
        try:
            if name.endswith(".py") or os.sep in name:
                mod_name = "fastbert_compile_report_" + hashlib.sha1(os.path.abspath(name).encode()).hexdigest()[:8]
                spec = importlib.util.spec_from_file_location(mod_name, name)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = mod
                spec.loader.exec_module(mod)
            else:
                mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - reported as a failure of that module
            out.append((label, e))
            continue
        if hasattr(mod, "compile_specs"):
            out.append((label, mod))
        else:  # DEVELOPERS.md: every Triton kernel module lists its launch configs
            out.append((label, AttributeError(f"{label} has no compile_specs()")))
    return out


def _spec_archs(spec: dict, archs: List[str]) -> List[str]:
    """The archs a spec is compiled for: all, or the one its ``capability`` (80 / 90) names."""
    cap = spec.get("capability")
    if cap is None:
        return list(archs)
    return [a for a in archs if int(a[3:5]) == int(cap)]


def _default_attrs(spec) -> dict:
    fn, sig = spec["kernel"], spec["signature"]
    return {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
            if str(sig.get(a, "")).startswith("*")}


def _config_str(spec) -> str:
    const = spec.get("constexprs", {})
    keys = [k for k in const if k.isupper() and isinstance(const[k], int) and not isinstance(const[k], bool)]
    parts = [f"{k}={const[k]}" for k in keys[:4]]
    parts += [f"w{spec.get('num_warps', 4)}", f"s{spec.get('num_stages', 1)}"]
    return " ".join(parts)


def compile_triton(label: str, spec: dict, arch: str, use_cache: bool) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    fn = spec["kernel"]
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # unwrap @autotune / @heuristics
        fn = fn.fn
    spec = dict(spec, kernel=fn)
    cap = 80 if arch == "sm_80" else 90
    attrs = spec.get("attrs")
    if attrs is None:
        attrs = _default_attrs(spec)
    opts = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 1)}
    rec = {"source": "triton", "module": label, "name": spec["name"], "kernel": getattr(fn, "__name__", str(fn)),
           "config": _config_str(spec), "arch": arch, "hot": bool(spec.get("hot", True)),
           "kind": spec.get("kind", "other"), "note": spec.get("note", ""), "threads": 32 * opts["num_warps"]}
    src_file = inspect.getsourcefile(fn.fn) if hasattr(fn, "fn") else label
    try:
        src_text = inspect.getsource(fn.fn)
    except (OSError, TypeError):
        src_text = ""
    m = re.search(r"fastbert:\s*spill-ok:\s*(.+)", src_text)
    if m:
        rec["spill_ok"] = m.group(1).strip()
    try:  # Triton's own key: the function's source and every @jit function it calls, as its cache uses
        src_key = fn.cache_key
    except Exception:  # noqa: BLE001 - fall back to every .py beside the kernel
        src_key = _dir_sources(os.path.dirname(os.path.abspath(src_file)), (".py",))
    key = _hash("triton", triton.__version__, src_key,
                spec["name"], rec["kernel"], sorted(spec["signature"].items()),
                sorted((k, repr(v)) for k, v in spec.get("constexprs", {}).items()), sorted(attrs.items()),
                sorted(opts.items()), arch)
    cached = _cache_get(key, use_cache)
    if cached is not None:
        rec.update(cached)
        rec["cached"] = True
        return rec
    t0 = time.time()
    try:
        src = triton.compiler.ASTSource(fn, dict(spec["signature"]), dict(spec.get("constexprs", {})), attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
    except Exception as e:  # noqa: BLE001 - a compile failure is a finding
        rec["error"] = f"compile failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return rec
    ptxas_for, cuobjdump = _triton_tools()
    found = {}
    with tempfile.TemporaryDirectory() as d:
        ptx_path = os.path.join(d, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ck.asm["ptx"])
        # The same ptxas and register-allocation flag Triton's own build uses, so the numbers match.
        r = subprocess.run([ptxas_for(cap), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", ptx_path, "-o",
                            os.path.join(d, "k.o")], capture_output=True, text=True)
        parsed = parse_ptxas(r.stdout + r.stderr)
        found = next(iter(parsed.values()), {})
        sass = ""
        if cuobjdump and "cubin" in ck.asm:
            cub = os.path.join(d, "k.cubin")
            with open(cub, "wb") as f:
                f.write(ck.asm["cubin"])
            s = subprocess.run([cuobjdump, "-sass", cub], capture_output=True, text=True)
            sass = s.stdout if s.returncode == 0 else ""
    if not found:
        rec["error"] = f"ptxas -v gave no resource report: {(r.stderr or r.stdout)[-300:]}"
        return rec
    meta = ck.metadata
    result = dict(found)
    result["smem_dynamic"] = int(getattr(meta, "shared", 0) or 0)
    result["ptx"] = ptx_stats(ck.asm["ptx"])
    result["sass"] = sass_stats(sass) if sass else None
    result["facts"] = kernel_facts(sass, ck.asm["ptx"])
    result["compile_s"] = round(time.time() - t0, 2)
    _cache_put(key, result)
    rec.update(result)
    return rec


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
# "fastbert: <what>: <pattern>: <value>"; the pattern ends at the first colon followed by a space, so
# patterns may contain "::" and ", " (e.g. "*fb::layer_norm_bwd_kernel<*, 1>*").
_ANNOT = re.compile(r"fastbert:\s*(kind|cold|spill-ok|scalar-ok|dynamic-smem):\s*([^\n]+?):\s+([^\n]+)")


def annotations(text: str) -> List[Tuple[str, str, str]]:
    return [(m.group(1), m.group(2).strip(), m.group(3).strip()) for m in _ANNOT.finditer(text)]


def _annot(ann, what: str, name: str) -> Optional[str]:
    for w, pat, val in ann:
        if w == what and fnmatch.fnmatchcase(name, pat):
            return val
    return None


def template_base(name: str) -> str:
    """``void fb::k<__nv_bfloat16, 8>(...)`` -> ``fb::k``: the kernel template all its instances share."""
    return re.sub(r"^void\s+", "", name.split("(")[0].split("<")[0]).strip()


def cuda_default_kind(file_stem: str, name: str) -> str:
    base = name.split("(")[0].split("<")[0].lower()
    if file_stem in BANDWIDTH_FILES:
        return "bandwidth"
    if ("attn" in file_stem or "attention" in file_stem) and "attn" in base and \
            not any(w in base for w in HELPER_WORDS):
        return "tensor_core"
    return "other"


def compile_cuda_file(path: str, arch: str, nvcc: str, use_cache: bool) -> List[dict]:
    """Every kernel (template instance) of one .cu for one arch."""
    d = os.path.dirname(os.path.abspath(path))
    stem = os.path.basename(path)[:-3]
    with open(path) as f:
        text = f.read()
    flags = ["-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-Xptxas", "-v", "-I", d]
    ver = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = _hash("cuda", ver, path, _dir_sources(d, (".cu", ".cuh", ".h")), flags)
    cached = _cache_get(key, use_cache)
    base = {"source": "cuda", "module": os.path.relpath(path, ROOT) if path.startswith(ROOT) else path, "arch": arch}
    if cached is None:
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, stem + ".cubin")
            r = subprocess.run([nvcc, *flags, "-keep", "-keep-dir", tmp, "-o", out, path],
                               capture_output=True, text=True)
            if r.returncode != 0:
                err = "\n".join(ln for ln in (r.stderr + r.stdout).splitlines() if "error" in ln)[:800]
                return [{**base, "name": stem, "kernel": stem, "config": "", "hot": True, "kind": "other",
                         "error": f"nvcc failed (rc {r.returncode}): {err or r.stderr[-500:]}"}]
            parsed = parse_ptxas(r.stdout + r.stderr)
            ptx_files = glob.glob(os.path.join(tmp, "*.ptx"))
            ptx = open(ptx_files[0]).read() if ptx_files else ""
            _, cuobjdump = _triton_tools_safe()
            sass = {}
            if cuobjdump:
                s = subprocess.run([cuobjdump, "-sass", out], capture_output=True, text=True)
                sass = sass_functions(s.stdout) if s.returncode == 0 else {}
        entries = ptx_entries(ptx)
        extern_smem = re.findall(r"\.extern\s+\.shared[^;]*?([\w$]+)\s*\[\s*\]", ptx)
        kernels = {}
        for mangled, res in parsed.items():
            body = entries.get(mangled, "")
            m = re.search(r"\.maxntid\s+(\d+)(?:,\s*(\d+))?(?:,\s*(\d+))?", body)
            threads = 1
            if m:
                for g in m.groups():
                    threads *= int(g) if g else 1
            kernels[mangled] = {**res, "ptx": ptx_stats(body), "sass": sass_stats(sass[mangled]) if mangled in sass
                                else None, "facts": kernel_facts(sass.get(mangled), body),
                                "maxntid": threads if m else None,
                                "dynamic_smem_used": any(re.search(rf"\b{re.escape(x)}\b", body) for x in extern_smem)}
        cached = {"kernels": kernels, "compile_s": round(time.time() - t0, 2)}
        _cache_put(key, cached)
    ann = annotations(text)
    names = demangle(list(cached["kernels"]))
    recs = []
    for mangled, res in cached["kernels"].items():
        name = names.get(mangled, mangled)
        rec = {**base, "name": name, "mangled": mangled, "kernel": template_base(name), "config": "",
               **{k: v for k, v in res.items() if k not in ("maxntid", "dynamic_smem_used")}}
        rec["kind"] = _annot(ann, "kind", name) or cuda_default_kind(stem, name)
        cold = _annot(ann, "cold", name)
        rec["hot"] = cold is None
        rec["note"] = cold or ""
        for w in ("spill-ok", "scalar-ok"):
            v = _annot(ann, w, name)
            if v:
                rec[w.replace("-", "_")] = v
        dyn = _annot(ann, "dynamic-smem", name)
        rec["smem_dynamic"] = int(dyn) if dyn and dyn.isdigit() else 0
        if dyn is None and res.get("dynamic_smem_used"):
            rec["smem_dynamic_unknown"] = True  # sized at launch; annotate with fastbert: dynamic-smem
        rec["threads"] = res.get("maxntid") or 256
        rec["threads_from"] = "__launch_bounds__" if res.get("maxntid") else "assumed 256 (no __launch_bounds__)"
        rec["config"] = f"{rec['threads']} thr"
        if cached.get("compile_s") is not None:
            rec["compile_s"] = cached["compile_s"]
        recs.append(rec)
    return recs


def _triton_tools_safe():
    try:
        return _triton_tools()
    except Exception:  # noqa: BLE001 - triton missing: fall back to a cuobjdump on PATH
        return None, shutil.which("cuobjdump")


# ----------------------------------------------------------------------------------------------
# rules
# ----------------------------------------------------------------------------------------------
def finish(rec: dict) -> dict:
    """Occupancy and the rule checks for one record (``problems``: list of strings)."""
    problems = []
    if rec.get("error"):
        rec["problems"] = [rec["error"]]
        return rec
    lim = LIMITS[rec["arch"]]
    smem = int(rec.get("smem_static", 0)) + int(rec.get("smem_dynamic", 0))
    rec["smem_total"] = smem
    rec.update(occupancy(rec["arch"], rec.get("regs", 0), smem, rec.get("threads", 128)))
    spilled = rec.get("spill_stores", 0) + rec.get("spill_loads", 0)
    waived = rec.get("spill_ok") or ("spill" in rec.get("note", "").lower())
    if spilled and rec.get("hot") and not waived:
        problems.append(f"hot kernel spills ({rec['spill_stores']} B stores, {rec['spill_loads']} B loads)")
    if smem > lim["smem_per_block"]:
        problems.append(f"shared memory {smem} B exceeds the {lim['gpu']} per-block limit {lim['smem_per_block']} B")
    ptx, sass = rec.get("ptx") or {}, rec.get("sass") or {}
    rec["tensor_cores"] = bool(ptx.get("mma") or ptx.get("wgmma") or sass.get("hmma") or sass.get("hgmma"))
    if rec.get("kind") == "tensor_core" and not rec["tensor_cores"]:
        problems.append("tensor_core kernel has no mma/wgmma (PTX) nor HMMA/HGMMA (SASS) instruction")
    rec["problems"] = problems
    return rec


def scalar_rule(recs: List[dict]) -> None:
    """Bandwidth kernels must issue vector global loads. Triton: per spec (each spec is a real launch
    config). CUDA: per kernel template and arch, some instance must (its bf16 instances when it has any:
    a scalar fallback instance beside a vectorised one is fine, a template with no vector path is not)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in recs:
        if r.get("error") or r.get("kind") != "bandwidth":
            continue
        if r["source"] == "triton":
            note = r.get("note", "").lower()
            waived = "scalar" in note or "vector" in note
            if not r["ptx"]["ld_vector"] and r["ptx"]["ld_scalar"] and not waived:
                r["problems"].append(f"bandwidth kernel issues only scalar global loads "
                                     f"({r['ptx']['ld_scalar']} scalar, widest {r['ptx']['ld_max_bytes']} B)")
        else:
            groups.setdefault((r["module"], r["kernel"], r["arch"]), []).append(r)
    for (_, kernel, arch), rs in groups.items():
        bf16 = [r for r in rs if "bfloat16" in r["name"]]
        pool = bf16 or rs
        if any(r["ptx"]["ld_vector"] for r in pool) or all(r.get("scalar_ok") for r in pool):
            continue
        for r in pool:
            if not r.get("scalar_ok"):
                what = "bf16 instance" if bf16 else "instance"
                r["problems"].append(f"no {what} of {kernel} issues a vector global load on {arch}")


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def _short(name: str, width: int = 70) -> str:
    name = name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    name = re.sub(r"\(.*\)$", "", name).replace("void ", "")
    return name if len(name) <= width else name[: width - 1] + "~"


def markdown(recs: List[dict]) -> str:
    lines = ["| kernel | config | arch | regs | spills st/ld B | smem KB | tensor cores | vector ld/st (widest B) | "
             "occupancy warps/SM (limiter) | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        label = f"{r['module']}: {_short(r['name'] if r['source'] == 'cuda' else r['name'])}"
        if r.get("error"):
            lines.append(f"| {label} | {r.get('config', '')} | {r['arch']} | - | - | - | - | - | - | "
                         f"FAIL: {r['error'][:120]} |")
            continue
        p, s = r.get("ptx", {}), r.get("sass") or {}
        tc = "-"
        if r["tensor_cores"]:
            tc = ", ".join(f"{k}x{v}" for k, v in (("mma", p.get("mma")), ("wgmma", p.get("wgmma")),
                                                    ("HMMA", s.get("hmma")), ("HGMMA", s.get("hgmma"))) if v)
        vec = (f"{p['ld_vector']}/{p['ld_vector'] + p['ld_scalar']} ld ({p['ld_max_bytes']}), "
               f"{p['st_vector']}/{p['st_vector'] + p['st_scalar']} st ({p['st_max_bytes']})")
        status = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        if not r["problems"] and (r.get("spill_stores") or r.get("spill_loads")):
            status = "ok (spill waived: " + (r.get("spill_ok") or r.get("note") or "cold") + ")"
        lines.append(f"| {label} | {r.get('config', '')} | {r['arch']} | {r['regs']} | "
                     f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)} | {r['smem_total'] / 1024:.1f} | {tc} | "
                     f"{vec} | {r['warps_per_sm']} ({100 * r['occupancy']:.0f}%, {r['limiter']}) | {status} |")
    return "\n".join(lines)


def summary_markdown(recs: List[dict]) -> str:
    """One row per kernel (Triton function / CUDA template) and arch, over all its configs / instances:
    the compact table for the README."""
    groups: Dict[tuple, List[dict]] = {}
    for r in recs:
        groups.setdefault((r["module"], r.get("kernel") or r["name"], r["arch"]), []).append(r)
    lines = ["| kernel | arch | builds | regs | max spill B | max smem KB | tensor cores | vector loads | "
             "warps/SM | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (mod, kernel, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.get("error")]
        fails = sum(bool(r["problems"]) for r in rs)
        if not ok:
            lines.append(f"| {mod}: {kernel} | {arch} | {len(rs)} | - | - | - | - | - | - | FAIL ({fails}) |")
            continue
        regs = [r["regs"] for r in ok]
        warps = [r["warps_per_sm"] for r in ok]
        tc = sum(r["tensor_cores"] for r in ok)
        vec = sum(bool(r["ptx"]["ld_vector"]) for r in ok)
        lines.append(
            f"| {mod}: {_short(kernel, 50)} | {arch} | {len(rs)} | {min(regs)}-{max(regs)} | "
            f"{max(r.get('spill_stores', 0) + r.get('spill_loads', 0) for r in ok)} | "
            f"{max(r['smem_total'] for r in ok) / 1024:.1f} | {tc}/{len(ok)} | {vec}/{len(ok)} | "
            f"{min(warps)}-{max(warps)} | {'ok' if not fails else f'FAIL ({fails})'} |")
    return "\n".join(lines)


def collect(archs: List[str], default_triton: bool = True, triton_modules_extra: Optional[List[str]] = None,
            default_csrc: bool = True, csrc_dirs: Optional[List[str]] = None, use_cache: bool = True,
            jobs: int = 2) -> Tuple[List[dict], List[str], Optional[str]]:
    """Compile every kernel for ``archs`` (cached by source hash): ``(records, failures, nvcc path)``.
    Each record carries the rule checks (``problems``) and the SASS / PTX ``facts`` of bench.perf_static."""
    # The report compiles for real GPUs; the interpreter (set by test setups) would hand us no JITFunction.
    os.environ.pop("TRITON_INTERPRET", None)
    recs: List[dict] = []
    failures: List[str] = []
    cu_files = []
    dirs = ([os.path.join(ROOT, "csrc")] if default_csrc else []) + list(csrc_dirs or [])
    for d in dirs:
        cu_files += sorted(p for p in glob.glob(os.path.join(d, "*.cu")))
    nvcc = find_nvcc() if cu_files else None
    pool = cf.ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = {}
    if cu_files and nvcc is None:
        failures.append("nvcc not found (set NVCC or CUDA_HOME): the CUDA kernels were not compiled")
    elif cu_files:
        for p in cu_files:
            for a in archs:
                futures[pool.submit(compile_cuda_file, p, a, nvcc, use_cache)] = (p, a)

    # Triton compiles run in this thread while nvcc runs in the pool.
    for label, mod in triton_modules(default_triton, list(triton_modules_extra or [])):
        if isinstance(mod, Exception):
            recs.append({"source": "triton", "module": label, "name": label, "kernel": "", "config": "",
                         "arch": archs[0], "error": f"import failed: {type(mod).__name__}: {mod}"})
            continue
        try:
            specs = mod.compile_specs()
        except Exception as e:  # noqa: BLE001
            recs.append({"source": "triton", "module": label, "name": f"{label}.compile_specs", "kernel": "",
                         "config": "", "arch": archs[0], "error": f"compile_specs() failed: {type(e).__name__}: {e}"})
            continue
        for spec in specs:
            for a in _spec_archs(spec, archs):
                recs.append(compile_triton(label, spec, a, use_cache))
    for fut in cf.as_completed(futures):
        p, a = futures[fut]
        try:
            recs.extend(fut.result())
        except Exception as e:  # noqa: BLE001
            recs.append({"source": "cuda", "module": p, "name": os.path.basename(p), "kernel": "", "config": "",
                         "arch": a, "error": f"{type(e).__name__}: {e}"})
    pool.shutdown()

    recs = [finish(r) for r in recs]
    scalar_rule(recs)
    recs.sort(key=lambda r: (r["source"] != "triton", r["module"], r["name"], r["arch"]))
    for r in recs:
        for prob in r["problems"]:
            failures.append(f"{r['module']}: {r['name']} [{r['arch']}]: {prob}")
    return recs, failures, nvcc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_report",
                                 description="Compile every Triton and CUDA kernel for sm_80 / sm_90a and check "
                                             "registers, spills, shared memory, tensor cores and vector loads.")
    ap.add_argument("--arch", default=",".join(ARCHS), help="comma-separated: sm_80,sm_90a")
    ap.add_argument("--json", default=DEFAULT_JSON, help=f"where to write the JSON (default {DEFAULT_JSON}); "
                    "the Markdown table goes beside it (.md)")
    ap.add_argument("--triton-module", action="append", default=[],
                    help="extra Triton module (dotted name or .py path) with compile_specs(); repeatable")
    ap.add_argument("--csrc-dir", action="append", default=[], help="extra directory of .cu files; repeatable")
    ap.add_argument("--no-default-triton", action="store_true", help="skip kernels/*.py")
    ap.add_argument("--no-default-csrc", action="store_true", help="skip csrc/*.cu")
    ap.add_argument("--no-cache", action="store_true", help="recompile everything")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc compiles (default 2)")
    args = ap.parse_args(argv)

    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    bad = [a for a in archs if a not in LIMITS]
    if bad:
        ap.error(f"--arch: unsupported {bad}; expected some of {list(LIMITS)}")
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        print("error: triton was imported under TRITON_INTERPRET=1; run the report in its own process",
              file=sys.stderr)
        return 2
    t0 = time.time()
    recs, failures, nvcc = collect(archs, not args.no_default_triton, args.triton_module,
                                   not args.no_default_csrc, args.csrc_dir, not args.no_cache, args.jobs)

    import platform
    meta = {"archs": archs, "limits": {a: LIMITS[a] for a in archs}, "seconds": round(time.time() - t0, 1),
            "nvcc": nvcc, "python": platform.python_version(), "command": " ".join(
                ["python", "-m", "bench.compile_report"] + (sys.argv[1:] if argv is None else list(argv)))}
    try:
        import triton
        meta["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        meta["triton"] = None
    print("Compile-time evidence (registers, spills, shared memory, instructions; no kernel was run, so no speed "
          "is implied)\n")
    print(markdown(recs))
    n_tr = sum(r["source"] == "triton" for r in recs)
    print(f"\n{n_tr} Triton and {len(recs) - n_tr} CUDA kernel builds for {', '.join(archs)} "
          f"in {meta['seconds']} s.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            # the SASS / PTX facts stay in the cache and in bench/results/perf-model.json (the model's input)
            slim = [{k: v for k, v in r.items() if k != "facts"} for r in recs]
            json.dump({"meta": meta, "kernels": slim, "failures": failures}, f, indent=1, default=str)
        md = os.path.splitext(args.json)[0] + ".md"
        with open(md, "w") as f:  # the table as the README quotes it, with what produced it
            f.write(f"Compile-time evidence, not measured speed: `{meta['command']}` (triton {meta['triton']}, "
                    f"nvcc {nvcc_version(nvcc)}); {len(failures)} problem(s).\n\n## Per kernel\n\n"
                    f"{summary_markdown(recs)}\n\n## Every build\n\n{markdown(recs)}\n")
            for msg in failures:
                f.write(f"\n- FAIL {msg}")
        print(f"wrote {args.json} and {md}")
    return exit_status(failures)


def exit_status(problems: List[str]) -> int:
    """Print each problem as ``FAIL ...`` on stderr (what the tests grep for); 1 if there are any."""
    if problems:
        print(f"\n{len(problems)} problem(s):", file=sys.stderr)
        for msg in problems:
            print(f"  FAIL {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
