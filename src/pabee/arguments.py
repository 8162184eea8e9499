"""Every command's flags, as typed dataclasses that check themselves (`HfArgumentParser` turns them into flags).

A value no command could use raises a `PabeeError` in `__post_init__`, so the command line reports it as one line
with exit code 2 before any model or data is loaded; list flags (`--patience 1,2,3`) are converted here, once.
What can only be checked against a model or a folder (a threshold for the model's problem type, a taken output
file) is checked by the command.

- `ExitSweepArguments`: the exit settings `run-glue` evaluates and `bench` times (criteria, thresholds, cap);
- `RunGlueArguments`, `BenchArguments`: those plus each command's own;
- `InferenceArguments`: what `predict` and `serve` share (model, one exit setting, length, threads, dtype).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .backbones import ADAPTERS
from .configuration import PabeeConfig
from .errors import PabeeError, require_extra
from .folders import ATTENTION_KERNELS, BACKENDS, DTYPES
from .losses import check_distillation
from .onnx_model import require_onnx
from .pipeline import DEFAULT_MAX_LENGTH
from .recipes import check_recipes, recipe_settings
from .rules import build_criterion
from .settings import (
    CRITERION_NAMES,
    EXIT_KEYWORDS,
    ExitSpec,
    ExitSweep,
    check_max_exit_layer,
    check_patience,
    check_regression_threshold,
    exit_spec_from,
)

__all__ = [
    "API_KEY_VARIABLE",
    "AddExitsArguments",
    "checked_specs",
    "parse_criteria",
    "parse_int_list",
    "parse_patiences",
    "parse_thresholds",
    "BenchArguments",
    "CalibrateArguments",
    "ExportArguments",
    "ExitSweepArguments",
    "InferenceArguments",
    "PredictArguments",
    "RayArguments",
    "RunGlueArguments",
    "ServeArguments",
]


API_KEY_VARIABLE = "PABEE_API_KEY"  # where `pabee serve` finds its API key when --api_key is not given


def _at_least(args: object, name: str, minimum: float) -> None:
    """`--name=value is invalid` unless the flag `name` of `args` is unset or >= `minimum`."""
    value = getattr(args, name)
    if value is not None and value < minimum:
        whole = "whole " if isinstance(minimum, int) else ""
        raise PabeeError(f"--{name}={value!r} is invalid: use a {whole}number >= {minimum}.")


# auto: certify the accuracy drop --max_drop promises where the examples can (`pabee.calibrate.auto_guarantee`),
# else choose uncertified and say so; none: always the uncertified choice.
CERTIFY_CHOICES = ["auto", "drop", "disagreement", "none"]


def guarantee_of(risk: str | None, max_drop: float | None, max_disagreement: float, confidence_level: float):
    """The `pabee.certify.Guarantee` the flags ask for (None for auto, none or no --certify: auto is resolved
    against the examples by `pabee.calibrate`); the bounds are given in points and percent, a guarantee holds
    shares. Bad values are one line."""
    from .certify import Guarantee

    if not 0.0 < confidence_level < 1.0:
        raise PabeeError(f"--confidence_level={confidence_level!r} is invalid: use a probability in (0, 1).")
    if not 0.0 < max_disagreement < 100.0:
        raise PabeeError(f"--max_disagreement={max_disagreement!r} is invalid: use a percentage in (0, 100).")
    if risk not in ("drop", "disagreement"):
        return None
    if risk == "drop" and not (max_drop is not None and 0.0 < max_drop < 100.0):
        raise PabeeError(f"--certify drop needs a --max_drop in (0, 100) points; got {max_drop!r}.")
    bound = max_drop if risk == "drop" else max_disagreement
    return Guarantee(risk, bound / 100, confidence_level)


def _checked(check, *values) -> Any:
    """Run one of `exits`' checks; its `ValueError` becomes the command line's `PabeeError`."""
    try:
        return check(*values)
    except ValueError as error:
        raise PabeeError(str(error)) from None


# --- the exit settings a command sweeps: --exit_criterion, --patience, --exit_threshold -> ExitSpecs -----------------
#
#     --exit_criterion patience,confidence,static     # default: patience
#     --patience 1,2,3                                # patience and patience+confidence
#     --exit_threshold confidence=0.8,0.9 static=2,4  # per rule; a bare list serves the only one that takes one
#
# A rule given no thresholds sweeps `settings.DEFAULT_SWEEPS` (static: every layer); `checked_specs` builds every
# setting against the model, so a bad one stops the command before any work is done.


NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"  # a decimal number as a flag may spell it (no inf, no nan)


def parse_int_list(value: str, flag: str, minimum: int) -> list[int]:
    """`"1,2,3"` → `[1, 2, 3]` (repeats dropped, order kept), or a `PabeeError` naming the flag."""
    numbers: list[int] = []
    for part in str(value).split(","):
        part = part.strip()
        if not re.fullmatch(r"[-+]?\d+", part) or int(part) < minimum:
            raise PabeeError(
                f"{flag} {value!r} is invalid: {part!r} is not a whole number >= {minimum} "
                "(use comma-separated numbers, e.g. 1,2,3)."
            )
        numbers.append(int(part))
    return list(dict.fromkeys(numbers))


def parse_patiences(value: str) -> list[int]:
    """`--patience "3,4,5"` → `[3, 4, 5]`: whole numbers >= 0 (0 is the full model)."""
    return parse_int_list(value, "--patience", 0)


def parse_criteria(value: str) -> list[str]:
    """`"patience,confidence"` → `["patience", "confidence"]`, each a known criterion, no repeats."""
    names: list[str] = []
    for part in str(value).split(","):
        name = part.strip()
        if name not in CRITERION_NAMES:
            known = ", ".join(CRITERION_NAMES)
            raise PabeeError(f"--exit_criterion {value!r}: {name!r} is unknown; choose from {known}.")
        if name not in names:
            names.append(name)
    return names


def parse_thresholds(values: Sequence[str] | str | None, criteria: Sequence[str]) -> dict[str, list[float]]:
    """`["confidence=0.8,0.9", "static=2"]` → `{"confidence": [0.8, 0.9], "static": [2.0]}`.

    A bare list (`["0.8,0.9"]`) is allowed when exactly one selected criterion takes thresholds.
    """
    if values is None:
        return {}
    if isinstance(values, str):
        values = values.split()
    takers = [c for c in criteria if c != "patience"]
    out: dict[str, list[float]] = {}
    for item in values:
        name, eq, numbers = item.rpartition("=")
        if not eq:
            if len(takers) != 1:
                raise PabeeError(
                    f"--exit_threshold {item!r} does not say which criterion it is for; "
                    f"write e.g. confidence={item} (selected: {', '.join(criteria)})."
                )
            name = takers[0]
        if name not in takers:
            raise PabeeError(
                f"--exit_threshold {item!r}: {name!r} is not a selected criterion that takes thresholds "
                f"({', '.join(takers) or 'none selected; add it to --exit_criterion'})."
            )
        parsed = []
        for part in numbers.split(","):
            if not re.fullmatch(rf"\s*{NUMBER}\s*", part):
                raise PabeeError(f"--exit_threshold {item!r}: {part.strip()!r} is not a number.")
            parsed.append(float(part))
        out[name] = parsed
    return out


def checked_specs(sweep: ExitSweep, config: PabeeConfig) -> dict[str, list[ExitSpec]]:
    """The sweep's settings for a model, each built into its criterion once, so a bad value stops the command
    before any work is done."""
    specs = sweep.specs(config.num_hidden_layers)
    for name, items in specs.items():
        if not items:
            raise PabeeError(f"--exit_criterion {name}: nothing to evaluate (give it a non-zero --patience).")
        for spec in items:
            try:
                build_criterion(spec, config)
            except ValueError as error:
                raise PabeeError(f"--exit_criterion {name}: {error}") from None
    return specs


def parse_ladder(text: str) -> list[ExitSpec]:
    """`--exit_ladder "full;confidence=0.9;confidence=0.8;patience=2"` → settings, top first: `full` is the full
    model, `RULE=VALUE` a rule with its threshold (for `patience`, its patience). A bad one is a `PabeeError`."""
    specs = []
    for part in (p.strip() for p in str(text).split(";") if p.strip()):
        if part == "full":
            specs.append(ExitSpec("patience", patience=0))
            continue
        rule, eq, value = (x.strip() for x in part.partition("="))
        if not eq or not re.fullmatch(NUMBER, value):
            raise PabeeError(f"--exit_ladder {text!r}: {part!r} is not 'full' or RULE=NUMBER (e.g. confidence=0.8).")
        if rule == "patience" and not re.fullmatch(r"[-+]?\d+", value):
            raise PabeeError(f"--exit_ladder {text!r}: {part!r}: a patience is a whole number (e.g. patience=2).")
        keywords = {"exit_criterion": rule}
        keywords |= {"patience": int(value)} if rule == "patience" else {"exit_threshold": float(value)}
        specs.append(_checked(exit_spec_from, keywords))
    if not specs:
        raise PabeeError(f"--exit_ladder {text!r} lists no setting.")
    return specs


@dataclass
class ExitSweepArguments:
    """The exit settings `run-glue` evaluates and `bench` times; `--patience` is each command's own."""

    exit_criterion: str = field(
        default="patience",
        metadata={
            "help": "Comma-separated exit criteria to compare on the same model: patience, entropy, confidence, "
            "patience+confidence, static. Each gets its own table (run-glue) or timed variants (bench)."
        },
    )
    exit_threshold: list[str] | None = field(
        default=None,
        metadata={
            "help": "Thresholds per criterion, e.g. confidence=0.8,0.9 entropy=0.1,0.3 static=2,4 (static: the "
            "layer k). A bare list serves the only selected criterion that takes one. Default: a built-in sweep "
            "(certifying: a fine one)."
        },
    )
    max_exit_layer: int | None = field(
        default=None, metadata={"help": "Cap on the layers any example may use, for every criterion."}
    )

    def __post_init__(self) -> None:
        self.criteria: list[str] = parse_criteria(self.exit_criterion)
        self.thresholds: dict[str, list[float]] = parse_thresholds(self.exit_threshold, self.criteria)
        _checked(check_max_exit_layer, self.max_exit_layer)

    @property
    def sweep(self) -> ExitSweep:
        """The settings these flags select, as one value (a command without `--patience` sweeps none)."""
        thresholds = {name: tuple(values) for name, values in self.thresholds.items()}
        patiences = tuple(getattr(self, "patiences", ()))
        return ExitSweep(tuple(self.criteria), patiences, thresholds, self.max_exit_layer)

    def sweep_specs(self, config: PabeeConfig, sweep: ExitSweep | None = None) -> dict[str, list[ExitSpec]]:
        """Every setting of `sweep` (default: the flags') for the model `config` describes, checked against it."""
        return checked_specs(sweep or self.sweep, config)


