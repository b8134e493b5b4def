"""fastbert.models: config round-trip, the MosaicBERT/baseline switches, heads, checkpoint I/O, ALiBi length
extrapolation, input errors, and torch.compile of one layer. Tiny shapes: everything runs on CPU."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastbert.models import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel
from fastbert.models.bert import BertLayer
from fastbert.testing import assert_close

# head dim 32 (the smallest the flash kernels take), small vocab so the decoder is cheap
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=203,
            hidden_dropout_prob=0.0)


def _cfg(**kw):
    return BertConfig.preset("tiny", **{**TINY, **kw})


def _batch(B=3, S=11, V=203):
    ids = torch.randint(1, V, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    lens = [S, S - 4, 2][:B]
    for i, L in enumerate(lens):
        mask[i, L:] = 0
    labels = torch.full((B, S), -100, dtype=torch.long)
    labels[0, [1, 5, S - 1]] = torch.tensor([3, 9, 202])
    labels[1, 2] = 7
    if B > 2:
        labels[2, 0] = 0
    return ids, mask, labels


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def test_config_presets_roundtrip_and_padding(tmp_path):
    base = BertConfig.preset("base")
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == (12, 768, 12, 3072)
    assert (base.position_embedding_type, base.mlp_type, base.attention_impl) == ("alibi", "glu", "unpadded")
    assert base.attention_probs_dropout_prob == 0.0
    assert base.vocab_size == 30522 and base.padded_vocab_size == 30528
    assert BertConfig(vocab_size=64).padded_vocab_size == 64 and BertConfig(vocab_size=65).padded_vocab_size == 128
    assert BertConfig(vocab_size=30522, pad_vocab_size_multiple=1).padded_vocab_size == 30522
    tiny = BertConfig.preset("tiny")
    assert 2 <= tiny.num_hidden_layers <= 4 and 128 <= tiny.hidden_size <= 256 and tiny.vocab_size == 30522
    bl = BertConfig.preset("base-baseline")
    assert (bl.position_embedding_type, bl.mlp_type, bl.attention_impl) == ("learned", "mlp", "padded_sdpa")
    large = BertConfig.preset("large", vocab_size=1000)
    assert large.hidden_size == 1024 and large.vocab_size == 1000
    # JSON round trip: dict, file and directory
    assert BertConfig.from_dict(json.loads(json.dumps(large.to_dict()))) == large
    large.save(str(tmp_path))
    assert BertConfig.load(str(tmp_path)) == large
    assert BertConfig.load(str(tmp_path / "config.json"), num_labels=5).num_labels == 5


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="name"):
        BertConfig.preset("huge")
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig(position_embedding_type="rotary")
    with pytest.raises(ValueError, match="divisible"):
        BertConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob"):
        BertConfig(attention_probs_dropout_prob=0.1)  # unpadded flash attention has no dropout
    with pytest.raises(ValueError, match="unknown BertConfig field"):
        BertConfig.from_dict({"hiden_size": 3})


def test_base_parameter_count():
    # built on the meta device: no memory, no init cost
    with torch.device("meta"):
        n = BertForMaskedLM(BertConfig.preset("base")).num_parameters()
    assert 136e6 < n < 138.5e6, n  # MosaicBERT-base: ~137M with vocab 30528


# ----------------------------------------------------------------------------------------------
# MLM model
# ----------------------------------------------------------------------------------------------
def test_mlm_sparse_loss_matches_dense_loss_and_tied_decoder():
    model = BertForMaskedLM(_cfg()).eval()
    assert model.decoder_weight is model.bert.embeddings.word_embeddings.weight
    ids, mask, labels = _batch()
    out = model(ids, mask, labels=labels)
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    assert out.n_masked == int((labels != -100).sum()) == 5
    # independent dense computation over the padded hidden states: full logits over the padded vocab
    hidden = model.bert(ids, mask).last_hidden_state
    h = model.head.transform(hidden[labels != -100])
    dense_logits = h @ model.decoder_weight.t() + model.head.bias
    ref = F.cross_entropy(dense_logits.double(), labels[labels != -100])
    assert torch.allclose(out.loss.double(), ref, rtol=1e-5, atol=1e-6)
    # eval mode returns the labelled rows' logits (real vocab only) and the argmax hits
    assert out.logits.shape == (5, 203)
    assert torch.allclose(out.logits, dense_logits[:, :203], atol=1e-5)
    assert torch.equal(out.masked_labels, labels[labels != -100])
    assert int(out.n_correct) == int((dense_logits[:, :203].argmax(-1) == out.masked_labels).sum())
    assert out.masked_accuracy == int(out.n_correct) / 5
    # training mode: no extra vocabulary projection
    model.train()
    out_t = model(ids, mask, labels=labels)
    assert out_t.logits is None and out_t.n_correct is None and out_t.masked_accuracy is None


def test_mlm_logits_without_labels_zero_at_pads_and_padding_invariant():
    model = BertForMaskedLM(_cfg()).eval()
    ids, mask, _ = _batch()
    logits = model(ids, mask).logits
    assert logits.shape == (3, 11, 203)
    assert torch.all(logits[mask == 0] == 0)
    # a sequence alone, unpadded, gives the same logits as inside the padded batch
    alone = model(ids[1:2, :7]).logits
    assert torch.allclose(alone[0], logits[1, :7], atol=1e-5)


def test_mlm_training_step_reaches_every_parameter():
    model = BertForMaskedLM(_cfg()).train()
    ids, mask, labels = _batch()
    model(ids, mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "token_type" not in name:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mlp_type", ["glu", "mlp"])
@pytest.mark.parametrize("position", ["alibi", "learned"])
def test_unpadded_and_padded_attention_agree(position, mlp_type):
    """The unpadded path (fastbert varlen attention) and padded SDPA give the same model, forward and backward."""
    unp = BertForMaskedLM(_cfg(position_embedding_type=position, mlp_type=mlp_type))
    pad = BertForMaskedLM(_cfg(position_embedding_type=position, mlp_type=mlp_type, attention_impl="padded_sdpa"))
    pad.load_state_dict(unp.state_dict())
    ids, mask, labels = _batch()
    tt = torch.zeros_like(ids)
    tt[:, 4:] = 1
    lu = unp(ids, mask, token_type_ids=tt, labels=labels).loss
    lp = pad(ids, mask, token_type_ids=tt, labels=labels).loss
    assert torch.allclose(lu, lp, rtol=1e-5)
    lu.backward()
    lp.backward()
    for (name, a), b in zip(unp.named_parameters(), pad.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_alibi_runs_far_beyond_training_length():
    """ALiBi has no position weights: a model (trained at 128) runs at 512 and 1024 tokens unchanged."""
    model = BertForMaskedLM(_cfg(num_hidden_layers=1, max_position_embeddings=128)).eval()
    n_params = model.num_parameters()
    for layer in model.bert.layers:
        assert layer.attention.alibi_slopes.shape == (2,)  # sized by heads, never by length
    for S in (512, 1024):
        ids = torch.randint(1, 203, (1, S))
        labels = torch.full_like(ids, -100)
        labels[0, ::97] = 5
        with torch.no_grad():
            out = model(ids, labels=labels)
            hidden = model.bert(ids[:, : S // 2 + 3], torch.ones(1, S // 2 + 3)).last_hidden_state
        assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all() and torch.isfinite(hidden).all()
    assert model.num_parameters() == n_params
    learned = BertForMaskedLM(_cfg(position_embedding_type="learned", max_position_embeddings=128))
    with pytest.raises(ValueError, match="input_ids.*max_position_embeddings"):
        learned(torch.randint(1, 203, (1, 129)))


def test_bad_inputs_raise_value_errors_naming_the_argument():
    model = BertForMaskedLM(_cfg())
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float(), mask)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0], mask[0])
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, mask[:, :5])
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, mask, token_type_ids=torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(ids, mask, labels=labels[:2])
    bad = labels.clone()
    bad[2, 9] = 4  # a label on a padding position
    with pytest.raises(ValueError, match="labels"):
        model(ids, mask, labels=bad)
    with pytest.raises(ValueError, match="config"):
        BertForMaskedLM({"hidden_size": 64})


# ----------------------------------------------------------------------------------------------
# classification + checkpoints
# ----------------------------------------------------------------------------------------------
def test_sequence_classification_losses():
    ids, mask, _ = _batch()
    clf = BertForSequenceClassification(_cfg(), num_labels=3).eval()
    y = torch.tensor([0, 2, 1])
    out = clf(ids, mask, labels=y)
    assert out.logits.shape == (3, 3)
    assert torch.allclose(out.loss, F.cross_entropy(out.logits, y))
    # the pooled token is the first token ([CLS]) of each sequence
    hidden = clf.bert(ids, mask).last_hidden_state
    ref_logits = clf.classifier(torch.tanh(clf.bert.pooler.dense(hidden[:, 0])))
    assert torch.allclose(out.logits, ref_logits, atol=1e-6)
    reg = BertForSequenceClassification(_cfg(), num_labels=1)
    t = torch.tensor([0.5, -1.0, 2.0])
    out = reg(ids, mask, labels=t)
    assert out.logits.shape == (3, 1) and torch.allclose(out.loss, F.mse_loss(out.logits[:, 0], t))
    with pytest.raises(ValueError, match="labels"):
        clf(ids, mask, labels=torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="labels"):
        clf(ids, mask, labels=torch.tensor([0, 1]))


def test_mean_pooling_classifier_reads_the_mean_of_real_tokens():
    """classifier_pooling="mean": the pooler reads each sequence's mean over its real tokens (pads excluded),
    so extra padding changes nothing; gradients reach every token of the encoder output."""
    ids, mask, _ = _batch()
    clf = BertForSequenceClassification(_cfg(classifier_pooling="mean"), num_labels=2).eval()
    out = clf(ids, mask)
    hidden = clf.bert(ids, mask).last_hidden_state                      # zeros at pads
    mean = hidden.sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(out.logits, clf.classifier(torch.tanh(clf.bert.pooler.dense(mean))), atol=1e-6)
    pad = torch.zeros(3, 5, dtype=torch.long)
    longer = clf(torch.cat([ids, pad + 7], 1), torch.cat([mask, pad], 1))
    assert torch.allclose(out.logits, longer.logits, atol=1e-6)
    with pytest.raises(ValueError, match="classifier_pooling"):
        _cfg(classifier_pooling="max")


def test_save_load_roundtrip_and_mlm_to_classifier(tmp_path, caplog):
    from safetensors.torch import load_file

    model = BertForMaskedLM(_cfg()).eval()
    ids, mask, labels = _batch()
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    keys = load_file(str(tmp_path / "model.safetensors")).keys()
    assert not any("decoder" in k for k in keys)  # tied: stored once, as the word embedding
    back = BertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert back.config == model.config and back.loading_info == {"missing_keys": [], "unexpected_keys": []}
    assert back.decoder_weight is back.bert.embeddings.word_embeddings.weight
    assert torch.equal(back(ids, mask, labels=labels).loss, model(ids, mask, labels=labels).loss)
    # MLM checkpoint -> classifier: encoder kept, new head initialised and reported
    with caplog.at_level("WARNING", logger="fastbert"):
        clf = BertForSequenceClassification.from_pretrained(str(tmp_path), num_labels=4)
    assert clf.num_labels == 4 and clf.classifier.out_features == 4
    info = clf.loading_info
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias", "bert.pooler.dense.weight",
                                         "bert.pooler.dense.bias"}
    assert info["unexpected_keys"] and all(k.startswith("head.") for k in info["unexpected_keys"])
    assert "classifier.weight" in caplog.text and "head.bias" in caplog.text
    for k, v in model.bert.state_dict().items():
        assert torch.equal(clf.bert.state_dict()[k], v), k
    # classifier checkpoint round trip, and a config override at load time
    clf.save_pretrained(str(tmp_path / "clf"))
    clf2 = BertForSequenceClassification.from_pretrained(str(tmp_path / "clf"), attention_impl="padded_sdpa").eval()
    assert clf2.config.attention_impl == "padded_sdpa" and clf2.loading_info["missing_keys"] == []
    assert torch.allclose(clf2(ids, mask).logits, clf.eval()(ids, mask).logits, atol=1e-5)
    with pytest.raises(ValueError, match="classifier.*num_labels"):
        BertForSequenceClassification.from_pretrained(str(tmp_path / "clf"), num_labels=2)
    with pytest.raises(ValueError, match="directory"):
        BertForMaskedLM.from_pretrained(str(tmp_path / "nowhere"))
    # a bare encoder loads from the MLM checkpoint too
    enc = BertModel.from_pretrained(str(tmp_path))
    assert enc.loading_info["missing_keys"] == []


def test_compile_one_layer_fullgraph():
    """One unpadded encoder layer traces with no graph break (the fastbert ops are torch.library ops).
    aot_eager keeps the test fast; the graph capture (the part that can break) is the same as inductor's."""
    layer = BertLayer(_cfg())
    x = torch.randn(11, 64, requires_grad=True)
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, cu, 7)
    y.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref = layer(x, cu, 7)
    ref.sum().backward()
    assert torch.allclose(y, ref, atol=1e-6) and torch.allclose(gx, x.grad, atol=1e-6)
    # the whole model with compiled layers: same loss as eager, across two batch shapes
    model = BertForMaskedLM(_cfg())
    eager = BertForMaskedLM(_cfg())
    eager.load_state_dict(model.state_dict())
    model.compile_layers(backend="aot_eager")
    for B, S in ((3, 11), (2, 7)):
        ids, mask, labels = _batch(B, S)
        assert torch.allclose(model(ids, mask, labels=labels).loss, eager(ids, mask, labels=labels).loss, atol=1e-6)


