"""Small helpers of the training harness: distributed setup, RNG state, MFU, metrics file, loss plot."""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

# Dense bf16 tensor-core peak FLOP/s per GPU (vendor datasheets, no sparsity). Matched by substring of
# torch.cuda.get_device_name(), first hit wins, so more specific names come first.
GPU_BF16_PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("A6000", 155e12), ("V100", 125e12),  # V100 has no bf16: its fp16 peak, for a rough MFU
]


def prog_name(module: str) -> str:
    """How the user started ``module`` (for usage lines): ``fastbert-<module>`` when run through the
    installed console script, else ``python -m train.<module>`` (a checkout)."""
    script = f"fastbert-{module}"
    return script if os.path.basename(sys.argv[0] or "") == script else f"python -m train.{module}"


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    """bf16 peak of ``device`` from the table, or None (CPU, or a GPU not in the table)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_BF16_PEAK_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def mfu(n_params: int, tokens_per_s_per_device: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: 6 * params * tokens/s (forward + backward of the matmuls; attention's
    own FLOPs left out, as in the usual estimate) over the device's peak."""
    if not peak:
        return None
    return 6.0 * n_params * tokens_per_s_per_device / peak


@dataclass
class Dist:
    """Where this process stands: ``rank`` / ``world`` / ``local_rank``, its ``device``, ``enabled`` when a
    process group is up (launched by torchrun with WORLD_SIZE > 1)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup_distributed(device_pref: str = "auto") -> Dist:
    """Read torchrun's environment; start NCCL (GPU) or gloo (CPU) when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device: 'cuda' was asked for but torch sees no GPU")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if world > 1:
            # N processes on one CPU: split the cores instead of oversubscribing them N times.
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    enabled = False
    if world > 1:
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        enabled = True
    return Dist(rank, world, local_rank, device, enabled)


def rng_state() -> Dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_metrics(path: str) -> List[Dict]:
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: drop it
                    pass
    return rows


def truncate_metrics(path: str, last_step: int) -> None:
    """Keep only rows up to ``last_step`` (a resumed run rewrites what the killed run logged after its
    last checkpoint)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def plot_losses(metrics_path: str, out_png: str, title: str = "") -> Optional[str]:
    """Training loss and held-out loss against step, from ``metrics.jsonl``; returns the PNG path."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train"]
    valid = [(r["step"], r["eval_loss"]) for r in rows if r.get("split") == "valid"]
    if not train and not valid:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train MLM loss", lw=1.2)
    if valid:
        ax.plot(*zip(*valid), "o-", label="held-out MLM loss", lw=1.5, ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(out_png))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png


class StopSignals:
    """Turn SIGINT / SIGTERM into a request to stop at the next step boundary (a preempted cluster job
    gets SIGTERM and some seconds of grace; torchrun forwards it to every rank and waits 30 s).

    ``with StopSignals() as stop: ... if stop.agreed(dist): ...``. A SIGINT more than ``patience_s`` after
    the first signal restores the default behaviour and re-raises it (Ctrl-C twice aborts at once); repeats
    within that window are ignored, because a launcher that forwards a signal its process group already
    got (torchrun, on Ctrl-C or a group-wide SIGTERM) delivers it twice. Outside the main thread (where
    Python cannot install handlers) it does nothing.
    """

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, patience_s: float = 3.0):
        self.signum: Optional[int] = None
        self.patience_s = patience_s
        self._first_at = 0.0
        self._old: Dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal
        import time
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > self.patience_s:
            self.__exit__(None, None, None)  # the user insists: stop waiting for the step boundary
            signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    @property
    def name(self) -> str:
        import signal
        return signal.Signals(self.signum).name if self.signum else ""

    def agreed(self, dist: "Dist") -> bool:
        """Whether any rank was signalled; every rank gets the same answer (an all-reduce per call), so
        all of them stop after the same step."""
        local = self.signum is not None
        if not dist.enabled:
            return local
        flag = torch.tensor([float(self.signum or 0)], device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        got = int(flag.item())  # a host sync; the loop already makes one per step
        if self.signum is None and got:
            self.signum = got  # another rank's signal: report it as ours
        return got > 0