@dataclass
class RunGlueArguments(ExitSweepArguments):
    """Flags of `pabee run-glue` beyond `TrainingArguments`; the research script's names are kept verbatim."""

    task_name: str | None = field(
        default=None, metadata={"help": "GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "GLUE TSV folder of the task (or the GLUE root). Omitted: load nyu-mll/glue from the hub."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Encoder checkpoint or fine-tuned PABEE folder. Default: the bundled MiniLM."}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Encoder type; inferred from the checkpoint.", "choices": sorted(ADAPTERS)},
    )
    patience: str = field(
        default="1,2,3,4,5",
        metadata={
            "help": "Comma-separated patiences to evaluate (0 = full model, always included). The saved model "
            "answers with the full model unless --calibrate_max_drop or --calibrate_certify chooses a setting."
        },
    )
    regression_threshold: float = field(default=0.1, metadata={"help": "Agreement threshold for regression."})
    distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "Self-distillation: each internal classifier's loss is (1 - w) x its label loss + w x its "
            "distance to the last layer's prediction (0: labels only, the paper's loss)."
        },
    )
    distillation_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the last layer's softened prediction for distillation."}
    )
    alignment_weight: float = field(
        default=0.0,
        metadata={
            "help": "Alignment (LEAP-style): add w x the mean over internal layers of 1 - cos(their pooled state, "
            "the last layer's, detached) to the loss (0: off)."
        },
    )
    gradient_equilibrium: bool = field(
        default=False,
        metadata={
            "help": "Gradient equilibrium (ElasticBERT): each layer's gradient is the mean of the exit losses' "
            "above it, not their sum."
        },
    )
    two_stage: float = field(
        default=0.0,
        metadata={
            "help": "Two stages (DeeBERT): this share of the training steps trains the backbone and last "
            "classifier alone, the rest the internal classifiers on the frozen backbone (0: one joint stage)."
        },
    )
    sample_weighting_temperature: float = field(
        default=0.0,
        metadata={
            "help": "Sample weighting by exit (COSEE-style): each classifier weighs the examples by how near it is "
            "to their exit layer, weights softmax(-|layer - exit| / this) over the batch (0: off)."
        },
    )
    calibrate_max_drop: float | None = field(
        default=None,
        metadata={
            "help": "After training, choose the saved model's exit setting like `pabee calibrate`: the fastest "
            "within this many points of the full model, on a held-out part of the training data."
        },
    )
    calibrate_certify: str | None = field(
        default=None,
        metadata={
            "help": "Calibrate after training like `pabee calibrate --certify`: only settings whose accuracy drop "
            "(--calibrate_max_drop points) or disagreement with the full model (--calibrate_max_disagreement, in "
            "percent) is certified with --calibrate_confidence_level. Default with --calibrate_max_drop: auto "
            "(certify the drop where the held-out examples can, else choose uncertified and say so).",
            "choices": CERTIFY_CHOICES,
        },
    )
    calibrate_max_disagreement: float = field(
        default=2.0,
        metadata={
            "help": "With --calibrate_certify disagreement: the largest share of answers that may change, in percent."
        },
    )
    calibrate_confidence_level: float = field(
        default=0.95, metadata={"help": "With --calibrate_certify: probability that the bound holds."}
    )
    calibration_fraction: float = field(
        default=0.1, metadata={"help": "Share of the training data held out for calibration."}
    )
    pooling: str = field(
        default="auto",
        metadata={"help": "What the classifiers read.", "choices": ["auto", "pooler", "cls", "mean"]},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    do_lower_case: bool = field(
        default=False, metadata={"help": "Accepted for compatibility; the tokenizer's own setting decides."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Reuse a non-empty --output_dir: its checkpoints and results are replaced, nothing else."},
    )
    eval_all_checkpoints: bool = field(
        default=False, metadata={"help": "Evaluate every checkpoint-* folder in --output_dir and the final model."}
    )
    evaluate_during_training: bool = field(
        default=False, metadata={"help": "Research-script spelling of --eval_strategy steps."}
    )
    per_gpu_train_batch_size: int | None = field(
        default=None, metadata={"help": "Research-script spelling of --per_device_train_batch_size."}
    )
    per_gpu_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Research-script spelling of --per_device_eval_batch_size."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Your own training data (csv, tsv or jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Your own evaluation data."})
    task_type: str = field(
        default="auto",
        metadata={"help": "For your own data.", "choices": ["auto", "classification", "regression"]},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again instead of using the cache."})

    def __post_init__(self) -> None:
        from .glue import get_task

        if self.task_name is None and self.train_file is None and self.validation_file is None:
            raise PabeeError("Give --task_name (a GLUE task) or --train_file / --validation_file (your own data).")
        # Looked up once, here (an unknown task fails before any folder is touched), then carried: `glue_task`.
        self.glue_task = get_task(self.task_name) if self.task_name is not None else None
        # The full model (patience 0) is always evaluated, first: every table compares with it.
        self.patiences: list[int] = [0, *(p for p in parse_patiences(self.patience) if p != 0)]
        super().__post_init__()
        try:
            check_regression_threshold(self.regression_threshold)
            check_distillation(self.distillation_weight, self.distillation_temperature)
            check_recipes(**self.recipes)
        except ValueError as error:
            raise PabeeError(f"--{error}") from None
        if self.max_seq_length < 8:
            raise PabeeError(f"--max_seq_length {self.max_seq_length} is too small; use at least 8.")
        _at_least(self, "max_train_samples", 1)
        _at_least(self, "max_eval_samples", 1)
        _at_least(self, "calibrate_max_drop", 0.0)
        self.guarantee()  # bad certification flags fail before training
        if not 0.0 < self.calibration_fraction <= 0.5:
            raise PabeeError(
                f"--calibration_fraction={self.calibration_fraction!r} is invalid: use a share in (0, 0.5]."
            )

    @property
    def recipes(self) -> dict[str, Any]:
        """The exit-aware training flags (`pabee.recipes`), named as `PabeeConfig` records them."""
        return recipe_settings(self)

    @property
    def calibrating(self) -> bool:
        """Whether the saved model's exit setting is chosen after training (--calibrate_max_drop or _certify)."""
        return self.calibrate_max_drop is not None or self.calibrate_certify is not None

    @property
    def auto_certify(self) -> bool:
        """Whether the calibration certifies the drop where the held-out examples can (the default)."""
        return self.calibrate_certify in (None, "auto")

    def guarantee(self):
        """What --calibrate_certify asks the choice to guarantee (None: choose as `pabee calibrate` does)."""
        return guarantee_of(
            self.calibrate_certify,
            self.calibrate_max_drop,
            self.calibrate_max_disagreement,
            self.calibrate_confidence_level,
        )


@dataclass
class BenchArguments(ExitSweepArguments):
    """Flags of `pabee bench`."""

    model: str | None = field(
        default=None,
        metadata={"help": "Fine-tuned PABEE folder. Default: the bundled MiniLM with fresh (untrained) heads."},
    )
    task_name: str = field(default="SST-2", metadata={"help": "GLUE task whose dev set supplies the examples."})
    data_dir: str | None = field(default=None, metadata={"help": "GLUE TSV folder (task folder or GLUE root)."})
    input_file: str | None = field(
        default=None,
        metadata={
            "help": "Your own texts instead of GLUE: .txt (one per line, a tab splits a pair), .tsv, .csv, .jsonl."
        },
    )
    patience: str = field(default="1,2,3", metadata={"help": "Comma-separated patiences to time."})
    batch_sizes: str = field(default="32", metadata={"help": "Comma-separated batch sizes for batched variants."})
    max_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    bs1_examples: int | None = field(
        default=None, metadata={"help": "Examples for the batch-size-1 loop (default: all); it is the slow one."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    sort_by_length: bool = field(
        default=False, metadata={"help": "Batch examples of similar length together (less padding), all variants."}
    )
    repeats: int = field(default=5, metadata={"help": "Timed passes per variant (median reported)."})
    warmup: int = field(default=1, metadata={"help": "Untimed passes per variant first."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: all cores)."})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel (default: the model's, sdpa). eager is faster on some CPUs.",
            "choices": list(ATTENTION_KERNELS),
        },
    )
    backend: str = field(
        default="torch",
        metadata={
            "help": "torch, or onnxruntime: --model is then a folder made by `pabee export`, timed on its sessions.",
            "choices": list(BACKENDS),
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for fresh heads and the interleaving order."})
    profile: bool = field(default=False, metadata={"help": "Also break early-exit time into its parts."})
    training_cost: bool = field(
        default=False, metadata={"help": "Also time a training step: PABEE vs plain fine-tuning."}
    )
    output_dir: str | None = field(default=None, metadata={"help": "Write bench.json and bench.md here."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace existing bench files."})

    def __post_init__(self) -> None:
        if self.backend == "onnxruntime":
            require_onnx()
            if self.model is None:
                raise PabeeError("--backend onnxruntime needs --model: a folder made by `pabee export`.")
            if self.training_cost or self.attn_implementation:
                raise PabeeError("--training_cost and --attn_implementation apply to the torch backend only.")
        self.patiences: list[int] = parse_patiences(self.patience)
        super().__post_init__()
        self.batch_size_list: list[int] = parse_int_list(self.batch_sizes, "--batch_sizes", 1)
        if self.repeats < 1 or self.warmup < 0:
            raise PabeeError("--repeats must be >= 1 and --warmup >= 0.")
        for name in ("threads", "max_examples", "bs1_examples"):
            _at_least(self, name, 1)
        _at_least(self, "max_seq_length", 2)


@dataclass
class InferenceArguments:
    """What `pabee predict` and `pabee serve` share: the model, one exit setting, input length and runtime."""

    model: str = field(metadata={"help": "Fine-tuned PABEE model folder (e.g. the --output_dir of run-glue)."})
    patience: int | None = field(default=None, metadata={"help": "Patience (0 = full model). Default: the model's."})
    exit_criterion: str | None = field(default=None, metadata={"help": "Exit rule. Default: the model's."})
    exit_threshold: float | None = field(default=None, metadata={"help": "The exit rule's threshold."})
    max_exit_layer: int | None = field(default=None, metadata={"help": "No example uses more layers than this."})
    max_seq_length: int = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "Tokens per text (pair); longer ones are truncated."}
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch threads (default: predict: torch's choice; serve: cores / workers)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights' dtype (default: as saved, float32). bfloat16 about doubles throughput on CPUs with "
            "bfloat16 instructions, for slightly different numbers.",
            "choices": list(DTYPES),
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel (default: the model's, sdpa).", "choices": list(ATTENTION_KERNELS)},
    )
    backend: str | None = field(
        default=None,
        metadata={
            "help": "torch, or onnxruntime for a folder made by `pabee export` (default: what --model holds).",
            "choices": list(BACKENDS),
        },
    )

    def __post_init__(self) -> None:
        if self.backend == "onnxruntime":
            require_onnx()
        if self.patience is not None:
            _checked(check_patience, self.patience)
        _checked(check_max_exit_layer, self.max_exit_layer)
        # The exit flags given, as keywords over the model's own setting (which only loading the model reveals).
        self.exit_keywords: dict[str, Any] = {name: getattr(self, name) for name in EXIT_KEYWORDS}
        _checked(exit_spec_from, self.exit_keywords)  # an unknown criterion fails before any model loads
        _at_least(self, "threads", 1)
        _at_least(self, "max_seq_length", 2)

    def pipeline_options(self) -> dict[str, Any]:
        """`PabeePipeline.from_pretrained` keywords these flags set; the batch size is each command's own."""
        return {
            "max_length": self.max_seq_length,
            **self.exit_keywords,
            "dtype": self.dtype,
            "attn_implementation": self.attn_implementation,
            "backend": self.backend,
            "threads": self.threads,
        }


@dataclass(kw_only=True)
class RayArguments:
    """Running on Ray (`pabee[ray]`): a local Ray started here, or a running cluster joined."""

    ray: bool = field(default=False, metadata={"help": "Run on Ray (needs pabee[ray])."})
    ray_address: str | None = field(
        default=None, metadata={"help": "A running Ray cluster to join, e.g. ray://head:10001 (default: local Ray)."}
    )

    def __post_init__(self) -> None:
        if self.ray:
            require_extra("ray", ("ray",), "--ray")
        elif self.ray_address is not None:
            raise PabeeError("--ray_address applies with --ray.")


@dataclass(kw_only=True)
class PredictArguments(RayArguments, InferenceArguments):
    """Flags of `pabee predict`."""

    input: str = field(
        metadata={
            "help": "Texts: .txt (one per line, a tab splits a pair), .tsv, .csv or .jsonl; with --ray also "
            ".parquet, and a glob or a folder of files."
        }
    )
    output: str | None = field(
        default=None,
        metadata={"help": "JSON-lines output file (default: standard output); with --ray, a folder of shards."},
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace an existing output file (--ray: remove the folder's earlier shards, redo every input)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Column/field holding the text (tsv, csv, jsonl)."})
    text_pair_column: str = field(
        default="text_pair", metadata={"help": "Column/field holding the second text of a pair, where present."}
    )
    batch_size: int = field(default=32, metadata={"help": "Examples per forward pass (batched by length)."})
    concurrency: int | None = field(
        default=None, metadata={"help": "With --ray: model copies (actors), --threads each (default: CPUs / threads)."}
    )
    output_format: str = field(
        default="jsonl", metadata={"help": "With --ray: shard format.", "choices": ["jsonl", "parquet"]}
    )

    def __post_init__(self) -> None:
        InferenceArguments.__post_init__(self)
        RayArguments.__post_init__(self)
        _at_least(self, "batch_size", 1)
        _at_least(self, "concurrency", 1)
        if not self.ray and (self.concurrency is not None or self.output_format != "jsonl"):
            raise PabeeError("--concurrency and --output_format apply with --ray (shards in a folder).")


@dataclass(kw_only=True)
class ServeArguments(RayArguments, InferenceArguments):
    """Flags of `pabee serve`."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    max_batch_size: int = field(
        default=32, metadata={"help": "Most texts gathered into one micro-batch (run as padding-aware forwards)."}
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "How long the first request of a micro-batch waits for company."}
    )
    max_texts_per_request: int = field(default=64, metadata={"help": "More texts in one request: 413."})
    max_text_chars: int = field(default=5000, metadata={"help": "A longer text (or pair part): 413."})
    max_queue: int = field(
        default=128,
        metadata={"help": "Most texts waiting for a batch; a request beyond it gets 503 with Retry-After at once."},
    )
    request_timeout: float = field(
        default=60.0,
        metadata={"help": "Seconds a /predict request may take; then 504, and its texts leave the queue unrun."},
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "Require 'Authorization: Bearer <key>' on /predict, /metrics and /openapi.json, and turn /docs "
            "and /redoc off; visible ASCII, no spaces (default: $PABEE_API_KEY; none: anyone who can reach the "
            "port may use it)."
        },
    )
    workers: int = field(default=1, metadata={"help": "uvicorn worker processes, each with its own model copy."})
    replicas: int = field(default=1, metadata={"help": "With --ray: Ray Serve replicas, each with its own model."})
    access_log: bool = field(default=True, metadata={"help": "Log every request (--no_access_log to turn off)."})
    graceful_timeout: float | None = field(
        default=None,
        metadata={
            "help": "Seconds shutdown waits for in-flight requests before closing (default: --request_timeout, so "
            "every admitted request can finish)."
        },
    )
    drain_seconds: float = field(
        default=0.0,
        metadata={
            "help": "On SIGTERM, /health turns 503 at once; keep serving this many seconds more, so load balancers "
            "polling /health stop sending before the server stops accepting."
        },
    )
    max_connections: int = field(
        default=256,
        metadata={
            "help": "Most concurrent connections (and requests); beyond them uvicorn answers 503 at once, so a "
            "flood of slow uploads cannot hold unbounded memory."
        },
    )
    allowed_hosts: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated Host header values to answer (e.g. localhost,127.0.0.1,api.example.com); other "
            "Hosts get 400, which defeats DNS rebinding. Default: any."
        },
    )
    latency_target_ms: float | None = field(
        default=None,
        metadata={
            "help": "Choose each micro-batch's exit setting by load so requests are answered within this many ms: "
            "down the exit ladder when the target is at risk, back up when there is room (default: one setting)."
        },
    )
    exit_ladder: str | None = field(
        default=None,
        metadata={
            "help": "The settings load may choose from, top first, e.g. 'full;confidence=0.9;confidence=0.8' "
            "(default: the model folder's exit_ladder.json, which pabee calibrate writes, measured)."
        },
    )
    max_disagreement: float = field(
        default=2.0,
        metadata={
            "help": "With --latency_target_ms: the floor; no measured setting that changed more than this share of "
            "the full model's answers (in percent, on calibration data) is ever chosen by load."
        },
    )
    allow_request_exit: bool = field(
        default=False,
        metadata={"help": 'Let a request choose its own exit setting ("exit": {...} or "full" in its body).'},
    )

    def __post_init__(self) -> None:
        InferenceArguments.__post_init__(self)
        RayArguments.__post_init__(self)
        self._check_exit_control()
        if self.ray and self.workers != 1:
            raise PabeeError("--workers is uvicorn's; with --ray, use --replicas.")
        if not self.ray and self.replicas != 1:
            raise PabeeError("--replicas applies with --ray; without it, use --workers.")
        for name, minimum in (
            ("replicas", 1),
            ("max_batch_size", 1),
            ("max_wait_ms", 0.0),
            ("max_texts_per_request", 1),
            ("max_text_chars", 1),
            ("max_queue", 1),
            ("workers", 1),
            ("port", 0),
            ("graceful_timeout", 0.0),
            ("drain_seconds", 0.0),
            ("max_connections", 1),
        ):
            _at_least(self, name, minimum)
        if self.request_timeout <= 0:
            raise PabeeError(f"--request_timeout={self.request_timeout!r} is invalid: use a number of seconds > 0.")
        if self.max_queue < self.max_texts_per_request:
            raise PabeeError(
                f"--max_queue={self.max_queue} is smaller than --max_texts_per_request={self.max_texts_per_request}: "
                "a request that large could only be served when nothing else waits; raise --max_queue."
            )
        if self.graceful_timeout is None:
            self.graceful_timeout = self.request_timeout
        self._check_access()

    def _check_exit_control(self) -> None:
        if self.latency_target_ms is not None and not self.latency_target_ms > 0:
            raise PabeeError(f"--latency_target_ms={self.latency_target_ms!r} is invalid: use a number of ms > 0.")
        if self.exit_ladder is not None and self.latency_target_ms is None:
            raise PabeeError("--exit_ladder is walked by load: give --latency_target_ms too.")
        if not 0.0 < self.max_disagreement <= 100.0:
            raise PabeeError(f"--max_disagreement={self.max_disagreement!r} is invalid: use a percentage in (0, 100].")
        self.ladder_specs: list[ExitSpec] | None = None if self.exit_ladder is None else parse_ladder(self.exit_ladder)

    def _check_access(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_VARIABLE) or None
        if self.api_key is not None and not self.api_key.strip():
            raise PabeeError("--api_key is empty; give a secret, or leave it out to serve without one.")
        if self.api_key is not None and not all("!" <= char <= "~" for char in self.api_key):
            raise PabeeError(
                "--api_key must be visible ASCII characters without spaces (HTTP clients send header values as "
                "ASCII); choose another key, e.g. from `openssl rand -hex 24`."
            )
        if self.allowed_hosts is not None and not self.host_list:
            raise PabeeError("--allowed_hosts is empty; list host names, or leave it out to answer any Host.")

    @property
    def host_list(self) -> list[str] | None:
        """`--allowed_hosts` as a list (None: any Host)."""
        if self.allowed_hosts is None:
            return None
        return [host.strip() for host in self.allowed_hosts.split(",") if host.strip()]


@dataclass
class CalibrateArguments(ExitSweepArguments):
    """Flags of `pabee calibrate`."""

    model: str = field(default=None, metadata={"help": "Fine-tuned PABEE model folder; its config.json is updated."})
    task_name: str | None = field(default=None, metadata={"help": "GLUE task whose dev set calibrates."})
    data_dir: str | None = field(default=None, metadata={"help": "GLUE TSV folder (task folder or GLUE root)."})
    validation_file: str | None = field(default=None, metadata={"help": "Your own labelled data instead."})
    task_type: str = field(
        default="auto",
        metadata={"help": "For --validation_file.", "choices": ["auto", "classification", "regression"]},
    )
    max_drop: float = field(
        default=1.0,
        metadata={"help": "Most points of the task's metric the chosen setting may lose to the full model."},
    )
    certify: str = field(
        default="auto",
        metadata={
            "help": "Choose only among settings certified by Learn then Test on the choosing half: the accuracy "
            "drop against the full model (drop: at most --max_drop points) or the share of answers that differ "
            "from it (disagreement: at most --max_disagreement percent, needs no labels) holds with "
            "--confidence_level probability; with none certified, the full model stays. auto (the default): "
            "certify the drop where the examples can (else the uncertified choice, and the output says what it "
            "does not promise), disagreement on --input_file; none: the fastest setting within --max_drop on the "
            "choosing half, uncertified.",
            "choices": CERTIFY_CHOICES,
        },
    )
    max_disagreement: float = field(
        default=2.0,
        metadata={"help": "With --certify disagreement: the largest share of answers that may change, in percent."},
    )
    confidence_level: float = field(
        default=0.95, metadata={"help": "With --certify: probability that the bound holds (1 - delta)."}
    )
    input_file: str | None = field(
        default=None,
        metadata={
            "help": "Unlabelled texts to certify disagreement on (.txt one per line, a tab splits a pair; .tsv, "
            ".csv or .jsonl with text and text_pair)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split into a choosing and a reporting half."})
    dry_run: bool = field(default=False, metadata={"help": "Report the choice without changing the config."})
    max_seq_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Tokens per example."})
    batch_size: int = field(default=64, metadata={"help": "Examples per forward pass."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model is None:
            raise PabeeError("Give --model, the folder of a fine-tuned PABEE model.")
        sources = [self.task_name, self.validation_file, self.input_file]
        if sum(source is not None for source in sources) != 1:
            raise PabeeError(
                "Give one of --task_name (a GLUE task's dev set), --validation_file (your own labelled data) or "
                "--input_file (unlabelled texts, with --certify disagreement)."
            )
        if self.input_file is not None and self.certify == "auto":
            self.certify = "disagreement"  # unlabelled texts: the only risk they can certify
        if self.input_file is not None and self.certify != "disagreement":
            raise PabeeError("--input_file holds no labels: only --certify disagreement can calibrate on it.")
        if self.task_name is not None:
            from .glue import get_task

            get_task(self.task_name)
        if not self.max_drop >= 0:
            raise PabeeError(f"--max_drop={self.max_drop!r} is invalid: use a number of points >= 0.")
        self.guarantee()
        _at_least(self, "batch_size", 1)
        _at_least(self, "threads", 1)
        _at_least(self, "max_seq_length", 2)

    def guarantee(self):
        """What --certify asks the choice to guarantee (None: auto, resolved against the examples, or none)."""
        return guarantee_of(self.certify, self.max_drop, self.max_disagreement, self.confidence_level)


ADD_EXITS_CRITERIA = "patience,confidence"  # distilled exits are calibrated: confidence often exits sooner


@dataclass
class AddExitsArguments(ExitSweepArguments):
    """Flags of `pabee add-exits`: the classifier, the texts its exits learn from, how long they train and, with
    --max_disagreement, the certified setting written into the result."""

    exit_criterion: str = field(
        default=ADD_EXITS_CRITERIA,
        metadata={
            "help": "Comma-separated exit criteria --max_disagreement chooses among (patience, entropy, confidence, "
            "patience+confidence, static); a regression model leaves out those that need classes."
        },
    )
    model: str = field(
        default=None, metadata={"help": "A fine-tuned Hugging Face sequence classifier (folder or hub id)."}
    )
    output_dir: str = field(default=None, metadata={"help": "New folder for the model with exits."})
    task_name: str | None = field(default=None, metadata={"help": "GLUE task whose train split the exits learn from."})
    data_dir: str | None = field(default=None, metadata={"help": "GLUE TSV folder (task folder or GLUE root)."})
    train_file: str | None = field(
        default=None, metadata={"help": "Your labelled data instead (csv, tsv or jsonl: text, text_pair, label)."}
    )
    input_file: str | None = field(
        default=None,
        metadata={"help": "Unlabelled texts instead (.txt one per line, a tab splits a pair; .tsv, .csv, .jsonl)."},
    )
    max_examples: int | None = field(default=None, metadata={"help": "Use only the first N training texts."})
    pooling: str = field(
        default="mean",
        metadata={"help": "What each new exit reads from its layer.", "choices": ["mean", "cls", "pooler"]},
    )
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs over the cached states."})
    max_steps: int = field(default=-1, metadata={"help": "Training steps (overrides --num_train_epochs if > 0)."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Texts per training step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam's learning rate for the exits."})
    seed: int = field(default=42, metadata={"help": "Seed of the exits' initialisation and the data order."})
    distillation_temperature: float = field(
        default=2.0, metadata={"help": "Temperature of the classifier's softened answers the exits learn."}
    )
    label_weight: float = field(
        default=0.5, metadata={"help": "Weight of the label loss beside distillation, where labels exist (0: off)."}
    )
    max_disagreement: float | None = field(
        default=None,
        metadata={
            "help": "Then choose the fastest exit setting certified to change at most this percentage of the "
            "classifier's answers (with --confidence_level), on held-out texts, and write it into the folder."
        },
    )
    confidence_level: float = field(default=0.95, metadata={"help": "Probability that the certified bound holds."})
    calibration_file: str | None = field(
        default=None,
        metadata={
            "help": "Texts the exits never saw, to certify on (default with --task_name: its dev set; same formats "
            "as --input_file)."
        },
    )
    max_seq_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Tokens per text."})
    batch_size: int = field(default=64, metadata={"help": "Texts per forward pass of the frozen model."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model is None or self.output_dir is None:
            raise PabeeError("Give --model (a fine-tuned classifier) and --output_dir (a new folder).")
        sources = [self.task_name, self.train_file, self.input_file]
        if sum(source is not None for source in sources) != 1:
            raise PabeeError(
                "Give one of --task_name (a GLUE task's train split), --train_file (your labelled data) or "
                "--input_file (unlabelled texts) for the exits to learn from."
            )
        if self.task_name is not None:
            from .glue import get_task

            get_task(self.task_name)
        if self.max_disagreement is not None:
            guarantee_of("disagreement", None, self.max_disagreement, self.confidence_level)
            if self.task_name is None and self.calibration_file is None:
                raise PabeeError("--max_disagreement certifies on texts the exits never saw: give --calibration_file.")
        for name in ("learning_rate", "distillation_temperature"):
            if not getattr(self, name) > 0:
                raise PabeeError(f"--{name}={getattr(self, name)!r} is invalid: use a number > 0.")
        if not self.num_train_epochs > 0 and self.max_steps <= 0:
            raise PabeeError(f"--num_train_epochs={self.num_train_epochs!r} is invalid: use a number > 0.")
        if not self.label_weight >= 0:
            raise PabeeError(f"--label_weight={self.label_weight!r} is invalid: use a number >= 0.")
        for name in ("per_device_train_batch_size", "batch_size", "threads", "max_examples"):
            _at_least(self, name, 1)
        _at_least(self, "max_seq_length", 2)

    def guarantee(self):
        """The disagreement bound --max_disagreement asks the setting to keep (None: no calibration)."""
        if self.max_disagreement is None:
            return None
        return guarantee_of("disagreement", None, self.max_disagreement, self.confidence_level)


@dataclass
class ExportArguments:
    """Flags of `pabee export`."""

    model: str = field(metadata={"help": "Fine-tuned PABEE model folder (e.g. the --output_dir of run-glue)."})
    output: str = field(metadata={"help": "Folder for the ONNX graphs, tokenizer, config and manifest."})
    quantize: str | None = field(
        default=None, metadata={"help": "int8: dynamic int8 quantization of the weights.", "choices": ["int8"]}
    )
    opset: int = field(default=17, metadata={"help": "ONNX opset version."})
    optimize: bool = field(
        default=True,
        metadata={
            "help": "Run onnxruntime's transformer optimizer on the graph (fused attention, layer norms), kept only "
            "where the optimized graph's outputs equal the plain one's (--no_optimize to leave it plain)."
        },
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace an earlier export in --output (a folder holding pabee_onnx.json); other folders "
            "are refused."
        },
    )

    def __post_init__(self) -> None:
        require_onnx()
        _at_least(self, "opset", 14)
