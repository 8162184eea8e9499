"""`pabee export`: a PABEE model as ONNX graphs that ONNX Runtime runs one layer at a time.

ONNX Runtime cannot stop inside a graph, so early exit needs one graph per step: `embeddings.onnx` (token ids →
hidden states), `mask.onnx` (padding mask → the attention mask(s) the layers take, built once per batch shape as
the torch model does, not again in every layer's graph) and one `layer_<k>.onnx` per distinct encoder layer,
holding the layer and the exit heads of the layers that run it (ALBERT shares one layer across a group: one graph
per group, its heads chosen by the `head` input). `pabee.onnx_model` drives them with the same exit loop as the
torch layers (`modeling.infer`).

The folder also holds the tokenizer, `config.json` (the model's config with its exit settings) and
`pabee_onnx.json`, the manifest: versions, opset, precision, which graph and head serve each layer, and the
SHA-256 of every file, so a missing or altered file is found before anything runs.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PabeeError
from .folders import FORMAT_VERSION, MANIFEST, load_model_folder, load_tokenizer
from .modeling import PabeeForSequenceClassification
from .onnx_model import require_onnx
from .provenance import file_digest, fsync_folder, make_temp_folder
from .version import __version__

__all__ = ["OPSET", "export_full_model", "export_onnx", "layer_graphs"]

OPSET = 17
PRECISIONS = ("fp32", "int8")


def layer_graphs(model: PabeeForSequenceClassification) -> list[int]:
    """For each layer, the index of the graph that runs it: one graph per distinct set of layer weights."""
    config = model.config.encoder_config
    return [model.adapter.weights_of_layer(config, i) for i in range(model.num_layers)]


class _Embeddings(nn.Module):
    """Token ids → the hidden states that enter layer 1."""

    def __init__(self, model: PabeeForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        return self.model.adapter.embed(self.model.encoder, input_ids, token_type_ids, None, None, attention_mask)


class _Mask(nn.Module):
    """The padding mask → the attention mask(s) of the backbone's layers, as a tuple (`mask_names` names them)."""

    def __init__(self, model: PabeeForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        return mask_parts(self.model.layer_mask(hidden, attention_mask))


def mask_parts(mask: Any) -> tuple:
    """The tensors of a backbone's layer mask, in `mask_names` order."""
    return tuple(mask.values()) if isinstance(mask, dict) else (mask,)


def mask_names(mask: Any) -> list[str]:
    """Graph names of the parts of a backbone's layer mask: one tensor (`mask`) or a dict's entries."""
    return [f"mask.{key}" for key in mask] if isinstance(mask, dict) else ["mask"]


class _LayerStep(nn.Module):
    """One encoder layer and the exit heads of the layers that run it; `head` picks the head (0 unless shared).
    The layer's attention mask comes in as `mask_parts` (from `mask.onnx`), rebuilt in the backbone's structure."""

    def __init__(self, model: PabeeForSequenceClassification, layer: int, heads: list[int], keys: list | None) -> None:
        super().__init__()
        self.model, self.layer, self.keys = model, layer, keys
        self.register_buffer("weight", torch.stack([model.classifiers[i].weight.detach() for i in heads]))
        self.register_buffer("bias", torch.stack([model.classifiers[i].bias.detach() for i in heads]))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, head: torch.Tensor, *mask_parts):
        mask = mask_parts[0] if self.keys is None else dict(zip(self.keys, mask_parts, strict=True))
        hidden = self.model.adapter.run_layer(self.model.encoder, self.layer, hidden, mask)  # (B, T, H)
        pooled = self.model.pool(hidden, attention_mask)  # (B, H)
        return hidden, pooled @ self.weight[head].transpose(0, 1) + self.bias[head]  # (B, T, H), (B, C)


