"""fastbert: Triton and CUDA kernels for BERT-style encoders, with a MosaicBERT model and training harness."""
from fastbert.registry import BackendUnavailableError, backends, use_backend

__version__ = "0.1.0"
__all__ = ["backends", "use_backend", "BackendUnavailableError", "__version__"]
