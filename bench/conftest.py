"""Benchmark-suite setup. Without a GPU the Triton kernels run under the interpreter, which must be
switched on before triton is first imported, so this happens at conftest import."""
import os

import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    import sys
    if "triton" in sys.modules:
        raise RuntimeError("triton was imported before bench/conftest.py could set TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

from bench import common  # noqa: E402  (after TRITON_INTERPRET)


def pytest_report_header(config):
    return [f"fastbert bench mode: {common.MODE} (device {common.DEVICE}; "
            + ("no timings are taken in smoke mode)" if common.SMOKE else "CUDA-event timings)")]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add what the report needs beyond pytest-benchmark's fields: run mode, environment, and every
    provider that was asked for but could not run (with the reason)."""
    output_json["fastbert"] = {"env": common.env_info(), "missing": list(common.MISSING)}