def _example_inputs(model: PabeeForSequenceClassification) -> dict[str, torch.Tensor]:
    """Two rows, the second padded, so the traced graph keeps the padding-mask path."""
    input_ids = torch.full((2, 8), 5, dtype=torch.long)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    names: list[str],
    outputs: list[str],
    opset: int,
    axes: dict | None = None,
) -> None:
    """`axes` overrides the default dynamic axes (batch and sequence on dims 0 and 1) of the names it holds."""
    default = {name: {0: "batch", 1: "sequence"} for name in (*names, *outputs) if name not in ("head", "logits")}
    axes = {**default, **(axes or {}), "logits": {0: "batch"}}
    module.eval()  # the exporter puts the wrapper's training mode back onto the model it wraps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter handles transformers' mask code on every backbone we have
        )


def _export_graphs(model: PabeeForSequenceClassification, folder: Path, opset: int) -> dict[str, Any]:
    """Write the graphs; return the manifest's graph section."""
    inputs = _example_inputs(model)
    with torch.no_grad():
        hidden = _Embeddings(model)(**inputs)
        _export(
            _Embeddings(model), tuple(inputs.values()), folder / "embeddings.onnx", list(inputs), ["hidden"], opset
        )
        structure = model.layer_mask(hidden, inputs["attention_mask"])
        keys = list(structure) if isinstance(structure, dict) else None
        parts, mask = mask_names(structure), mask_parts(structure)
        axes = _mask_axes(inputs["attention_mask"], parts, mask)
        args = (hidden, inputs["attention_mask"])
        _export(_Mask(model), args, folder / "mask.onnx", ["hidden", "attention_mask"], parts, opset, axes)
        graph_of = layer_graphs(model)
        graphs = []
        for graph in sorted(set(graph_of)):
            layers = [i for i, g in enumerate(graph_of) if g == graph]
            step = _LayerStep(model, layers[0], layers, keys)
            path = folder / f"layer_{graph}.onnx"
            args = (hidden, inputs["attention_mask"], torch.tensor(0), *mask)
            names = ["hidden", "attention_mask", "head", *parts]
            _export(step, args, path, names, ["hidden_out", "logits"], opset, axes)
            graphs.append(path.name)
    heads = [graph_of[:i].count(graph_of[i]) for i in range(len(graph_of))]
    layers = [{"graph": graphs[g], "head": h} for g, h in zip(graph_of, heads, strict=True)]
    return {"embeddings": "embeddings.onnx", "mask": {"graph": "mask.onnx", "outputs": parts}, "layers": layers}


def _mask_axes(attention_mask: torch.Tensor, names: list[str], parts: tuple) -> dict:
    """Dynamic axes of the mask parts: every dimension the example's batch or sequence length sized."""
    batch, sequence = attention_mask.shape
    axes = {}
    for name, part in zip(names, parts, strict=True):
        axes[name] = {
            dim: "batch" if size == batch and dim == 0 else "sequence"
            for dim, size in enumerate(part.shape)
            if (dim == 0 and size == batch) or (dim > 0 and size == sequence)
        }
    return axes


class _FullModel(nn.Module):
    """The whole encoder and the last classifier in one graph: the full model, no early exit."""

    def __init__(self, model: PabeeForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, patience=0
        ).logits


def export_full_model(
    model_dir: str | Path, path: str | Path, quantize: str | None = None, opset: int = OPSET
) -> Path:
    """The model as ONE graph at full depth: what a user without early exit would deploy, the baseline that
    per-layer sessions are measured against (`benchmarks/backends.py`). Input names as `embeddings.onnx`."""
    require_onnx()
    model, _ = _load(model_dir)
    path = Path(path)
    inputs = _example_inputs(model)
    with torch.no_grad():
        _export(_FullModel(model), tuple(inputs.values()), path, list(inputs), ["logits"], opset)
    if quantize == "int8":
        _quantize(path.parent, [path.name])
    return path


INT8_SCHEME = {"method": "dynamic", "ops": ["MatMul"], "weights": "int8", "per_channel": True, "reduce_range": True}


