"""Public functional ops. Each is a ``torch.library`` custom op (fake + autograd registered, so
``torch.compile`` traces through it) whose implementation comes from the backend table
(``fastbert.registry``): the CUDA extension, Triton, or the PyTorch reference, chosen per call."""
from fastbert.ops.activations import bias_gelu, geglu
from fastbert.ops.attention import alibi_slopes, flash_attn_varlen_alibi
from fastbert.ops.layer_norm import layer_norm
from fastbert.ops.mlm_loss import sparse_mlm_loss
from fastbert.ops.padding import pad_input, unpad_indices, unpad_input

__all__ = ["unpad_input", "pad_input", "unpad_indices", "flash_attn_varlen_alibi", "alibi_slopes",
           "bias_gelu", "geglu", "layer_norm", "sparse_mlm_loss"]
