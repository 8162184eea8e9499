"""Slowdown attack, the report (`slowdown.py --render_only` re-renders it): `render(report)` is slowdown.md."""

from typing import Any

import common

NUMPY_RULE = {  # how exit layers were read off one pass: reports before `exit_rule` used a numpy copy of the rule
    None: (
        " in numpy (checked equal to `pabee.exits.sweep_exit_layers`)",
        "in numpy",
        ", and the search's numpy rule for patience",
    ),
    "sweep_exit_layers": (" with `pabee.exits.sweep_exit_layers`", "applied", ""),
}


def render(report: dict[str, Any]) -> str:
    lines = header(report) + summary_lines(report) + what_was_done(report)
    for task, t in report["tasks"].items():
        metrics = ["accuracy", "f1"] if task == "MRPC" else ["accuracy"]
        lines += trigger_and_model_alone(report, task, t, metrics) + one_at_a_time(report, t["model_alone"])
        lines += sweep(report, t["model_alone"], metrics) + server(report, t) + search_log(t["trigger"])
    return "\n".join([*lines, "", "## Caveats", "", *(f"- {c}" for c in CAVEATS)]) + "\n"


def _metric_cells(row: dict[str, Any], metrics: list[str]) -> str:
    return " | ".join(f"{100 * row[m]:.1f}" for m in metrics)


def _heads(metrics: list[str]) -> list[str]:
    return ["Acc" if m == "accuracy" else "F1" for m in metrics]


def header(report: dict[str, Any]) -> list[str]:
    p, k = report["patience"], report["max_exit_layer"]
    prov, elapsed = report["provenance"], report["elapsed_seconds"]
    hw = prov["hardware"]
    return [
        "# Slowdown attack on PABEE, measured: a universal trigger, and what `max_exit_layer` bounds",
        "",
        "Early exit can be attacked: inputs on which consecutive layers keep disagreeing push every example to the "
        "last layer (WAFFLE, NeurIPS 2023; SAME, ACL 2023). This measures a cheap such attack on the fine-tuned "
        f"6-layer MiniLM PABEE models, at **patience {p}**, and the cap `max_exit_layer` = **{k}** against it.",
        "",
        f"Command: `{prov['command']}`  ",
        f"Date: {prov['date']}; torch {prov['versions']['torch']}, transformers {prov['versions']['transformers']}; "
        f"{hw['cpu']}, {hw['cpu_count']} cores, CPU flags {', '.join(hw['cpu_flags']) or 'none reported'}; "
        f"{report['threads']} torch thread(s) here and in the server.  ",
        f"Load average (1/5/15 min) at the start and end of the server runs: {report['load_average_start']} → "
        f"{report['load_average_end']} (a shared machine).  ",
        f"Elapsed: model alone {elapsed['model_alone']:.0f} s, server {elapsed['server']:.0f} s; trigger search "
        + ", ".join(f"{t} {s:.0f} s" for t, s in elapsed["search_recorded"].items())
        + " (cached in the triggers file; a measure-only run skips it).",
        "",
    ]


