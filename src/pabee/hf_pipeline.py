"""The `transformers` pipeline task `"early-exit-classification"`, registered when `pabee` is imported.

    >>> import pabee
    >>> from transformers import pipeline
    >>> classify = pipeline("early-exit-classification", model="runs/sst2", patience=2)
    >>> classify("a gripping, funny film")
    [{'label': 'positive', 'score': 0.97, 'exit_layer': 2}]

It is transformers' text-classification pipeline (same inputs, `top_k`, `function_to_apply`, `batch_size`,
`device`) with each answer's exit layer added, inputs truncated to `max_length` tokens (128, as in training) unless
`truncation` is given, and the exit settings accepted as keywords (`patience=2`; every name in
`pabee.settings.EXIT_KEYWORDS`) at creation or per call. Plain `"text-classification"` works too,
without exit layers. `pabee.pipeline` is the faster choice for large inputs: it sorts texts by length before
batching.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForSequenceClassification, TextClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .pipeline import DEFAULT_MAX_LENGTH, supported_length
from .settings import EXIT_KEYWORDS

__all__ = ["EarlyExitClassificationPipeline", "TASK", "register"]

TASK = "early-exit-classification"


class EarlyExitClassificationPipeline(TextClassificationPipeline):
    """Text classification whose answers carry `exit_layer`; exit settings pass through to the model."""

    def _sanitize_parameters(self, **kwargs: Any) -> tuple[dict, dict, dict]:
        exit_options = {name: kwargs.pop(name) for name in EXIT_KEYWORDS if name in kwargs}
        exit_options = {name: value for name, value in exit_options.items() if value is not None}
        if "truncation" not in kwargs:
            max_length = kwargs.pop("max_length", DEFAULT_MAX_LENGTH)
            kwargs.update(truncation=True, max_length=supported_length(self.model, self.tokenizer, max_length))
        preprocess, _, postprocess = super()._sanitize_parameters(**kwargs)
        return preprocess, exit_options, postprocess

    def _forward(self, model_inputs: dict, **exit_options: Any) -> Any:
        return self.model(**model_inputs, **exit_options)

    def postprocess(self, model_outputs: Any, **kwargs: Any) -> dict | list[dict]:
        answer = super().postprocess(model_outputs, **kwargs)
        exit_layer = int(model_outputs["exit_layers"][0])
        for item in answer if isinstance(answer, list) else [answer]:
            item["exit_layer"] = exit_layer
        return answer


def register() -> None:
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=EarlyExitClassificationPipeline, pt_model=AutoModelForSequenceClassification
    )