def _quantize(folder: Path, graphs: list[str]) -> None:
    """Dynamic int8 quantization of the layers' matrix products (activations are quantized per batch at run time).

    Weights get a scale per output channel, in 7 bits (`reduce_range`): one scale per matrix cost SST-2 1.4 points
    of accuracy on the fine-tuned MiniLM (86.1 -> 84.7), per channel in 7 bits 0.1 (86.0), at the same speed; the
    7 bits keep AVX2's 8-bit products (no VNNI) from saturating. The embedding tables stay float: a lookup does
    no arithmetic to speed up, and int8 tables only lose accuracy.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice on pre-processing at WARNING
    try:
        for name in graphs:
            path = folder / name
            quantized = path.with_suffix(".int8.onnx")
            quantize_dynamic(
                str(path),
                str(quantized),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=INT8_SCHEME["ops"],
                per_channel=INT8_SCHEME["per_channel"],
                reduce_range=INT8_SCHEME["reduce_range"],
            )
            os.replace(quantized, path)
    finally:
        logging.getLogger().setLevel(quiet)


def _versions() -> dict[str, str]:
    return {
        "pabee": __version__,
        "torch": torch.__version__,
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
    }


def _check_target(output: Path, overwrite: bool) -> None:
    """`--output` must be new, empty, or (with `--overwrite`) an earlier export: `--overwrite` must never delete a
    folder of something else (a model, a home directory) that `--output` named by mistake."""
    if output.exists() and not output.is_dir():
        raise PabeeError(f"--output {output} exists and is not a folder.")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise PabeeError(f"--output {output} exists and is not empty; pass --overwrite to replace it.")
        if not (output / MANIFEST).is_file():
            raise PabeeError(
                f"--output {output} is not an earlier export (no {MANIFEST}); --overwrite replaces only an export "
                "or an empty folder, so choose another folder."
            )


def _load(model_dir: str | Path) -> tuple[PabeeForSequenceClassification, Any]:
    # Eager attention: the layer graphs then hold plain MatMul/Softmax, which int8 quantization understands.
    return load_model_folder(model_dir, attn_implementation="eager"), load_tokenizer(model_dir)


def export_onnx(
    model_dir: str | Path, output: str | Path, quantize: str | None = None, opset: int = OPSET, overwrite: bool = False
) -> Path:
    """Export the PABEE model in `model_dir` to `output` (see the module docstring); returns `output`.

    The folder is built beside `output` and moved into place at the end, so a failed export leaves nothing.
    """
    require_onnx()
    output = Path(output)
    precision = quantize or "fp32"
    if precision not in PRECISIONS:
        raise PabeeError(f"--quantize {quantize!r} is not supported; use int8 (or leave it out for fp32).")
    _check_target(output, overwrite)
    model, tokenizer = _load(model_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    work = make_temp_folder(output.parent, f".{output.name}.")  # the umask's mode, which the export keeps
    try:
        try:
            layout = _export_graphs(model, work, opset)
        except Exception as error:  # an exporter failure on a backbone is a fact to report, not a traceback
            name = model.config.encoder_config.model_type
            raise PabeeError(
                f"cannot export the {name!r} backbone to ONNX yet: {type(error).__name__}: {error}"
            ) from None
        if precision == "int8":
            _quantize(work, list(dict.fromkeys(layer["graph"] for layer in layout["layers"])))
        tokenizer.save_pretrained(work)
        model.config.save_pretrained(work)
        files = {p.name: file_digest(p) for p in sorted(work.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT_VERSION, "precision": precision, "opset": opset, "source": str(model_dir)}
        if precision == "int8":
            manifest["quantization"] = INT8_SCHEME
        manifest.update({**layout, "versions": _versions(), "files": files})
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(output, work, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return output


def _replace(output: Path, work: Path, overwrite: bool) -> None:
    """Move the finished export into place; an earlier export there is checked again (the folder may have changed
    during the export), renamed aside, and removed only once the new one is in place."""
    old = None
    if output.exists():
        _check_target(output, overwrite)
        old = make_temp_folder(output.parent, f".{output.name}.old.")
        os.replace(output, old)  # onto the empty folder just made
    os.replace(work, output)
    fsync_folder(output.parent)
    if old is not None:
        shutil.rmtree(old)