def what_was_done(report: dict[str, Any]) -> list[str]:
    p, k, rule = report["patience"], report["max_exit_layer"], NUMPY_RULE[report.get("exit_rule")]
    return [
        "## What was done",
        "",
        "- **Trigger** (`--stage search`): a universal sequence of whole-word tokens, chosen greedily on a random "
        "sample of *training* examples to maximise the mean exit layer under patience "
        f"{p} (no cap), then prepended to every *dev* example (MRPC: to the first sentence). Each candidate costs "
        "one full-depth pass returning all layers' logits; exit layers under patience are read off them"
        f"{rule[0]}. Candidates, each scored in context by such a pass: the "
        "most frequent whole-word tokens of the training text and the best of the whole whole-word vocabulary by a "
        "linear-mixing surrogate (each token's own per-layer logits, `[CLS] v v v [SEP]`, mixed into the sample's "
        "clean logits by the trigger's share of the tokens, as mean pooling and linear heads roughly do; exit rule "
        f"{rule[1]}), each tried as the token repeated; then coordinate rounds in which each position tries the "
        "HotFlip top-k (gradient of the expected agreement Σ<softmax_l, softmax_l+1> of consecutive layers before "
        "the last w.r.t. the trigger embeddings), the surrogate's top-k for a swap at that position, and the best "
        "screened tokens, keeping the best; rounds stop when one changes nothing.",
        "- **Model alone** (`pabee.pipeline`, real early exit, batches of 32) on the whole dev set, clean vs "
        f"attacked, for patience {p}; patience {p} with `max_exit_layer` {k}; the model truncated at layer {k} "
        f"(`static` {k}: the plain model's first {k} layers and classifier {k}). Real exits are compared with the "
        f"one-pass sweep (`sweep_exit_layers`{rule[2]}).",
        "- **A perfect attack, simulated**: one that made every example's layers disagree would let nobody exit "
        f"before the cap. `--exit_criterion entropy --exit_threshold 0` never fires (entropy is never below 0), so "
        "every example runs the early-exit loop (each layer's classifier and the exit bookkeeping) to the last "
        f"layer, or to layer {k} with `max_exit_layer` {k}: the most any slowdown attack can cost, without and with "
        "the cap. The target is checked against it too, since the real trigger leaves most examples below the cap.",
        f"- **Server**: `pabee serve --threads {report['threads']}` (default micro-batching: 32 texts, 5 ms) for the "
        "same settings (the simulated perfect attack on attacked inputs only); closed-loop clients "
        f"({', '.join(map(str, report['clients']))}) each sending one random "
        f"dev example per request (the same examples clean and attacked), {report['warmup']:g} s warm-up + "
        f"{report['duration']:g} s measured per setting; the settings interleaved over {report['rounds']} rounds "
        "in one process (server order rotated, clean/attacked order alternated); medians over rounds, and ratios "
        "within each round. Latency is measured by the client (HTTP included); the mean exit layer is the server's "
        "`pabee_exit_layer` histogram over the timed window.",
    ]


def trigger_and_model_alone(report: dict[str, Any], task: str, t: dict[str, Any], metrics: list[str]) -> list[str]:
    trig, alone, n = t["trigger"], t["model_alone"], t["model_alone"]["num_examples"]
    rule = "numpy rule" if trig.get("exit_rule") is None else "the exit rule"
    lines = [
        "",
        f"## {task} (`{t['model']}`)",
        "",
        f"The model's `config.json` says patience {t['model_config_patience']} (run-glue saves the first of "
        f"`--patience 1,2,3,4,5`); this uses patience {report['patience']}.",
        "",
        f"**Trigger: `{trig['trigger']}`** — searched on {trig['train_sample_size']} training examples in "
        f"{trig['search_seconds']:.0f} s ({trig['example_passes']} example passes); on that sample the mean exit "
        f"layer went {trig['train_sample_clean']['mean_exit_layer']:.3f} → "
        f"{trig['train_sample_triggered']['mean_exit_layer']:.3f} (search, one pass + {rule}); real early "
        f"exit on the same sample in this run: {alone['search_check']['clean']['real_mean_exit_layer']:.3f} → "
        f"{alone['search_check']['triggered']['real_mean_exit_layer']:.3f}. Dev examples average "
        f"{alone['mean_tokens']['clean']:.1f} tokens, so the trigger is "
        f"{len(trig['trigger_tokens']) / alone['mean_tokens']['attacked']:.0%} of the tokens the mean-pooled "
        "classifiers average over.",
        "",
        f"Model alone, dev ({n} examples), real early exit:",
        "",
    ]
    head = ["Exit setting", "Input", *_heads(metrics), "Avg. exit layer", "Exits per layer", "One-pass avg. exit"]
    rows = [
        [
            setting,
            name,
            _metric_cells(r, metrics),
            f"{r['avg_exit_layer']:.2f}",
            " / ".join(map(str, r["exit_histogram"])),
        ]
        + [
            f"{r['one_pass_avg_exit_layer']:.2f}",
            f"{r['exit_layers_equal_one_pass']}/{n}",
            f"{r['examples_per_s']:.0f}",
        ]
        for setting, by_input in alone["settings"].items()
        for name, r in by_input.items()
    ]
    return lines + common.table([*head, "Exits equal to one pass", "ex/s (one run)"], rows)


