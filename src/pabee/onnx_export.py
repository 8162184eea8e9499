"""`pabee export`: a PABEE model as one ONNX graph that ONNX Runtime runs in segments, with early exit between them.

ONNX Runtime cannot stop inside a graph, and it runs every node of a graph whatever outputs are asked for, so
early exit needs a graph per step. Instead of exporting each step on its own, the whole model is exported as ONE
graph that names what passes between layers: `hidden_0` (the embeddings) to `hidden_L`, the layer mask parts
(`mask`, or `mask.<key>` for a backbone whose mask is several tensors) and every layer's logits `logits_1` to
`logits_L`. That graph gets what a user would do to it without pabee: onnxruntime's transformer optimizer (fused
Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization, wherever its result is checked equal to the
plain graph; where it is not, the graph stays plain, the manifest says why and a warning names the reason) and,
with `--quantize int8`, per-channel dynamic int8. `pabee.onnx_model` then cuts it at those
names into the segments early exit runs (the layers before the first possible exit in one session, then one
layer at a time), so every segment has exactly the optimizations of the whole graph.

The folder also holds the tokenizer, `config.json` (the model's config with its exit settings) and
`pabee_onnx.json`, the manifest: versions, opset, precision, the graph's boundary names, what the optimizer fused,
and the SHA-256 of every file, so a missing or altered file is found before anything runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .errors import PabeeError
from .folders import FORMAT_VERSION, MANIFEST, load_model_folder, load_tokenizer
from .modeling import PabeeForSequenceClassification
from .onnx_model import require_onnx, session_options, shared_pool_exists
from .provenance import file_digest, fsync_folder, make_temp_folder
from .version import __version__

__all__ = ["GRAPH", "OPSET", "FullModelExport", "export_full_model", "export_onnx"]

logger = logging.getLogger(__name__)

OPSET = 17
CARRIED = ("exit_ladder.json", "calibration.md", "calibration.json")  # what the export keeps of the model folder
PRECISIONS = ("fp32", "int8")
GRAPH = "model.onnx"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FUSED_OPS = ("Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu", "EmbedLayerNormalization")
INT8_SCHEME = {
    "method": "dynamic",
    "ops": ["MatMul", "Attention"],
    "weights": "int8",
    "per_channel": True,
    "reduce_range": True,
}


def mask_parts(mask: Any) -> tuple:
    """The tensors of a backbone's layer mask, in `mask_names` order."""
    return tuple(mask.values()) if isinstance(mask, dict) else (mask,)


def mask_names(mask: Any) -> list[str]:
    """Graph names of the parts of a backbone's layer mask: one tensor (`mask`) or a dict's entries."""
    return [f"mask.{key}" for key in mask] if isinstance(mask, dict) else ["mask"]


class _Boundaries(nn.Module):
    """The whole model, returning what passes between its layers: `hidden_0..L`, the mask parts, `logits_1..L`."""

    def __init__(self, model: PabeeForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        model = self.model
        hidden = model.adapter.embed(model.encoder, input_ids, token_type_ids, None, None, attention_mask)
        mask = model.layer_mask(hidden, attention_mask)
        states, logits = [hidden], []
        for layer in range(model.num_layers):
            hidden = model.adapter.run_layer(model.encoder, layer, hidden, mask)  # (B, T, H)
            states.append(hidden)
            logits.append(model.classify(layer, hidden, attention_mask))  # (B, C)
        return (*states, *mask_parts(mask), *logits)


class _FullModel(nn.Module):
    """The whole encoder and the last classifier in one graph: the full model, no early exit."""

    def __init__(self, model: PabeeForSequenceClassification) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor):
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, patience=0
        ).logits


