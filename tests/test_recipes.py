"""Exit-aware training recipes (`pabee.recipes`): each one's loss or schedule checked by hand on tiny tensors, the
model applying it, bad settings refused as one line, and run-glue recording each in the saved config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_run_glue_refuses, random_batch, tiny_model, tiny_run_glue_argv
from safetensors.torch import load_file

from pabee import PabeeForSequenceClassification
from pabee.cli import main
from pabee.configuration import PabeeConfig
from pabee.losses import layer_weighted_loss
from pabee.recipes import (
    BACKBONE_STAGE,
    HEADS_STAGE,
    TwoStageCallback,
    alignment_loss,
    check_recipes,
    equilibrium,
    exit_example_weights,
    stage_at,
    stage_layer_weights,
)

SINGLE = "single_label_classification"
# 2 examples x 2 layers x 2 classes, and the labels: small enough to compute every loss by hand.
LOGITS = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [3.0, 0.0]]])
LABELS = torch.tensor([0, 1])


def cross_entropy(logits: list[float], label: int) -> float:
    """−log softmax(logits)[label], written out."""
    return -logits[label] + math.log(sum(math.exp(x) for x in logits))


def ce(example: int, layer: int) -> float:
    return cross_entropy(LOGITS[example, layer].tolist(), int(LABELS[example]))


def test_the_loss_pass_computes_what_the_sweep_computes():
    """A forward with labels runs its own pass over the layers; its logits equal `infer`'s every-layer pass, in
    training too (the same dropout draws in the same order), so the default loss is the paper's as before."""
    model, batch, labels = tiny_model(pooling="pooler"), random_batch(), torch.randint(0, 2, (8,))
    for training in (False, True):
        model.train(training)
        torch.manual_seed(3)
        swept = model(**batch, output_all_logits=True)
        torch.manual_seed(3)
        with_loss = model(**batch, labels=labels)
        assert torch.equal(with_loss.all_logits, swept.all_logits)
        assert torch.equal(with_loss.exit_layers, swept.exit_layers)


# --- alignment ---------------------------------------------------------------------------------------------------


def test_alignment_by_hand():
    """Example 1: layer 1 orthogonal to layer 2 (1 − cos = 1); example 2: the same direction, twice as long (0)."""
    pooled = torch.tensor([[[1.0, 0.0], [0.0, 3.0]], [[1.0, 1.0], [2.0, 2.0]]], requires_grad=True)
    loss = alignment_loss(pooled)
    assert loss.item() == pytest.approx((1.0 + 0.0) / 2)
    loss.backward()
    assert torch.equal(pooled.grad[:, -1], torch.zeros(2, 2))  # the last layer is the target, never pulled
    assert pooled.grad[0, 0].abs().sum() > 0


def test_alignment_of_a_one_layer_model_is_zero():
    assert alignment_loss(torch.randn(3, 1, 4)).item() == 0.0


def test_the_model_adds_the_alignment_of_its_pooled_states():
    batch, labels = random_batch(), torch.randint(0, 2, (8,))
    plain = tiny_model(pooling="mean")(**batch, labels=labels).loss  # eval mode: no dropout
    model = tiny_model(pooling="mean", alignment_weight=0.3)
    with torch.no_grad():
        pooled = []
        for layers in range(1, model.num_layers + 1):
            hidden = model.prefix(batch, layers, heads=False)[0]
            pooled.append(model.pool(hidden, batch["attention_mask"]))
        last = pooled[-1]
        by_hand = sum(1 - torch.cosine_similarity(p, last, dim=-1).mean() for p in pooled[:-1]) / (len(pooled) - 1)
    torch.testing.assert_close(model(**batch, labels=labels).loss, plain + 0.3 * by_hand)


# --- gradient equilibrium ----------------------------------------------------------------------------------------


def test_gradient_equilibrium_on_a_toy_graph():
    """Three "layers" h_k = a_k · h_{k−1} and exits ℓ_k = c_k · Σ h_k, wired as the model wires them. Backward,
    the gradient at h_k is (1 / n_k) · Σ_{j ≥ k} ∂ℓ_j/∂h_k, n_k = 3 − k + 1 exits at or above it:
    h_3: 4; h_2: (2 + 5·4) / 2 = 11; h_1: (1 + 3·2 + 3·5·4) / 3 = 67/3; plain backprop would give 4, 22, 67."""
    a, c = (2.0, 3.0, 5.0), (1.0, 2.0, 4.0)
    x = torch.ones(2, requires_grad=True)
    hidden, outputs, losses = x, [], []
    for layer in range(3):
        hidden = hidden * a[layer]
        hidden.retain_grad()
        outputs.append(hidden)
        read, onward = equilibrium(hidden, layer, 3)
        assert torch.equal(read, hidden) and torch.equal(onward, hidden)  # the identity forward
        losses.append(c[layer] * read.sum())
        hidden = onward
    sum(losses).backward()
    for output, expected in zip(outputs, (67 / 3, 11.0, 4.0), strict=True):
        torch.testing.assert_close(output.grad, torch.full((2,), expected))
    torch.testing.assert_close(x.grad, torch.full((2,), 2 * 67 / 3))