def one_at_a_time(report: dict[str, Any], alone: dict[str, Any]) -> list[str]:
    if "one_at_a_time" not in alone:
        return []
    one, k = alone["one_at_a_time"], report["max_exit_layer"]
    lines = [
        "",
        f"Model alone, one example per call ({one['examples']} random dev examples, {report['rounds']} "
        "interleaved rounds, latencies pooled; no HTTP: what a 1-client server computes):",
        "",
    ]
    rows = [
        [*label.split(" | "), f"{r['examples_per_s']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
        + [", ".join(f"{v:.2f}" for v in r["p99_ms_per_round"])]
        for label, r in one["settings"].items()
    ]
    lines += common.table(["Exit setting", "Input", "ex/s", "p50 ms", "p99 ms", "p99 ms per round"], rows)
    return lines + [
        "",
        f"- Target, model alone (attacked p99 with `max_exit_layer` {k} / the truncated model's): real "
        f"trigger **{one['target']['p99']:.3f}x** ({'met' if one['target']['met'] else 'missed'}); "
        f"perfect attack **{one['target_perfect']['p99']:.3f}x** "
        f"({'met' if one['target_perfect']['met'] else 'missed'}; mean latency per round "
        f"{', '.join(f'{v:.3f}' for v in one['target_perfect']['mean_per_round'])}x).",
        f"- The real trigger without a cap: p99 {one['attack_p99']:.3f}x clean's, mean latency "
        f"{one['attack_mean']:.3f}x; a perfect attack without a cap: p99 {one['perfect_p99']:.3f}x clean's.",
    ]


def sweep(report: dict[str, Any], alone: dict[str, Any], metrics: list[str]) -> list[str]:
    heads = " | ".join(_heads(metrics))
    rows = [
        [
            "0 (full)" if c["patience"] == 0 else c["patience"],
            f"{c['avg_exit_layer']:.2f}",
            f"{a['avg_exit_layer']:.2f}",
        ]
        + [_metric_cells(c, metrics), _metric_cells(a, metrics)]
        for c, a in zip(alone["sweep"]["clean"], alone["sweep"]["attacked"], strict=True)
    ]
    head = ["Patience", "Clean avg. exit", "Attacked avg. exit", f"Clean {heads}", f"Attacked {heads}"]
    table = common.table(head, rows)
    table[1] = "|---|---|---|" + "---|" * (2 * len(metrics))
    intro = f"Every patience from the one-pass sweep (the trigger was searched for patience {report['patience']}):"
    return ["", intro, "", *table]


def server(report: dict[str, Any], t: dict[str, Any]) -> list[str]:
    lines = ["", f"Server, medians over {report['rounds']} rounds:", ""]
    rows = []
    for label, r in t["server"]["medians"].items():
        setting, name, clients = label.split(" | ")
        rows.append([setting, name, clients.split()[0], f"{r['examples_per_s']:.1f}", f"{r['p50_ms']:.1f}"])
        rows[-1] += [f"{r['p99_ms']:.1f}", f"{r['avg_exit_layer']:.2f}", f"{r['avg_batch_size']:.1f}"]
    head = ["Exit setting", "Input", "Clients", "ex/s", "p50 ms", "p99 ms", "Avg. exit layer (/metrics)", "Avg. batch"]
    lines += [*common.table(head, rows), "", "Ratios (of the medians; per round in brackets):", ""]
    for suffix, r in t["server"]["by_clients"].items():
        lines += ratio_lines(report, suffix, r)
    lines += ["", "Per round:", ""]
    rows = []
    for label, rs in t["server_runs"].items():
        setting, name, clients = label.split(" | ")
        for i, r in enumerate(rs, start=1):
            rows.append([setting, name, clients.split()[0], i, f"{r['examples_per_s']:.1f}", f"{r['p50_ms']:.1f}"])
            rows[-1] += [f"{r['p99_ms']:.1f}", f"{r['avg_exit_layer']:.2f}", r["load_average_before"]]
    head = ["Exit setting", "Input", "Clients", "Round", "ex/s", "p50 ms", "p99 ms", "Avg. exit layer", "Load before"]
    return lines + common.table(head, rows)


def ratio_lines(report: dict[str, Any], suffix: str, r: dict[str, Any]) -> list[str]:
    p, k, target = report["patience"], report["max_exit_layer"], report["target_ratio"]

    def fmt(x: dict[str, Any]) -> str:
        return f"**{x['of_medians']:.3f}x** [{', '.join(f'{v:.3f}' for v in x['per_round'])}]"

    verdict, verdict_perfect = ("met" if r[f"{name}_met"] else "missed" for name in ("target", "target_perfect"))
    return [
        f"- {suffix}: the attack without a cap, attacked / clean: p50 {fmt(r['attack_p50'])}, p99 "
        f"{fmt(r['attack_p99'])}; throughput clean / attacked {fmt(r['attack_throughput'])}.",
        f"- {suffix}: **target** (attacked p99 with `max_exit_layer` {k} ≤ {target:g}x the p99 of the model "
        f"truncated at {k}, same attacked inputs): {fmt(r['target_p99'])} — **{verdict}** "
        f"({r['target_met_rounds']}/{len(r['target_p99']['per_round'])} rounds within). Against the "
        f"truncated model on clean inputs: {fmt(r['capped_vs_static_clean_p99'])}; against the uncapped "
        f"model on attacked inputs: {fmt(r['capped_vs_uncapped_attacked_p99'])}.",
        f"- {suffix}: **target against a perfect attack** (nobody exits before {k}; p99 with `max_exit_layer` "
        f"{k} ≤ {target:g}x the truncated model's): {fmt(r['target_perfect_p99'])} — **{verdict_perfect}** "
        f"({r['target_perfect_met_rounds']}/{len(r['target_perfect_p99']['per_round'])} rounds within); "
        f"throughput truncated / capped {fmt(r['perfect_capped_throughput_vs_static'])}.",
        f"- {suffix}: a perfect attack without a cap (every example to the last layer), against clean inputs "
        f"at patience {p}: p50 {fmt(r['perfect_p50_vs_clean'])}, p99 {fmt(r['perfect_p99_vs_clean'])}, "
        f"throughput clean / attacked {fmt(r['perfect_throughput_vs_clean'])}. With the cap its p99 is "
        f"{fmt(r['perfect_capped_p99_vs_clean'])} clean's; uncapped / capped p99 "
        f"{fmt(r['perfect_p99_vs_perfect_capped'])}.",
    ]


def search_log(trig: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Search log (the best candidate of each step and where it came from; the trigger changes only if it "
        "beats the current one):",
        "",
    ]
    rows = [
        [s["step"], s["candidates"], f"`{s.get('best_candidate', '')}` ({s['best_candidate_from']})"]
        + [f"`{' '.join(s['trigger'])}`", f"{s['mean_exit_layer']:.3f}", f"{s['flips']:.2f}", f"{s['seconds']:.0f}"]
        for s in trig["log"]
    ]
    head = ["Step", "Candidates", "Best candidate (from)", "Trigger after", "Mean exit (train sample)", "Flips", "s"]
    return lines + common.table(head, rows)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The headline numbers and verdicts, per task."""
    p, k, target = report["patience"], report["max_exit_layer"], report["target_ratio"]
    plain = f"patience {p}"
    lines = ["## Summary", ""]
    for task, t in report["tasks"].items():
        alone, server = t["model_alone"], t["server"]["by_clients"]
        clean, hit = alone["settings"][plain]["clean"], alone["settings"][plain]["attacked"]
        capped = alone["settings"][f"patience {p}, max_exit_layer {k}"]["attacked"]
        transfer = "" if hit["avg_exit_layer"] > clean["avg_exit_layer"] else " (the trigger did not transfer to dev)"
        lines.append(
            f"- **{task}**, trigger `{t['trigger']['trigger']}`: dev mean exit layer at patience {p}: "
            f"{clean['avg_exit_layer']:.2f} → {hit['avg_exit_layer']:.2f}{transfer}; with `max_exit_layer` {k}: "
            f"{capped['avg_exit_layer']:.2f}. A perfect attack would take every example to layer "
            f"{len(alone['per_layer']['clean'])} (with the cap: {k})."
        )
        parts = []
        if "one_at_a_time" in alone:
            one = alone["one_at_a_time"]
            parts.append(
                f"model alone, one at a time: {one['target']['p99']:.3f}x real trigger, "
                f"{one['target_perfect']['p99']:.3f}x perfect attack"
            )
        for suffix, r in server.items():
            parts.append(
                f"server, {suffix}: {r['target_p99']['of_medians']:.3f}x real trigger "
                f"({r['target_met_rounds']}/{len(r['target_p99']['per_round'])} rounds ≤ {target:g}), "
                f"{r['target_perfect_p99']['of_medians']:.3f}x perfect attack "
                f"({r['target_perfect_met_rounds']}/{len(r['target_perfect_p99']['per_round'])} rounds)"
            )
        lines.append(
            f"  - Target (capped attacked p99 / truncated-at-{k} p99 ≤ {target:g}): " + "; ".join(parts) + "."
        )
        uncapped = [
            f"{suffix}: real trigger p50 {r['attack_p50']['of_medians']:.2f}x, perfect attack p50 "
            f"{r['perfect_p50_vs_clean']['of_medians']:.2f}x / p99 {r['perfect_p99_vs_clean']['of_medians']:.2f}x"
            f" / throughput ÷{r['perfect_throughput_vs_clean']['of_medians']:.2f}"
            for suffix, r in server.items()
        ]
        lines.append("  - Without a cap, against clean inputs (server): " + "; ".join(uncapped) + ".")
    lines += [
        "- Verdicts on p99 latency differ by a few percent from round to round on this shared machine, and at 16 "
        "clients (queueing, micro-batches) by far more: read the per-round ratios before the verdict. "
        "The model-alone numbers (no HTTP, no client processes on the same cores) are the steadier check.",
        "",
    ]
    return lines


CAVEATS = [
    "One universal trigger per task, searched greedily on a small training sample with a first-order (HotFlip) "
    "candidate list, against a 6-layer model: a lower bound on what an attacker gets. Per-input attacks (WAFFLE, "
    "SAME) optimise each input and can push more examples to the last layer.",
    "The trigger is not constrained to keep the label or to read naturally; accuracy on attacked inputs is reported "
    "but an attacker who only wants to slow the service does not care about it.",
    "Latency is measured on a shared 2-core VM with the clients on the same cores as the server; settings are "
    "interleaved and per-round ratios listed because the machine's speed drifts between minutes. A p99 over "
    "`--duration` seconds rests on the slowest few requests (1 client: about 250 requests, so 2-3 of them; "
    "16 clients: 6-9 of 600-900), which is why a 5% bound cannot be resolved in every round.",
    "A cap bounds compute, not accuracy: with the cap, attacked inputs answer from layer k's classifier.",
    "Mean pooling dilutes a short trigger: it is T / (T + n) of the tokens every classifier averages over (see each "
    "task's trigger line), and the early layers, whose agreement decides the first exits, are the most "
    "bag-of-words-like. Longer triggers (`--trigger_length`) move more examples; they were not measured here.",
    "The perfect attack is simulated with an exit rule that never fires (entropy 0), not with inputs: it costs what "
    "inputs on which no two consecutive layers agree would cost, through the same early-exit loop.",
]
