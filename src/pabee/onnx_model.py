"""An exported PABEE model (`pabee export`) on ONNX Runtime: a `Runtime` the engine drives like the torch model.

`pabee.folders.load_runtime(folder)` verifies the export and builds an `OnnxPabeeModel`; `pabee.modeling.infer`
then runs it with any exit setting, so exit rules, compaction and padding trimming are the torch model's code.
Each step is a session over a segment of the one exported graph (`pabee.onnx_segments`), cut when first needed:
`prefix(k)` is the embeddings and the first k layers in ONE call (the whole optimized graph when k is the last
layer and only its logits are wanted), `climb(k, n)` the n layers from layer k with their heads (one a call for a
batch; one sentence's call plan may group several, `pabee.call_plan`). Tensors cross into ONNX Runtime as numpy
views, without copies where they are contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbones import profiler_label
from .call_plan import CallPlan
from .configuration import PabeeConfig
from .errors import PabeeError, require_extra
from .onnx_exit_graph import EXIT_GRAPH_RULES, build_exit_graph
from .onnx_segments import Segments
from .rules import SINGLE_LABEL, ExitCriterion

__all__ = ["OnnxPabeeModel", "require_onnx", "session_options", "shared_pool_exists"]


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


def shared_pool_exists() -> bool:
    """Whether this process's ONNX Runtime has the shared thread pool (every later session must then use it)."""
    return bool(_SHARED_POOL)


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
        # One sentence in one call of the exit graph (`pabee.onnx_exit_graph`) where its rule allows: off, because
        # it measured slower than the loop's call per layer (ONNX Runtime 1.32 CPU: each `If` costs more than the
        # `run` it saves; runtime_speed.md), and early exit is only worth its speed.
        self.one_call = False
        # What a call costs beside its layers, in layers, for one sentence's call plans (`pabee.call_plan`): ~50 µs
        # against ~165 µs a MiniLM int8 layer (hidden 384) measured at batch 1; a layer's products grow with the
        # square of the hidden size, the call's cost does not.
        hidden_size = getattr(self.config.encoder_config, "hidden_size", 384)
        self.call_cost = 0.3 * (384 / hidden_size) ** 2
        self.plan_calls = True  # False: one sentence climbs one layer a call, as a batch does
        self._plans: dict[ExitCriterion, CallPlan] = {}
        # Layer 1 always runs inside a prefix (with the embeddings, which the optimizer may have fused into it),
        # so only the later layers are cut on their own.
        self.boundary = ["attention_mask", *self.mask_names]  # what a climb may read beside the hidden states
        needed = set()
        for k in range(1, self.num_layers):
            outputs, available = [self.hidden[k + 1], self.logits[k]], [self.hidden[k], *self.boundary]
            needed.update(self.segments.inputs_for(outputs, available))
        self.mask_needed = [name for name in self.mask_names if name in needed]  # by the layers after compaction

    @property
    def num_layers(self) -> int:
        return len(self.logits)

    # --- the Runtime interface: numpy arrays in and out ------------------------------------------------------------

    def native_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The batch as int64 numpy arrays, the graph's input type (`token_type_ids` zeros where not given): the
        exit loop then runs without a torch operation between the layers."""
        if inputs.get("position_ids") is not None or inputs.get("inputs_embeds") is not None:
            raise ValueError("The ONNX Runtime backend takes input_ids; position_ids and inputs_embeds are torch's.")
        input_ids = _int64(inputs["input_ids"])
        token_type_ids = inputs.get("token_type_ids")
        return {
            "input_ids": input_ids,
            "attention_mask": _int64(inputs["attention_mask"]),
            "token_type_ids": np.zeros_like(input_ids) if token_type_ids is None else _int64(token_type_ids),
        }

    def prefix(
        self, inputs: Mapping[str, np.ndarray], layers: int, heads: bool = True
    ) -> tuple[np.ndarray | None, dict[str, np.ndarray] | None, list[np.ndarray]]:
        """Embeddings and the first `layers` layers in one session. Without `heads` only the last layer's logits
        come back (hidden states and mask None): with `layers` the last layer, that is the whole optimized graph."""
        carry = heads and layers < self.num_layers  # what the later layers need from this call
        outputs = [*(self.logits[:layers] if heads else [self.logits[layers - 1]])]
        outputs += [self.hidden[layers], *self.mask_needed] if carry else []
        session = self._session(("prefix", layers, heads), outputs, ["input_ids", "attention_mask", "token_type_ids"])
        inputs = {name: np.ascontiguousarray(value) for name, value in inputs.items()}  # trimmed: column views
        with profiler_label("pabee.layers"):
            results = session.run(inputs)
        logits = results[:layers] if heads else results[:1]
        if not carry:
            return None, None, logits
        mask = dict(zip(self.mask_needed, results[layers + 1 :], strict=True))
        mask["attention_mask"] = inputs["attention_mask"]
        return results[layers], mask, logits

    def layer_mask(self, hidden: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """The padding mask, and the mask parts the layer segments read (recomputed by the mask segment; none
        where the optimizer's fused attention reads the padding mask itself)."""
        mask = {"attention_mask": np.ascontiguousarray(attention_mask)}
        if self.mask_needed:
            session = self._session(("mask",), self.mask_needed, [self.hidden[0], "attention_mask"])
            feed = {self.hidden[0]: np.ascontiguousarray(hidden), **mask}
            mask.update(zip(self.mask_needed, session.run(feed), strict=True))
        return mask

    def climb(
        self, layer: int, count: int, hidden: np.ndarray, mask: dict[str, np.ndarray], attention_mask: np.ndarray
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Layers `layer` .. `layer + count - 1` (0-based) and their heads in one session call."""
        outputs = [self.hidden[layer + count], *self.logits[layer : layer + count]]
        session = self._session(("layer", layer, count), outputs, [self.hidden[layer], *self.boundary])
        with profiler_label("pabee.layers"):
            results = session.run({**mask, self.hidden[layer]: np.ascontiguousarray(hidden)})
        return results[0], results[1:]

    def call_plan(self, criterion: ExitCriterion) -> CallPlan | None:
        """How one sentence under `criterion` climbs: which layers each call runs (`pabee.call_plan`)."""
        if not self.plan_calls:
            return None
        plan = self._plans.get(criterion)
        if plan is None:
            if len(self._plans) >= 64:  # a server given many settings keeps the plans of the recent ones
                self._plans.clear()
            plan = self._plans[criterion] = CallPlan(self.num_layers, self.call_cost)
        return plan

    def exit_in_one_call(
        self, inputs: Mapping[str, np.ndarray], criterion: ExitCriterion
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """One sentence's whole climb in one call of the exit graph (`pabee.onnx_exit_graph`), or None where the
        engine's loop climbs instead: a batch of more rows, a rule the graph does not hold, or `one_call` off."""
        if not (self.one_call and inputs["input_ids"].shape[0] == 1 and _in_graph(criterion)):
            return None
        session = self._exit_session(criterion.name)
        feed = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        feed["exit_patience"] = np.array([getattr(criterion, "patience", 0)], dtype=np.int64)
        feed["exit_threshold"] = np.array([getattr(criterion, "threshold", 0.0)], dtype=np.float32)
        feed["exit_limit"] = np.array([criterion.exit_limit(self.num_layers)], dtype=np.int64)
        with profiler_label("pabee.layers"):
            logits, exit_layer = session.run(feed)
        return logits, exit_layer

    # --- segments -------------------------------------------------------------------------------------------

    def _session(self, key: tuple, outputs: list[str], available: list[str]) -> _Session:
        """The session of a segment, cut and made the first time it is needed."""
        if key not in self._sessions:
            inputs = self.segments.inputs_for(outputs, available)
            self._sessions[key] = _Session(self._open(key, self.segments.cut(inputs, outputs)), inputs, outputs)
        return self._sessions[key]

    def _exit_session(self, rule: str) -> _Session:
        """The exit graph's session for `rule`, built the first time a sentence needs it."""
        key = ("exit graph", rule)
        if key not in self._sessions:
            model = build_exit_graph(self.segments, self.manifest["boundaries"], rule)
            inputs = [value.name for value in model.graph.input]
            self._sessions[key] = _Session(self._open(key, model), inputs, ["logits", "exit_layer"])
        return self._sessions[key]

    def _open(self, key: tuple, model: Any) -> Any:
        import onnxruntime as ort

        try:
            return ort.InferenceSession(model.SerializeToString(), self.options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise PabeeError(f"ONNX Runtime cannot run the segment {key} of the export: {error}") from None


class _Session:
    """A segment's session with the names it reads and returns."""

    def __init__(self, session: Any, inputs: list[str], outputs: list[str]) -> None:
        self.session, self.inputs, self.outputs = session, inputs, outputs

    def run(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.outputs, {name: feed[name] for name in self.inputs})


def _in_graph(criterion: ExitCriterion) -> bool:
    """Whether the exit graph holds `criterion`: a rule it builds, on single-label logits."""
    return criterion.name in EXIT_GRAPH_RULES and criterion.problem_type == SINGLE_LABEL


def _int64(array: torch.Tensor | np.ndarray) -> np.ndarray:
    values = array.numpy() if isinstance(array, torch.Tensor) else array
    return np.ascontiguousarray(values, dtype=np.int64)
