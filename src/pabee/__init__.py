"""pabee: patience-based early exit (PABEE) for Hugging Face transformer classifiers.

Importing the package registers `PabeeConfig` and `PabeeForSequenceClassification` with the transformers Auto
classes, so `AutoModelForSequenceClassification.from_pretrained(folder)` loads a saved PABEE model, and the
pipeline task `"early-exit-classification"` (`transformers.pipeline(...)`; see `pabee.hf_pipeline`).
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .backbones import ADAPTERS, EncoderAdapter, adapter_for
from .configuration import PabeeConfig
from .folders import load_runtime
from .hf_pipeline import EarlyExitClassificationPipeline
from .hf_pipeline import register as _register_pipeline_task
from .modeling import PabeeForSequenceClassification, PabeeOutput, PabeePreTrainedModel, Runtime, infer
from .pipeline import PabeePipeline, pipeline
from .pretrained import bundled_model_path
from .rules import (
    CRITERIA,
    ConfidenceCriterion,
    EntropyCriterion,
    ExitCriterion,
    ExitTracker,
    PatienceConfidenceCriterion,
    PatienceCriterion,
    StaticCriterion,
    build_criterion,
    logits_at_exit,
    sweep_exit_layers,
)
from .settings import ExitSpec, ExitSweep, exit_spec_from
from .version import __version__

AutoConfig.register(PabeeConfig.model_type, PabeeConfig, exist_ok=True)
AutoModelForSequenceClassification.register(PabeeConfig, PabeeForSequenceClassification, exist_ok=True)
_register_pipeline_task()

__all__ = [
    "ADAPTERS",
    "CRITERIA",
    "ConfidenceCriterion",
    "EarlyExitClassificationPipeline",
    "EncoderAdapter",
    "EntropyCriterion",
    "ExitCriterion",
    "ExitSpec",
    "ExitSweep",
    "ExitTracker",
    "PabeeConfig",
    "PabeeForSequenceClassification",
    "PabeeOutput",
    "PabeePipeline",
    "PabeePreTrainedModel",
    "PatienceConfidenceCriterion",
    "PatienceCriterion",
    "Runtime",
    "StaticCriterion",
    "__version__",
    "adapter_for",
    "build_criterion",
    "bundled_model_path",
    "exit_spec_from",
    "infer",
    "load_runtime",
    "logits_at_exit",
    "pipeline",
    "sweep_exit_layers",
]
