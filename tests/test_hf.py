"""fastbert inside Hugging Face encoders (fastbert.hf, fastbert.hf_unpad, fastbert.patch.apply_fastbert).

Every family (BERT, RoBERTa, XLM-RoBERTa, ELECTRA, DistilBERT, ModernBERT), built small and random from a
config (no download), is run three ways: ``attn_implementation="fastbert"``, ``apply_fastbert(model)`` and
``apply_fastbert(model, unpad=True)`` (the BERT family). The MLM loss, the logits of the labelled rows, the
last hidden state at real tokens and every parameter gradient must match the same model under
``attn_implementation="eager"`` by fastbert's tolerance rule (reference: eager in fp64; peer: eager in the
same dtype; ModernBERT: SDPA, see ``_mlm``), in fp32 and bf16, on a padded batch with a length-1 row and a
fully padded row.
"""
import copy
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is needed for the Hugging Face tests")

import fastbert  # noqa: E402
from fastbert import hf  # noqa: E402
from fastbert.patch import apply_fastbert  # noqa: E402
from fastbert.testing import assert_close  # noqa: E402

V = 101
_COMMON = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
               max_position_embeddings=40, attention_probs_dropout_prob=0.0)


def _config(family, **kw):
    if family == "distilbert":
        base = dict(vocab_size=V, dim=64, n_layers=2, n_heads=2, hidden_dim=96, max_position_embeddings=40,
                    attention_dropout=0.0)
        return transformers.DistilBertConfig(**{**base, **kw})
    if family == "modernbert":  # layers 0 and 2 global, layer 1 local with a window of 4 either side
        base = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                    max_position_embeddings=64, local_attention=8, global_attn_every_n_layers=2, pad_token_id=0,
                    bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        return transformers.ModernBertConfig(**{**base, **kw})
    cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
           "xlm-roberta": transformers.XLMRobertaConfig, "electra": transformers.ElectraConfig}[family]
    extra = {"pad_token_id": 1} if "roberta" in family else {}
    if family == "electra":
        extra["embedding_size"] = 64
    return cls(**{**_COMMON, **extra, **kw})


def _mlm(family, **kw):
    # ModernBERT's eager attention gives NaN in fp64 on padded batches (its dtype-min mask becomes -inf in its
    # fp32 softmax, a query whose window holds only pads gets NaN, and NaN values of masked keys spread), so
    # its fp64 reference and its peer run SDPA.
    impl = "sdpa" if family == "modernbert" else "eager"
    model = transformers.AutoModelForMaskedLM.from_config(_config(family, **kw), attn_implementation=impl)
    return model.eval()


