"""fastbert.patch: fastbert ops inside Hugging Face BERT (outputs and gradients unchanged), and HF weights loaded
into fastbert's classic baseline (outputs reproduced). Small randomly initialised HF models, no download.
The other families and the unpadded encoder: tests/test_hf.py."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is needed for the Hugging Face tests")

from fastbert import nn as fnn  # noqa: E402
from fastbert.models import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel  # noqa: E402
from fastbert.patch import apply_fastbert, config_from_hf, convert_hf_state_dict, from_hf  # noqa: E402
from fastbert.testing import assert_close  # noqa: E402


def _hf_config(**kw):
    # head dim 32: the smallest the fastbert attention kernels take (for the unpadded load test)
    base = dict(vocab_size=157, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                max_position_embeddings=40, type_vocab_size=2)
    base.update(kw)
    return transformers.BertConfig(**base)


def _batch(V=157):
    ids = torch.randint(1, V, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    tt = torch.zeros_like(ids)
    tt[:, 6:] = 1
    labels = torch.full_like(ids, -100)
    labels[0, [2, 12]] = torch.tensor([5, 156])
    labels[1, 7] = 8
    labels[2, 1] = 3
    return ids, mask, tt, labels


def _run(model, proj_seed, **inputs):
    """Forward + backward of the loss (or of a fixed projection of the logits); returns output and grads."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    if out.loss is not None and "labels" in inputs and inputs["labels"].dim() == 2:  # MLM: loss and labelled logits
        out.loss.backward()
        logits = out.logits if out.logits.dim() == 2 else out.logits[inputs["labels"] != -100]
        val = torch.cat([out.loss.reshape(1).to(logits.dtype), logits.detach().flatten()])
    elif out.loss is not None:
        out.loss.backward()
        val = out.loss
    else:
        g = torch.Generator().manual_seed(proj_seed)  # the same projection for every model compared
        proj = torch.randn(out.logits.shape, generator=g, dtype=torch.float64).to(out.logits.dtype)
        real = inputs["attention_mask"].bool()  # outputs at pads are meaningless (HF: attended garbage; ours: 0)
        (out.logits * proj * real[..., None]).sum().backward()
        val = out.logits[real]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return val.detach(), grads


