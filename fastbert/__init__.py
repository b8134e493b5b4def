"""fastbert: Triton and CUDA kernels for BERT-style encoders, with a MosaicBERT model and training harness."""
from fastbert.paths import cache_dir
from fastbert.registry import BackendUnavailableError, backends, use_backend

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "BackendUnavailableError", "cache_dir", "__version__"]