def _batch(family, B=4, S=11):
    """Lengths S, 6, 1, 0 (a fully padded row); pads carry the pad id, as a tokenizer writes them."""
    ids = torch.randint(3, V, (B, S))
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate([S, 6, 1, 0][:B]):
        mask[b, :n] = 1
    ids[mask == 0] = 1 if "roberta" in family else 0
    labels = torch.full_like(ids, -100)
    labels[0, [0, 4, S - 1]] = torch.randint(0, V, (3,))
    labels[1, min(5, S - 1)] = 7
    labels[2, 0] = 3
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _run(model, batch):
    """MLM loss, labelled-row logits, last hidden state at real tokens, and every parameter gradient."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, output_hidden_states=True)
    out.loss.backward()
    labelled = batch["labels"] != -100
    logits = out.logits[labelled] if out.logits.dim() == 3 else out.logits
    real = batch["attention_mask"].bool()
    vals = {"loss": out.loss, "logits": logits, "hidden": out.hidden_states[-1][real]}
    vals = {k: v.detach() for k, v in vals.items()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return vals, grads


def _check(got, ref, peer, what):
    vals, grads = got
    for r in (ref, peer):  # a NaN reference would make every comparison below pass
        assert all(torch.isfinite(t).all() for t in list(r[0].values()) + list(r[1].values())), f"{what}: reference"
    for k in ref[0]:
        floor = 1e-6
        if k == "loss":
            # The loss is one number, so PyTorch's own error on it is a single sample that can be tiny by chance
            # (a bf16 model's loss once met 4e-5 where ours had 1.9e-4). The mean cross-entropy moves by at most
            # twice the largest logit change, so the logits' rule bounds it: 2 x (factor x the peer's logit error).
            floor += 2 * 2 * (peer[0]["logits"].double() - ref[0]["logits"].double()).abs().max().item()
        assert_close(vals[k].to(peer[0][k].dtype), ref[0][k], peer=peer[0][k], factor=2, name=f"{what}: {k}",
                     atol_floor=floor)
    assert grads.keys() == ref[1].keys(), f"{what}: gradients of {sorted(set(ref[1]) ^ set(grads))}"
    for n in ref[1]:
        assert_close(grads[n], ref[1][n], peer=peer[1][n], factor=3, name=f"{what}: grad {n}")


_WAYS = {"attn": lambda m: m.set_attn_implementation(hf.register()),
         "patch": lambda m: apply_fastbert(m),
         "unpad": lambda m: apply_fastbert(m, unpad=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "modernbert"])
def test_three_ways_match_eager(family, dtype):
    model = _mlm(family)
    batch = _batch(family)
    ref = _run(copy.deepcopy(model).double(), batch)
    peer = _run(copy.deepcopy(model).to(dtype), batch)
    ways = ["attn", "patch"] + (["unpad"] if family in ("bert", "roberta", "xlm-roberta", "electra") else [])
    for way in ways:
        ours = copy.deepcopy(model).to(dtype)
        _WAYS[way](ours)
        _check(_run(ours, batch), ref, peer, f"{family} {way}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_unpadded_classifier_and_pooler(family, dtype):
    """Sequence classification (BERT: pooler; RoBERTa: its own head) and the base model's pooled output,
    with return_dict=False tuples; rows with at least one real token are compared."""
    cls = getattr(transformers, f"{'Bert' if family == 'bert' else 'Roberta'}ForSequenceClassification")
    model = cls(_config(family, num_labels=3)).eval()
    model.set_attn_implementation("eager")
    batch = _batch(family)
    del batch["labels"]
    keep = batch["attention_mask"].any(1)
    y = torch.tensor([0, 2, 1, 0])

    def run(m):
        m.zero_grad(set_to_none=True)
        logits = m(**batch, return_dict=False)[0]
        torch.nn.functional.cross_entropy(logits[keep].float(), y[keep]).backward()
        grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
        return {"logits": logits[keep].detach()}, grads

    ref, peer = run(copy.deepcopy(model).double()), run(copy.deepcopy(model).to(dtype))
    ours = apply_fastbert(copy.deepcopy(model).to(dtype), unpad=True)
    _check(run(ours), ref, peer, f"{family} classifier")
    if family == "bert":  # the bare encoder: pooled output and every hidden state, as a tuple
        with torch.no_grad():
            r = model.bert.double()(**batch, output_hidden_states=True, return_dict=False)
            p = copy.deepcopy(model.bert).to(dtype)(**batch, output_hidden_states=True, return_dict=False)
            o = ours.bert(**batch, output_hidden_states=True, return_dict=False)
        assert len(o) == len(r) == 3 and len(o[2]) == len(r[2]) == 3
        real = batch["attention_mask"].bool()
        assert_close(o[1][keep], r[1][keep], peer=p[1][keep], name="pooled")
        for i in range(3):
            assert_close(o[2][i][real], r[2][i][real], peer=p[2][i][real], name=f"hidden_states[{i}]")
        assert torch.all(o[0][~real] == 0)  # pads are zeros, not garbage


@pytest.mark.parametrize("backend", ["triton", "cuda_host"])
def test_backends_tiny(backend):
    """The triton kernels (interpreter) and the CUDA kernels (host build) inside a tiny BERT, attention
    interface and unpadded; bf16 (the CUDA attention kernels are bf16/fp16 only), the reference rule."""
    if backend == "cuda_host":
        pytest.importorskip("fastbert.cuda_host_backend").load()
    model = _mlm("bert", num_hidden_layers=1)
    batch = _batch("bert", B=3, S=7)
    ref = _run(copy.deepcopy(model).double(), batch)
    peer = _run(copy.deepcopy(model).to(torch.bfloat16), batch)
    for way in ("attn", "unpad"):
        ours = copy.deepcopy(model).to(torch.bfloat16)
        _WAYS[way](ours)
        with fastbert.use_backend(backend):
            got = _run(ours, batch)
        _check(got, ref, peer, f"{backend} {way}")


# ----------------------------------------------------------------------------------------------
# padding-free batches (DataCollatorWithFlattening)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "modernbert"])
def test_padding_free_batches(family):
    """One row of concatenated sequences (position_ids restarting at 0, or cu_seq_lens_* kwargs) gives what
    the same sequences give in a padded batch."""
    from transformers import DataCollatorWithFlattening

    model = _mlm(family)
    lengths = [5, 1, 7]
    seqs = [torch.randint(3, V, (n,)) for n in lengths]
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, s in enumerate(seqs):
        padded[i, :len(s)], mask[i, :len(s)] = s, 1
    with torch.no_grad():
        ref = model(input_ids=padded, attention_mask=mask, output_hidden_states=True).hidden_states[-1][mask.bool()]
    feats = [{"input_ids": s.tolist()} for s in seqs]
    kinds = {"position_ids": DataCollatorWithFlattening(return_tensors="pt"),
             "cu_seq_lens": DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)}
    if family == "modernbert":  # its layers never see position_ids: only the kwargs reach attention
        kinds.pop("position_ids")
    ways = ["attn", "unpad"] if family == "bert" else ["attn"]
    for kind, collate in kinds.items():
        flat = collate(feats)
        flat.pop("labels")
        for way in ways:
            ours = copy.deepcopy(model)
            _WAYS[way](ours)
            with torch.no_grad():
                got = ours(**flat, output_hidden_states=True).hidden_states[-1][0]
            assert_close(got, ref, peer=ref, name=f"{family} {way} {kind}")


# ----------------------------------------------------------------------------------------------
# what the kernel cannot do: refused, or handed off with a one-time warning
# ----------------------------------------------------------------------------------------------
def test_refusals():
    dec = transformers.BertModel(_config("bert", is_decoder=True), add_pooling_layer=False).eval()
    dec.set_attn_implementation(hf.register())
    ids = torch.randint(3, V, (2, 5))
    with pytest.raises(ValueError, match="causal"):
        dec(input_ids=ids)
    with pytest.raises(ValueError, match="unpad=True is for encoders"):
        apply_fastbert(transformers.BertForMaskedLM(_config("bert", is_decoder=True)), unpad=True)
    q = torch.randn(1, 2, 5, 32)
    enc = transformers.BertModel(_config("bert")).encoder.layer[0].attention.self
    with pytest.raises(ValueError, match="cross-attention"):
        hf.fastbert_attention_forward(enc, q, q[:, :, :3], q[:, :, :3], None)
    with pytest.raises(ValueError, match="custom mask pattern"):
        hf.fastbert_mask(1, 5, 5, attention_mask=torch.ones(1, 5, dtype=torch.bool), use_vmap=True)
    with pytest.raises(ValueError, match="unpad=True supports model types"):
        apply_fastbert(_mlm("modernbert"), unpad=True)
    unpadded = apply_fastbert(_mlm("bert"), unpad=True)
    with pytest.raises(ValueError, match="output_attentions"):
        unpadded(input_ids=ids, output_attentions=True)
    train = apply_fastbert(_mlm("bert", attention_probs_dropout_prob=0.1), unpad=True).train()
    with pytest.raises(ValueError, match="attention dropout 0.1"):
        train(input_ids=ids)


def test_handoffs_warn_once_and_match(caplog):
    ids = torch.randint(3, V, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    caplog.set_level(logging.WARNING, logger="fastbert")
    hf._warned.clear()
    # head dim 16: not a kernel head dim -> SDPA, same result as eager
    small = transformers.BertModel(_config("bert", hidden_size=32, intermediate_size=40)).eval()
    small.set_attn_implementation("eager")
    with torch.no_grad():
        ref = small(input_ids=ids, attention_mask=mask).last_hidden_state
        small.set_attn_implementation(hf.register())
        got = small(input_ids=ids, attention_mask=mask).last_hidden_state
        small(input_ids=ids, attention_mask=mask)
    assert_close(got[mask.bool()], ref[mask.bool()], peer=ref[mask.bool()], name="head dim 16")
    assert caplog.text.count("head dim 16") == 1 and "run on sdpa" in caplog.text
    # output_attentions -> the model's eager attention (probabilities returned)
    model = transformers.BertModel(_config("bert")).eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        model.set_attn_implementation(hf.register())
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == 2 and all(torch.allclose(g, r, atol=1e-6) for g, r in zip(got, ref))
    assert "output_attentions=True" in caplog.text and "run on eager" in caplog.text
    # ... with ModernBERT's sliding window rebuilt in the dense mask (real query rows; pad rows are meaningless)
    modern = _mlm("modernbert").model
    modern.set_attn_implementation("eager")
    b = _batch("modernbert", S=11)
    with torch.no_grad():
        ref = modern(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions
        modern.set_attn_implementation(hf.register())
        got = modern(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_attentions=True).attentions
    real = b["attention_mask"].bool()
    assert len(got) == 3 and all(torch.allclose(g.transpose(1, 2)[real], r.transpose(1, 2)[real], atol=1e-6)
                                 for g, r in zip(got, ref))
    # attention dropout while training -> SDPA with dropout (same random stream as HF's SDPA)
    drop = transformers.BertModel(_config("bert", attention_probs_dropout_prob=0.3, hidden_dropout_prob=0.0)).train()
    drop.set_attn_implementation("sdpa")
    torch.manual_seed(5)
    ref = drop(input_ids=ids, attention_mask=mask).last_hidden_state
    drop.set_attn_implementation(hf.register())
    torch.manual_seed(5)
    got = drop(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_close(got[mask.bool()], ref[mask.bool()], peer=ref[mask.bool()], name="dropout hand-off")
    assert "attention dropout 0.3 in training" in caplog.text


# ----------------------------------------------------------------------------------------------
# the HF contract of a patched model
# ----------------------------------------------------------------------------------------------
def test_masked_lm_output_contract():
    """issue 14.3: with labels, a patched BertForMaskedLM returns logits (the labelled rows, HF's
    logits[labels != -100]) and honours return_dict=False; "full" gives HF's [B, S, V]; "none" none."""
    model = _mlm("bert")
    batch = _batch("bert")
    with torch.no_grad():
        ref = model(**batch)
    labelled = batch["labels"] != -100
    for unpad in (False, True):
        ours = apply_fastbert(copy.deepcopy(model), **({"unpad": True} if unpad else {}))
        with torch.no_grad():
            loss, logits = ours(**batch, return_dict=False)
            bare = ours(batch["input_ids"], batch["attention_mask"], return_dict=False)
        assert logits.shape == (int(labelled.sum()), V)
        assert_close(logits, ref.logits[labelled], peer=ref.logits[labelled], name="labelled logits")
        assert_close(loss, ref.loss, peer=ref.loss, name="loss")
        assert len(bare) == 1 and bare[0].shape == ref.logits.shape  # no labels: full logits, HF's shape
    full = apply_fastbert(copy.deepcopy(model), mlm_logits="full")
    with torch.no_grad():
        out = full(**batch)
    real = batch["attention_mask"].bool()
    assert_close(out.logits[real], ref.logits[real], peer=ref.logits[real], name="full logits")
    none = apply_fastbert(copy.deepcopy(model), mlm_logits="none")
    with torch.no_grad():
        assert none(**batch).logits is None and len(none(**batch, return_dict=False)) == 1
    with pytest.raises(ValueError, match="mlm_logits"):
        apply_fastbert(copy.deepcopy(model), mlm_logits="some")
    pad_label = dict(batch, labels=batch["labels"].clone())
    pad_label["labels"][3, 2] = 5  # a label on a padding position cannot be honoured unpadded
    with pytest.raises(ValueError, match="padding"):
        ours(**pad_label)


