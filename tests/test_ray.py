"""`executor = "ray"`: each model's pipeline is one Ray actor; on a local 2-CPU Ray cluster a run over several models,
concepts and layers writes exactly the local executor's tables, and a worker killed mid-run is restarted and resumes."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from cliutil import error_lines, run_cli
from steerstrength.config import build_config
from steerstrength.crossmodel import run_models
from steerstrength.errors import InputError
from steerstrength import executors
from steerstrength.pipeline import stage_keys
from steerstrength.pipeline import STAGES
from test_pipeline import SMALL, Quiet, tables
from tiny import FLOAT32, WORDS, save_tiny_models

# Two models x two concepts x two layers; the judged completions and MMLU are left to test_pipeline, and Delta CE
# reads a small corpus file (time: tokenizing the packaged Wikipedia corpus takes most of a tiny model's run).
GRID = SMALL + ["concept.enabled=false", "mmlu.enabled=false", "concepts=joy,evil", "layers=1,2"]
COMPUTED = ("prompts", "vectors", "tokens", "logodds", "depth", "limit", "xent")
TABLES = [s for s in STAGES if s not in ("figures", "report")]  # the runs compare tables; `plot` draws the rest once


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is the optional extra steerstrength[ray] (`make test` installs it)")
    try:
        ray.init(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - a machine where Ray itself cannot start (no shared memory, sandboxing)
        pytest.skip(f"a local Ray instance cannot start on this machine: {type(exc).__name__}: {exc}")
    yield ray
    ray.shutdown()


@pytest.fixture
def worker_killed_after(monkeypatch):
    """kill(stage, marker): the first actor whose pipeline logs `[stage] done` SIGKILLs its own worker process (as the
    kernel's OOM killer would), once: the marker file records that it happened. The actor class is defined here, so
    Ray ships it to the workers by value; production code carries no fault hook."""

    def kill(stage: str, marker: Path) -> None:
        class DyingCell(executors.ModelCell):
            def log(self, line: str) -> None:
                import os
                import signal

                super().log(line)
                if line.startswith(f"[{stage}] done"):
                    try:
                        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # once, whichever is first
                    except FileExistsError:
                        return
                    os.kill(os.getpid(), signal.SIGKILL)

        monkeypatch.setattr(executors, "ModelCell", DyingCell)

    return kill


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(24))}) + "\n"
                            for i in range(8)))
    return path


def grid(paths, corpus, *extra):
    return build_config("demo", None, GRID + [f"xent.corpus={corpus}", "models=" + ",".join(map(str, paths))]
                        + list(extra))


@pytest.fixture(scope="module")
def local_run(models, corpus, tmp_path_factory):
    """The reference: the same grid with the local executor (one model after the other, in this process)."""
    out = tmp_path_factory.mktemp("local") / "run"
    run_models(grid(models, corpus, "executor=local"), out, progress=Quiet(), log=lambda m: None, only=TABLES)
    return out


def assert_same_tables(a_dir, b_dir):
    a, b = tables(a_dir), tables(b_dir)
    assert a.keys() == b.keys() and a
    for name in a:
        if isinstance(a[name], str):
            assert a[name] == b[name], name
        else:
            # An actor runs with its own thread count (ray.num_cpus_per_model): the same values, not the same bits.
            pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, obj=name, **FLOAT32)


def stage_status(manifest: Path, stage: str):
    """A stage's status in a manifest (written atomically, so whole or absent)."""
    return json.loads(manifest.read_text())["stages"].get(stage, {}).get("status") if manifest.is_file() else None


def statuses(results: dict) -> dict:
    return {stage: status for stage, (status, _, _) in results.items()}


def test_the_executor_is_no_part_of_any_stage_key():
    local = build_config("demo", None, [])
    ray = build_config("demo", None, ["executor=ray", "ray.address=auto", "ray.num_gpus_per_model=0.5",
                                      "ray.memory_gb=8", "ray.max_retries=1", "ray.num_cpus_per_model=4"])
    assert (ray.executor, ray.ray.num_gpus_per_model, ray.ray.memory_gb) == ("ray", 0.5, 8)
    assert stage_keys(local) == stage_keys(ray)  # a local and a Ray run of one config reuse each other's results
    assert build_config("paper").ray.num_gpus_per_model == 1  # the paper preset: one model per GPU


@pytest.mark.parametrize("override, message", [
    ("executor=dask", "executor must be local or ray"),
    ("ray.num_gpus_per_model=0", "ray.num_gpus_per_model must be a positive finite number (or none)"),
    ("ray.memory_gb=-2", "ray.memory_gb must be a positive"),
    ("ray.max_retries=-1", "ray.max_retries must be at least 0"),
    ("ray.num_cpus_per_model=0", "ray.num_cpus_per_model must be at least 1"),
    ("ray.address=''", "ray.address must be a cluster address"),
])
def test_bad_executor_settings_are_one_line(override, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config("demo", None, [override])


def test_without_ray_the_ray_executor_is_one_line_naming_the_extra(models, corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    for args in (["--executor", "ray"], ["executor=ray"], ["--ray-address", "auto"]):
        out = tmp_path / "out"
        code, _, err = run_cli(["run", f"models={models[0]},{models[1]}", *args, "--out", out], monkeypatch, capsys,
                               quiet=True)
        lines = [line for line in error_lines(err) if "error" in line.lower()]
        assert code == 2 and len(lines) == 1 and "pip install 'steerstrength[ray]'" in lines[0], err
        assert not out.exists()
    with pytest.raises(InputError, match=r"steerstrength\[ray\]"):
        run_models(grid(models, corpus, "executor=ray"), tmp_path / "api", progress=Quiet(), log=lambda m: None)
    assert not (tmp_path / "api").exists()
    # the local executor never imports Ray
    code, _, err = run_cli(["run", f"model.spec={models[0]}", *GRID, "--only", "prompts", "--out", tmp_path / "local"],
                           monkeypatch, capsys, quiet=True)
    assert code == 0, err


def test_ray_run_of_the_grid_writes_the_local_tables_exactly(ray_cluster, models, corpus, local_run, tmp_path,
                                                             monkeypatch, capsys):
    """Two actors per model: the (concept, layer) cells of tokens and xent run on both, then the pipeline assembles."""
    out = tmp_path / "ray"
    seen = []
    results = run_models(grid(models, corpus, "executor=ray", "ray.actors_per_model=2"), out, progress=Quiet(),
                         log=lambda m: None, only=TABLES,
                         watch=lambda states: seen.append([(s.name, s.state, s.stages_done) for s in states]))
    assert set(results) == {"tiny-gpt2", "tiny-llama"}
    for name, res in results.items():
        # prompts and vectors ran first (step 1), so the final pipeline finds them; tokens and xent it builds from the
        # cells' chunks (step 2; that it computes none of them is tests/test_pipeline.py's cells test)
        assert {statuses(res)[s] for s in ("prompts", "vectors")} == {"cached"}, (name, res)
        assert {statuses(res)[s] for s in COMPUTED[2:]} == {"done"}, (name, res)
        chunks = out / "models" / name / ".chunks"
        assert len(list((chunks / "xent").glob("*/*.done"))) >= 4 and len(list((chunks / "tokens").glob("*/*.done"))) >= 4
        assert_same_tables(local_run / "models" / name, out / "models" / name)
        # the manifest is as true as a local run's: the same stage keys, every output recorded, finished
        ours, theirs = (json.loads((d / "models" / name / "manifest.json").read_text()) for d in (out, local_run))
        assert ours["finished"] and {s: r.get("key") for s, r in ours["stages"].items()} == {
            s: r.get("key") for s, r in theirs["stages"].items()}
        assert ours["stages"]["xent"]["files"].keys() == theirs["stages"]["xent"]["files"].keys()
        tokens = pd.read_parquet(out / "models" / name / "tables" / "tokens.parquet")
        assert set(tokens["layer"]) == {1, 2} and set(tokens["concept"]) == {"joy", "evil"}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "tables" / "badges.parquet"),
                                  pd.read_parquet(local_run / "tables" / "badges.parquet"), check_exact=False, **FLOAT32)
    assert (out / "report.html").is_file() and (out / "figures" / "fig6_models_evil.png").is_file()
    # the progress view saw the cells run and finish
    assert seen[-1] == [("tiny-gpt2", "done", len(TABLES)), ("tiny-llama", "done", len(TABLES))]
    assert any(state == "running" for snapshot in seen for _, state, _ in snapshot)

    # a local run of the same config finds every stage done (the executor is not in any stage key) ...
    again = run_models(grid(models, corpus, "executor=local"), out, progress=Quiet(), log=lambda m: None, only=TABLES)
    assert all(set(statuses(r).values()) <= {"cached", "skipped"} for r in again.values()), again
    # ... and so does the CLI on Ray, which shows the cells as they finish
    code, _, err = run_cli(["run", f"models={models[0]},{models[1]}", *GRID, f"xent.corpus={corpus}", "--executor",
                            "ray", "--only", ",".join(TABLES), "--out", out], monkeypatch, capsys, quiet=True)
    assert code == 0, err
    assert "cells: 2 done, 0 running, 0 waiting, 0 failed of 2" in err


def test_a_worker_killed_mid_run_is_restarted_and_resumes_to_the_local_tables(ray_cluster, models, corpus, local_run,
                                                                              tmp_path, monkeypatch, capsys,
                                                                              worker_killed_after):
    marker = tmp_path / "killed"
    worker_killed_after("tokens", marker)  # the worker SIGKILLs itself once its tokens stage is done
    out = tmp_path / "ray"
    results = run_models(grid(models[:1], corpus, "executor=ray"), out, progress=Quiet(), log=lambda m: None,
                         only=TABLES)
    assert marker.is_file()  # the worker was killed ...
    retried = statuses(results["tiny-gpt2"])
    # ... Ray restarted it and retried the cell, which found the stages finished before the kill in its run directory
    assert [retried[s] for s in COMPUTED] == ["cached"] * 3 + ["done"] * 4, retried
    assert_same_tables(local_run / "models" / "tiny-gpt2", out / "models" / "tiny-gpt2")
    assert json.loads((out / "models" / "tiny-gpt2" / "manifest.json").read_text())["finished"]
    # `steerstrength plot` draws a Ray run's figures and reports as it does a local run's
    code, _, err = run_cli(["plot", out], monkeypatch, capsys, quiet=True)
    assert code == 0, err
    assert (out / "models" / "tiny-gpt2" / "report.html").is_file() and (out / "report.html").is_file()
    assert (out / "models" / "tiny-gpt2" / "figures" / "index.json").is_file()


def test_a_killed_driver_is_rerun_and_resumes_to_the_local_tables(ray_cluster, models, corpus, local_run, tmp_path):
    out = tmp_path / "ray"
    command = [str(Path(sys.executable).parent / "steerstrength"), "--quiet", "run", f"models={models[0]}", *GRID,
               f"xent.corpus={corpus}", "--ray-address", ray_cluster.get_runtime_context().gcs_address,
               "--only", ",".join(TABLES), "--out", str(out)]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = out / "models" / "tiny-gpt2" / "manifest.json"
    try:
        while driver.poll() is None and stage_status(manifest, "tokens") != "done":
            time.sleep(0.1)
    finally:
        driver.kill()  # the driver dies; Ray stops the actors it owned
        err = driver.communicate()[1].decode()
    assert driver.returncode == -9, err  # killed mid-run, not finished
    assert stage_status(manifest, "tokens") == "done" and stage_status(manifest, "xent") != "done"
    results = run_models(grid(models[:1], corpus, "executor=ray"), out, progress=Quiet(), log=lambda m: None,
                         only=TABLES)
    resumed = statuses(results["tiny-gpt2"])
    assert [resumed[s] for s in COMPUTED[:3]] == ["cached"] * 3 and resumed["xent"] == "done", resumed
    assert_same_tables(local_run / "models" / "tiny-gpt2", out / "models" / "tiny-gpt2")


def test_a_failing_cell_is_its_own_error_and_the_others_finish(ray_cluster, models, corpus, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # a directory, but no model transformers can load
    with pytest.raises(Exception, match="broken-model") as info:
        run_models(grid([models[0], broken], corpus, "executor=ray"), tmp_path / "run", progress=Quiet(),
                   log=lambda m: None, only=["prompts"])
    assert type(info.value).__name__ == "ModelLoadError"  # the cell's own error, not Ray's wrapping of it
    manifest = json.loads((tmp_path / "run" / "models" / "tiny-gpt2" / "manifest.json").read_text())
    assert manifest["stages"]["prompts"]["status"] == "done"
