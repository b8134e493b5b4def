"""MosaicBERT-style encoder and heads (and the classic BERT baseline from the same config)."""
from fastbert.models.config import BertConfig
from fastbert.models.bert import (BertEmbeddings, BertForMaskedLM, BertForSequenceClassification, BertLayer,
                                  BertModel, BertModelOutput, BertPreTrainedModel, MaskedLMOutput,
                                  SequenceClassifierOutput)

__all__ = ["BertConfig", "BertModel", "BertForMaskedLM", "BertForSequenceClassification", "BertModelOutput",
           "MaskedLMOutput", "SequenceClassifierOutput", "BertLayer", "BertEmbeddings", "BertPreTrainedModel"]
