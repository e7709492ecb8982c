"""Where the models' pipelines run: here, one after the other (`executor = "local"`), or on a Ray cluster, one actor
per model (`executor = "ray"`; docs/scale.md).

A cell is one model's whole pipeline in its own run directory (crossmodel's RUN/models/<name>/, or the run
directory itself for a run of one model): `run_pipeline` exactly as a local run calls it, so a cell writes the same
files through the same writer, resumes from the same chunks, and keeps the same manifest. On Ray each cell is one
actor that declares what it needs (`ray.num_cpus_per_model`, `ray.num_gpus_per_model`, `ray.memory_gb`); the
worker process loads the model once and runs every stage of it. A worker that dies (killed, out of memory, a lost
node) is restarted by Ray (`max_restarts`) and the cell retried (`max_task_retries`): the retried `run_pipeline`
finds the finished stages and chunks in the run directory and continues where the dead one stopped. The run
directory must be on a file system every node mounts at the same path.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from steerstrength.config import RunConfig
from steerstrength.errors import InputError, RunError, SteerStrengthError

POLL_SECONDS = 1.0
LOCK_WAIT_SECONDS = 60.0


@dataclass
class Cell:
    """One model's pipeline: its name (folder), its single-model config and its run directory."""

    name: str
    cfg: RunConfig
    out: Path


@dataclass
class CellState:
    """What the progress view shows of a cell (read from its run directory's manifest)."""

    name: str
    state: str = "waiting"  # waiting (queued, or loading its model), running, done, failed
    stage: str = ""  # the stage it is in
    stages_done: int = 0
    n_stages: int = 0
    error: str = ""


def run_cells(cfg: RunConfig, cells: list[Cell], *, progress, log: Callable[[str], None],
              only: list[str] | None = None, watch: Callable[[list[CellState]], None] | None = None) -> dict:
    """Run (or resume) every cell with `cfg.executor`: {cell name: its run_pipeline results}.

    `watch(states)` is called as cells start, move through their stages and finish (Ray only: a local run shows its
    stages' own progress bars).
    """
    if cfg.executor == "ray":
        return run_ray(cfg, cells, log=log, only=only, watch=watch)
    from steerstrength.pipeline import run_pipeline

    results = {}
    for cell in cells:
        if cfg.models:
            log(f"[models] {cell.name} ({cell.cfg.model.spec}) in {cell.out}")
        results[cell.name] = run_pipeline(cell.cfg, cell.out, progress=progress, log=log, only=only)
    return results


# ----------------------------------------------------------------------------- Ray


def require_ray():
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError("executor=ray needs Ray, which is not installed: pip install 'steerstrength[ray]'") from None
    return ray


class ModelCell:
    """One model's pipeline in one Ray worker process (`ray.remote(ModelCell)`): the model loads once, there."""

    def __init__(self, cfg: RunConfig, out: str, only: list[str] | None, cwd: str):
        if os.path.isdir(cwd):  # relative paths in the config mean what they meant to the driver
            os.chdir(cwd)
        self.cfg, self.out, self.only = cfg, out, only
        self.name = Path(out).name
        self._model = None

    def model(self):
        """The model, loaded on first use and kept for every call this actor serves."""
        if self._model is None:
            from steerstrength.pipeline import load_run_model

            self._model = load_run_model(self.cfg)
        return self._model

    def run(self, only: list[str] | None = None) -> dict:
        """The model's pipeline (`only` these stages; default: the run's)."""
        from steerstrength.pipeline import check_names, run_pipeline
        from steerstrength.stages import no_progress

        check_names(self.cfg)
        self.wait_for_lock()
        return run_pipeline(self.cfg, self.out, progress=no_progress, log=self.log,
                            only=self.only if only is None else only, model=self.model())

    def run_vector(self, concept: str, layer: int) -> list[str]:
        """One vector's share of the long stages: its chunks, in the model's run directory (pipeline.run_vector)."""
        from steerstrength.pipeline import run_vector
        from steerstrength.stages import no_progress

        return run_vector(self.cfg, self.out, concept, layer, progress=no_progress, log=self.log, model=self.model())

    def wait_for_lock(self) -> None:
        """A cell re-run right after its driver was killed may find the old worker still stopping, holding the run
        directory's lock: wait a while for it (a run that really goes on then gets run_pipeline's one-line error)."""
        from filelock import FileLock, Timeout

        path = Path(self.out) / ".lock"
        if path.is_file():
            lock = FileLock(str(path))
            try:
                lock.acquire(timeout=LOCK_WAIT_SECONDS)
                lock.release()
            except Timeout:
                pass

    def log(self, line: str) -> None:
        print(f"[{self.name}] {line}", flush=True)  # Ray forwards a worker's output to the driver's terminal


