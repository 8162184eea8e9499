"""An exported PABEE model (`pabee export`) on ONNX Runtime: a `Runtime` the engine drives like the torch model.

`pabee.folders.load_runtime(folder)` verifies the export and builds an `OnnxPabeeModel`; `pabee.modeling.infer`
then runs it with any exit setting, so exit rules, compaction and padding trimming are the torch model's code.
Each step is a session over a segment of the one exported graph (`pabee.onnx_segments`), cut when first needed:
`prefix(k)` is the embeddings and the first k layers in ONE call (the whole optimized graph when k is the last
layer and only its logits are wanted), `step(k)` one layer with its head. Tensors cross into ONNX Runtime as numpy
views, without copies where they are contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import profiler_label
from .configuration import PabeeConfig
from .errors import PabeeError, require_extra
from .onnx_segments import Segments

__all__ = ["OnnxPabeeModel", "require_onnx", "session_options"]


def require_onnx() -> None:
    """One line naming the extra when ONNX Runtime or the exporter's packages are missing."""
    require_extra("onnx", ("onnx", "onnxruntime"), "the ONNX backend")


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


class OnnxPabeeModel:
    """The segments of an exported folder's graph as a `Runtime` (`pabee.modeling.Runtime`).

    Args:
        folder: a folder written by `pabee export`.
        manifest: its manifest, already verified (`pabee.folders.read_manifest`).
        threads: ONNX Runtime threads per session (default: its own choice).
        config: the folder's `PabeeConfig`, when the caller has read it already.
    """

    def __init__(
        self,
        folder: str | Path,
        manifest: Mapping[str, Any],
        threads: int | None = None,
        config: PabeeConfig | None = None,
    ) -> None:
        require_onnx()
        import onnx

        folder = Path(folder)
        self.manifest = manifest
        self.config = config or PabeeConfig.from_pretrained(folder)
        self.precision = manifest["precision"]
        names = manifest["boundaries"]
        self.hidden, self.mask_names, self.logits = names["hidden"], names["mask"], names["logits"]
        self.segments = Segments(onnx.load(str(folder / manifest["graph"])))
        self.options = session_options(threads, shared_pool=True)
        self._sessions: dict[tuple, _Session] = {}
        # Layer 1 always runs inside a prefix (with the embeddings, which the optimizer may have fused into it),
        # so only the later layers are cut on their own.
        boundary = ["attention_mask", *self.mask_names]
        self.layer_inputs = [[]] + [
            self.segments.inputs_for(self._layer_outputs(k), [self.hidden[k], *boundary])
            for k in range(1, self.num_layers)
        ]
        needed = {name for inputs in self.layer_inputs for name in inputs}
        self.mask_needed = [name for name in self.mask_names if name in needed]  # by the layers after compaction

    @property
    def num_layers(self) -> int:
        return len(self.logits)

    # --- the Runtime interface --------------------------------------------------------------------------------

    def prefix(
        self, inputs: Mapping[str, torch.Tensor | None], layers: int, heads: bool = True
    ) -> tuple[torch.Tensor | None, dict[str, np.ndarray] | None, list[torch.Tensor]]:
        """Embeddings and the first `layers` layers in one session. Without `heads` only the last layer's logits
        come back (hidden states and mask None): with `layers` the last layer, that is the whole optimized graph."""
        if inputs.get("position_ids") is not None or inputs.get("inputs_embeds") is not None:
            raise ValueError("The ONNX Runtime backend takes input_ids; position_ids and inputs_embeds are torch's.")
        feed = _model_inputs(inputs)
        carry = heads and layers < self.num_layers  # what the later layers need from this call
        outputs = [*(self.logits[:layers] if heads else [self.logits[layers - 1]])]
        outputs += [self.hidden[layers], *self.mask_needed] if carry else []
        session = self._session(("prefix", layers, heads), outputs, ["input_ids", "attention_mask", "token_type_ids"])
        with profiler_label("pabee.layers"):
            results = dict(zip(outputs, session.run(feed), strict=True))
        logits = [torch.from_numpy(results[name]) for name in outputs if name in self.logits]
        if not carry:
            return None, None, logits
        mask = {"attention_mask": feed["attention_mask"], **{name: results[name] for name in self.mask_needed}}
        return torch.from_numpy(results[self.hidden[layers]]), mask, logits

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """The padding mask, and the mask parts the layer segments read (recomputed by the mask segment; none
        where the optimizer's fused attention reads the padding mask itself)."""
        mask = {"attention_mask": _int64(attention_mask)}
        if self.mask_needed:
            session = self._session(("mask",), self.mask_needed, [self.hidden[0], "attention_mask"])
            feed = {self.hidden[0]: np.ascontiguousarray(hidden.numpy()), **mask}
            mask.update(zip(self.mask_needed, session.run(feed), strict=True))
        return mask

    def step(
        self, layer: int, hidden: torch.Tensor, mask: dict[str, np.ndarray], attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer and its exit head: one session call."""
        session = self._session(("layer", layer), self._layer_outputs(layer), self.layer_inputs[layer])
        with profiler_label("pabee.layers"):
            hidden_out, logits = session.run({self.hidden[layer]: np.ascontiguousarray(hidden.numpy()), **mask})
        return torch.from_numpy(hidden_out), torch.from_numpy(logits)

    # --- segments -------------------------------------------------------------------------------------------

    def _layer_outputs(self, layer: int) -> list[str]:
        return [self.hidden[layer + 1], self.logits[layer]]

    def _session(self, key: tuple, outputs: list[str], available: list[str]) -> _Session:
        """The session of a segment, cut and made the first time it is needed."""
        if key not in self._sessions:
            import onnxruntime as ort

            inputs = self.segments.inputs_for(outputs, available)
            model = self.segments.cut(inputs, outputs)
            try:
                session = ort.InferenceSession(
                    model.SerializeToString(), self.options, providers=["CPUExecutionProvider"]
                )
            except Exception as error:
                raise PabeeError(f"ONNX Runtime cannot run the segment {key} of the export: {error}") from None
            self._sessions[key] = _Session(session, inputs, outputs)
        return self._sessions[key]


class _Session:
    """A segment's session with the names it reads and returns."""

    def __init__(self, session: Any, inputs: list[str], outputs: list[str]) -> None:
        self.session, self.inputs, self.outputs = session, inputs, outputs

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, {name: feed[name] for name in self.inputs})


def _model_inputs(inputs: Mapping[str, torch.Tensor | None]) -> dict[str, np.ndarray]:
    input_ids = inputs["input_ids"]
    token_type_ids = inputs.get("token_type_ids")
    return {
        "input_ids": _int64(input_ids),
        "attention_mask": _int64(inputs["attention_mask"]),
        "token_type_ids": _int64(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids),
    }


def _int64(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.numpy(), dtype=np.int64)
