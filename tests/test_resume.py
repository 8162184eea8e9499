"""Training survives SIGKILL: only checkpoints saved whole are resumed or evaluated, and a resumed run ends where
an uninterrupted one with the same seed does."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from pabee.arguments import RunGlueArguments
from pabee.checkpoints import (
    CHECKPOINT_MARKER,
    CheckpointMarker,
    complete_checkpoints,
    is_complete_checkpoint,
    mark_checkpoint_complete,
)
from pabee.errors import PabeeError
from pabee.resume import RUN_FILE, prepare_output_dir, run_identity

MODEL = "some/model"


def _checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    """A checkpoint folder as Trainer leaves it; without `complete`, as a kill mid-save does: no marker (nor
    trainer_state.json, written last) and a truncated optimizer file."""
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"m" * 64)
    if complete:
        (folder / "optimizer.pt").write_bytes(b"o" * 128)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        mark_checkpoint_complete(folder, step)
    else:
        (folder / "optimizer.pt").write_bytes(b"o" * 40)
    return folder


def _arguments(out: Path, task: str = "SST-2", **training) -> tuple[RunGlueArguments, TrainingArguments]:
    training = {"output_dir": str(out), "do_train": True, "report_to": "none", **training}
    return RunGlueArguments(task_name=task, model_name_or_path=MODEL), TrainingArguments(**training)


def _prepare(out: Path, task: str = "SST-2", **training) -> str | None:
    return prepare_output_dir(*_arguments(out, task, **training), MODEL)


def _this_run(out: Path, task: str = "SST-2", **training) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(run_identity(*_arguments(out, task, **training), MODEL)))


def test_marker_is_written_on_save_by_rank_zero_and_checks_sizes(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "sub").mkdir()
    (folder / "sub" / "rng.pth").write_bytes(b"y" * 3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    CheckpointMarker().on_save(args, TrainerState(global_step=3, is_world_process_zero=False), TrainerControl())
    assert not (folder / CHECKPOINT_MARKER).exists() and not is_complete_checkpoint(folder)
    CheckpointMarker().on_save(args, TrainerState(global_step=3), TrainerControl())
    marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    assert marker == {"step": 3, "files": {"model.safetensors": 10, "sub/rng.pth": 3}}
    assert is_complete_checkpoint(folder)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    (folder / "model.safetensors").write_bytes(b"x" * 4)  # a marked file cut short later: not complete either
    assert not is_complete_checkpoint(folder)
    renamed = folder.rename(tmp_path / "checkpoint-5")  # the marker is for step 3
    (renamed / "model.safetensors").write_bytes(b"x" * 10)
    assert not is_complete_checkpoint(renamed)


def test_resume_takes_the_last_complete_checkpoint_and_removes_incomplete_ones(tmp_path, capsys):
    out = tmp_path / "out"
    _this_run(out)
    _checkpoint(out, 2)
    _checkpoint(out, 4)
    _checkpoint(out, 6, complete=False)
    assert _prepare(out) == str(out / "checkpoint-4")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (
        capsys.readouterr().out == f"{out / 'checkpoint-6'} is incomplete (interrupted while saving): removing it.\n"
    )


def test_only_incomplete_checkpoints_start_afresh(tmp_path, capsys):
    out = tmp_path / "out"
    _this_run(out)
    _checkpoint(out, 2, complete=False)
    assert _prepare(out) is None
    assert list(out.glob("checkpoint-*")) == []
    printed = capsys.readouterr().out
    assert "checkpoint-2 is incomplete (interrupted while saving): removing it." in printed
    assert f"No complete checkpoint of this run in {out}: training from the start." in printed
    # Killed before its first checkpoint: only the run file is there, and the same command starts afresh.
    assert _prepare(out) is None


def test_other_runs_checkpoints_are_an_error_and_left_alone(tmp_path, capsys):
    out = tmp_path / "out"
    _this_run(out, task="RTE")
    _checkpoint(out, 2)
    _checkpoint(out, 4, complete=False)
    with pytest.raises(PabeeError, match="holds checkpoints of another run"):
        _prepare(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (out / RUN_FILE).unlink()  # no run file: another (unknown) run, and nothing is removed either
    with pytest.raises(PabeeError, match="another run"):
        _prepare(out)
    assert (out / "checkpoint-4").is_dir()
    # A finished run of this task without checkpoints (its trainer_state.json at the top) is not redone silently.
    finished = tmp_path / "finished"
    _this_run(finished)
    (finished / "trainer_state.json").write_text("{}")
    with pytest.raises(PabeeError, match="exists and is not empty"):
        _prepare(finished)
    assert capsys.readouterr().out == ""


def test_evaluation_lists_only_complete_checkpoints_and_removes_nothing(tmp_path, capsys):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 3, complete=False)
    _checkpoint(tmp_path, 10)
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-10"]
    assert (tmp_path / "checkpoint-3").is_dir()
    assert (
        capsys.readouterr().out
        == f"{tmp_path / 'checkpoint-3'} is incomplete (interrupted while saving): skipping it.\n"
    )


# --- the same run: data content, starting model, result-changing flags (issue 27, item 8) --------------------


def _glue_and_model(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "glue" / "SST-2"
    data.mkdir(parents=True)
    (data / "train.tsv").write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    (data / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    model = tmp_path / "start"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "model.safetensors").write_bytes(b"w" * 64)
    return data, model


def _identity_prepare(out: Path, data: Path, model: Path, **training) -> str | None:
    args = RunGlueArguments(task_name="SST-2", data_dir=str(data), model_name_or_path=str(model))
    training_args = TrainingArguments(output_dir=str(out), do_train=True, report_to="none", **training)
    return prepare_output_dir(args, training_args, str(model))


def _record(out: Path, data: Path, model: Path, **training) -> None:
    args = RunGlueArguments(task_name="SST-2", data_dir=str(data), model_name_or_path=str(model))
    training_args = TrainingArguments(output_dir=str(out), do_train=True, report_to="none", **training)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(run_identity(args, training_args, str(model))))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("data edited in place, same size", "data"),
        ("starting weights edited in place", "model"),
        ("learning rate", "learning_rate"),
        ("batch size", "per_device_train_batch_size"),
        ("seed", "seed"),
    ],
)
def test_a_run_with_other_data_content_model_or_hyperparameters_is_another_run(tmp_path, change, named):
    data, model = _glue_and_model(tmp_path)
    out = tmp_path / "out"
    _record(out, data, model)
    _checkpoint(out, 2)
    assert _identity_prepare(out, data, model) == str(out / "checkpoint-2")  # the same run resumes
    training = {}
    if change.startswith("data"):
        (data / "train.tsv").write_text("sentence\tlabel\na fine film\t0\na dull film\t1\n")  # labels swapped
    elif change.startswith("starting"):
        (model / "model.safetensors").write_bytes(b"v" * 64)
    else:
        training = {"learning rate": {"learning_rate": 1e-3}, "batch size": {"per_device_train_batch_size": 4}}.get(
            change, {"seed": 7}
        )
    with pytest.raises(PabeeError, match=f"holds checkpoints of another run \\(it differs in: {named}\\)"):
        _identity_prepare(out, data, model, **training)
    assert (out / "checkpoint-2").is_dir()


def test_resume_from_checkpoint_obeys_the_marker_and_the_run(tmp_path):
    data, model = _glue_and_model(tmp_path)
    out = tmp_path / "out"
    _record(out, data, model)
    good, cut = _checkpoint(out, 2), _checkpoint(out, 4, complete=False)
    assert _identity_prepare(tmp_path / "new", data, model, resume_from_checkpoint=str(good)) == str(good)
    with pytest.raises(PabeeError, match="checkpoint-4 is not a complete checkpoint"):
        _identity_prepare(tmp_path / "new", data, model, resume_from_checkpoint=str(cut))
    with pytest.raises(PabeeError, match=r"--resume_from_checkpoint .*checkpoint-2 holds checkpoints of another run"):
        _identity_prepare(tmp_path / "new", data, model, resume_from_checkpoint=str(good), learning_rate=1e-3)
    (out / RUN_FILE).unlink()  # a checkpoint nobody recorded a run for
    with pytest.raises(PabeeError, match="another run \\(no record of what it was\\)"):
        _identity_prepare(tmp_path / "new", data, model, resume_from_checkpoint=str(good))


# --- a real `pabee run-glue`, killed with SIGKILL -------------------------------------------------------------

MAX_STEPS = 16
KILL_AFTER_STEP = 5  # logged after checkpoint-4 is saved and marked: the kill lands between two checkpoints


def _sst2_data(root: Path) -> Path:
    """A small SST-2 in the GLUE layout: a label the words decide, so training moves the weights."""
    words = ["good", "great", "fine", "bad", "dull", "awful", "film", "plot", "actors", "very", "a", "the"]
    rows = []
    for i in range(64):
        sentence = " ".join(words[(i * k + 3) % len(words)] for k in range(1, 4 + i % 5))
        rows.append(f"{sentence}\t{int(sum(w in sentence.split() for w in words[:3]) > 0)}")
    folder = root / "SST-2"
    folder.mkdir()
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:48]) + "\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[48:]) + "\n", encoding="utf-8")
    return folder


def _command(data: Path, model: Path, out: Path) -> list[str]:
    return [
        *[sys.executable, "-m", "pabee", "run-glue", "--task_name", "SST-2", "--data_dir", str(data)],
        *["--model_name_or_path", str(model), "--output_dir", str(out), "--do_train", "--do_eval"],
        *f"--max_steps {MAX_STEPS} --save_steps 2 --logging_steps 1 --disable_tqdm true --seed 3".split(),
        *"--per_device_train_batch_size 4 --learning_rate 1e-3 --max_seq_length 32 --patience 1,2".split(),
    ]


def _is_step_log(line: str) -> bool:
    return line.startswith("{") and "'loss'" in line and "train_runtime" not in line


def _marked_steps(out: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in out.glob(f"checkpoint-*/{CHECKPOINT_MARKER}"))


def _kill_mid_training(command: list[str], out: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Start the run, SIGKILL it once step KILL_AFTER_STEP is logged; the steps it finished and its output."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, steps = [], 0
    deadline = time.monotonic() + 300
    try:
        for line in proc.stdout:
            lines.append(line)
            steps += _is_step_log(line)
            if steps == KILL_AFTER_STEP:
                assert _marked_steps(out), "a checkpoint with its marker exists before the kill"
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(lines[-30:])
        assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(lines[-30:])
        rest = proc.stdout.read()  # what it printed before it died
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    lines += rest.splitlines(keepends=True)
    return sum(_is_step_log(line) for line in lines), lines


def _fake_half_written_checkpoint(out: Path, last: int) -> Path:
    """What a kill while saving leaves: the model file, half the optimizer, no trainer_state.json, no marker."""
    step = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) + 2
    assert step < MAX_STEPS  # the resumed run saves this step again: a stale folder would be in its way
    source, folder = out / f"checkpoint-{last}", out / f"checkpoint-{step}"
    folder.mkdir()
    shutil.copy(source / "model.safetensors", folder / "model.safetensors")
    optimizer = (source / "optimizer.pt").read_bytes()
    (folder / "optimizer.pt").write_bytes(optimizer[: len(optimizer) // 2])
    return folder


def _assert_close(a: object, b: object, where: str = "") -> None:
    """Equal results, numbers to 1e-6 (pytest.approx does not nest)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=1e-6), where
    else:
        assert a == b, where


