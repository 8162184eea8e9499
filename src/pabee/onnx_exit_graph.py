"""Early exit for one sentence in ONE ONNX Runtime call: the exit rule inside the graph, as nested `If` nodes.

At batch size 1 the segments of `pabee.onnx_segments` cost one `run` per layer, and Python between the calls.
Here the whole climb is one graph: layer 1 and its head run, the rule's test on its logits is a few ONNX operators,
and an `If` either answers with that layer's logits or runs the next layer inside its `else` branch, and so on to
the last layer. The layers' nodes are those of the exported graph, cut at the same boundary names, so they keep
its fusions and quantization; the weights stay in the outer graph, which the branches read. (Moving each layer's
weights into its own branch measured no faster in a throwaway check.)

Measured (runtime_speed.md), it is slower than the engine's loop on ONNX Runtime 1.32's CPU provider: each `If`
costs more than the `run` it saves. So it is off by default (`OnnxPabeeModel.one_call`), kept for the benchmark that
checks it on each ONNX Runtime release, and exact: a sentence exits at the loop's layer with its logits (tested).

One graph serves every value of a rule: the patience, the threshold and the exit limit are inputs, so a setting
chosen per request (`pabee.load_control`) does not build a graph per value. Only the rules that read one
sentence's logits are built here (patience, confidence, entropy, patience+confidence, single-label); the others,
and every batch of more than one row (an `If` takes one condition), climb with the engine's loop.
"""

from __future__ import annotations

from typing import Any

from .onnx_segments import Segments

__all__ = ["EXIT_GRAPH_RULES", "build_exit_graph"]

EXIT_GRAPH_RULES = ("patience", "confidence", "entropy", "patience+confidence")
SETTING_INPUTS = ("exit_patience", "exit_threshold", "exit_limit")  # int64 [1], float [1], int64 [1]


def build_exit_graph(segments: Segments, boundaries: dict[str, list[str]], rule: str) -> Any:
    """The model (`onnx.ModelProto`) that climbs the exported graph under `rule` for one sentence.

    Inputs: the model's three, plus `exit_patience`, `exit_threshold` and `exit_limit` (the layer every sentence
    still running answers at). Outputs: `logits` `(1, C)` and `exit_layer` `(1,)`, 1-based.
    """
    from onnx import TensorProto, helper

    if rule not in EXIT_GRAPH_RULES:
        raise ValueError(f"no one-call graph for the {rule!r} rule; it runs in the engine's loop.")
    source = segments.model.graph
    logits = boundaries["logits"]
    layers = len(logits)
    layer_nodes = _layer_nodes(segments, boundaries)
    rules = _Rule(rule, helper, TensorProto)
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "labels"]),
        helper.make_tensor_value_info("exit_layer", TensorProto.INT64, [1]),
    ]
    branch = None
    for layer in range(layers, 0, -1):  # from the last layer down: each layer's `else` holds the layers above it
        nodes = [*layer_nodes[layer - 1], *rules.nodes(layer, logits[layer - 1])]
        if branch is None:  # the last layer answers whatever the rule says
            nodes += _answer(helper, layer, logits[layer - 1], f"out_logits_{layer}", f"out_layer_{layer}")
        else:
            then = helper.make_graph(
                _answer(helper, layer, logits[layer - 1], f"then_logits_{layer}", f"then_layer_{layer}"),
                f"exit_{layer}",
                [],
                _outputs(helper, TensorProto, f"then_logits_{layer}", f"then_layer_{layer}"),
            )
            nodes.append(
                helper.make_node(
                    "If",
                    [rules.condition(layer)],
                    [f"out_logits_{layer}", f"out_layer_{layer}"],
                    name=f"exit_if_{layer}",
                    then_branch=then,
                    else_branch=branch,
                )
            )
        if layer > 1:
            climbed = _outputs(helper, TensorProto, f"out_logits_{layer}", f"out_layer_{layer}")
            branch = helper.make_graph(nodes, f"climb_{layer}", [], climbed)
    nodes += [
        helper.make_node("Identity", ["out_logits_1"], ["logits"]),
        helper.make_node("Identity", ["out_layer_1"], ["exit_layer"]),
    ]
    read = _read(nodes)  # what no layer reads stays out (ONNX Runtime warns of unused initializers)
    constants = [node for node in rules.constants() if node.output[0] in read]
    weights = [tensor for tensor in source.initializer if tensor.name in read]
    graph = helper.make_graph(
        [*constants, *nodes], "pabee_exit_graph", [*source.input, *rules.inputs()], outputs, initializer=weights
    )
    model = helper.make_model(graph, opset_imports=list(segments.model.opset_import))
    model.ir_version = segments.model.ir_version
    return model  # ONNX Runtime checks it when it opens the session (onnx's checker does not know fused operators)


def _layer_nodes(segments: Segments, boundaries: dict[str, list[str]]) -> list[list]:
    """Each layer's nodes (its encoder layer and head); a node an earlier layer made (the fused attention's mask)
    is not repeated."""
    hidden, logits = boundaries["hidden"], boundaries["logits"]
    produced = {value.name for value in segments.model.graph.input}
    layer_nodes = []
    for layer in range(1, len(logits) + 1):
        wanted = [logits[layer - 1], hidden[layer], *(boundaries["mask"] if layer == 1 else [])]
        layer_nodes.append(segments.nodes_for(wanted, produced))
        produced |= {name for node in layer_nodes[-1] for name in node.output}
    return layer_nodes


