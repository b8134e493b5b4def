"""sparse_mlm_loss: masked-LM cross-entropy in which only labelled rows reach the vocabulary projection."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from fastbert.ops import _checks
from fastbert.ops._dispatch import opt_in, opt_out, pick, run, traced

Tensor = torch.Tensor


def _loss_dtype(hidden: Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs; fp64 inputs (gradcheck) keep fp64."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastbert::sparse_mlm_loss_fwd", mutates_args=())
def _mlm_fwd(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Optional[Tensor], ignore_index: int,
             compute_grad: bool, backend: str, max_labelled: Optional[int] = None
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if traced(backend):
        _checks.labels_values(labels, weight.shape[0], ignore_index)
    # autocast off: the backends choose their own GEMM dtypes (fp32 logits and gradients)
    with torch.autocast(hidden.device.type, enabled=False):
        loss, dh, dw, db = run("sparse_mlm_loss_fwd", backend, hidden, labels, weight, bias, ignore_index,
                               compute_grad, max_labelled)
    acc = _loss_dtype(hidden)
    grads = [opt_out(None if g is None else g.to(acc), hidden) for g in (dh, dw, db)]
    return (loss.to(acc), *grads)


@_mlm_fwd.register_fake
def _(hidden, labels, weight, bias, ignore_index, compute_grad, backend, max_labelled=None):
    acc = _loss_dtype(hidden)
    loss = hidden.new_empty((), dtype=acc)
    if not compute_grad:
        e = hidden.new_empty((0,))
        return loss, e, e.clone(), e.clone()
    db = bias.new_empty(bias.shape, dtype=acc) if bias is not None else hidden.new_empty((0,))
    return loss, hidden.new_empty(hidden.shape, dtype=acc), weight.new_empty(weight.shape, dtype=acc), db


def _setup(ctx, inputs, output):
    hidden, labels, weight, bias, ignore_index, compute_grad, backend, max_labelled = inputs
    loss, dh, dw, db = output
    ctx.compute_grad = compute_grad
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)


def _backward(ctx, gloss, *_):
    if not ctx.compute_grad:
        raise RuntimeError("sparse_mlm_loss: gradients were not computed in the forward (it ran with "
                           "grad disabled or no input requiring grad)")
    dh, dw, db = ctx.saved_tensors
    g = gloss.to(dh.dtype)
    # The upstream gradient (e.g. GradScaler's 65536) is applied in fp32, then rounded once to the
    # parameter dtype: an fp16 gradient of the mean loss would underflow first (issue 22.3).
    dh_dt, dw_dt, db_dt = ctx.dtypes
    db_out = (db * g).to(db_dt) if opt_in(db) is not None else None
    return (dh * g).to(dh_dt), None, (dw * g).to(dw_dt), db_out, None, None, None, None


_mlm_fwd.register_autograd(_backward, setup_context=_setup)


def sparse_mlm_loss(hidden: Tensor, labels: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    ignore_index: int = -100, max_labelled: Optional[int] = None) -> Tensor:
    """Mean cross-entropy over the rows of ``hidden`` whose label is not ``ignore_index``.

    Args:
        hidden: ``[T, H]`` (or ``[..., H]`` with labels ``[...]``) fp16/bf16/fp32; labels: int64;
        weight: ``[V, H]`` decoder (tied embeddings); bias: ``[V]`` or None.
        max_labelled: an upper bound on the number of labelled rows, e.g. ``hidden.shape[0]`` when the
            caller passes only labelled rows. With it the op never waits for the GPU (no host sync, fit
            for CUDA graphs); if more rows are labelled the loss and gradients are NaN. None: the op
            counts the labelled rows on the host (one small sync) and projects exactly those.
    Returns:
        fp32 scalar (fp64 for fp64 inputs). Logits of unlabelled rows are never computed; no labelled rows gives 0, not NaN.
        The gradient is computed in the same pass as the loss (when grad is enabled) and scaled in the
        backward. No label smoothing.
    """
    _checks.tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, min_dim=1)
    dev = hidden.device
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, dim=2, device=dev)
    Hd = hidden.shape[-1]
    if weight.shape[1] != Hd:
        raise ValueError(f"weight: expected shape (vocab, {Hd}) to match hidden's last dim, got {tuple(weight.shape)}")
    V = weight.shape[0]
    _checks.optional_vector("bias", bias, V, dev)
    h2 = _checks.flat2d(hidden)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(labels.shape)}")
    lab = labels.reshape(-1)
    _checks.labels(lab, h2.shape[0], V, ignore_index, dev)
    lab = lab.long().contiguous()
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else None
    compute_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if max_labelled is not None and (isinstance(max_labelled, bool)
                                     or not isinstance(max_labelled, (int, torch.SymInt))  # SymInt: compiled
                                     or (isinstance(max_labelled, int) and max_labelled < 0)):
        raise ValueError(f"max_labelled: expected a non-negative int or None, got {max_labelled!r}")
    backend = pick("sparse_mlm_loss_fwd", dev, hidden.dtype, h2, lab, w, b, int(ignore_index), compute_grad,
                   max_labelled)
    loss, _, _, _ = _mlm_fwd(h2, lab, w, b, int(ignore_index), compute_grad, backend, max_labelled)
    return loss