def _example_inputs() -> dict[str, torch.Tensor]:
    """Two rows, the second padded, so the traced graph keeps the padding-mask path."""
    input_ids = torch.full((2, 8), 5, dtype=torch.long)
    attention_mask = torch.ones(2, 8, dtype=torch.long)
    attention_mask[1, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


def _export(module: nn.Module, path: Path, outputs: list[str], axes: dict, opset: int) -> None:
    """Trace `module` on the example inputs into `path`; `axes` gives each name's dynamic dimensions."""
    module.eval()  # the exporter puts the wrapper's training mode back onto the model it wraps
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(
            module,
            tuple(_example_inputs().values()),
            str(path),
            input_names=list(INPUTS),
            output_names=outputs,
            dynamic_axes={**{name: {0: "batch", 1: "sequence"} for name in INPUTS}, **axes},
            opset_version=opset,
            dynamo=False,  # the TorchScript exporter handles transformers' mask code on every backbone we have
        )


def _example_mask(model: PabeeForSequenceClassification) -> Any:
    """The backbone's layer mask on the example inputs: its parts name and size the graph's mask outputs."""
    inputs = _example_inputs()
    with torch.no_grad():
        hidden = model.adapter.embed(model.encoder, inputs["input_ids"], None, None, None, inputs["attention_mask"])
        return model.layer_mask(hidden, inputs["attention_mask"])


def _boundaries(model: PabeeForSequenceClassification, mask: Any) -> dict[str, list[str]]:
    """The graph's names for what passes between layers: hidden states, mask parts, each layer's logits."""
    layers = model.num_layers
    return {
        "hidden": [f"hidden_{k}" for k in range(layers + 1)],
        "mask": mask_names(mask),
        "logits": [f"logits_{k}" for k in range(1, layers + 1)],
    }


def _outputs(names: dict[str, list[str]]) -> list[str]:
    """The boundary graph's outputs, in `_Boundaries`' order."""
    return [*names["hidden"], *names["mask"], *names["logits"]]


def _boundary_axes(names: dict[str, list[str]], mask: Any) -> dict[str, dict]:
    """Dynamic axes of the outputs: hidden states by batch and sequence, logits by batch, mask parts by every
    dimension the example's batch or sequence length sized."""
    batch, sequence = _example_inputs()["attention_mask"].shape
    axes: dict[str, dict] = {name: {0: "batch", 1: "sequence"} for name in names["hidden"]}
    axes.update({name: {0: "batch"} for name in names["logits"]})
    for name, part in zip(names["mask"], mask_parts(mask), strict=True):
        axes[name] = {
            dim: "batch" if dim == 0 else "sequence"
            for dim, size in enumerate(part.shape)
            if (dim == 0 and size == batch) or (dim > 0 and size == sequence)
        }
    return axes


def _export_boundaries(model: PabeeForSequenceClassification, path: Path, opset: int) -> dict[str, list[str]]:
    """Write the whole model with its boundaries named (`_Boundaries`); return the names."""
    mask = _example_mask(model)
    names = _boundaries(model, mask)
    _export(_Boundaries(model), path, _outputs(names), _boundary_axes(names, mask), opset)
    return names


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The optimizer and the quantizer log advice at WARNING on the root logger (and the optimizer prints some);
    a command's output is not the place for it."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.getLogger().setLevel(level)


def _optimize(path: Path, model: PabeeForSequenceClassification, outputs: list[str]) -> dict[str, Any]:
    """onnxruntime's transformer optimizer on the graph at `path`, kept only if every output of the optimized graph
    equals the plain graph's (within 1e-4 on the example inputs). Returns what it fused, or why it was not kept."""
    config = model.config.encoder_config
    candidate = path.with_suffix(".optimized.onnx")
    job = (str(path), str(candidate), config.num_attention_heads, config.hidden_size)
    try:
        # Its sessions need threads of their own, which ONNX Runtime refuses once this process has the shared pool.
        fused = _optimized_copy_apart(*job) if shared_pool_exists() else _optimized_copy(*job)
        difference = _max_difference(path, candidate, outputs)
    except Exception as error:  # an optimizer that cannot handle a backbone leaves its graph plain
        candidate.unlink(missing_ok=True)
        return {"applied": False, "reason": " ".join(f"{type(error).__name__}: {error}".split())[:300]}
    if difference > 1e-4:
        candidate.unlink()
        return {"applied": False, "reason": f"optimized outputs differ by {difference:.2g}"}
    os.replace(candidate, path)
    return {"applied": True, "model_type": "bert", "fused": fused}


def _optimized_copy_apart(*job: Any) -> dict[str, int]:
    """`_optimized_copy` in a fresh Python process (a plain subprocess: nothing of the caller's script re-runs)."""
    code = (
        "import json, sys; from pabee.onnx_export import _optimized_copy; "
        "print(json.dumps(_optimized_copy(*json.loads(sys.argv[1]))))"
    )
    done = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _optimized_copy(path: str, candidate: str, num_heads: int, hidden_size: int) -> dict[str, int]:
    """The optimizer's graph of `path` written to `candidate`; the fused operators it holds, by type. Runs in a
    process of its own when this one's ONNX Runtime already has the shared thread pool."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)  # a raw (B, T) mask: any row or column subset of the batch stays valid
    with _quiet():
        optimized = optimize_model(
            path, model_type="bert", num_heads=num_heads, hidden_size=hidden_size, optimization_options=options
        )
        optimized.save_model_to_file(candidate)
    fused = Counter(node.op_type for node in optimized.model.graph.node if node.op_type in FUSED_OPS)
    return dict(sorted(fused.items()))


def _unfused(optimization: dict[str, Any]) -> str | None:
    """Why a graph meant to be optimized is not fused (the optimizer was not kept, or matched nothing), or None."""
    if not optimization["applied"]:
        return optimization["reason"]
    return None if optimization.get("fused") else "the optimizer fused no operator"


def _require_fused(optimization: dict[str, Any], what: str) -> None:
    """`require_optimized`: a graph the optimizer did not fuse is an error, not a plain graph."""
    reason = _unfused(optimization)
    if reason is not None:
        raise PabeeError(f"onnxruntime's transformer optimizer did not fuse {what} (require_optimized=True): {reason}")


def _max_difference(plain: Path, optimized: Path, outputs: list[str]) -> float:
    """The largest difference between two graphs' `outputs` on the example inputs."""
    import onnxruntime as ort

    feed = {name: value.numpy() for name, value in _example_inputs().items()}
    results = []
    for path in (plain, optimized):  # the process-wide thread pool where one exists (sessions must then use it)
        session = ort.InferenceSession(str(path), session_options(None), providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        results.append(session.run(outputs, {name: value for name, value in feed.items() if name in wanted}))
    return max(_difference(a, b) for a, b in zip(*results, strict=True))


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest element-wise difference; equal infinities (an additive mask's) count as equal."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.astype(np.float64), b.astype(np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    return float(np.where(same, 0.0, np.abs(a - b)).max(initial=0.0))


def _quantize(path: Path) -> None:
    """Dynamic int8 quantization of the weight products (activations are quantized per batch at run time).

    Weights get a scale per output channel, in 7 bits (`reduce_range`): one scale per matrix cost SST-2 1.4 points
    of accuracy on the fine-tuned MiniLM (86.1 -> 84.7), per channel in 7 bits 0.1 (86.0), at the same speed; the
    7 bits keep AVX2's 8-bit products (no VNNI) from saturating. The embedding tables stay float: a lookup does
    no arithmetic to speed up, and int8 tables only lose accuracy.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_suffix(".int8.onnx")
    with _quiet():
        quantize_dynamic(
            str(path),
            str(quantized),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=INT8_SCHEME["ops"],
            per_channel=INT8_SCHEME["per_channel"],
            reduce_range=INT8_SCHEME["reduce_range"],
            # ONNX's shape inference does not know the optimizer's fused operators; their outputs are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    os.replace(quantized, path)


class FullModelExport(NamedTuple):
    """What `export_full_model` wrote: the graph's `path`, and what onnxruntime's transformer optimizer did to it,
    as the manifest of `export_onnx` records it: `{"applied": True, "model_type": "bert", "fused": {op: count}}`
    (counted before int8 quantization) or `{"applied": False, "reason": ...}`."""

    path: Path
    optimization: dict[str, Any]


def export_full_model(
    model_dir: str | Path,
    path: str | Path,
    quantize: str | None = None,
    opset: int = OPSET,
    optimize: bool = True,
    require_optimized: bool = False,
) -> FullModelExport:
    """The model as ONE graph at full depth, as a user without early exit would deploy it: exported, optimized by
    onnxruntime's transformer optimizer (unless `optimize=False`) and quantized like `export_onnx`'s graph. The
    baseline early exit is measured against (`benchmarks/`). Inputs: `input_ids`, `attention_mask`,
    `token_type_ids`; output: `logits`.

    Where the optimizer fails or changes the outputs the graph stays plain, as in `export_onnx`, and the returned
    `optimization` says why; with `require_optimized=True` that (or an optimizer that fused nothing) raises a
    `PabeeError` instead, so a baseline is never weaker than it claims to be.

    Example:
        >>> graph, optimization = export_full_model("runs/mrpc", "whole.onnx", "int8", require_optimized=True)
    """
    if require_optimized and not optimize:
        raise ValueError("require_optimized=True needs optimize=True.")
    require_onnx()
    model, _ = _load(model_dir)
    path = Path(path)
    _export(_FullModel(model), path, ["logits"], {"logits": {0: "batch"}}, opset)
    optimization = _optimize(path, model, ["logits"]) if optimize else {"applied": False, "reason": "optimize=False"}
    if require_optimized and _unfused(optimization) is not None:
        path.unlink()  # a baseline that is not what it claims to be is not left behind
        _require_fused(optimization, str(path))
    if quantize == "int8":
        _quantize(path)
    return FullModelExport(path, optimization)


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
    model_dir: str | Path,
    output: str | Path,
    quantize: str | None = None,
    opset: int = OPSET,
    overwrite: bool = False,
    optimize: bool = True,
    require_optimized: bool = False,
) -> Path:
    """Export the PABEE model in `model_dir` to `output` (see the module docstring); returns `output`.

    `optimize=False` leaves out onnxruntime's transformer optimizer. Where the optimizer fails or changes the
    graph's outputs, the graph stays plain: the manifest's `optimization` records why and a warning (logger
    `pabee.onnx_export`) names the reason; with `require_optimized=True` that (or an optimizer that fused nothing)
    is a `PabeeError` instead. The folder is built beside `output` and moved into place at the end, so a failed
    export leaves nothing.
    """
    if require_optimized and not optimize:
        raise ValueError("require_optimized=True needs optimize=True.")
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
        layout = _write_graph(model, work / GRAPH, opset, optimize)
        if require_optimized:
            _require_fused(layout["optimization"], f"the export {output}")
        unfused = _unfused(layout["optimization"]) if optimize else None  # --no_optimize is no news
        if precision == "int8":
            _quantize(work / GRAPH)
        tokenizer.save_pretrained(work)
        model.config.save_pretrained(work)
        for name in CARRIED:  # measured on the model, true of the export too (fp32; int8 answers may differ)
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, work / name)
        files = {p.name: file_digest(p) for p in sorted(work.iterdir()) if p.is_file()}
        manifest = {"format": FORMAT_VERSION, "precision": precision, "opset": opset, "source": str(model_dir)}
        if precision == "int8":
            manifest["quantization"] = INT8_SCHEME
        manifest.update({**layout, "versions": _versions(), "files": files})
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace(output, work, overwrite)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if unfused is not None:  # after the export is in place: the warning names a folder that exists
        logger.warning(
            "onnxruntime's transformer optimizer did not fuse the export %s, which runs its graph as exported: %s "
            '(recorded under "optimization" in %s)',
            output,
            unfused,
            MANIFEST,
        )
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


def _write_graph(model: PabeeForSequenceClassification, path: Path, opset: int, optimize: bool) -> dict[str, Any]:
    """The boundary graph at `path`, optimized where that keeps its outputs; the manifest's graph section."""
    try:
        names = _export_boundaries(model, path, opset)
    except Exception as error:  # an exporter failure on a backbone is a fact to report, not a traceback
        name = model.config.encoder_config.model_type
        raise PabeeError(f"cannot export the {name!r} backbone to ONNX yet: {type(error).__name__}: {error}") from None
    skipped = {"applied": False, "reason": "--no_optimize"}
    optimization = _optimize(path, model, _outputs(names)) if optimize else skipped
    return {"graph": path.name, "boundaries": names, "optimization": optimization}
