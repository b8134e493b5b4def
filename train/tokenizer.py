"""WordPiece tokenizer (Hugging Face ``tokenizers``): load a BERT vocab, or train one on the corpus.

A :class:`WordPiece` wraps a ``tokenizers.Tokenizer`` with the special-token ids the harness needs and
saves itself in the layout ``transformers.BertTokenizerFast.from_pretrained`` reads (``vocab.txt``,
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, List, Optional

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPiece:
    """A BERT-style WordPiece tokenizer.

    Attributes: ``vocab_size``; ``pad_id``, ``unk_id``, ``cls_id``, ``sep_id``, ``mask_id``;
    ``special_ids`` (sorted list of those five; never masked in MLM); ``fingerprint`` (hex digest of the
    vocabulary and normalisation, part of the shard cache key).
    """

    def __init__(self, tokenizer, lowercase: bool = True):
        self.tok = tokenizer
        self.lowercase = lowercase
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer: vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = sorted({self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id})
        self.vocab_size = tokenizer.get_vocab_size()
        if self.vocab_size > 65535:
            raise ValueError(f"tokenizer: vocab_size {self.vocab_size} does not fit the uint16 token shards")
        ordered = sorted(vocab.items(), key=lambda kv: kv[1])
        h = hashlib.sha256(json.dumps([ordered, lowercase]).encode())
        self.fingerprint = h.hexdigest()[:16]

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, path: str, lowercase: bool = True) -> "WordPiece":
        """Load ``vocab.txt`` (one token a line) or a saved ``tokenizer.json``, or a directory with either."""
        from tokenizers import Tokenizer
        from tokenizers.implementations import BertWordPieceTokenizer

        if os.path.isdir(path):
            for name in ("tokenizer.json", "vocab.txt"):
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.tokenizer: no vocabulary file at {path!r} (point it at a BERT "
                                    "vocab.txt, a tokenizer.json, or set FASTBERT_DATA)")
        if path.endswith(".json"):
            return cls(Tokenizer.from_file(path), lowercase)
        wp = BertWordPieceTokenizer(path, lowercase=lowercase)
        return cls(wp._tokenizer, lowercase)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 30522, lowercase: bool = True) -> "WordPiece":
        """Train a WordPiece vocabulary of ``vocab_size`` tokens on ``texts`` (an iterator of documents)."""
        from tokenizers.implementations import BertWordPieceTokenizer

        wp = BertWordPieceTokenizer(lowercase=lowercase)
        wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2,
                               special_tokens=list(SPECIAL_TOKENS), wordpieces_prefix="##",
                               show_progress=False)
        return cls(wp._tokenizer, lowercase)

    # ------------------------------------------------------------------------------------------
    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        """Token ids of each text, without [CLS]/[SEP] (the packer adds them)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_str(cls, s: str, lowercase: bool = True) -> "WordPiece":
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(s), lowercase)

    def save(self, directory: str) -> None:
        """Write vocab.txt, tokenizer.json and the small JSON files transformers' BERT tokenizer reads."""
        os.makedirs(directory, exist_ok=True)
        self.tok.save(os.path.join(directory, "tokenizer.json"))
        inv = sorted(self.tok.get_vocab().items(), key=lambda kv: kv[1])
        with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
            for tok, _ in inv:
                f.write(tok + "\n")
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
                       "model_max_length": 512, "unk_token": "[UNK]", "sep_token": "[SEP]",
                       "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}, f, indent=2)
        with open(os.path.join(directory, "special_tokens_map.json"), "w") as f:
            json.dump({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                       "cls_token": "[CLS]", "mask_token": "[MASK]"}, f, indent=2)


def load_tokenizer(spec: str, lowercase: bool = True, train_texts: Optional[Iterable[str]] = None,
                   vocab_size: int = 30522) -> WordPiece:
    """``spec`` is a vocab path / tokenizer.json / directory, or ``"train"`` (needs ``train_texts``)."""
    if spec == "train":
        if train_texts is None:
            raise ValueError("data.tokenizer='train' needs training texts")
        return WordPiece.train(train_texts, vocab_size=vocab_size, lowercase=lowercase)
    return WordPiece.from_vocab(spec, lowercase=lowercase)