def actor_options(cfg: RunConfig) -> dict:
    """The resources a model's actor declares, and how often Ray restarts it and retries its cell."""
    r = cfg.ray
    options = dict(num_cpus=r.num_cpus_per_model, num_gpus=r.num_gpus_per_model or 0,
                   max_restarts=r.max_retries, max_task_retries=r.max_retries)
    if r.memory_gb:
        options["memory"] = int(r.memory_gb * 2**30)
    return options


@contextmanager
def ray_session(cfg: RunConfig, log: Callable[[str], None]) -> Iterator:
    """Ray, connected: to `ray.address`, to a new local instance when it is none, or as the caller already has it."""
    ray = require_ray()
    if ray.is_initialized():  # a notebook or a test that started Ray itself: use it and leave it running
        yield ray
        return
    address = cfg.ray.address
    try:
        context = ray.init(address=address, logging_level=logging.ERROR, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot start or reach {where} ({first}); start one with `ray start --head` or set "
                         "--ray-address") from None
    url = getattr(context, "dashboard_url", None)
    log(f"[ray] {'connected to ' + address if address else 'started a local Ray instance'}"
        + (f"; dashboard {url if '://' in url else 'http://' + url}" if url else
           " (no dashboard: pip install 'ray[default]')"))
    try:
        yield ray
    finally:
        ray.shutdown()


def check_resources(ray, cfg: RunConfig, n_actors: int = 1) -> None:
    """A model that asks for more than the whole cluster has would wait forever: one line instead."""
    total = ray.cluster_resources()
    options = actor_options(cfg)
    asked = {"CPU": n_actors * options["num_cpus"], "GPU": n_actors * options["num_gpus"],
             "memory": n_actors * options.get("memory", 0)}
    keys = {"CPU": "ray.num_cpus_per_model", "GPU": "ray.num_gpus_per_model", "memory": "ray.memory_gb"}
    for resource, need in asked.items():
        have = total.get(resource, 0)
        if need and have < need:
            shown = (lambda x: f"{x / 2**30:.1f} GB") if resource == "memory" else (lambda x: f"{x:g}")
            each = f"{n_actors} actors x " if n_actors > 1 else ""
            raise InputError(f"each model asks for {each}{shown(need / n_actors)} {resource} ({keys[resource]}) but the "
                             f"Ray cluster has "
                             f"{shown(have)}; add nodes or lower {keys[resource]}"
                             + ("=none" if resource == "GPU" else ""))


def cell_state(cell: Cell, state: CellState, keys: Callable[[str | None], dict], wanted: list[str]) -> CellState:
    """The stage a cell is in and how many of its stages are finished, from its manifest; `keys(fingerprint)` are
    the cell's stage keys for the model weights its manifest records (the driver loads no model)."""
    try:
        manifest = json.loads((Path(cell.out) / "manifest.json").read_text(encoding="utf-8"))
        stages = manifest.get("stages") or {}
        keys = keys(manifest.get("model_fingerprint"))
    except (OSError, ValueError, AttributeError):
        stages = {}
    finished = [s for s in wanted if isinstance(stages.get(s), dict) and (
        stages[s].get("status") == "skipped" or stages[s].get("status") == "done" and stages[s].get("key") == keys[s])]
    running = [s for s in wanted if isinstance(stages.get(s), dict) and stages[s].get("status") == "running"]
    state.stages_done = len(finished)
    if state.state in ("waiting", "running"):
        state.stage = running[0] if running else ""
        state.state = "running" if running or finished else state.state
    return state