def test_state_dict_save_load_and_optimizer(tmp_path):
    model = _mlm("bert", hidden_dropout_prob=0.0)  # train mode below: no randomness between the two copies
    batch = _batch("bert")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # built before patching
    keys = list(model.state_dict())
    apply_fastbert(model, unpad=True)
    assert list(model.state_dict()) == keys
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # the unpadded layers honour it
    assert all(layer.gradient_checkpointing for layer in model.bert.encoder.layer)
    for m, o in ((model, opt), (ref, torch.optim.SGD(ref.parameters(), lr=0.5))):
        m.train()
        m(**batch).loss.backward()
        o.step()
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.detach(), r.detach(), peer=r.detach(), name=f"after a step: {n}")
    model.eval().save_pretrained(tmp_path)
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert_close(a.loss, b.loss, peer=b.loss, name="loss after save/from_pretrained")
    fb_attn = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, attn_implementation="fastbert").eval()
    assert fb_attn.config._attn_implementation == "fastbert"
    with torch.no_grad():
        assert_close(fb_attn(**batch).loss, b.loss, peer=b.loss, name="from_pretrained(attn_implementation='fastbert')")
    again = apply_fastbert(transformers.BertForMaskedLM.from_pretrained(tmp_path), unpad=True).eval()
    with torch.inference_mode():  # inference tensors carry no version counter: nothing may cache on it
        assert torch.equal(again(**batch).loss, a.loss) and torch.equal(again(**batch).loss, a.loss)


