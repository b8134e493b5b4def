"""Races, uninitialised shared reads and out-of-bounds accesses of the CUDA kernels, caught on a CPU.

Each check is shown catching a planted bug, deterministically (fixed seeds; the shadow-state check does
not depend on the thread order at all) and with a report naming where:

* the checking build (``check_mode``) on a temporary copy of csrc/flash_attn.cu and flash_attn_tiles.cuh
  with one bug switched on at a time: a removed barrier before reads of copied data (RAW), the next
  tile's copies issued before the barrier (WAR), a missing ``cp_async_wait``, the short backward's phase
  barrier removed, a tile load one row past the tensor (read into a guard zone), tail rows left
  unwritten (uninitialised shared read); with the reports off, the interleaved scheduling alone makes
  the missing barriers change the results. Bugs that break no memory rule (the copy size in elements,
  an edge tile's mask skipped, the linear ALiBi term off by one) fail the reference comparison;
* the checking and ASan builds of the emulation's self-test (small kernels with each kind planted, the
  cp.async emulation, __syncwarp and shuffle ordering, silence on correct kernels);
* the cuda_host test files run again in a subprocess on the ASan + UBSan build.

The cp.async wrappers (csrc/cp_async.cuh) also compile with nvcc for sm_80 and sm_90 here.
"""
import ctypes
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the cuda_host backend")

CH = pytest.importorskip("fastbert.cuda_host_backend")
ROOT = Path(__file__).resolve().parent.parent
SELFTEST = ROOT / "tests" / "cuda_host_driver" / "emu_selftest.cpp"
IN_ASAN = CH._env_flavor() == "asan"


def _run(exe, *args, env=None):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env)


# ------------------------------------------------------------------------------------------------
# the emulation's self-test on the checking and ASan builds
# ------------------------------------------------------------------------------------------------
CHECK_SELFTEST = ("check_reports_missing_barrier_before_reads", "check_reports_missing_barrier_before_writes",
                  "check_reports_uninitialised_shared_read", "check_reports_shared_oob",
                  "check_reports_guard_zone_read", "check_reports_cp_async_read_before_wait",
                  "check_reports_missing_syncwarp", "check_syncwarp_does_not_order_other_warps",
                  "check_syncwarp_orders_its_lanes", "check_shuffle_orders_its_lanes",
                  "check_silent_on_correct_kernel", "cp_async_copy_and_zero_fill", "cp_async_commit_groups_wait_n")


def test_selftest_checking_build():
    r = _run(CH.build_executable(SELFTEST, "check"))
    print(r.stdout)
    assert r.returncode == 0 and "SELFTEST OK" in r.stdout, r.stdout + r.stderr
    for name in CHECK_SELFTEST:
        assert f"PASS {name}" in r.stdout, name


def test_selftest_asan_build_catches_a_kernel_reading_past_a_buffer():
    exe = CH.build_executable(SELFTEST, "asan")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    r = _run(exe, env=env)  # the whole self-test, fibers and cp.async included, is clean under ASan + UBSan
    assert r.returncode == 0 and "SELFTEST OK" in r.stdout, r.stdout + r.stderr[-3000:]
    r = _run(exe, "asan-oob", env=env)
    line = next(i for i, t in enumerate(SELFTEST.read_text().splitlines(), 1) if "reads x[n]" in t)
    assert r.returncode != 0 and "ASAN DID NOT REPORT" not in r.stdout, r.stdout
    assert "heap-buffer-overflow" in r.stderr and f"emu_selftest.cpp:{line}" in r.stderr, r.stderr[-3000:]


