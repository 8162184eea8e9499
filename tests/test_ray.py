"""`pabee.ray`: Ray Data predictions equal the pipeline's, an interrupted job writes every row exactly once, and
Ray Serve answers as `pabee serve` does. Tests that start Ray are slow-marked (Ray takes ~10 s to start)."""

from __future__ import annotations

import io
import json
import socket
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pabee.arguments import PredictArguments
from pabee.cli import main
from pabee.pipeline import pipeline
from pabee.ray.batch_predict import _encode, _Predictor, _ShardWriter, input_files, run_ray_predict
from pabee.server import create_app

SHARD = ".predictions.jsonl"


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 2 CPUs whatever the machine, no dashboard."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sst2_model(tmp_path_factory, trained_minilm, minilm_tokenizer) -> Path:
    """MiniLM after a few SST-2 steps, saved with patience 2: real exit layers that vary."""
    folder = tmp_path_factory.mktemp("sst2-model")
    trained_minilm.config.patience = 2
    trained_minilm.save_pretrained(folder)
    minilm_tokenizer.save_pretrained(folder)
    return folder


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- without Ray running -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_without_ray_one_line_names_the_extra(command, model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what find_spec sees when Ray is not installed
    extra = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out")] if command == "predict" else []
    assert main([command, "--model", str(model_dir), "--ray", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'pabee {command}: error: --ray needs ray: pip install "pabee[ray]"'


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--replicas", "2"], "--replicas applies with --ray"),
        (["serve", "--ray", "--workers", "2"], "with --ray, use --replicas"),
        (["serve", "--ray_address", "auto"], "--ray_address applies with --ray"),
        (["predict", "--input", "x.jsonl", "--concurrency", "2"], "apply with --ray"),
        (["predict", "--input", "x.jsonl", "--ray", "--concurrency", "0"], "--concurrency=0 is invalid"),
    ],
)
def test_ray_flags_out_of_place_are_one_line(argv, message, model_dir, capsys):
    assert main([argv[0], "--model", str(model_dir), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_input_files_one_format_at_a_time(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.csv").write_text("text\nx\n")
    with pytest.raises(Exception, match="mixes formats"):
        input_files(str(tmp_path / "*"))
    with pytest.raises(Exception, match="matches no files"):
        input_files(str(tmp_path / "*.parquet"))
    assert input_files(str(tmp_path / "*.jsonl")) == [(tmp_path / "a.jsonl").resolve()]


def test_shard_writer_writes_each_file_whole_and_refuses_rows_out_of_order(tmp_path):
    shards = {"/in/a.jsonl": tmp_path / "a" / "a.jsonl.predictions.jsonl", "/in/b.jsonl": tmp_path / "b.out"}
    shards["/in/empty.jsonl"] = tmp_path / "empty.out"
    writer = _ShardWriter(shards, "jsonl", {"sentence": "text"})
    rows = {"path": ["/in/a.jsonl"] * 3, "sentence": ["x", "y", "z"], "label": ["p", "n", "p"]}
    rows["exit_layer"] = [1, 2, 3]
    writer.add(pd.DataFrame(rows).iloc[:2])
    assert not shards["/in/a.jsonl"].exists()  # not whole yet
    writer.add(pd.concat([pd.DataFrame(rows).iloc[2:], pd.DataFrame({**rows, "path": ["/in/b.jsonl"] * 3})]))
    a = read_jsonl(shards["/in/a.jsonl"])
    assert [(r["row"], r["text"], r["exit_layer"]) for r in a] == [(0, "x", 1), (1, "y", 2), (2, "z", 3)]
    with pytest.raises(RuntimeError, match="out of order"):
        writer.add(pd.DataFrame({**rows, "path": ["/in/a.jsonl"] * 3}))
    writer.close()
    assert [r["row"] for r in read_jsonl(shards["/in/b.jsonl"])] == [0, 1, 2]
    assert shards["/in/empty.jsonl"].read_text() == ""  # an input without rows is done too


def test_a_row_that_is_not_text_costs_only_that_row(model_dir):
    """What each Ray actor does with a batch: rows it cannot classify get an error, the others their answers."""
    predictor = _Predictor(str(model_dir), "text", None, 1, {}, None)
    texts = pd.Series(["fine", "ok \ud800 text", None, "dull"], dtype=object)  # pandas' str dtype refuses \ud800
    batch = pd.DataFrame({"id": [0, 1, 2, 3], "text": texts})
    out = predictor(batch)
    expected = pipeline(model_dir)(["fine", "dull"])
    good = out.iloc[[0, 3]]
    assert list(good["label"]) == [a["label"] for a in expected] and good["error"].isna().all()
    assert list(good["exit_layer"]) == [a["exit_layer"] for a in expected]
    assert "character 3 is a lone surrogate U+D800" in out["error"][1] and "None" in out["error"][2]
    assert pd.isna(out["label"][1]) and out["exit_layer"].isna().tolist() == [False, True, True, False]
    lines = [json.loads(line) for line in _encode(out, "jsonl").decode().splitlines()]
    assert lines[1]["text"] == "ok \ud800 text" and lines[1]["exit_layer"] is None and "error" in lines[1]
    assert "error" not in lines[0] and lines[0]["exit_layer"] == expected[0]["exit_layer"]
    assert _encode(out, "parquet")  # the lone surrogate is stored as U+FFFD


def test_parquet_shards_keep_the_columns():
    import pyarrow.parquet as pq

    frame = pd.DataFrame({"row": [0, 1], "text": ["a", "b"], "label": ["x", None], "score": [0.5, 0.25]})
    table = pq.read_table(io.BytesIO(_encode(frame, "parquet")))
    assert table.to_pydict() == frame.astype(object).where(frame.notna(), None).to_dict(orient="list")


# --- Ray Data ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_data_equals_the_pipeline_on_256_sst2_sentences(ray_cluster, sst2_model, glue_dir):
    from helpers import read_tsv_column

    from pabee.ray import predict_dataset

    sentences = read_tsv_column(glue_dir / "SST-2" / "dev.tsv", "sentence", limit=256)
    expected = pipeline(sst2_model)(sentences)
    dataset = ray_cluster.data.from_items([{"id": i, "text": s} for i, s in enumerate(sentences)])
    rows = predict_dataset(dataset, sst2_model, rows_per_call=100, concurrency=2, threads=1).take_all()
    rows.sort(key=lambda row: row["id"])
    assert [row["text"] for row in rows] == sentences  # every row once, other columns kept
    assert [(r["label"], r["exit_layer"]) for r in rows] == [(a["label"], a["exit_layer"]) for a in expected]
    assert [r["score"] for r in rows] == pytest.approx([a["score"] for a in expected], abs=1e-6)
    assert len({a["exit_layer"] for a in expected}) > 1  # the comparison covers early exits, not just one layer


@pytest.mark.slow
def test_ray_data_runs_an_onnx_export_as_the_pipeline_does(ray_cluster, model_dir, sst2_dev_sentences, tmp_path):
    from pabee.onnx_export import export_onnx
    from pabee.ray import predict_dataset

    exported = export_onnx(model_dir, tmp_path / "onnx", None, 17, False)
    expected = pipeline(exported, backend="onnxruntime")(sst2_dev_sentences)
    dataset = ray_cluster.data.from_items([{"text": s} for s in sst2_dev_sentences])
    rows = predict_dataset(dataset, exported, backend="onnxruntime", rows_per_call=16, concurrency=1).take_all()
    got = sorted((r["text"], r["label"], r["exit_layer"]) for r in rows)  # Ray Data does not promise the order
    assert got == sorted((s, a["label"], a["exit_layer"]) for s, a in zip(sst2_dev_sentences, expected, strict=True))


@pytest.mark.slow
def test_interrupted_job_writes_every_row_exactly_once(ray_cluster, model_dir, glue_dir, tmp_path, monkeypatch):
    from helpers import read_tsv_column

    from pabee.arguments import PredictArguments

    sentences = read_tsv_column(glue_dir / "SST-2" / "dev.tsv", "sentence", limit=600)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for part in range(6):
        lines = [json.dumps({"text": s, "id": f"{part}-{i}"}) for i, s in enumerate(sentences[part * 100 :][:100])]
        (inputs / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    (inputs / "part-6.jsonl").write_text("")
    out = tmp_path / "out"
    args = PredictArguments(model=str(model_dir), input=str(inputs / "*.jsonl"), output=str(out), ray=True)

    finished = []
    original = _ShardWriter._finish

    def finish_then_die(writer):
        if writer.current is not None:
            finished.append(writer.current)
        original(writer)
        if len(finished) == 2:  # killed with two shards written and the third file half read
            raise KeyboardInterrupt

    monkeypatch.setattr(_ShardWriter, "_finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_ray_predict(args)
    monkeypatch.undo()
    written = sorted(out.glob(f"*{SHARD}"))
    assert len(written) == 2
    (out / ".part-5.jsonl.predictions.jsonl.1234.tmp").write_text('{"half": ')  # as a kill mid-write leaves

    result = run_ray_predict(args)
    assert "5 of 7 input files written" in result["summary"] and "(2 done before, skipped)" in result["summary"]
    assert not list(out.glob(".*.tmp"))
    pipe = pipeline(model_dir)
    for part in range(7):
        rows = read_jsonl(out / f"part-{part}.jsonl{SHARD}")
        texts = sentences[part * 100 :][:100] if part < 6 else []
        assert [r["text"] for r in rows] == texts and [r["row"] for r in rows] == list(range(len(texts)))
        assert [r["exit_layer"] for r in rows] == [a["exit_layer"] for a in pipe(texts)] if texts else True
    again = run_ray_predict(args)
    assert again["examples"] == 0 and "(7 done before, skipped)" in again["summary"]


@pytest.mark.slow
def test_a_different_job_may_not_write_into_the_same_folder(ray_cluster, model_dir, tmp_path, capsys):
    (tmp_path / "in.csv").write_text('text\n"a fine, funny film"\n')
    base = ["predict", "--model", str(model_dir), "--input", str(tmp_path / "in.csv"), "--ray"]
    assert main([*base, "--output", str(tmp_path / "out")]) == 0
    assert read_jsonl(tmp_path / "out" / f"in.csv{SHARD}")[0]["text"] == "a fine, funny film"
    assert main([*base, "--output", str(tmp_path / "out"), "--patience", "3"]) == 2
    assert "holds shards of a different job" in capsys.readouterr().err


# --- Ray Serve ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_serve_answers_as_pabee_serve_does(ray_cluster, model_dir, sst2_dev_sentences):
    from ray import serve

    from pabee.ray import deployment

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        options = {"threads": 1, "api_key": "s3cret", "max_texts_per_request": 8, "max_queue": 16}
        options |= {"latency_target_ms": 5000.0, "exit_ladder": "full;static=2", "allow_request_exit": True}
        serve.run(deployment(str(model_dir), replicas=2, **options), name="pabee", route_prefix="/")
        key = {"Authorization": "Bearer s3cret"}
        bodies = [
            b'{"texts": ["fine", ',
            b'{"texts": []}',
            b'{"texts": ["x"], "extra": 1}',
            json.dumps({"texts": ["x"] * 9}).encode(),
            json.dumps({"texts": ["x" * 5001]}).encode(),
        ]
        local = create_app(pipeline(model_dir), threads=1, api_key="s3cret", max_texts_per_request=8, max_queue=16)
        with TestClient(local) as reference, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as ray:
            texts = sst2_dev_sentences[:12]
            answers = ray.post("/predict", json={"texts": texts[:8]}, headers=key).json()["predictions"]
            answers += ray.post("/predict", json={"texts": texts[8:]}, headers=key).json()["predictions"]
            expected = pipeline(model_dir)(texts)
            pairs = [(a["label"], a["exit_layer"]) for a in answers]
            assert pairs == [(a["label"], a["exit_layer"]) for a in expected]
            assert ray.post("/predict", json={"texts": ["x"]}).status_code == 401
            for body in bodies:
                got = ray.post("/predict", content=body, headers=key)
                want = reference.post("/predict", content=body, headers=key)
                assert (got.status_code, got.json()) == (want.status_code, want.json())
                assert 400 <= got.status_code < 500
            health = ray.get("/health").json()
            assert health["max_queue"] == 16 and health["latency_target_ms"] == 5000.0  # the replicas walk a ladder
            assert [rung["setting"] for rung in health["exit_ladder"]] == ["patience 1", "static k=2"]
            own = {
                "texts": texts[:3],
                "exit": {"exit_criterion": "static", "exit_threshold": 2},
                "return_exit_setting": True,
            }
            chosen = ray.post("/predict", json=own, headers=key).json()["predictions"]
            assert {(a["exit_layer"], a["exit_setting"]) for a in chosen} == {(2, "static k=2")}
            assert "pabee_texts_total" in ray.get("/metrics", headers=key).text
    finally:
        serve.shutdown()


# --- outputs belong to one job (issue 27, item 7) ----------------------------------------------------------------


def _done_job(tmp_path, model_dir, out) -> PredictArguments:
    """A job whose inputs all have their shards already (so it needs no Ray), and its arguments."""
    inputs = tmp_path / "in"
    inputs.mkdir(exist_ok=True)
    for name in ("a", "b"):
        (inputs / f"{name}.jsonl").write_text('{"text": "x"}\n')
        (out / f"{name}.jsonl{SHARD}").parent.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.jsonl{SHARD}").write_text('{"row": 0}\n')
    return PredictArguments(model=str(model_dir), input=str(inputs), output=str(out), ray=True)


@pytest.fixture
def no_ray(monkeypatch):
    """These jobs have nothing to run: starting Ray would be a failure (and slow)."""
    monkeypatch.setattr("pabee.ray.batch_predict.connect", lambda address: pytest.fail("Ray was started"))


def test_a_second_job_on_the_same_output_folder_gets_a_clear_error(tmp_path, model_dir, no_ray):
    from pabee.errors import PabeeError
    from pabee.ray.batch_predict import _OutputLock

    out = tmp_path / "out"
    args = _done_job(tmp_path, model_dir, out)
    with _OutputLock(out), pytest.raises(PabeeError, match=r"is in use by another pabee predict --ray job \(process"):
        run_ray_predict(args)
    assert "0 of 2 input files written (2 done before, skipped)" in run_ray_predict(args)["summary"]  # released


def test_a_job_removes_its_own_temporary_files_only(tmp_path, model_dir, no_ray):
    out = tmp_path / "out"
    args = _done_job(tmp_path, model_dir, out)
    (out / f".a.jsonl{SHARD}.1234.tmp").write_text('{"half": ')  # a killed run of this job left it
    (out / ".someone-else.tmp").write_text("theirs")
    (out / "notes.tmp").write_text("theirs")
    run_ray_predict(args)
    assert sorted(p.name for p in out.iterdir() if "tmp" in p.name) == [".someone-else.tmp", "notes.tmp"]


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path, model_dir, no_ray):
    out = tmp_path / "in" / "predictions"
    args = _done_job(tmp_path, model_dir, out)
    result = run_ray_predict(args)  # before: the shards in in/predictions were inputs too, with no shard yet
    assert "0 of 2 input files written" in result["summary"]
    assert input_files(str(tmp_path / "in"), exclude=out) == sorted((tmp_path / "in").glob("*.jsonl"))


@pytest.mark.slow
def test_overwrite_removes_the_old_jobs_shards_before_writing(ray_cluster, model_dir, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a", "b"):
        (inputs / f"{name}.jsonl").write_text('{"text": "a fine film"}\n')
    base = ["predict", "--model", str(model_dir), "--ray", "--output", str(out), "--threads", "1"]
    assert main([*base, "--input", str(inputs)]) == 0
    assert sorted(p.name for p in out.glob(f"*{SHARD}")) == [f"a.jsonl{SHARD}", f"b.jsonl{SHARD}"]
    (inputs / "b.jsonl").unlink()
    assert main([*base, "--input", str(inputs / "a.jsonl"), "--overwrite", "--patience", "3"]) == 0
    assert [p.name for p in out.glob(f"*{SHARD}")] == [f"a.jsonl{SHARD}"]  # b's shard was the old job's
    assert json.loads((out / "pabee_predict.json").read_text())["shards"] == [f"a.jsonl{SHARD}"]