@pytest.mark.slow
def test_sigkill_mid_training_resumes_to_the_uninterrupted_result(tmp_path, model_dir):
    data = _sst2_data(tmp_path)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",  # every log line reaches the pipe before the kill
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
    }
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    done, printed = _kill_mid_training(_command(data, model_dir, killed), killed, env)
    marked = _marked_steps(killed)
    last = marked[-1]
    assert done < MAX_STEPS and not (killed / "eval_results.json").exists(), "".join(printed[-30:])
    lost = done - last
    print(f"killed after {done} of {MAX_STEPS} steps; last complete checkpoint-{last}; steps lost: {lost}")
    assert 0 <= lost <= 2, "at most the steps since the last checkpoint (one every 2 steps) are lost"
    half = _fake_half_written_checkpoint(killed, last)

    resumed = subprocess.run(_command(data, model_dir, killed), capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{half} is incomplete (interrupted while saving): removing it." in resumed.stdout
    assert f"Resuming training from {killed / f'checkpoint-{last}'}" in resumed.stdout
    assert sum(_is_step_log(line) for line in resumed.stdout.splitlines()) == MAX_STEPS - last
    uninterrupted = subprocess.run(_command(data, model_dir, fresh), capture_output=True, text=True, env=env)
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:] + uninterrupted.stderr[-3000:]

    # Every checkpoint now in the folder was saved whole, and the same steps were saved as without the kill.
    assert _marked_steps(killed) == _marked_steps(fresh) == list(range(2, MAX_STEPS + 1, 2))
    assert all(is_complete_checkpoint(p) for p in killed.glob("checkpoint-*"))
    a, b = (json.loads((out / "eval_results.json").read_text()) for out in (killed, fresh))
    assert a["training"]["global_step"] == b["training"]["global_step"] == MAX_STEPS
    # The record says which steps this process ran, so its train_runtime can be read per step.
    assert (a["training"]["resumed_from_step"], b["training"]["resumed_from_step"]) == (last, 0)
    _assert_close(a["evaluations"][-1]["splits"], b["evaluations"][-1]["splits"])
    losses = [
        [h["loss"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
        for out in (killed, fresh)
    ]
    assert len(losses[0]) == MAX_STEPS and losses[0] == pytest.approx(losses[1], abs=1e-6)
    weights = [load_file(out / "model.safetensors") for out in (killed, fresh)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert (tensor - weights[1][name]).abs().max().item() <= 1e-6, name