@pytest.mark.parametrize("impl", ["unpadded", "padded_sdpa"])
def test_bf16_autocast_training_step(impl):
    """Under bf16 autocast (the GPU training setting) the residual stream, the fp32 LayerNorm/embedding
    parameters and the tied decoder meet bf16 activations: the step must run, with an fp32 loss close to
    the fp32 model's and finite gradients."""
    model = BertForMaskedLM(_cfg(attention_impl=impl))
    ids, mask, labels = _batch()
    ref = model(ids, mask, labels=labels).loss.item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, mask, labels=labels)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref) < 0.02 * ref  # bf16 activations: ~1% of a ~5.3 loss at init
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
def test_mlm_on_gpu_kernels_matches_reference():
    """On a GPU, ``auto`` runs the CUDA/Triton kernels: under bf16 autocast the encoder output and the MLM
    gradients stay within the tolerance rule of the torch-backend model (fp32 reference, bf16 peer)."""
    import fastbert

    model = BertForMaskedLM(_cfg()).cuda()
    ids, mask, labels = (t.cuda() for t in _batch())
    real = mask.bool()

    def run(backend, autocast):
        model.zero_grad(set_to_none=True)
        with fastbert.use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            hidden = model.bert(ids, mask).last_hidden_state[real].float()
            model(ids, mask, labels=labels).loss.backward()
        return hidden.detach(), model.bert.embeddings.word_embeddings.weight.grad.clone()

    ref_h, ref_g = run("torch", False)
    peer_h, peer_g = run("torch", True)
    out_h, out_g = run("auto", True)
    assert_close(out_h, ref_h, peer=peer_h, factor=2, name="hidden")
    assert_close(out_g, ref_g, peer=peer_g, factor=3, name="grad word_embeddings")
