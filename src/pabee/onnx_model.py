"""An exported PABEE model (`pabee export`) on ONNX Runtime: a `Runtime` the engine drives like the torch model.

`pabee.folders.load_runtime(folder)` verifies the export and builds an `OnnxPabeeModel`; `pabee.modeling.infer`
then runs it with any exit setting, so exit rules, compaction and padding trimming are the torch model's code. The
embeddings are one session, the attention mask another (run once per batch shape, as torch builds it once), and
each distinct layer a session holding the layer and its exit heads. Tensors cross into ONNX Runtime as numpy
views, without copies where they are contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .configuration import PabeeConfig
from .errors import require_extra
from .modeling import profiler_label

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
    """The sessions of an exported folder as a `Runtime` (`pabee.modeling.Runtime`).

    Args:
        folder: a folder written by `pabee export`.
        manifest: its manifest, already verified (`pabee.folders.read_manifest`).
        threads: ONNX Runtime threads per session (default: its own choice).
    """

    def __init__(self, folder: str | Path, manifest: Mapping[str, Any], threads: int | None = None) -> None:
        require_onnx()
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = manifest
        self.config = PabeeConfig.from_pretrained(folder)
        self.precision = manifest["precision"]
        options = session_options(threads, shared_pool=True)

        def session(name: str) -> Any:
            return ort.InferenceSession(str(folder / name), options, providers=["CPUExecutionProvider"])

        self.embeddings = session(manifest["embeddings"])
        self.mask = session(manifest["mask"]["graph"])
        graphs = {name: session(name) for name in dict.fromkeys(layer["graph"] for layer in manifest["layers"])}
        self.layers = [
            (graphs[layer["graph"]], np.array(layer["head"], dtype=np.int64)) for layer in manifest["layers"]
        ]
        # The exporter may drop an input a graph does not use (DeBERTa's layers ignore the padding part): feed each
        # session only the names it declares.
        self.inputs = {id(s): [i.name for i in s.get_inputs()] for s in (self.embeddings, self.mask, *graphs.values())}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # --- the Runtime interface --------------------------------------------------------------------------------

    def embed(self, inputs: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """Token ids → hidden states `(B, T, H)`; `position_ids` and `inputs_embeds` are the torch model's only."""
        if inputs.get("position_ids") is not None or inputs.get("inputs_embeds") is not None:
            raise ValueError("The ONNX Runtime backend takes input_ids; position_ids and inputs_embeds are torch's.")
        input_ids = inputs["input_ids"]
        token_type_ids = inputs.get("token_type_ids")
        feed = {
            "input_ids": input_ids,
            "attention_mask": inputs["attention_mask"],
            "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids,
        }
        return torch.from_numpy(self._run(self.embeddings, {name: _int64(value) for name, value in feed.items()})[0])

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """The padding mask and the layers' attention mask parts, by input name."""
        feed = {"hidden": np.ascontiguousarray(hidden.numpy()), "attention_mask": _int64(attention_mask)}
        parts = self._run(self.mask, feed)
        return {
            "attention_mask": feed["attention_mask"],
            **dict(zip(self.manifest["mask"]["outputs"], parts, strict=True)),
        }

    def step(
        self,
        layer: int,
        hidden: torch.Tensor,
        mask: dict[str, np.ndarray],
        attention_mask: torch.Tensor,
        head: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer session: the layer and its head are one call, so the logits come back with or without `head`."""
        session, head_index = self.layers[layer]
        with profiler_label("pabee.layers"):
            hidden_out, logits = self._run(
                session, {"hidden": np.ascontiguousarray(hidden.numpy()), "head": head_index, **mask}
            )
        return torch.from_numpy(hidden_out), torch.from_numpy(logits)

    def _run(self, session: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(None, {name: feed[name] for name in self.inputs[id(session)]})


def _int64(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.numpy(), dtype=np.int64)