def _check_against_hf(hf, patched, inputs):
    """patched (fp32) vs HF in fp64 (the reference) with HF in fp32 as the peer, forward and every gradient."""
    hf64 = copy.deepcopy(hf).double()
    seed = int(torch.randint(0, 2**31 - 1, ()))
    ref, gref = _run(hf64, seed, **inputs)
    peer, gpeer = _run(hf, seed, **inputs)
    out, gout = _run(patched, seed, **inputs)
    assert_close(out, ref, peer=peer, factor=2, name="output")
    assert gout.keys() == gref.keys()
    for n in gref:
        assert_close(gout[n], gref[n], peer=gpeer[n], factor=3, name=f"grad {n}")


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_apply_fastbert_masked_lm(hidden_act):
    hf = transformers.BertForMaskedLM(_hf_config(hidden_act=hidden_act)).eval()
    keys = list(hf.state_dict())
    patched, summary = apply_fastbert(copy.deepcopy(hf), return_summary=True)
    assert summary == {"family": "bert", "attention": "fastbert", "unpad": False, "add_norm": 4, "layer_norm": 1,
                       "dense_gelu": 2, "geglu": 0, "head_transform": 1, "mlm_loss": True, "skipped": []}
    assert list(patched.state_dict()) == keys  # same names, so checkpoints move both ways
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in patched.modules())
    assert sum(isinstance(m, fnn.LayerNorm) for m in patched.modules()) == 6
    ids, mask, tt, labels = _batch()
    # loss through the sparse MLM head (labelled rows only), and full logits without labels
    _check_against_hf(hf, patched, dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels))
    _check_against_hf(hf, patched, dict(input_ids=ids, attention_mask=mask, token_type_ids=tt))
    # HF's output contract (issue 14.3): logits of the labelled rows, tuples with return_dict=False
    loss, logits = patched(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert logits.shape == (int((labels != -100).sum()), 157) and loss.dim() == 0


@pytest.mark.parametrize("num_labels", [3, 1])
def test_apply_fastbert_sequence_classification(num_labels):
    hf = transformers.BertForSequenceClassification(_hf_config(num_labels=num_labels)).eval()
    patched = apply_fastbert(copy.deepcopy(hf))
    assert patched.fastbert_patch["add_norm"] == 4 and patched.fastbert_patch["mlm_loss"] is False
    ids, mask, tt, _ = _batch()
    y = torch.tensor([0, 2, 1]) if num_labels > 1 else torch.tensor([0.5, -1.0, 2.0])
    _check_against_hf(hf, patched, dict(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=y))


def test_apply_fastbert_shares_parameters_and_reports_unsupported_activation():
    hf = transformers.BertForMaskedLM(_hf_config(hidden_act="relu"))
    params = {id(p) for p in hf.parameters()}
    _, summary = apply_fastbert(hf, return_summary=True)
    assert {id(p) for p in hf.parameters()} == params  # shared, not copied: an existing optimizer keeps working
    assert summary["dense_gelu"] == 0 and summary["add_norm"] == 4 and "relu" in summary["skipped"][0]
    assert summary["head_transform"] == 0  # the MLM head's activation is relu too
    with pytest.raises(ValueError, match="model"):
        apply_fastbert("bert")


# ----------------------------------------------------------------------------------------------
# HF weights -> fastbert classic baseline
# ----------------------------------------------------------------------------------------------
def test_from_hf_masked_lm_reproduces_hf():
    hf = transformers.BertForMaskedLM(_hf_config()).eval()
    ids, mask, tt, labels = _batch()
    fb = from_hf(hf)
    assert isinstance(fb, BertForMaskedLM) and not fb.training
    assert fb.config.position_embedding_type == "learned" and fb.config.attention_impl == "padded_sdpa"
    assert fb.loading_info == {"missing_keys": [], "unexpected_keys": []}
    with torch.no_grad():
        ref_logits = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        ref_loss = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss
        hf64 = copy.deepcopy(hf).double()
        ref64 = hf64(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        loss64 = hf64(input_ids=ids, attention_mask=mask, token_type_ids=tt, labels=labels).loss
    real = mask.bool()
    for impl in ("padded_sdpa", "unpadded"):  # the HF weights also run unpadded (no attention dropout in eval)
        model = fb if impl == "padded_sdpa" else from_hf(hf, attention_impl=impl, attention_probs_dropout_prob=0.0)
        with torch.no_grad():
            logits = model(ids, mask, token_type_ids=tt).logits
            loss = model(ids, mask, token_type_ids=tt, labels=labels).loss
        assert logits.shape == ref_logits.shape
        assert_close(logits[real], ref64[real], peer=ref_logits[real], factor=2, name=f"logits ({impl})")
        assert_close(loss, loss64, peer=ref_loss, factor=2, name=f"loss ({impl})")


def test_from_hf_classifier_and_encoder_and_state_dict():
    ids, mask, tt, _ = _batch()
    hf = transformers.BertForSequenceClassification(_hf_config(num_labels=3)).eval()
    fb = from_hf(hf)
    assert isinstance(fb, BertForSequenceClassification) and fb.num_labels == 3
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        ref64 = copy.deepcopy(hf).double()(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        assert_close(fb(ids, mask, token_type_ids=tt).logits, ref64, peer=ref, name="classifier logits")
    # bare encoder, loaded from a state dict + HF config
    enc = transformers.BertModel(_hf_config()).eval()
    fb_enc = from_hf(enc.state_dict(), config=enc.config)
    assert isinstance(fb_enc, BertModel) and fb_enc.pooler is not None
    with torch.no_grad():
        r = enc(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        r64 = copy.deepcopy(enc).double()(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        o = fb_enc(ids, mask, token_type_ids=tt)
    real = mask.bool()
    assert_close(o.last_hidden_state[real], r64.last_hidden_state[real], peer=r.last_hidden_state[real], name="hidden")
    assert_close(o.pooler_output, r64.pooler_output, peer=r.pooler_output, name="pooled")
    assert torch.all(o.last_hidden_state[~real] == 0)
    with pytest.raises(ValueError, match="config"):
        from_hf(enc.state_dict())


def test_convert_hf_state_dict_layout():
    hf_cfg = _hf_config()
    hf = transformers.BertForMaskedLM(hf_cfg)
    cfg = config_from_hf(hf_cfg, pad_vocab_size_multiple=64)
    sd = convert_hf_state_dict(hf.state_dict(), cfg)
    q = hf.bert.encoder.layer[1].attention.self
    W = sd["bert.layers.1.attention.Wqkv.weight"]
    assert torch.equal(W, torch.cat([q.query.weight, q.key.weight, q.value.weight]))
    emb = sd["bert.embeddings.word_embeddings.weight"]
    assert emb.shape[0] == cfg.padded_vocab_size == 192 and torch.all(emb[157:] == 0)
    assert set(sd) == set(BertForMaskedLM(cfg).state_dict())
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf(_hf_config(hidden_act="relu"))
    assert isinstance(config_from_hf(hf_cfg), BertConfig)


def _logits_or_hidden(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


@pytest.mark.parametrize("kind", ["bert-untied-mlm", "roberta-mlm", "roberta-classifier", "xlm-roberta-encoder",
                                  "electra-mlm"])
def test_from_hf_families_reproduce_hf(kind):
    """RoBERTa (positions from padding_idx + 1), XLM-R, ELECTRA, and (issue 22.2) a BERT MLM whose decoder
    is not tied to the word embeddings: every weight used, outputs at real tokens reproduced."""
    family, _, head = kind.partition("-")
    common = dict(vocab_size=157, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                  max_position_embeddings=40)
    if head.startswith("roberta"):
        family, head = "xlm-roberta", head.split("-", 1)[1]
    if family == "bert":
        hf = transformers.BertForMaskedLM(transformers.BertConfig(**common, tie_word_embeddings=False))
        with torch.no_grad():  # make sure the untied decoder really differs (HF's init may copy it)
            hf.cls.predictions.decoder.weight.normal_(0, 0.5)
    else:
        cls = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "electra": "Electra"}[family]
        extra = {"pad_token_id": 1} if "roberta" in family else {"embedding_size": 64}
        cfg = getattr(transformers, f"{cls}Config")(**common, **extra, **({"num_labels": 3} if head == "classifier" else {}))
        suffix = {"mlm": "ForMaskedLM", "classifier": "ForSequenceClassification", "encoder": "Model"}[head]
        hf = getattr(transformers, f"{cls}{suffix}")(cfg)
    hf.eval()
    ids, mask, _, _ = _batch()
    if "roberta" in family:  # RoBERTa derives positions from the pad id (1): it may appear at pads only
        ids[ids == 1] = 2
        ids[mask == 0] = 1
    fb = from_hf(hf)
    assert fb.loading_info == {"missing_keys": [], "unexpected_keys": []}
    assert fb.config.tie_word_embeddings == (family != "bert")
    with torch.no_grad():
        ref = _logits_or_hidden(hf(input_ids=ids, attention_mask=mask))
        ref64 = _logits_or_hidden(copy.deepcopy(hf).double()(input_ids=ids, attention_mask=mask))
        out = _logits_or_hidden(fb(ids, mask))
    real = mask.bool()
    if ref.dim() == 3:
        ref, ref64, out = ref[real], ref64[real], out[real]
    assert_close(out, ref64, peer=ref, name=kind)


def test_from_hf_refuses_what_it_would_drop_or_cannot_build():
    common = dict(vocab_size=157, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
                  max_position_embeddings=40)
    for model in (transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=157, dim=64, n_layers=1,
                                                                             n_heads=2, hidden_dim=96)),
                  transformers.ModernBertModel(transformers.ModernBertConfig(
                      vocab_size=157, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)),
                  transformers.ElectraForSequenceClassification(transformers.ElectraConfig(**common)),
                  transformers.BertForPreTraining(transformers.BertConfig(**common))):
        with pytest.raises(ValueError, match=r"not supported by from_hf; supported model types \['bert', 'electra'"):
            from_hf(model)
    # a state dict with an NSP head: named, not silently dropped; strict=False drops and lists it
    sd = transformers.BertForPreTraining(transformers.BertConfig(**common)).state_dict()
    with pytest.raises(ValueError, match="cls.seq_relationship.weight"):
        from_hf(sd, config=transformers.BertConfig(**common))
    fb = from_hf(sd, config=transformers.BertConfig(**common), strict=False)
    assert "cls.seq_relationship.weight" in fb.loading_info["unexpected_keys"]
    # an untied decoder under a config that says tied: the key is named
    untied = transformers.BertForMaskedLM(transformers.BertConfig(**common, tie_word_embeddings=False)).state_dict()
    untied["cls.predictions.decoder.weight"] = untied["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(ValueError, match="cls.predictions.decoder.weight"):
        from_hf(untied, config=config_from_hf(transformers.BertConfig(**common)))
    with pytest.raises(ValueError, match="embedding_size"):
        config_from_hf(transformers.ElectraConfig(**common, embedding_size=32))


def test_glue_hf_checkpoint_path_names_dropped_weights(tmp_path):
    """train.glue's Hugging Face path (issue 22.2): the MLM head may be left out and the task head is new, but
    an encoder weight that is missing, resized or unused is an error naming it, never silently replaced."""
    from train import glue

    common = dict(vocab_size=157, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96,
                  max_position_embeddings=40)
    transformers.BertForMaskedLM(transformers.BertConfig(**common)).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + ["a"] * 152))
    src = glue.load_model_source(tmp_path)
    assert src.kind == "hf" and src.build(3).num_labels == 3  # cls.* unused, classifier + pooler new: fine
    for info, word in (({"missing_keys": ["bert.encoder.layer.0.output.dense.weight"]}, "missing from"),
                       ({"mismatched_keys": [("bert.embeddings.word_embeddings.weight", (1,), (2,))]}, "another shape"),
                       ({"unexpected_keys": ["bert.encoder.layer.5.output.dense.weight"]}, "unused from")):
        with pytest.raises(ValueError, match=word):
            glue.check_hf_loading_info(info, "ckpt")
    model = src.build(2)
    state = {k: v for k, v in model.state_dict().items() if "layer.0.intermediate" not in k}
    with pytest.raises(RuntimeError, match="layer.0.intermediate.dense"):
        glue._load_encoder_from(src.build(2), state)