def test_cp_async_wrappers_compile_for_sm80_and_sm90(tmp_path):
    """The cp.async PTX of csrc/cp_async.cuh assembles for both targets (the emulation cannot prove the
    asm itself: only that the kernels call the wrappers correctly)."""
    nvcc = next((c for c in (os.environ.get("NVCC"), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc"))
                 if c and os.path.isfile(c)), None)
    if nvcc is None:
        pytest.skip("no nvcc found")
    src = SELFTEST.parent / "async_kernels_nvcc.cu"
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-Werror", "all-warnings", "--keep", "--keep-dir", str(tmp_path),
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           f"-I{CH.csrc_dir()}", str(src), "-o", str(tmp_path / "k.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for ptx in sorted(tmp_path.glob("*.ptx")):
        text = ptx.read_text()
        for instr in ("cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group 1",
                      "cp.async.wait_group 0"):
            assert instr in text, (ptx.name, instr)
    assert len(list(tmp_path.glob("*.ptx"))) == 2


# ------------------------------------------------------------------------------------------------
# bugs planted in a temporary copy of the attention kernels
# ------------------------------------------------------------------------------------------------
FA, TILES = "flash_attn.cu", "flash_attn_tiles.cuh"
# kind -> (file in csrc/, anchor, replacement, text the anchor is searched after), applied in this order. A
# missing anchor means the kernels changed: move the plant to the equivalent line (the test then proves
# the new code). Each is switched on by its code in PLANT_CODE at run time.
PLANTS = {
    # the barrier between the prologue's copies landing and other threads reading them (Q into registers)
    "raw": (FA, "  cp_async_wait<0>();\n  __syncthreads();\n  const int r0 = warp * 16;\n",
            "  cp_async_wait<0>();\n  if (planted != 2) __syncthreads();  // PLANT raw\n  const int r0 = warp * 16;\n",
            "flash_attn_fwd_kernel("),
    # the next tile's copies issued before the barrier that says every warp is done with that buffer
    "war": (FA, "    cp_async_wait<0>();\n    __syncthreads();  // tile n0 is in for every thread, and every warp is "
                "done with the other buffer\n    if (n0 + BN < hi) load_kv(stage ^ 1, n0 + BN);",
            "    if (planted == 1 && n0 + BN < hi) load_kv(stage ^ 1, n0 + BN);  // PLANT war\n"
            "    cp_async_wait<0>();\n    __syncthreads();\n    if (planted != 1 && n0 + BN < hi) load_kv(stage ^ 1, n0 + BN);",
            "flash_attn_fwd_kernel("),
    # no wait for the tile's copies before the barrier (the per-tile wait of the forward's pipeline)
    "nowait": (FA, "    cp_async_wait<0>();\n    __syncthreads();\n",
               "    if (planted != 5) cp_async_wait<0>();  // PLANT nowait\n    __syncthreads();\n", "flash_attn_fwd_kernel("),
    # the key-chunk barrier of the short backward: phase 2 reads P and dS rows other warps write
    "phase": (FA, "  __syncthreads();  // every warp's P and dS rows are in\n",
              "  if (planted != 9) __syncthreads();  // PLANT phase\n", "flash_attn_bwd_short_kernel("),
    "oob": (TILES, "    const bool in = r < valid;\n",
            "    const bool in = r < valid + (planted == 3);  // PLANT oob: one row too many\n", "void load_tile_async("),
    "uninit": (TILES, "    cp_async_16(dst + r * LD + col,",
               "    if (planted == 4 && !in) continue;  // PLANT uninit: tail rows never written\n"
               "    cp_async_16(dst + r * LD + col,", "void load_tile_async("),
    # the copy size in elements instead of bytes: half of every row copied, the other half zero-filled
    "zfill": (TILES, "in ? 16 : 0);", "in ? (planted == 6 ? 8 : 16) : 0);  // PLANT zfill", "void load_tile_async("),
    # a tile cut by the sequence end taken for an interior one: its mask skipped
    "edge": (TILES, "  const bool tail = kKeysInColumns ? end >= w.len : last >= w.len;\n",
             "  const bool tail = planted != 7 && (kKeysInColumns ? end >= w.len : last >= w.len);  // PLANT edge\n",
             "int tile_form("),
    # the row part of the linear ALiBi form off by one position
    "alibi": (TILES, "    if (F == kRight) rt[r] = c * (float)(col - i);\n",
              "    if (F == kRight) rt[r] = c * (float)(col - i + (planted == 8));  // PLANT alibi\n", "void tile_scores("),
}
PLANT_CODE = {"war": 1, "raw": 2, "oob": 3, "uninit": 4, "nowait": 5, "zfill": 6, "edge": 7, "alibi": 8, "phase": 9}


def _planted_copy(dst: Path) -> Path:
    shutil.copytree(CH.csrc_dir(), dst)
    texts = {f: (dst / f).read_text() for f in (FA, TILES)}
    for kind, (f, anchor, repl, after) in PLANTS.items():
        s = texts[f]
        start = s.find(after)
        i = s.find(anchor, start)
        assert start >= 0 and i >= 0, f"plant {kind!r}: anchor not found in csrc/{f}; update PLANTS"
        texts[f] = s[:i] + repl + s[i + len(anchor):]
    decl = "namespace fb {\nnamespace attn {"  # the first of the two files the kernel sources include
    texts[TILES] = texts[TILES].replace(decl, "namespace fb {\ninline int planted = 0;  // PLANT switch\nnamespace attn {", 1)
    assert "inline int planted" in texts[TILES]
    for f, s in texts.items():
        (dst / f).write_text(s)
    (dst / "host_entry.cpp").write_text((dst / "host_entry.cpp").read_text() + (
        '\nextern "C" __attribute__((visibility("default"))) void fbh_plant(int k) { fb::planted = k; }\n'))
    return dst


@pytest.fixture(scope="module")
def planted_lib():
    if IN_ASAN:
        pytest.skip("the planted copy runs on the checking build, not in the ASan process")
    with tempfile.TemporaryDirectory() as d:
        src = _planted_copy(Path(d) / "csrc")
        lib = CH.open_library(CH.build(flavor="check", src=src))
        lib.fbh_plant.argtypes = [ctypes.c_int]
        yield lib
        lib.fbh_plant(0)


def _attention_case():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_cuda_host_attention as A
    return A


# Two sequences: 70 tokens (two key tiles, so the next tile's writes meet the previous tile's readers, and
# a key chunk past 64 in the short backward) and 37 (a partial tile at the end of the tensor, so one row
# more runs past it).
SEQLENS = [70, 37]
# what a missing barrier or wait shows up as, depending on how far the other thread got: its copy not yet
# issued (uninitialised), issued but not landed (read before the wait), landed but not ordered (hazard)
HAZARD = (r"(read-after-write|write-after-read) hazard|cp.async destination before the cp_async_wait|"
          r"read of uninitialised shared memory")


@pytest.mark.parametrize("kind,expect", [
    ("raw", rf"({HAZARD}).*\n  read of sKV\[\+\d+ bytes"),
    ("war", HAZARD),
    ("nowait", rf"({HAZARD}).*\n  read of sKV\[\+\d+ bytes"),
    ("phase", r"(read-after-write hazard|read of uninitialised shared memory).*\n  read of smem\[\+\d+ bytes"),
    ("oob", r"out-of-bounds global read of \d+ bytes, \d+ bytes past the end of 'qkv' \[107, 3, 1, 64\]"),
    ("uninit", r"read of uninitialised shared memory.*\n  read of (sKV|smem)\[\+\d+ bytes"),
])
def test_planted_attention_bug_is_reported(planted_lib, kind, expect):
    A = _attention_case()
    planted_lib.fbh_plant(PLANT_CODE[kind])
    for seed in (11, 12):  # any schedule: the shadow check does not depend on the order
        with CH.check_mode(seed=seed, library=planted_lib), pytest.raises(RuntimeError) as e:
            A._check(SEQLENS, 1, 64, torch.bfloat16, "alibi")
        msg = str(e.value)
        print(msg)
        assert re.search(expect, msg), msg
        assert re.search(r"flash_attn(_tiles)?\.cuh?:\d+", msg) and "kernel void fb::attn::flash_attn_" in msg, msg
        if "hazard" in msg:  # both threads and both source lines
            assert len(re.findall(r"by thread \(\d+,0,0\) \[warp \d, lane \d+\]\n    at \S+:\d+", msg)) == 2, msg
    planted_lib.fbh_plant(0)
    with CH.check_mode(seed=11, library=planted_lib):  # the copy with no bug switched on is clean
        A._check(SEQLENS, 1, 64, torch.bfloat16, "alibi")


@pytest.mark.parametrize("kind,seqlens,expect", [
    ("zfill", SEQLENS, "out"),
    ("edge", SEQLENS, "out"),
    ("edge", SEQLENS, "d[qkv]"),     # the short backward alone (forward clean)
    # tiles wholly right of the diagonal: the forward, the short backward (128 tokens), the two-pass
    # backward (150)
    ("alibi", [128, 5], "out"),
    ("alibi", [128, 5], "d[qkv]"),
    ("alibi", [150, 5], "d[qkv]"),
])
def test_planted_arithmetic_bug_fails_the_reference_check(planted_lib, kind, seqlens, expect):
    """Bugs that break no memory rule (a wrong copy size, a skipped edge mask, an ALiBi term off by one
    position: slope 0.3, so one position is a 26% change in those weights) fail the comparison with the
    reference; the same inputs pass with the bug switched off."""
    A = _attention_case()
    switch = lambda: planted_lib.fbh_plant(PLANT_CODE[kind])  # noqa: E731
    bwd_only = expect != "out"  # the forward runs clean, the plant is switched on for the backward
    planted_lib.fbh_plant(0 if bwd_only else PLANT_CODE[kind])
    try:
        with CH.check_mode(seed=11, library=planted_lib), \
                pytest.raises(AssertionError, match=rf"^{expect}: max error .* exceeds tolerance"):
            A._check(seqlens, 1, 64, torch.bfloat16, 0.3, before_bwd=switch if bwd_only else None)
        planted_lib.fbh_plant(0)
        with CH.check_mode(seed=11, library=planted_lib):
            A._check(seqlens, 1, 64, torch.bfloat16, 0.3)
    finally:
        planted_lib.fbh_plant(0)


# Not "war": its early copies belong to the group committed after the barrier, and the emulation lands a
# copy at the issuing thread's next wait, which comes after every warp passed that barrier, so only the
# checker (which sees the write at issue) reports it, above. "phase": the short backward's warps read P
# and dS rows that a lagging warp has not written yet.
@pytest.mark.parametrize("kind,seqlens", [("raw", SEQLENS), ("phase", SEQLENS)])
def test_missing_barrier_changes_results_under_interleaving(planted_lib, kind, seqlens):
    """Reports off: threads switched at every shared access in a seeded order make the race visible in
    the output itself (the fast build, switching only at barriers, computes the right answer)."""
    A = _attention_case()
    planted_lib.fbh_plant(PLANT_CODE[kind])
    try:
        with CH.check_mode(seed=11, library=planted_lib, report=False), pytest.raises(AssertionError):
            A._check(seqlens, 1, 64, torch.bfloat16, "alibi")
    finally:
        planted_lib.fbh_plant(0)


# ------------------------------------------------------------------------------------------------
# the cuda_host tests on the ASan + UBSan build (a subprocess: the ASan runtime must be preloaded)
# ------------------------------------------------------------------------------------------------
def test_cuda_host_tests_under_asan_and_ubsan():
    if IN_ASAN:
        pytest.skip("already inside the sanitizer process")
    CH.build(flavor="asan")  # here, not under the ASan runtime (g++ would run with it preloaded too)
    env = CH.sanitizer_env()
    # Every kernel and code path once; repeats that differ only in dtype or in the scheduling mode stay
    # in the main run (they add time here, not coverage of memory accesses).
    skip = ("test_matches_reference_d64 and not alibi-dtype0", "debug_mode", "public_op", "ops_dispatch",
            "ops_bad_input", "selftest")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
           "-k", " and ".join(f"not ({k})" for k in skip), "tests/test_cuda_host.py", "tests/test_cuda_host_attention.py"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    out = r.stdout[-6000:] + r.stderr[-6000:]
    print(out)
    assert r.returncode == 0, out
    assert re.search(r"\d+ passed", r.stdout), out
