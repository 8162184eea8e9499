"""An exported PABEE model (`pabee export`) on ONNX Runtime, called like the torch model for inference.

`OnnxPabeeModel(folder)(**batch, exit_spec=...)` returns a `PabeeOutput` with the same `logits` and
`exit_layers`: it embeds with one session, then hands the per-layer sessions to the exit loop the torch model
uses (`modeling.early_exit`), so exit rules, compaction and padding trimming are the same code; the attention
mask is built by its own session once per batch shape (`layer_mask`), as in torch. Tensors cross
into ONNX Runtime as numpy views, without copies where they are contiguous.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configuration import PabeeConfig
from .errors import PabeeError
from .modeling import ExitSettings, PabeeOutput, early_exit, profiler_label
from .onnx_export import FORMAT_VERSION, MANIFEST, require_onnx
from .provenance import file_digest

__all__ = ["OnnxPabeeModel", "read_manifest", "session_options"]


def read_manifest(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an exported folder, after checking its format and (with `verify`) every file's SHA-256."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise PabeeError(f"{folder / MANIFEST} cannot be read: {error}") from None
    if manifest.get("format") != FORMAT_VERSION:
        made_by = manifest.get("versions", {}).get("pabee", "an unknown version")
        raise PabeeError(
            f"{folder} was exported by pabee {made_by} in format {manifest.get('format')!r}; this pabee reads format "
            f"{FORMAT_VERSION}. Export the model again with this version (pabee export)."
        )
    for name, digest in manifest.get("files", {}).items() if verify else ():
        path = folder / name
        if not path.is_file():
            raise PabeeError(f"{folder} is incomplete: {name} is missing; export the model again.")
        if file_digest(path) != digest:
            raise PabeeError(f"{path} differs from the file that was exported (SHA-256 mismatch); export again.")
    return manifest


_SHARED_POOL: list[int] = []  # the size of the process-wide ONNX Runtime thread pool, once it is made


def session_options(threads: int | None, shared_pool: bool = False):
    """Sequential sessions with `threads` intra-op threads (None: ONNX Runtime's choice, the physical cores).

    With `shared_pool` and `threads` > 1, the sessions share ONE process-wide pool of `threads` threads: a layer's
    session then finds the threads awake where the previous layer's call left them, instead of waking a pool of
    its own (per-session pools cost the per-layer sessions 20-35% at batch size 1 on MiniLM with 2 threads).
    ONNX Runtime sizes that pool once per process, and once it exists every session must use it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if _SHARED_POOL or (shared_pool and threads and threads > 1 and _make_shared_pool(threads)):
        options.use_per_session_threads = False
        return options
    options.inter_op_num_threads = 1
    options.intra_op_num_threads = threads or 0
    # Threads that spin after their session's call would steal the cores of the next session's call.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _make_shared_pool(threads: int) -> bool:
    """Make the process-wide pool; False when ONNX Runtime was already set up without one (sessions exist)."""
    import onnxruntime as ort

    try:
        ort.set_global_thread_pool_sizes(threads, 1)
    except Exception:
        return False
    _SHARED_POOL.append(threads)
    return True


class OnnxPabeeModel(ExitSettings):
    """The sessions of an exported folder behind the torch model's inference interface.

    Args:
        folder: a folder written by `pabee export`.
        threads: ONNX Runtime threads per session (default: its own choice).
    """

    training = False
    device = torch.device("cpu")

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        require_onnx()
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.config = PabeeConfig.from_pretrained(folder)
        options = session_options(threads, shared_pool=True)

        def session(name: str) -> Any:
            return ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])

        self.embeddings = session(self.manifest["embeddings"])
        self.mask = session(self.manifest["mask"]["graph"])
        graphs = {name: session(name) for name in dict.fromkeys(layer["graph"] for layer in self.manifest["layers"])}
        self.layers = [
            (graphs[layer["graph"]], np.array(layer["head"], dtype=np.int64)) for layer in self.manifest["layers"]
        ]
        # The exporter may drop an input a graph does not use (DeBERTa's layers ignore the padding part): feed each
        # session only the names it declares.
        self.inputs = {id(s): [i.name for i in s.get_inputs()] for s in (self.embeddings, self.mask, *graphs.values())}
        self.precision = self.manifest["precision"]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def eval(self) -> OnnxPabeeModel:
        return self

    def to(self, device: Any) -> OnnxPabeeModel:
        if torch.device(device).type != "cpu":
            raise ValueError("The ONNX Runtime backend runs on the CPU here; use the torch backend for a GPU.")
        return self

    # --- the exit loop's LayerStepper interface ---------------------------------------------------------------

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """The padding mask and the layers' attention mask parts, by input name."""
        feed = {"hidden": np.ascontiguousarray(hidden.numpy()), "attention_mask": _int64(attention_mask)}
        parts = self._run(self.mask, feed)
        return {
            "attention_mask": feed["attention_mask"],
            **dict(zip(self.manifest["mask"]["outputs"], parts, strict=True)),
        }

    def step(
        self, layer: int, hidden: torch.Tensor, mask: dict[str, np.ndarray], attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        session, head = self.layers[layer]
        with profiler_label("pabee.layers"):  # the layer and its head are one session call
            hidden_out, logits = self._run(
                session, {"hidden": np.ascontiguousarray(hidden.numpy()), "head": head, **mask}
            )
        return torch.from_numpy(hidden_out), torch.from_numpy(logits)

    def _run(self, session: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(None, {name: feed[name] for name in self.inputs[id(session)]})

    # --- inference ----------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs["token_type_ids"] = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        return torch.from_numpy(self._run(self.embeddings, {name: _int64(value) for name, value in inputs.items()})[0])

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        exit_spec: Any = None,
        output_all_logits: bool = False,
        **overrides: Any,
    ) -> PabeeOutput:
        """Early exit per example, as `PabeeForSequenceClassification.forward` in eval mode; `output_all_logits`
        runs every layer and returns them too."""
        criterion = self.get_exit_criterion(exit_spec, **overrides)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embed(input_ids, attention_mask, token_type_ids)  # (B, T, H)
        if output_all_logits:
            return self._all_layers(hidden, attention_mask, criterion)
        if criterion.can_exit_early(self.num_layers):
            logits, exit_layers = early_exit(self, hidden, attention_mask, criterion)
            return PabeeOutput(logits=logits, exit_layers=exit_layers)
        limit = criterion.exit_limit(self.num_layers)
        logits = self._layer_logits(hidden, attention_mask, limit)[-1]
        return PabeeOutput(logits=logits, exit_layers=torch.full((len(logits),), limit, dtype=torch.long))

    def _layer_logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: int) -> list[torch.Tensor]:
        """Every example through the first `layers` layers: each layer's logits `(B, C)`."""
        mask, per_layer = self.layer_mask(hidden, attention_mask), []
        for layer in range(layers):
            hidden, logits = self.step(layer, hidden, mask, attention_mask)
            per_layer.append(logits)
        return per_layer

    def _all_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor, criterion: Any) -> PabeeOutput:
        from .exits import logits_at_exit, sweep_exit_layers

        all_logits = torch.stack(self._layer_logits(hidden, attention_mask, self.num_layers), dim=1)  # (B, L, C)
        exit_layers = sweep_exit_layers(criterion, all_logits)
        return PabeeOutput(
            logits=logits_at_exit(all_logits, exit_layers), all_logits=all_logits, exit_layers=exit_layers
        )


def _int64(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.numpy(), dtype=np.int64)