def failure_line(exc: BaseException) -> str:
    """One line for a failed cell: its own error, not Ray's wrapping of it."""
    cause = getattr(exc, "cause", None) or exc
    name = type(exc).__name__
    if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError"):
        return "its worker died more often than ray.max_retries allows (out of memory? see the Ray logs)"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def run_ray(cfg: RunConfig, cells: list[Cell], *, log: Callable[[str], None], only: list[str] | None = None,
            watch: Callable[[list[CellState]], None] | None = None) -> dict:
    """Every model as Ray actors, all at once (Ray places them as resources free up); {name: results}.

    With `ray.actors_per_model` = 1 a model's actor runs its pipeline. With more (and prompts and vectors among the
    stages run), its actors are placed together (a placement group) and its pipeline runs in three steps: prompts and vectors on the first actor; then each vector's (concept, layer) share of the
    long stages (pipeline.PER_VECTOR_STAGES) on the model's actors in parallel, each filling its resumable chunks; then the first
    actor runs the pipeline, which finds every chunk and writes the tables a local run writes.
    """
    from steerstrength.pipeline import PER_VECTOR_STAGES, STAGES, enabled, run_vectors, stage_keys

    wanted = [s for s in STAGES if not only or s in only]
    n_actors = cfg.ray.actors_per_model
    phased = (n_actors > 1 and (not only or {"prompts", "vectors"} <= set(only))
              and any(enabled(c.cfg, s)[0] and s in wanted for c in cells[:1] for s in PER_VECTOR_STAGES))
    with ray_session(cfg, log) as ray:
        check_resources(ray, cfg, n_actors if phased else 1)
        remote_cell = ray.remote(ModelCell)
        actor_class = remote_cell.options(**actor_options(cfg))
        cwd = os.getcwd()
        states = {c.name: CellState(c.name, n_stages=len(wanted)) for c in cells}
        keys = {c.name: functools.lru_cache(maxsize=4)(functools.partial(stage_keys, c.cfg)) for c in cells}
        actors: dict[str, list] = {}
        refs: dict = {}  # ref -> (model cell, step)
        open_vectors: dict[str, int] = {}  # model -> its vectors' shares still running
        results, failed = {}, {}

        def submit(cell: Cell, step: str, ref) -> None:
            refs[ref] = (cell, step)

        groups: dict = {}  # model -> its placement group (phased runs: all its actors are placed together)

        def start(cell: Cell, group=None) -> None:
            out = str(Path(cell.out).resolve())
            klass = actor_class
            if group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                klass = remote_cell.options(**actor_options(cfg),
                                            scheduling_strategy=PlacementGroupSchedulingStrategy(group))
            actors[cell.name] = [klass.remote(cell.cfg, out, only, cwd) for _ in range(n_actors if phased else 1)]
            first = actors[cell.name][0]
            submit(cell, "vectors" if phased else "run",
                   first.run.remote(["prompts", "vectors"]) if phased else first.run.remote())

        try:
            for cell in cells:
                if cfg.models:
                    log(f"[models] {cell.name} ({cell.cfg.model.spec}) in {cell.out}: "
                        f"{n_actors if phased else 1} Ray actor(s)")
                if phased:
                    # All of a model's actors or none: an actor placed while its siblings wait for resources held by
                    # other models' actors would hold its cells hostage.
                    from ray.util.placement_group import placement_group

                    options = actor_options(cfg)
                    bundle = {k: v for k, v in (("CPU", options["num_cpus"]), ("GPU", options["num_gpus"]),
                                                ("memory", options.get("memory", 0))) if v}
                    groups[cell.name] = placement_group([bundle] * n_actors, strategy="PACK")
                    submit(cell, "placed", groups[cell.name].ready())
                else:
                    start(cell)
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_SECONDS)
                for ref in ready:
                    cell, step = refs.pop(ref)
                    if cell.name in failed:
                        continue
                    state = cell_state(cell, states[cell.name], keys[cell.name], wanted)
                    try:
                        value = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - reported per model below; the other models go on
                        failed[cell.name] = exc
                        state.state, state.error = "failed", failure_line(exc)
                        log(f"[ray] {cell.name} failed: {state.error}")
                        for actor in actors.pop(cell.name, []):
                            ray.kill(actor)
                        if cell.name in groups:
                            from ray.util.placement_group import remove_placement_group

                            remove_placement_group(groups.pop(cell.name))
                        continue
                    if step == "placed":
                        start(cell, groups[cell.name])
                    elif step == "vectors":  # the model's vectors, spread over its actors
                        todo = run_vectors(cell.cfg, cell.out)
                        open_vectors[cell.name] = len(todo)
                        state.stage = f"vectors 0/{len(todo)}"
                        for i, (concept, layer) in enumerate(todo):
                            submit(cell, "vector", actors[cell.name][i % n_actors].run_vector.remote(concept, layer))
                        if not todo:
                            submit(cell, "run", actors[cell.name][0].run.remote())
                    elif step == "vector":
                        open_vectors[cell.name] -= 1
                        if open_vectors[cell.name] == 0:  # every chunk is there: the pipeline assembles the tables
                            submit(cell, "run", actors[cell.name][0].run.remote())
                    else:
                        results[cell.name] = value
                        state.state, state.stage = "done", ""
                        for actor in actors.pop(cell.name, []):
                            ray.kill(actor)  # its CPUs / GPU go to the next model now
                        if cell.name in groups:
                            from ray.util.placement_group import remove_placement_group

                            remove_placement_group(groups.pop(cell.name))
                for cell in cells:
                    st = cell_state(cell, states[cell.name], keys[cell.name], wanted)
                    if st.state == "running" and open_vectors.get(cell.name):
                        n = sum(1 for c, step in refs.values() if c.name == cell.name and step == "vector")
                        st.stage = f"vectors: {n} of the long stages' (concept, layer) shares left"
                if watch is not None:
                    watch(list(states.values()))
        finally:
            for group in actors.values():  # interrupted: stop the actors still running (their chunks are kept)
                for actor in group:
                    ray.kill(actor)
            if groups:
                from ray.util.placement_group import remove_placement_group

                for group in groups.values():
                    remove_placement_group(group)
    if failed:
        if len(failed) == 1:
            exc = next(iter(failed.values()))
            cause = getattr(exc, "cause", None)
            if isinstance(cause, SteerStrengthError):
                raise cause
        lines = "; ".join(f"{name}: {states[name].error}" for name in failed)
        raise RunError(f"{len(failed)} of {len(cells)} model runs failed ({lines}); the finished stages are kept and "
                       "the same command resumes")
    return results