def _read(nodes: list) -> set[str]:
    """Every name `nodes` and the graphs inside them read (the initializers the exit graph keeps)."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            for graph in (attribute.g, *attribute.graphs):
                names |= _read(list(graph.node))
    return names


def _outputs(helper: Any, types: Any, logits: str, layer: str) -> list:
    return [
        helper.make_tensor_value_info(logits, types.FLOAT, [1, "labels"]),
        helper.make_tensor_value_info(layer, types.INT64, [1]),
    ]


def _answer(helper: Any, layer: int, logits: str, logits_out: str, layer_out: str) -> list:
    """This layer answers: its logits, and its number as the exit layer."""
    return [
        helper.make_node("Identity", [logits], [logits_out]),
        helper.make_node("Identity", [f"exit_layer_const_{layer}"], [layer_out]),
    ]


class _Rule:
    """The rule's operators after each layer: `condition(layer)` is True where the sentence may stop there."""

    def __init__(self, rule: str, helper: Any, types: Any) -> None:
        self.rule, self.helper, self.types = rule, helper, types
        self.layers: list[int] = []

    def inputs(self) -> list:
        kinds = (self.types.INT64, self.types.FLOAT, self.types.INT64)
        return [self.helper.make_tensor_value_info(n, k, [1]) for n, k in zip(SETTING_INPUTS, kinds, strict=True)]

    def constants(self) -> list:
        """Each layer's number (the exit layer it answers, and the limit's test), the counter's 0 and 1."""
        h, t = self.helper, self.types
        out = [
            h.make_node("Constant", [], [name], value=h.make_tensor(name, t.INT64, [1], [value]))
            for name, value in (("exit_zero", 0), ("exit_one", 1))
        ]
        out += [
            h.make_node("Constant", [], [f"exit_layer_const_{k}"], value=h.make_tensor(f"k{k}", t.INT64, [1], [k]))
            for k in sorted(self.layers)
        ]
        return out

    def condition(self, layer: int) -> str:
        return f"exit_cond_{layer}"

    def nodes(self, layer: int, logits: str) -> list:
        """The rule's state after `layer`, and its condition `exit_cond_<layer>` (the exit limit included)."""
        h, k = self.helper, layer
        self.layers.append(k)
        out, tests = [], []
        if self.rule in ("confidence", "patience+confidence"):
            out += [
                h.make_node("Softmax", [logits], [f"exit_p_{k}"], axis=-1),
                h.make_node("ReduceMax", [f"exit_p_{k}"], [f"exit_top_{k}"], axes=[1], keepdims=0),
                h.make_node("GreaterOrEqual", [f"exit_top_{k}", "exit_threshold"], [f"exit_sure_{k}"]),
            ]
        if self.rule == "confidence":
            tests.append(f"exit_sure_{k}")
        elif self.rule == "entropy":
            out += [
                h.make_node("Softmax", [logits], [f"exit_p_{k}"], axis=-1),
                h.make_node("LogSoftmax", [logits], [f"exit_logp_{k}"], axis=-1),
                h.make_node("Mul", [f"exit_p_{k}", f"exit_logp_{k}"], [f"exit_plogp_{k}"]),
                h.make_node("ReduceSum", [f"exit_plogp_{k}", "exit_axis"], [f"exit_negent_{k}"], keepdims=0),
                h.make_node("Neg", [f"exit_negent_{k}"], [f"exit_entropy_{k}"]),
                h.make_node("Less", [f"exit_entropy_{k}", "exit_threshold"], [f"exit_sure_{k}"]),
            ]
            if k == 1:
                axis = h.make_tensor("a", self.types.INT64, [1], [1])
                out.insert(0, h.make_node("Constant", [], ["exit_axis"], value=axis))
            tests.append(f"exit_sure_{k}")
        else:  # patience, patience+confidence: a counter of agreeing layers
            out.append(h.make_node("ArgMax", [logits], [f"exit_pred_{k}"], axis=1, keepdims=0))
            if k == 1:
                zero = h.make_tensor("c", self.types.INT64, [1], [0])
                out.append(h.make_node("Constant", [], [f"exit_count_{k}"], value=zero))
            else:
                out.append(h.make_node("Equal", [f"exit_pred_{k}", f"exit_pred_{k - 1}"], [f"exit_agree_{k}"]))
                agree = f"exit_agree_{k}"
                if self.rule == "patience+confidence":
                    out.append(h.make_node("And", [agree, f"exit_sure_{k}"], [f"exit_agree_sure_{k}"]))
                    agree = f"exit_agree_sure_{k}"
                out += [
                    h.make_node("Cast", [agree], [f"exit_agree_int_{k}"], to=self.types.INT64),
                    h.make_node("Add", [f"exit_count_{k - 1}", "exit_one"], [f"exit_next_{k}"]),
                    h.make_node("Mul", [f"exit_next_{k}", f"exit_agree_int_{k}"], [f"exit_count_{k}"]),
                ]
            if k == 1:  # patience 0 never exits early: tested once, read by every layer
                out.append(h.make_node("Greater", ["exit_patience", "exit_zero"], ["exit_patient"]))
            out += [
                h.make_node("GreaterOrEqual", [f"exit_count_{k}", "exit_patience"], [f"exit_reached_{k}"]),
                h.make_node("And", [f"exit_reached_{k}", "exit_patient"], [f"exit_counted_{k}"]),
            ]
            tests.append(f"exit_counted_{k}")
        out += [
            h.make_node("GreaterOrEqual", [f"exit_layer_const_{k}", "exit_limit"], [f"exit_capped_{k}"]),
            h.make_node("Or", [tests[0], f"exit_capped_{k}"], [f"exit_cond_{k}"]),
        ]
        return out