@pytest.mark.parametrize("way", ["attn", "patch", "unpad"])
def test_compile_fullgraph_traces(way):
    """torch.compile(fullgraph=True) traces the patched model, forward and backward (aot_eager: the graph
    capture is what is tested; no inductor build on CPU)."""
    model = _mlm("bert")
    _WAYS[way](model)
    batch = _batch("bert")
    ref = model(**batch)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(**batch)
    out.loss.backward()
    assert_close(out.loss.detach(), ref.loss.detach(), peer=ref.loss.detach(), name="compiled loss")


def test_sentence_transformers_same_embeddings(tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(V - 5)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(tmp_path)
    transformers.BertModel(_config("bert", pad_token_id=0)).save_pretrained(tmp_path)
    encoder = st.SentenceTransformer(modules=[Transformer(str(tmp_path)), Pooling(64)],
                                     device="cpu")
    sentences = ["w1 w2 w3 w4 w5 w6 w7", "w8", "w9 w10 w11"]
    ref = encoder.encode(sentences, convert_to_tensor=True)
    apply_fastbert(encoder[0].auto_model, unpad=True)
    assert encoder[0].auto_model.fastbert_patch["unpad"]
    got = encoder.encode(sentences, convert_to_tensor=True)
    assert_close(got, ref, peer=ref, name="sentence embeddings")


def test_modernbert_local_layers_path(monkeypatch, caplog):
    """ModernBERT's local (sliding-window) layers run on the kernels' window (HF's sliding_window 5 is 4 keys
    either side), global layers without one, and sequences no longer than the window need none; no hand-off."""
    caplog.set_level(logging.WARNING, logger="fastbert")
    hf._warned.clear()
    windows = []
    real = fastbert.ops.flash_attn_varlen_alibi

    def spy(*args, window_size=(-1, -1), **kw):
        windows.append(tuple(window_size))
        return real(*args, window_size=window_size, **kw)
    monkeypatch.setattr(fastbert.ops, "flash_attn_varlen_alibi", spy)
    model = apply_fastbert(_mlm("modernbert"))
    with torch.no_grad():
        model(**_batch("modernbert", S=11))
        assert windows == [(-1, -1), (4, 4), (-1, -1)]
        model(**_batch("modernbert", S=5))  # every key of a 5-token sequence is inside the window
        assert windows[3:] == [(-1, -1)] * 3
    assert "fastbert" not in caplog.text
