"""Per-architecture adapters that let the early-exit engine step an encoder one layer at a time.

This is the only module that reaches into transformers and torch internals (embedding modules, layer lists,
ALBERT's shared layer groups, attention-mask construction, each family's own classification head, the attention
kernel in use, whether a profiler runs).
Each adapter is stateless: it receives the encoder module on every call, so the model holds no second reference to
its weights. Adding an architecture means one small subclass plus an entry in `ADAPTERS`; architectures whose
layers look like BERT's (RoBERTa, ELECTRA) reuse it.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn
from torch.autograd import profiler
from transformers.masking_utils import create_bidirectional_mask

__all__ = [
    "ADAPTERS",
    "attention_kernel",
    "profiler_label",
    "AlbertAdapter",
    "BertAdapter",
    "DebertaV2Adapter",
    "DistilBertAdapter",
    "ElectraAdapter",
    "EncoderAdapter",
    "MPNetAdapter",
    "RobertaAdapter",
    "adapter_for",
]


class EncoderAdapter:
    """How to embed, run layer *i* and pool for one family of Hugging Face encoders."""

    model_types: ClassVar[tuple[str, ...]] = ()
    # Whether the architecture has a pooler at all (its `*Model` then takes `add_pooling_layer`).
    pooler_available: ClassVar[bool] = True

    def build_kwargs(self, with_pooler: bool) -> dict[str, Any]:
        """Extra arguments for `AutoModel.from_config`: build the pooler only when the classifiers use it."""
        return {"add_pooling_layer": with_pooler} if self.pooler_available else {}

    def embed(
        self,
        encoder: nn.Module,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Return the hidden states that enter layer 1, `[batch, seq, hidden]`."""
        return encoder.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
        )

    def layer_mask(self, encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """Turn a 2D padding mask into whatever the encoder's attention implementation expects."""
        return create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        """Apply layer `index` (0-based) to `hidden`."""
        raise NotImplementedError

    def weights_of_layer(self, config: Any, index: int) -> int:
        """Which distinct set of layer weights runs layer `index`: its own, except where layers share them."""
        return index

    def has_pooler(self, encoder: nn.Module) -> bool:
        return self.pooler_available and getattr(encoder, "pooler", None) is not None

    def pool(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's own pooler applied to the `[CLS]` state."""
        raise NotImplementedError

    # The family's own sequence-classification head, which `pabee add-exits` keeps as the last exit so that the
    # full depth answers exactly as the user's model did. Its modules carry the names the family's
    # `*ForSequenceClassification` gives them, so that model's non-encoder weights load into it unchanged.
    head_uses_pooler: ClassVar[bool] = False  # the head reads the encoder's pooler (built only then)

    def build_head(self, config: Any) -> nn.ModuleDict:
        """The family's classification head for `config` (its `num_labels`), freshly initialised."""
        raise NotImplementedError

    def run_head(self, encoder: nn.Module, head: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        """The family's classification head on the last layer's states `(B, T, H)` → logits `(B, C)`."""
        if self.head_uses_pooler:  # BERT, ALBERT: dropout and a linear layer over the pooler
            return head["classifier"](head["dropout"](self.pool(encoder, hidden)))
        return head["classifier"](hidden)  # the dense-activation heads that read `[CLS]` themselves


class BertAdapter(EncoderAdapter):
    """BERT and the encoders built like it: RoBERTa (and XLM-R, CamemBERT), ELECTRA (no pooler)."""

    model_types = ("bert",)
    head_uses_pooler = True

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        return encoder.encoder.layer[index](hidden, mask)

    def pool(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return encoder.pooler(hidden)

    def build_head(self, config: Any) -> nn.ModuleDict:
        dropout = getattr(config, "classifier_dropout", None)
        return _pooled_head(config, config.hidden_dropout_prob if dropout is None else dropout)


class RobertaAdapter(BertAdapter):
    """RoBERTa, XLM-R and CamemBERT: BERT's layers, but their classifier is a dense-tanh head on `<s>`, not the
    pooler (the three families' head classes are the same module under three names)."""

    model_types = ("roberta", "xlm-roberta", "camembert")
    head_uses_pooler = False

    def build_head(self, config: Any) -> nn.ModuleDict:
        from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

        return nn.ModuleDict({"classifier": RobertaClassificationHead(config)})


class AlbertAdapter(EncoderAdapter):
    """ALBERT projects embeddings up to the hidden size and shares weights across layer groups."""

    model_types = ("albert",)
    head_uses_pooler = True

    def embed(self, encoder, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        hidden = super().embed(encoder, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask)
        return encoder.encoder.embedding_hidden_mapping_in(hidden)

    def weights_of_layer(self, config: Any, index: int) -> int:
        return int(index / (config.num_hidden_layers / config.num_hidden_groups))  # the layer's group

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        group = self.weights_of_layer(encoder.config, index)
        return encoder.encoder.albert_layer_groups[group](hidden, mask)

    def pool(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return encoder.pooler_activation(encoder.pooler(hidden[:, 0]))

    def build_head(self, config: Any) -> nn.ModuleDict:
        return _pooled_head(config, config.classifier_dropout_prob)


class ElectraAdapter(BertAdapter):
    """ELECTRA's discriminator: BERT layers, an optional projection of small embeddings, no pooler."""

    model_types = ("electra",)
    pooler_available = False
    head_uses_pooler = False

    def build_head(self, config: Any) -> nn.ModuleDict:
        from transformers.models.electra.modeling_electra import ElectraClassificationHead

        return nn.ModuleDict({"classifier": ElectraClassificationHead(config)})

    def embed(self, encoder, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        hidden = super().embed(encoder, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask)
        project = getattr(encoder, "embeddings_project", None)
        return hidden if project is None else project(hidden)


class DistilBertAdapter(EncoderAdapter):
    """DistilBERT has no token types and no pooler; its blocks live in `transformer.layer`."""

    model_types = ("distilbert",)
    pooler_available = False

    def embed(self, encoder, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        return encoder.embeddings(input_ids, inputs_embeds, position_ids)

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        return encoder.transformer.layer[index](hidden, mask)

    def build_head(self, config: Any) -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "pre_classifier": nn.Linear(config.dim, config.dim),
                "classifier": nn.Linear(config.dim, config.num_labels),
                "dropout": nn.Dropout(config.seq_classif_dropout),
            }
        )

    def run_head(self, encoder: nn.Module, head: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(head["pre_classifier"](hidden[:, 0]))
        return head["classifier"](head["dropout"](pooled))


class DebertaV2Adapter(EncoderAdapter):
    """DeBERTa-v2/v3: relative-position attention, so the "mask" also carries positions; no pooler."""

    model_types = ("deberta-v2",)
    pooler_available = False

    def embed(self, encoder, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        if token_type_ids is None:  # DeBERTa's embeddings index token types unconditionally
            token_type_ids = torch.zeros_like(attention_mask, dtype=torch.long)
        return encoder.embeddings(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            mask=attention_mask,
            inputs_embeds=inputs_embeds,
        )

    def layer_mask(self, encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        stack = encoder.encoder
        return {
            "padding": attention_mask,
            "attention": stack.get_attention_mask(attention_mask),
            "relative_pos": stack.get_rel_pos(hidden),
            "rel_embeddings": stack.get_rel_embedding(),
        }

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        stack = encoder.encoder
        output, _ = stack.layer[index](
            hidden, mask["attention"], relative_pos=mask["relative_pos"], rel_embeddings=mask["rel_embeddings"]
        )
        if index == 0 and stack.conv is not None:  # the convolution branch mixes in layer 1's input
            output = stack.conv(hidden, output, mask["padding"])
        return output

    def build_head(self, config: Any) -> nn.ModuleDict:
        from transformers.models.deberta_v2.modeling_deberta_v2 import ContextPooler

        pooler = ContextPooler(config)
        dropout = getattr(config, "cls_dropout", None)
        return nn.ModuleDict(
            {
                "pooler": pooler,
                "classifier": nn.Linear(pooler.output_dim, config.num_labels),
                "dropout": nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout),
            }
        )

    def run_head(self, encoder: nn.Module, head: nn.ModuleDict, hidden: torch.Tensor) -> torch.Tensor:
        return head["classifier"](head["dropout"](head["pooler"](hidden)))


class MPNetAdapter(EncoderAdapter):
    """MPNet: no token types, and a relative position bias shared by every layer. The bias depends only on the
    batch's shape, so it is computed once with the mask (again after compaction), not inside each layer."""

    model_types = ("mpnet",)

    def embed(self, encoder, input_ids, token_type_ids, position_ids, inputs_embeds, attention_mask) -> torch.Tensor:
        return encoder.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)

    def layer_mask(self, encoder: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return {
            "attention": super().layer_mask(encoder, hidden, attention_mask),
            "position_bias": encoder.encoder.compute_position_bias(hidden),
        }

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        return encoder.encoder.layer[index](hidden, mask["attention"], mask["position_bias"])[0]

    def pool(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return encoder.pooler(hidden)

    def build_head(self, config: Any) -> nn.ModuleDict:
        from transformers.models.mpnet.modeling_mpnet import MPNetClassificationHead

        return nn.ModuleDict({"classifier": MPNetClassificationHead(config)})


def _pooled_head(config: Any, dropout: float) -> nn.ModuleDict:
    """BERT's and ALBERT's head: dropout and one linear layer over the encoder's pooler."""
    return nn.ModuleDict(
        {"dropout": nn.Dropout(dropout), "classifier": nn.Linear(config.hidden_size, config.num_labels)}
    )


ADAPTERS: dict[str, EncoderAdapter] = {
    model_type: adapter
    for adapter in (
        BertAdapter(),
        RobertaAdapter(),
        AlbertAdapter(),
        ElectraAdapter(),
        DistilBertAdapter(),
        DebertaV2Adapter(),
        MPNetAdapter(),
    )
    for model_type in adapter.model_types
}


def adapter_for(model_type: str) -> EncoderAdapter:
    """Return the adapter for an encoder's `config.model_type`, or raise a `ValueError` listing those we have."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"No PABEE adapter for backbone type {model_type!r}; supported types: {supported}.") from None


def attention_kernel(config: Any) -> str | None:
    """The attention kernel an encoder config runs (`sdpa`, `eager`, ...): transformers keeps it only in the
    private `_attn_implementation` (and sets it with `set_attn_implementation`); a benchmark records it."""
    return getattr(config, "_attn_implementation", None)


def profiler_label(part: str) -> AbstractContextManager:
    """A `record_function` label (`pabee.*`, read by `pabee bench --profile`) while a profiler runs;
    `record_function` itself costs ~20 µs even when none does. torch says whether one runs only through the
    private `_is_profiler_enabled` (assumed on where a torch version lacks it)."""
    return profiler.record_function(part) if getattr(profiler, "_is_profiler_enabled", True) else nullcontext()
