"""Per-architecture adapters that let the early-exit engine step an encoder one layer at a time.

This is the only module that reaches into transformers internals (embedding modules, layer lists, ALBERT's
shared layer groups, attention-mask construction). Each adapter is stateless: it receives the encoder module on
every call, so the model holds no second reference to its weights. Adding an architecture means one small
subclass plus an entry in `ADAPTERS`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


class EncoderAdapter:
    """How to embed, run layer *i* and pool for one family of Hugging Face encoders."""

    model_types: ClassVar[tuple[str, ...]] = ()

    def embed(
        self,
        encoder: nn.Module,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
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

    def has_pooler(self, encoder: nn.Module) -> bool:
        return getattr(encoder, "pooler", None) is not None

    def pool(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder's own pooler applied to the `[CLS]` state."""
        raise NotImplementedError


class BertAdapter(EncoderAdapter):
    model_types = ("bert",)

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        return encoder.encoder.layer[index](hidden, mask)

    def pool(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return encoder.pooler(hidden)


class AlbertAdapter(EncoderAdapter):
    """ALBERT projects embeddings up to the hidden size and shares weights across layer groups."""

    model_types = ("albert",)

    def embed(self, encoder, input_ids, token_type_ids, position_ids, inputs_embeds) -> torch.Tensor:
        hidden = super().embed(encoder, input_ids, token_type_ids, position_ids, inputs_embeds)
        return encoder.encoder.embedding_hidden_mapping_in(hidden)

    def run_layer(self, encoder: nn.Module, index: int, hidden: torch.Tensor, mask: Any) -> torch.Tensor:
        config = encoder.config
        group = int(index / (config.num_hidden_layers / config.num_hidden_groups))
        return encoder.encoder.albert_layer_groups[group](hidden, mask)

    def pool(self, encoder: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return encoder.pooler_activation(encoder.pooler(hidden[:, 0]))


ADAPTERS: dict[str, EncoderAdapter] = {
    model_type: adapter for adapter in (BertAdapter(), AlbertAdapter()) for model_type in adapter.model_types
}


def adapter_for(model_type: str) -> EncoderAdapter:
    """Return the adapter for an encoder's `config.model_type`, or raise a `ValueError` listing those we have."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"No PABEE adapter for backbone type {model_type!r}; supported types: {supported}.") from None
