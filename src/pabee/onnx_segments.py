"""Cutting the exported graph at its boundary names into the segments early exit runs.

ONNX Runtime runs every node of a session's graph, whatever outputs are asked for, so each step of early exit must
be a graph of its own: a *segment*, cut out of the one exported graph (`pabee.onnx_export`) between names it
exposes (`hidden_k`, the mask parts, `logits_k`). A segment is whatever the wanted outputs depend on, back to the
names the caller can feed; it keeps the nodes, fusions and quantization of the whole graph exactly.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from .errors import PabeeError

__all__ = ["Segments"]


class Segments:
    """The exported graph, ready to be cut (`onnx.ModelProto`; the cuts share nothing with it afterwards)."""

    def __init__(self, model: Any) -> None:
        graph = model.graph
        self.model = model
        self._producers = {name: node for node in graph.node for name in node.output}
        self._constants = {tensor.name for tensor in graph.initializer}
        self._order = [value.name for value in (*graph.input, *graph.output)]

    def inputs_for(self, outputs: Sequence[str], available: Collection[str]) -> list[str]:
        """The names among `available` that `outputs` depend on, in the graph's order. A `PabeeError` when they
        also depend on a graph input that is not available: the graph cannot be cut there."""
        needed, _ = self._walk(outputs, available)
        return sorted(needed, key=lambda name: self._order.index(name) if name in self._order else len(self._order))

    def nodes_for(self, outputs: Sequence[str], available: Collection[str]) -> list[Any]:
        """The nodes that compute `outputs` from `available` names (and constants), in the graph's order."""
        _, nodes = self._walk(outputs, available)
        return [node for node in self.model.graph.node if id(node) in nodes]

    def _walk(self, outputs: Sequence[str], available: Collection[str]) -> tuple[set[str], set[int]]:
        """Back from `outputs` to `available` names: the available names they read, and the ids of the nodes
        between; a `PabeeError` where they need a graph input that is not available."""
        needed, nodes, seen, pending = set(), set(), set(), list(outputs)
        while pending:
            name = pending.pop()
            if not name or name in seen:
                continue
            seen.add(name)
            if name in available:
                needed.add(name)
            elif name in self._producers:
                node = self._producers[name]
                nodes.add(id(node))
                pending.extend([*node.input, *_outer_names(node)])
            elif name not in self._constants:
                raise PabeeError(f"the exported graph cannot be cut before {', '.join(outputs)}: it needs {name!r}")
        return needed, nodes

    def cut(self, inputs: Sequence[str], outputs: Sequence[str]) -> Any:
        """The segment from `inputs` to `outputs` as a model of its own."""
        from onnx.utils import Extractor

        return Extractor(self.model).extract_model(list(inputs), list(outputs))


def _outer_names(node: Any) -> list[str]:
    """Names a control-flow node's subgraphs (`If`, `Loop`) read from the graph around them."""
    names = []
    for attribute in node.attribute:
        for graph in (attribute.g, *attribute.graphs):
            inner = {value.name for value in graph.input} | {t.name for t in graph.initializer}
            for inner_node in graph.node:
                inner |= set(inner_node.output)
                names += [name for name in inner_node.input if name and name not in inner]
    return names
