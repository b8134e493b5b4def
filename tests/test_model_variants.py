"""The recipe switches of fastbert.models (pre-LN, bias-free projections, headless MLM decoder, sinusoidal
positions, the classic baseline's fp32 LayerNorm and dense MLM head) against a plain-PyTorch reference
written here from the papers' formulas, not from the model code."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastbert.models import BertConfig, BertForMaskedLM
from fastbert.models.components import Fp32LayerNorm, sinusoidal_positions

V = 97
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=V,
             hidden_dropout_prob=0.0, pad_vocab_size_multiple=8)


def _batch(B=3, S=10):
    ids = torch.randint(5, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = torch.full((B, S), -100)
    labels[0, [0, 4, 9]] = torch.tensor([7, 8, 96])
    labels[1, 5] = 11
    labels[2, 1] = 12
    return ids, mask, labels


def _ln(x, mod):
    return F.layer_norm(x, (x.shape[-1],), mod.weight, mod.bias, mod.eps)


def _lin(x, mod):
    return F.linear(x, mod.weight, mod.bias)


def reference_encoder(model, ids, mask):
    """Hidden states ``[B, S, H]`` (fp64) of a BERT encoder computed on padded tensors with the textbook
    formulas: post-LN ``x = LN(x + f(x))`` or pre-LN ``x = x + f(LN(x))`` + a final LN; softmax attention
    with pads masked out of the keys and, for ALiBi, the bias ``-m_h |i - j|`` with the ALiBi paper's
    slopes ``m_h = 2^(-8 (h+1) / n_heads)`` (n_heads a power of two)."""
    c = model.config
    e = model.bert.embeddings
    B, S = ids.shape
    H, nh = c.hidden_size, c.num_attention_heads
    d = H // nh
    x = e.word_embeddings.weight[ids] + e.token_type_embeddings.weight[0]
    if c.position_embedding_type == "learned":
        x = x + e.position_embeddings.weight[:S]
    elif c.position_embedding_type == "sinusoidal":
        pos = torch.arange(S, dtype=torch.float64)[:, None]
        i = torch.arange(H // 2, dtype=torch.float64)[None, :]
        ang = pos / 10000 ** (2 * i / H)
        pe = torch.stack([torch.sin(ang), torch.cos(ang)], dim=-1).reshape(S, H)  # sin even, cos odd columns
        x = x + e.position_scale * pe
    if c.embedding_layer_norm:
        x = _ln(x, e.norm)
    bias = torch.zeros(B, nh, S, S, dtype=x.dtype)
    bias = bias.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
    if c.position_embedding_type == "alibi":
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / nh) for h in range(nh)], dtype=x.dtype)
        dist = (torch.arange(S)[:, None] - torch.arange(S)[None, :]).abs().to(x.dtype)
        bias = bias - slopes[None, :, None, None] * dist
    for layer in model.bert.layers:
        def attn(h):
            q, k, v = _lin(h, layer.attention.Wqkv).view(B, S, 3, nh, d).permute(2, 0, 3, 1, 4)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + bias, dim=-1)
            return _lin((p @ v).transpose(1, 2).reshape(B, S, H), layer.attention.out_proj)

        def mlp(h):
            a = _lin(h, layer.mlp.wi)
            if c.mlp_type == "glu":
                I = a.shape[-1] // 2
                a = F.gelu(a[..., :I]) * a[..., I:]
            else:
                a = F.gelu(a)
            return _lin(a, layer.mlp.wo)

        if c.layer_norm_position == "pre":
            x = x + attn(_ln(x, layer.attention_norm))
            x = x + mlp(_ln(x, layer.mlp_norm))
        else:
            x = _ln(x + attn(x), layer.attention_norm)
            x = _ln(x + mlp(x), layer.mlp_norm)
    if c.layer_norm_position == "pre":
        x = _ln(x, model.bert.final_norm)
    return x


def reference_mlm_loss(model, ids, mask, labels):
    h = reference_encoder(model, ids, mask)[labels != -100]
    head = model.head
    if head.dense is not None:
        h = _ln(F.gelu(_lin(h, head.dense)), head.norm)
    logits = F.linear(h, model.decoder_weight, head.bias)  # all padded-vocab columns, as the model normalises
    return F.cross_entropy(logits, labels[labels != -100])


VARIANTS = {
    "post-ln": {},
    "pre-ln": dict(layer_norm_position="pre"),
    "pre-ln bias-free, headless decoder (Cramming)": dict(
        layer_norm_position="pre", linear_bias=False, mlm_head_transform=False, mlm_decoder_bias=False,
        position_embedding_type="sinusoidal"),
    "pre-ln, no embedding LayerNorm, learned positions, GELU MLP, padded attention (24hBERT layout)": dict(
        layer_norm_position="pre", position_embedding_type="learned", mlp_type="mlp", attention_impl="padded_sdpa",
        embedding_layer_norm=False),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_plain_pytorch_reference(name):
    model = BertForMaskedLM(BertConfig.preset("tiny", **{**SMALL, **VARIANTS[name]})).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affine and biases, so a dropped term would show
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "norm.bias", ".bias", "position_scale")):
                p.add_(0.1 * torch.randn_like(p))
    ids, mask, labels = _batch()
    got = model.bert(ids, mask).last_hidden_state
    ref = reference_encoder(model, ids, mask)
    real = mask.bool()
    # fp64 throughout, except the sinusoid table the model stores in fp32 (an fp32 rounding, ~6e-8, of it)
    tol = 1e-6 if model.config.position_embedding_type == "sinusoidal" else 1e-9
    assert torch.allclose(got[real], ref[real], rtol=tol, atol=tol), (got[real] - ref[real]).abs().max()
    loss = model(ids, mask, labels=labels).loss
    assert torch.allclose(loss.double(), reference_mlm_loss(model, ids, mask, labels), rtol=tol, atol=tol)


def test_bias_free_and_headless_parameters():
    model = BertForMaskedLM(BertConfig.preset("tiny", **{**SMALL, **VARIANTS[list(VARIANTS)[2]]}))
    names = dict(model.named_parameters())
    layer = model.bert.layers[0]
    for mod in (layer.attention.Wqkv, layer.attention.out_proj, layer.mlp.wi, layer.mlp.wo):
        assert mod.bias is None
    assert model.head.dense is None and model.head.bias is None
    assert not any(n.startswith("head.") for n in names), sorted(n for n in names if n.startswith("head."))
    assert "bert.final_norm.weight" in names and "bert.final_norm.bias" in names  # LayerNorm keeps its bias
    assert names["bert.embeddings.position_scale"].item() == pytest.approx(64 ** -0.5)
    assert "bert.embeddings.position_embeddings.weight" not in names


def test_sinusoidal_table_formula():
    pe = sinusoidal_positions(7, 6)
    p, i = 5, 1
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 6)))
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 6)))


def test_variant_save_load_roundtrip(tmp_path):
    cfg = BertConfig.preset("tiny", **{**SMALL, **VARIANTS[list(VARIANTS)[2]]})
    model = BertForMaskedLM(cfg).eval()
    model.save_pretrained(str(tmp_path))
    again = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    ids, mask, labels = _batch()
    assert torch.equal(model(ids, mask, labels=labels).loss, again(ids, mask, labels=labels).loss)


def test_dense_head_equals_sparse_head_and_scores_every_position():
    sparse = BertForMaskedLM(BertConfig.preset("tiny", **SMALL)).eval()
    dense = BertForMaskedLM(BertConfig.preset("tiny", **SMALL, mlm_head="dense")).eval()
    dense.load_state_dict(sparse.state_dict())
    ids, mask, labels = _batch()
    a, b = sparse(ids, mask, labels=labels), dense(ids, mask, labels=labels)
    assert torch.allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5) and torch.equal(a.n_correct, b.n_correct)
    # the dense head transforms and projects all B*S positions, pads included (as Hugging Face's BERT)
    rows = []
    orig = dense.head.transform
    dense.head.transform = lambda h: rows.append(h.shape[0]) or orig(h)
    dense(ids, mask, labels=labels)
    assert rows[0] == ids.numel()


def test_fp32_layer_norm_keeps_fp32_under_autocast():
    ln = Fp32LayerNorm(16, eps=1e-12)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_()
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    r = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, z = ln(x, residual=r)
        y1 = ln(x)
    assert y.dtype == z.dtype == y1.dtype == torch.float32
    zr = x.double() + r.double()
    assert torch.allclose(z.double(), zr, atol=1e-6)
    assert torch.allclose(y.double(), F.layer_norm(zr, (16,), ln.weight.double(), ln.bias.double(), 1e-12), atol=1e-5)


def test_baseline_preset_is_the_classic_bert():
    bl = BertConfig.preset("base-baseline")
    assert bl.fp32_layer_norm and bl.mlm_head == "dense" and bl.padded_vocab_size == 30522 == bl.vocab_size
    assert (bl.position_embedding_type, bl.mlp_type, bl.attention_impl) == ("learned", "mlp", "padded_sdpa")
    with torch.device("meta"):
        n = BertForMaskedLM(bl).num_parameters()
    assert n == 109_514_298  # Hugging Face's BertForMaskedLM(bert-base-uncased) without its pooler


def test_mosaicbert_base_unchanged():
    with torch.device("meta"):
        assert BertForMaskedLM(BertConfig.preset("base")).num_parameters() == 137_474_112
