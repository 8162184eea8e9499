"""Is early exit more robust? The paper's claim measured with an attack library (TextAttack), and how an attack
moves the exit layer.

"BERT Loses Patience" reports that PABEE resists adversarial attacks better than the full model. Here TextAttack's
recipes attack, per task, four classifiers, each seen as users see it (the attacker queries answers only):

- full model: the PABEE model answering from its last layer (patience 0);
- PABEE: the same model at the patience chosen on the other dev half (the fewest layers on average within
  `--max_drop` points of the full model there, `pabee.calibrate.fastest_within`), answering from each query's own
  exit layer;
- static: the same model answering every query from layer k, k the PABEE setting's mean exit layer on the
  attacked examples, rounded (static truncation at the same mean layer);
- plain: the encoder fine-tuned the usual way (Trainer, one classifier on the pooler; the same hyper-parameters
  and data as the PABEE model, as `reproduce_glue_v3.py` trains its baseline), trained here once and kept in
  `--work_dir`.

The examples are the first `--examples` of the reporting half of dev (`pabee.calibrate.split_halves`, seed 0);
the setting is chosen on the other half. Per classifier and attack: accuracy before and after the attack
(an example still answered correctly after the attack counts; one answered wrongly before it is skipped and
counts as wrong), attack success rate (successful / attacked), queries per attacked example, and the mean exit
layer on the clean examples, on the attack's final texts and over every query the attack made.

**What runs offline.** TextAttack imports flair (part-of-speech tagging) and NLTK's stop-word list at import
time; flair does not import with transformers 5 and its taggers, like NLTK's data, download from the internet.
Here flair is replaced by a stand-in that raises if a recipe tags parts of speech, and NLTK's English stop words
by scikit-learn's (`ENGLISH_STOP_WORDS`, written as an NLTK corpus under `--work_dir`). The character-level
recipes need neither: DeepWordBug (Gao et al. 2018) and Pruthi et al. 2019 (keyboard typos). TextFooler (the
paper's attack) needs counter-fitted word vectors and the Universal Sentence Encoder (TF Hub), and flair: it
cannot run here, nor can the other word-substitution recipes (PWWS: WordNet; BAE/BERT-Attack: masked-LM
downloads and USE; TextBugger: GloVe and USE).

Needs TextAttack without its heavy dependencies: `pip install --no-deps textattack` and `pip install
editdistance lemminflect lru-dict nltk terminaltables word2number num2words more-itertools pinyin jieba
Levenshtein langdetect OpenHowNet language_tool_python bert_score` (imported at import time, unused here).

    python benchmarks/robustness.py --model MRPC=runs/mrpc --model SST-2=runs/sst2
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

ATTACKS = {"deepwordbug": "DeepWordBugGao2018", "pruthi": "Pruthi2019"}
VARIANTS = ("full", "pabee", "static", "plain")
PATIENCES = (1, 2, 3, 4, 5)
TRAIN_LIMITS = {"SST-2": 8000}  # as the PABEE models were trained (runs/sst2: --max_train_samples 8000)
NOT_OFFLINE = {
    "TextFooler (Jin et al. 2020, the paper's attack)": "counter-fitted word vectors and the Universal Sentence "
    "Encoder download from the internet; flair POS tagging",
    "PWWS": "WordNet (NLTK data download)",
    "BAE, BERT-Attack": "a masked language model from the hub and the Universal Sentence Encoder",
    "TextBugger": "GloVe vectors and the Universal Sentence Encoder",
}


# --- TextAttack, offline -------------------------------------------------------------------------------------------


def offline_textattack(work: Path) -> Any:
    """Import TextAttack with the stand-ins the module docstring describes (flair; NLTK's stop words)."""
    try:
        import flair  # noqa: F401
    except Exception:  # flair is missing or does not import with transformers 5: the character recipes need none
        sys.modules.update(_flair_stand_in())
    corpus = work / "nltk_data" / "corpora" / "stopwords"
    if not (corpus / "english").exists():
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        corpus.mkdir(parents=True, exist_ok=True)
        (corpus / "english").write_text("\n".join(sorted(ENGLISH_STOP_WORDS)) + "\n")
    os.environ["NLTK_DATA"] = str(work / "nltk_data")
    try:
        import textattack
    except ImportError as error:
        raise SystemExit(f"TextAttack is missing a module ({error}); see the install line in the docstring") from None
    return textattack


def _flair_stand_in() -> dict[str, types.ModuleType]:
    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("flair (part-of-speech tagging) is not available offline: this recipe cannot run here")

    flair, data, models = (types.ModuleType(name) for name in ("flair", "flair.data", "flair.models"))
    data.Tokenizer = type("Tokenizer", (), {})
    data.Sentence = type("Sentence", (), {"__init__": unavailable})
    models.SequenceTagger = type("SequenceTagger", (), {"load": staticmethod(unavailable)})
    flair.data, flair.models, flair.device = data, models, None
    return {"flair": flair, "flair.data": data, "flair.models": models}


# --- the classifiers -----------------------------------------------------------------------------------------------


class Answerer:
    """Texts in (a string, or a (text, pair) tuple), logits and exit layers out; every query's layer is kept."""

    def __init__(self, answer) -> None:
        self._answer = answer
        self.query_layers: list[int] = []

    def __call__(self, texts: list, record: bool = True) -> tuple[np.ndarray, np.ndarray]:
        examples = [tuple(t) if isinstance(t, (tuple, list)) else (t, None) for t in texts]
        logits, layers = self._answer(examples)
        if record:
            self.query_layers.extend(layers.tolist())
        return logits, layers


def pabee_answerer(pipe, spec) -> Answerer:
    def answer(examples):
        logits, layers = pipe.run(examples, exit_spec=spec)
        return logits.numpy(), layers.numpy()

    return Answerer(answer)


def plain_answerer(folder: Path, batch_size: int = 32) -> Answerer:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    depth = model.config.num_hidden_layers

    @torch.inference_mode()
    def answer(examples):
        out = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            pairs = [p for _, p in chunk] if chunk[0][1] is not None else None
            inputs = tokenizer([t for t, _ in chunk], pairs, truncation=True, max_length=128, padding=True,
                               return_tensors="pt")  # fmt: skip
            out.append(model(**inputs).logits.float().numpy())
        logits = np.concatenate(out)
        return logits, np.full(len(logits), depth)

    return Answerer(answer)


def wrapper(textattack, answerer: Answerer):
    """A TextAttack model wrapper answering with `answerer` (logits; TextAttack applies the softmax)."""

    class Wrapped(textattack.models.wrappers.ModelWrapper):
        def __init__(self) -> None:
            self.model = answerer

        def __call__(self, text_input_list):
            return answerer(list(text_input_list))[0]

    return Wrapped()


# --- one task ------------------------------------------------------------------------------------------------------


def plain_model(task_name: str, glue_dir: str, work: Path) -> tuple[Path, dict]:
    """The plain fine-tuned model of the task, trained once (and kept) under `work`."""
    from reproduce_glue_v3 import train_baseline

    from pabee.glue import get_task

    folder = work / get_task(task_name).folder / "plain"
    summary = folder / "baseline.json"
    if not summary.exists():
        result = train_baseline(task_name, glue_dir, folder, TRAIN_LIMITS.get(task_name), save=True)
        result.pop("predictions")
        summary.write_text(json.dumps(result, indent=1))
    return folder, json.loads(summary.read_text())


def choose_patience(pipe, examples, labels, task, max_drop: float) -> tuple[Any, dict, np.ndarray]:
    """The fewest-layers patience within `max_drop` of the full model on the choosing half, and the report half."""
    from pabee import ExitSpec
    from pabee.calibrate import choose_setting, split_halves

    all_logits = pipe.all_layer_logits(examples).numpy()
    specs = [ExitSpec("patience", patience=p) for p in PATIENCES]
    result = choose_setting(pipe.model, all_logits, labels, task, specs, max_drop)
    chosen = next((row for row in result["rows"] if row["chosen"]), result["rows"][0])
    halves = split_halves(len(examples))
    describe = {k: v for k, v in chosen.items() if k not in ("spec", "chosen", "pareto")}
    return chosen["spec"], describe, halves["report"]


def attack_one(textattack, recipe: str, answerer: Answerer, examples, labels, columns, seed: int) -> dict:
    """Attack every example; per example its outcome, queries, and exit layers before and after."""
    from textattack import attack_recipes

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    attack = getattr(attack_recipes, ATTACKS[recipe]).build(wrapper(textattack, answerer))
    answerer.query_layers.clear()
    records, start = [], time.perf_counter()
    for (text, pair), label in zip(examples, labels, strict=True):
        item = text if pair is None else OrderedDict(zip(columns, (text, pair), strict=True))
        result = attack.attack(item, int(label))
        status = type(result).__name__.replace("AttackResult", "").lower()
        final = result.perturbed_result.attacked_text.tokenizer_input
        _, (clean_layer, final_layer) = answerer([(text, pair), final], record=False)
        changed = result.original_result.attacked_text.all_words_diff(result.perturbed_result.attacked_text)
        records.append({
            "status": status,
            "queries": int(result.perturbed_result.num_queries),
            "clean_layer": int(clean_layer),
            "final_layer": int(final_layer),
            "words_changed": len(changed),
        })  # fmt: skip
    return {"seconds": time.perf_counter() - start, "examples": records, "query_layers": _mean(answerer.query_layers)}


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def summarize(records: list[dict]) -> dict:
    """The table's numbers for one classifier and attack."""
    count = len(records)
    status = [r["status"] for r in records]
    attacked = [r for r in records if r["status"] != "skipped"]
    succeeded = sum(s == "successful" for s in status)
    return {
        "examples": count,
        "clean_accuracy": 100 * len(attacked) / count,
        "after_attack_accuracy": 100 * sum(s == "failed" for s in status) / count,
        "success_rate": 100 * succeeded / len(attacked) if attacked else None,
        "queries": _mean(r["queries"] for r in attacked),
        "clean_layer": _mean(r["clean_layer"] for r in records),
        "clean_layer_attacked": _mean(r["clean_layer"] for r in attacked),
        "final_layer": _mean(r["final_layer"] for r in attacked),
        "successful_final_layer": _mean(r["final_layer"] for r in records if r["status"] == "successful"),
        "successful_clean_layer": _mean(r["clean_layer"] for r in records if r["status"] == "successful"),
    }


def run_task(textattack, task_name: str, folder: str, args) -> dict:
    """Choose the setting, then run every attack on every classifier of one task."""
    from pabee import ExitSpec
    from pabee.glue import get_task
    from pabee.pipeline import PabeePipeline
    from pabee.provenance import portable_path

    task = get_task(task_name)
    work = Path(args.work_dir)
    plain_folder, plain = plain_model(task_name, args.glue_dir, work)
    pipe = PabeePipeline.from_pretrained(folder, backend="torch", batch_size=32)
    examples, labels = common.glue_split(task_name, args.glue_dir)
    spec, chosen, report_half = choose_patience(pipe, examples, labels, task, args.max_drop)
    counts = {recipe: attack_examples(args.examples, recipe) for recipe in args.attacks.split(",")}
    index = report_half[: max(counts.values())]
    attacked, gold = [examples[i] for i in index], labels[index]
    _, layers = pabee_answerer(pipe, spec)(attacked, record=False)
    k = int(round(float(layers.mean())))
    answerers = {
        "full": pabee_answerer(pipe, ExitSpec("patience", patience=0)),
        "pabee": pabee_answerer(pipe, spec),
        "static": pabee_answerer(pipe, ExitSpec("static", threshold=k)),
        "plain": plain_answerer(plain_folder),
    }
    columns = ("sentence",) if attacked[0][1] is None else ("sentence1", "sentence2")
    out = {"model": portable_path(folder), "plain_model": portable_path(plain_folder), "plain_training": plain,
           "chosen": chosen, "setting": spec.label, "static_layer": k, "dev_indices": index.tolist(),
           "attacks": {}}  # fmt: skip
    for recipe, count in counts.items():
        out["attacks"][recipe] = {}
        for name in VARIANTS:
            print(f"{task_name} {recipe} {name} ...", file=sys.stderr, flush=True)
            runs = attack_one(textattack, recipe, answerers[name], attacked[:count], gold[:count], columns, args.seed)
            out["attacks"][recipe][name] = {**summarize(runs["examples"]), **runs}
    return out


def attack_examples(text: str, recipe: str) -> int:
    """How many examples `recipe` attacks, from --examples ("300", or "deepwordbug=300,pruthi=100")."""
    limits = {}  # a bare number applies to every recipe ("*")
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, number = item.rpartition("=")
        limits[name or "*"] = int(number)
    if recipe not in ATTACKS or recipe not in limits and "*" not in limits:
        raise SystemExit(f"--attacks/--examples: say how many examples {recipe!r} attacks (one of {sorted(ATTACKS)})")
    return limits.get(recipe, limits.get("*"))


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    textattack = offline_textattack(work)
    tasks = {}
    for task_name, folder in common.task_models(args).items():
        tasks[task_name] = run_task(textattack, task_name, folder, args)
    examples = {recipe: attack_examples(args.examples, recipe) for recipe in args.attacks.split(",")}
    settings = {"examples": examples, "max_drop": args.max_drop, "seed": args.seed, "threads": args.threads}
    return common.report(
        settings=settings, tasks=tasks, not_offline=NOT_OFFLINE, provenance={"textattack": _version("textattack")}
    )


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# --- report --------------------------------------------------------------------------------------------------------


def survived(rows: dict) -> np.ndarray:
    """Per attacked example: still answered correctly after the attack (the attack failed)."""
    return np.asarray([r["status"] == "failed" for r in rows["examples"]])


def paired(pabee: dict, other: dict) -> dict:
    """PABEE against another classifier on the same examples: the examples only one of them kept (after the
    attack), and the two-sided exact sign test on those (McNemar's exact test): how likely a split at least this
    uneven is when neither is more robust."""
    from scipy.stats import binomtest

    mine, theirs = survived(pabee), survived(other)
    only_pabee, only_other = int((mine & ~theirs).sum()), int((theirs & ~mine).sum())
    p = binomtest(only_pabee, only_pabee + only_other).pvalue if only_pabee + only_other else 1.0
    return {"only_pabee": only_pabee, "only_other": only_other, "p": float(p)}


def difference_interval(test: dict, examples: int, level: float = 0.95) -> tuple[float, float, float]:
    """PABEE's after-attack accuracy minus the other's, in points, with its `level` interval: exact (Clopper-Pearson)
    on the share of the discordant examples PABEE kept, scaled by how many were discordant."""
    from scipy.stats import binomtest

    discordant = test["only_pabee"] + test["only_other"]
    if not discordant:
        return 0.0, 0.0, 0.0
    interval = binomtest(test["only_pabee"], discordant).proportion_ci(level, method="exact")
    scale = 100 * discordant / examples
    return (
        scale * (2 * test["only_pabee"] / discordant - 1),
        scale * (2 * interval.low - 1),
        scale * (2 * interval.high - 1),
    )


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: each p-value as it stands against a family-wise error rate, given the others."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(test: dict, alpha: float = 0.05) -> str:
    """The paper's claim against one classifier: confirmed when PABEE keeps significantly more examples after the
    attack (sign test, Holm-adjusted over its family, `alpha`), refuted when significantly fewer, else no
    difference shown."""
    if test["p_holm"] >= alpha:
        return "no difference shown"
    return "confirmed" if test["only_pabee"] > test["only_other"] else "refuted"


FAMILIES = {  # the two claims, each judged over all its (task, attack) tests
    "plain": "against plain fine-tuning (the paper's claim)",
    "full": "against the same model at full depth (the exit rule alone)",
}


def claim_tests(data: dict) -> list[dict]:
    """Every paired test of the report, with its Holm-adjusted p-value within its family and its interval."""
    tests = []
    for task_name, task in data["tasks"].items():
        for recipe, rows in task["attacks"].items():
            for other in FAMILIES:
                test = paired(rows["pabee"], rows[other])
                difference = difference_interval(test, len(rows["pabee"]["examples"]))
                tests.append({"task": task_name, "recipe": recipe, "other": other, **test, "difference": difference})
    for other in FAMILIES:
        family = [t for t in tests if t["other"] == other]
        for test, adjusted in zip(family, holm([t["p"] for t in family]), strict=True):
            test["p_holm"] = adjusted
    return tests


def claim_summary(tests: list[dict], data: dict) -> str:
    """The verdict over each family, from the tests: what was shown, and how large an effect stays possible."""
    parts = []
    for other, family_name in FAMILIES.items():
        family = [t for t in tests if t["other"] == other]
        counts = {v: sum(verdict(t) == v for t in family) for v in ("confirmed", "refuted", "no difference shown")}
        low = min(t["difference"][1] for t in family)
        high = max(t["difference"][2] for t in family)
        parts.append(
            f"{family_name.capitalize()}: {counts['confirmed']} confirmed, {counts['refuted']} refuted, "
            f"{counts['no difference shown']} no difference shown of {len(family)} tests (Holm over the "
            f"{len(family)}, family-wise 0.05); the 95% intervals of the after-attack accuracy difference span "
            f"{low:+.1f} to {high:+.1f} points, so effects of that size are not ruled out."
        )
    return (
        "**Verdict.** "
        + " ".join(parts)
        + " Plain fine-tuning is transformers' classifier on the encoder's pooler, the PABEE models (MiniLM, pooling "
        "`auto`) read mean-pooled token states, so a difference against plain mixes the multi-exit training with the "
        "pooling. The paper's setting (TextFooler on 12-layer ALBERT-base) is not the one measured "
        "here (character-level attacks on the 6-layer MiniLM); TextFooler cannot run offline."
    )


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(data: dict) -> str:
    prov = data["provenance"]
    settings = data["settings"]
    lines = common.heading(
        "Robustness under attack: PABEE, the full model, static truncation and plain fine-tuning",
        prov,
        f"TextAttack {prov.get('textattack')}, torch threads {settings['threads']}, seed {settings['seed']}.",
    )
    lines += [
        "What each row is and how the examples and setting are chosen: the docstring of "
        "`benchmarks/robustness.py`. After-attack accuracy: examples still answered correctly after the attack "
        "(of all examples); success rate: successful attacks of those attempted (examples answered correctly "
        "before); queries: model queries per attempted example. Layers: mean exit layer on the clean attempted "
        "examples, on the attack's final texts, and over every query the attack made.",
        "",
        "Attacks that cannot run here: "
        + "; ".join(f"{name} ({why})" for name, why in data["not_offline"].items())
        + ". The character-level recipes below run with TextAttack's own code; only its stop-word list is "
        "scikit-learn's instead of NLTK's.",
        "",
        "## The paper's claim, per task and attack",
        "",
        "The paper compares PABEE with the fine-tuned model it accelerates (here: plain fine-tuning) and finds it "
        "keeps more accuracy under attack and costs the attacker more queries. Against plain fine-tuning and "
        "against the same PABEE model at full depth (which isolates the exit rule from the multi-exit training), on "
        "the same examples: after-attack accuracy, the examples only one of the two kept (PABEE / other), and "
        "the two-sided exact sign test on those, its p-value Holm-adjusted over the four tests of its comparison "
        "(two tasks × two attacks). Confirmed or refuted: adjusted p < 0.05 in PABEE's favour or against it. "
        "Difference: PABEE's after-attack accuracy minus the other's, with its exact 95% interval.",
        "",
    ]
    tests = claim_tests(data)
    lines += _claims_table(data, tests) + ["", claim_summary(tests, data)]
    lines += [f"\n{note}" for note in data.get("notes", [])]
    for task_name, task in data["tasks"].items():
        lines += _task_section(task_name, task, data["settings"]["examples"])
    lines += ["", "## Exit layers under attack", "", _layers_text(data), ""]
    return "\n".join(lines)


def _claims_table(data: dict, tests: list[dict]) -> list[str]:
    """One row per paired test: after-attack accuracies, the difference, the discordant split, p-values, verdict."""
    claims = []
    for test in tests:
        task, rows = data["tasks"][test["task"]], data["tasks"][test["task"]]["attacks"][test["recipe"]]
        pabee, other = rows["pabee"], rows[test["other"]]
        diff, low, high = test["difference"]
        claims.append([
            test["task"], test["recipe"], f"PABEE `{task['setting']}` vs {test['other']}",
            f"{_f(pabee['after_attack_accuracy'])} vs {_f(other['after_attack_accuracy'])}",
            f"{diff:+.1f} [{low:+.1f}, {high:+.1f}]", f"{test['only_pabee']} / {test['only_other']}",
            f"{test['p']:.3f}", f"{test['p_holm']:.3f}", f"{_f(pabee['queries'])} vs {_f(other['queries'])}",
            f"**{verdict(test)}**",
        ])  # fmt: skip
    return common.table(
        ["Task", "Attack", "Comparison", "After-attack acc.", "Difference [95%]", "Kept by one only", "p",
         "p, Holm", "Queries", "Claim"],
        claims,
    )  # fmt: skip


def _task_section(task_name: str, task: dict, examples: dict[str, int]) -> list[str]:
    """One task: what was attacked and with which setting, then each attack × classifier."""
    choose, plain = task["chosen"]["choose"], task["plain_training"]
    lines = [
        "",
        f"## {task_name}",
        "",
        "Attacked: the first "
        + ", ".join(f"{min(n, len(task['dev_indices']))} ({r})" for r, n in examples.items())
        + f" of the reporting half of dev ({len(task['dev_indices'])} examples listed in the JSON). PABEE setting "
        f"`{task['setting']}` (chosen on the other half: {_f(choose['score'])} at "
        f"{_f(choose['avg_exit_layer'], 2)} layers); static truncation at layer {task['static_layer']}. Plain "
        f"fine-tuning: {plain['num_layers']} layers, {plain['train_examples']} training examples, "
        f"{plain['train_seconds'] / 60:.1f} min to train.",
        "",
    ]
    rows = []
    for recipe, variants in task["attacks"].items():
        for name, r in variants.items():
            numbers = [_f(r[key]) for key in ("clean_accuracy", "after_attack_accuracy", "success_rate")]
            numbers.append(_f(r["queries"]))
            layers = [_f(r[key], 2) for key in ("clean_layer_attacked", "final_layer", "query_layers")]
            rows.append([recipe, name, *numbers, *layers, f"{r['seconds'] / 60:.1f}"])
    return lines + common.table(
        ["Attack", "Classifier", "Clean acc.", "After-attack acc.", "Success rate", "Queries",
         "Layer, clean", "Layer, attacked text", "Layer, all queries", "Minutes"],
        rows,
    )  # fmt: skip


def _layers_text(data: dict) -> str:
    parts = []
    for task_name, task in data["tasks"].items():
        for recipe, variants in task["attacks"].items():
            r = variants["pabee"]
            parts.append(
                f"{task_name}, {recipe}: PABEE's mean exit layer {_f(r['clean_layer_attacked'], 2)} on the clean "
                f"examples, {_f(r['final_layer'], 2)} on the attack's final texts "
                f"({_f(r['successful_clean_layer'], 2)} → {_f(r['successful_final_layer'], 2)} on the successful "
                f"ones), {_f(r['query_layers'], 2)} over all queries."
            )
    return " ".join(parts) + (
        " The attacks here only look for a changed label; a slowdown attack that aims at the exit layer is "
        "measured in `slowdown.md`."
    )


def main() -> None:
    parser = common.parser(__doc__, "robustness", threads=2)
    parser.add_argument("--work_dir", default=str(common.ROOT / "runs" / "robustness"))
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"Comma-separated, of {sorted(ATTACKS)}.")
    parser.add_argument(
        "--examples", default="deepwordbug=300,pruthi=100", help="Dev examples attacked per task and attack (at most)."
    )
    parser.add_argument("--max_drop", type=float, default=1.0, help="Points below the full model, choosing half.")
    parser.add_argument("--seed", type=int, default=0)
    common.write_report(parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