def _grads_after_one_backward(model, batch, labels):
    model.train()
    torch.manual_seed(5)  # the same dropout masks for both models
    loss = model(**batch, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_gradient_equilibrium_changes_the_backbone_gradients_only():
    batch, labels = random_batch(), torch.randint(0, 2, (8,))
    loss, plain = _grads_after_one_backward(tiny_model(), batch, labels)
    balanced_loss, balanced = _grads_after_one_backward(tiny_model(gradient_equilibrium=True), batch, labels)
    torch.testing.assert_close(balanced_loss, loss)  # the forward is untouched
    assert plain.keys() == balanced.keys()
    for name in plain:
        if name.startswith("classifiers.") or name.startswith("encoder.pooler."):  # heads: their usual gradients
            torch.testing.assert_close(balanced[name], plain[name])
    # The last layer's output has one exit above it (scale 1), its input two: layer 1 of 4 is scaled.
    first = "encoder.encoder.layer.0.output.dense.weight"
    assert not torch.allclose(balanced[first], plain[first])


# --- two stages --------------------------------------------------------------------------------------------------


def test_stage_layer_weights():
    assert stage_layer_weights(None, 4) == [1.0, 2.0, 3.0, 4.0]
    assert stage_layer_weights(BACKBONE_STAGE, 4) == [0.0, 0.0, 0.0, 1.0]
    assert stage_layer_weights(HEADS_STAGE, 4) == [1.0, 2.0, 3.0, 0.0]


def test_two_stage_losses_by_hand():
    """Stage 1: the last layer's cross-entropy alone; stage 2: the internal layers' (here layer 1 alone)."""
    stage1 = layer_weighted_loss(SINGLE, LOGITS, LABELS, layer_weights=stage_layer_weights(BACKBONE_STAGE, 2))
    stage2 = layer_weighted_loss(SINGLE, LOGITS, LABELS, layer_weights=stage_layer_weights(HEADS_STAGE, 2))
    assert stage1.item() == pytest.approx((ce(0, 1) + ce(1, 1)) / 2)
    assert stage2.item() == pytest.approx((ce(0, 0) + ce(1, 0)) / 2)
    joint = layer_weighted_loss(SINGLE, LOGITS, LABELS)
    assert joint.item() == pytest.approx((1 * (ce(0, 0) + ce(1, 0)) / 2 + 2 * (ce(0, 1) + ce(1, 1)) / 2) / 3)


def test_the_switch_step():
    assert [stage_at(step, 10, 0.3) for step in range(10)] == [1, 1, 1] + [2] * 7
    assert [stage_at(step, 2, 0.1) for step in range(2)] == [1, 2]  # each stage gets a step
    assert [stage_at(step, 2, 0.9) for step in range(2)] == [1, 2]


def test_the_callback_sets_the_stage_from_the_step():
    model = SimpleNamespace(training_stage=None)
    callback, control = TwoStageCallback(0.5), object()
    for step, stage in ((0, 1), (4, 1), (5, 2), (9, 2)):
        state = SimpleNamespace(global_step=step, max_steps=10)
        assert callback.on_step_begin(None, state, control, model=model) is control
        assert model.training_stage == stage
    callback.on_train_end(None, state, control, model=model)
    assert model.training_stage is None


def _trainable_groups(model):
    return {
        "backbone": list(model.encoder.parameters()),
        "last head": list(model.classifiers[-1].parameters()),
        "internal heads": [p for head in model.classifiers[:-1] for p in head.parameters()],
    }


def test_each_stage_trains_only_its_part():
    """Gradients reach only the stage's part, and with AdamW (weight decay, momentum from stage 1) the other part
    does not move at all: frozen parameters get no gradient, not a zero one."""
    model = tiny_model(two_stage=0.5).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    batch, labels = random_batch(), torch.randint(0, 2, (8,))
    trained = {BACKBONE_STAGE: {"backbone", "last head"}, HEADS_STAGE: {"internal heads"}}
    for stage in (BACKBONE_STAGE, BACKBONE_STAGE, HEADS_STAGE, HEADS_STAGE):
        model.training_stage = stage
        before = {name: [p.detach().clone() for p in ps] for name, ps in _trainable_groups(model).items()}
        model(**batch, labels=labels).loss.backward()
        for name, params in _trainable_groups(model).items():
            with_grad = [p.grad is not None for p in params]
            assert all(with_grad) if name in trained[stage] else not any(with_grad), (stage, name)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, params in _trainable_groups(model).items():
            moved = any(not torch.equal(p, b) for p, b in zip(params, before[name], strict=True))
            assert moved == (name in trained[stage]), (stage, name)


def test_without_two_stage_the_stage_is_ignored():
    model = tiny_model()
    model.training_stage = HEADS_STAGE
    assert model.stage is None


# --- sample weighting by exit ------------------------------------------------------------------------------------


def test_exit_example_weights_by_hand():
    """Exits at layers 1 and 2, τ = 1: layer 1 weighs the examples e^0 : e^−1, layer 2 e^−1 : e^0, times B = 2."""
    weights = exit_example_weights(torch.tensor([1, 2]), 2, 1.0)
    near, far = 2 / (1 + math.exp(-1)), 2 * math.exp(-1) / (1 + math.exp(-1))
    torch.testing.assert_close(weights, torch.tensor([[near, far], [far, near]]))


def test_exit_example_weights_reduce_to_the_papers():
    assert torch.allclose(exit_example_weights(torch.tensor([3, 3, 3]), 4, 0.5), torch.ones(3, 4))  # one exit
    assert torch.allclose(exit_example_weights(torch.tensor([1, 4, 2]), 4, 1e6), torch.ones(3, 4))  # τ → ∞
    columns = exit_example_weights(torch.tensor([1, 4, 2, 2]), 4, 0.7).mean(dim=0)
    torch.testing.assert_close(columns, torch.ones(4))


def test_sample_weighted_loss_by_hand():
    weights = exit_example_weights(torch.tensor([1, 2]), 2, 1.0)
    got = layer_weighted_loss(SINGLE, LOGITS, LABELS, example_weights=weights)
    near, far = 2 / (1 + math.exp(-1)), 2 * math.exp(-1) / (1 + math.exp(-1))
    layer1 = (near * ce(0, 0) + far * ce(1, 0)) / 2
    layer2 = (far * ce(0, 1) + near * ce(1, 1)) / 2
    assert got.item() == pytest.approx((1 * layer1 + 2 * layer2) / 3)


@pytest.mark.parametrize("problem", [SINGLE, "regression", "multi_label_classification"])
def test_unit_example_weights_are_the_papers_loss(problem):
    torch.manual_seed(0)
    width = 1 if problem == "regression" else 3
    logits = torch.randn(5, 4, width)
    labels = {
        SINGLE: torch.randint(0, 3, (5,)),
        "regression": torch.rand(5),
        "multi_label_classification": torch.randint(0, 2, (5, 3)).float(),
    }[problem]
    for weight in (0.0, 0.5):
        paper = layer_weighted_loss(problem, logits, labels, weight, 2.0)
        ones = layer_weighted_loss(problem, logits, labels, weight, 2.0, example_weights=torch.ones(5, 4))
        torch.testing.assert_close(ones, paper)


def test_the_model_weighs_examples_by_their_exit_layer():
    batch, labels = random_batch(), torch.randint(0, 2, (8,))
    model = tiny_model(sample_weighting_temperature=0.5, patience=1)
    out = model(**batch, labels=labels)
    weights = exit_example_weights(out.exit_layers, 4, 0.5)
    torch.testing.assert_close(out.loss, layer_weighted_loss(SINGLE, out.all_logits, labels, example_weights=weights))


# --- settings ----------------------------------------------------------------------------------------------------


def test_recipes_are_off_by_default_and_recorded():
    assert PabeeConfig(num_labels=2).recipes == {
        "alignment_weight": 0.0,
        "gradient_equilibrium": False,
        "two_stage": 0.0,
        "sample_weighting_temperature": 0.0,
    }
    recipes = {"alignment_weight": 0.2, "gradient_equilibrium": True, "sample_weighting_temperature": 1.5}
    config = PabeeConfig(num_labels=2, **recipes)
    assert PabeeConfig.from_dict(config.to_dict()).recipes == config.recipes
    assert PabeeConfig.from_dict(PabeeConfig(num_labels=2, two_stage=0.4).to_dict()).two_stage == 0.4


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"alignment_weight": -0.1}, "alignment_weight=-0.1 is invalid"),
        ({"two_stage": 1.0}, "two_stage=1.0 is invalid"),
        ({"sample_weighting_temperature": float("nan")}, "sample_weighting_temperature=nan is invalid"),
        ({"gradient_equilibrium": "yes"}, "gradient_equilibrium='yes' is invalid"),
        ({"two_stage": 0.5, "alignment_weight": 0.1}, "two_stage=0.5 does not combine with alignment_weight=0.1"),
    ],
)
def test_bad_recipes_are_refused(settings, message):
    values = {"alignment_weight": 0.0, "gradient_equilibrium": False, "two_stage": 0.0}
    values |= {"sample_weighting_temperature": 0.0, **settings}
    with pytest.raises(ValueError, match=message):
        check_recipes(**values)
    with pytest.raises(ValueError, match=message):
        PabeeConfig(num_labels=2, **settings)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--alignment_weight", "-1"], "--alignment_weight=-1.0 is invalid"),
        (["--two_stage", "1.5"], "--two_stage=1.5 is invalid"),
        (["--sample_weighting_temperature", "-2"], "--sample_weighting_temperature=-2.0 is invalid"),
        (["--two_stage", "0.5", "--gradient_equilibrium"], "--two_stage=0.5 does not combine with gradient_equil"),
        (["--two_stage", "0.5", "--ddp_find_unused_parameters", "false"], "--ddp_find_unused_parameters true"),
    ],
)
def test_bad_recipe_flags_are_one_line(flags, message, tmp_path, capsys):
    assert_run_glue_refuses(flags, message, tmp_path / "out", lambda: capsys.readouterr().err)


# --- end to end --------------------------------------------------------------------------------------------------


def test_run_glue_records_the_recipes(tmp_path, minilm_tokenizer):
    """Alignment, gradient equilibrium and sample weighting together on a tiny random encoder: saved, reloaded, and
    part of the run's identity (a resume with other recipes is another run)."""
    argv, out = tiny_run_glue_argv(tmp_path, minilm_tokenizer, num_rows=24)
    argv += ["--alignment_weight", "0.1", "--gradient_equilibrium", "--sample_weighting_temperature", "2"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    expected = {"alignment_weight": 0.1, "gradient_equilibrium": True, "two_stage": 0.0}
    expected |= {"sample_weighting_temperature": 2.0}
    assert {name: saved[name] for name in expected} == expected
    assert PabeeForSequenceClassification.from_pretrained(out).config.recipes == expected
    identity = json.loads((out / "pabee_run.json").read_text())["hyperparameters"]
    assert identity["alignment_weight"] == 0.1 and "two_stage" not in identity


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_stage_two_froze_the_backbone(stage_one, final) -> None:
    """From the end of stage 1 to the end: the internal heads moved, the backbone and the last head did not."""
    assert stage_one.keys() == final.keys()
    last = f"classifiers.{max(int(k.split('.')[1]) for k in final if k.startswith('classifiers.'))}."
    for name, value in final.items():
        same = torch.equal(value, stage_one[name])
        if name.startswith("classifiers.") and not name.startswith(last):
            assert not same, name
        else:
            assert same, name


def _two_stage_argv(argv: list[str]) -> list[str]:
    return [*argv, "--two_stage", "0.5", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


def test_run_glue_trains_in_two_stages(tmp_path, minilm_tokenizer):
    """4 steps, 2 per stage, under Trainer: the checkpoint after stage 1 and the final model differ only in the
    internal heads."""
    argv, out = tiny_run_glue_argv(tmp_path, minilm_tokenizer, num_rows=24)
    assert main(_two_stage_argv(argv)) == 0
    assert json.loads((out / "config.json").read_text())["two_stage"] == 0.5
    _assert_stage_two_froze_the_backbone(_weights(out / "checkpoint-2"), _weights(out))


@pytest.mark.slow
def test_two_stages_under_torchrun(tmp_path, minilm_tokenizer):
    """The same with two CPU processes (DDP over gloo): the stages switch together, and the frozen parts stay put."""
    argv, out = tiny_run_glue_argv(tmp_path, minilm_tokenizer, num_rows=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pabee"]
    done = subprocess.run([*torchrun, *_two_stage_argv(argv)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _assert_stage_two_froze_the_backbone(_weights(out / "checkpoint-2"), _weights(out))
