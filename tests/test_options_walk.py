"""Every option of every command is honoured or refused, never ignored (DESIGN.md; issue 27 item 7).

The command tree is introspected (typer's click commands), so a new option fails this test until it has a value here.
For each command, a small invocation on tiny models (the baseline) runs once; then each option, given a value other
than its default, must either change what the command writes (its files under --out, and stdout: tables and JSON,
timings left out) or be refused with one line and exit code 2. ALLOWED lists the few options whose effect cannot show
in the output, each with the reason."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cliutil import error_lines, run_cli
from tiny import tiny_model

# Options whose effect is not observable in the output, with the reason (keep this small).
ALLOWED = {
    "--out": "where the output goes: every other case of this walk reads its files from there",
    "--device": "the test machine has only the CPU, which the baseline already uses",
    "--quiet": "progress bars only, which go to the terminal, not to the output",
    "--batch-size": "a memory/speed knob: results are equal up to float rounding, and no test asserts bit equality "
                    "across batch sizes (train-tiny's is checked: it changes the training)",
    "--token-budget": "sweep mmlu's memory bound (rows x tokens per forward): the same numbers, in more forwards",
    "run --executor": "local or Ray write the same tables (tests/test_ray.py); a Ray cluster is too slow for this walk",
    "run --ray-address": "the Ray cluster to run on (tests/test_ray.py); implies --executor ray",
    "plot run_dir": "its only argument: the run it reads and writes",
    "export-gguf out": "its output file (as --out elsewhere)",
    "train-tiny --minutes": "a wall-clock budget: with --steps the training ends first",
    "train-tiny --force": "replaces a non-empty --out (tests/test_train_tiny.py); the walk's --out starts empty",
    "vectors scan --preset": "the presets' scan keys (scan_top_k, batch_size, max_length) are equal; the section "
                             "is read as `vectors --preset` reads it",
}
# theory figures builds its world from the same option objects (cli/theory.py) as theory verify, walked there; drawing
# its figures takes seconds per case.
SAME_AS_VERIFY = ("--groups", "--size", "--context-length", "--eps", "--d", "--negatives", "--q", "--target", "--seed",
                  "--alpha-max", "--alpha-points", "--steps", "--lr")


@dataclass
class Replace:
    """A positional argument's value: the whole invocation with it, compared with the baseline."""

    args: list


@dataclass
class Walk:
    base: list  # the baseline invocation; "{out}" is the output directory
    values: dict  # option -> [args] or [(args, extra args added to the baseline for this option)]
    stdout: bool = True  # compare stdout too (run's table holds timings)
    done: tuple = (0,)  # exit codes of a command that ran (theory verify: 1 when a claim fails its check)


def commands() -> dict:
    """{'sweep tokens': click command, ...}: every command of the CLI that takes parameters."""
    import typer

    from steerstrength.cli import app

    found = {}

    def walk(cmd, path):
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])
        if cmd.params:
            found[" ".join(path)] = cmd

    walk(typer.main.get_command(app), [])
    return found


def option_names(cmd) -> list[str]:
    return [p.opts[0] if p.opts and p.opts[0].startswith("-") else p.name for p in cmd.params]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Tiny models (llama; gpt2 of the same width; a wider one), vector files, texts, a corpus, a config file."""
    root = tmp_path_factory.mktemp("walk")
    for name, arch, seed in (("model", "llama", 0), ("model2", "gpt2", 1)):
        m = tiny_model(arch, seed=seed)
        m.hf.save_pretrained(root / name)
        m.tokenizer.save_pretrained(root / name)
    import transformers

    wide = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=m.vocab_size, n_layer=1, n_embd=48, bos_token_id=1,
                                                                eos_token_id=2, pad_token_id=0,
                                                                n_head=2, n_positions=64))
    wide.save_pretrained(root / "wide_model")
    m.tokenizer.save_pretrained(root / "wide_model")
    torch.manual_seed(0)
    d = 32
    from steerstrength import SteeringVectors

    for name in ("v", "v2"):
        SteeringVectors({1: torch.randn(d), 2: torch.randn(d)}, dict(concept="joy", setting="random")).save(
            root / f"{name}.safetensors")
    SteeringVectors({1: torch.randn(48)}).save(root / "wide.safetensors")
    words = "i am happy and glad today my friend . the sun and the rain on the house".split()

    def texts(name, n, shift, **extra):
        rows = [" ".join(words[(i + shift) % 7:(i + shift) % 7 + 6]) for i in range(n)]
        (root / name).write_text("".join(json.dumps(dict(text=t, **extra)) + "\n" for t in rows))
        return root / name

    files = dict(model=root / "model", model2=root / "model2", wide_model=root / "wide_model", v=root / "v.safetensors",
                 v2=root / "v2.safetensors", wide=root / "wide.safetensors",
                 p=texts("p.jsonl", 9, 0), n=texts("n.jsonl", 9, 5), p2=texts("p2.jsonl", 9, 2),
                 n2=texts("n2.jsonl", 9, 3), prompts=root / "prompts.txt", contexts=root / "contexts.txt",
                 corpus=root / "corpus.jsonl", corpus2=root / "corpus2.txt", config=root / "run.toml")
    (root / "prompts.txt").write_text("the cat saw\nmy friend is\nthe house was\n")
    (root / "contexts.txt").write_text("the cat saw the\nmy friend is so\nthe rain on\n")
    (root / "corpus.jsonl").write_text("".join(json.dumps(dict(text=" ".join(words[i % 5:]), body=" ".join(words[:8])))
                                               + "\n" for i in range(12)))
    (root / "corpus2.txt").write_text("".join(" ".join(words[i % 3:]) + "\n" for i in range(12)))
    from steerstrength.config import build_config, to_toml

    files["config"].write_text(to_toml(build_config("demo", None, [f"model.spec={root / 'model'}", "layers=1",
                                                                   "seed=5"])))
    return files


def specs(f: dict) -> dict:
    """The walk of every command: its baseline and a non-default value for each option."""
    grid = {"--alpha-min": ["-0.5"], "--alpha-max": ["3"], "--n-alphas": ["6"], "--alphas": ["-1,0,1"]}
    steer = {"--vectors": [f["v2"]], "--layers": ["2"], "--positions": ["last"], "--normalize": ["--normalize"],
             "--alpha-unit": ["raw"], "--concept": ["evil"], "--setting": ["contrastive"], "--preset": ["paper"],
             "--model": [f["model2"]], "--dtype": ["bfloat16"], "--blocks-path": ["model.embed_tokens"]}
    tiny = ["--model", f["model"], "--vectors", f["v"], "--device", "cpu", "--out", "{out}"]
    small = ["--n-alphas", "4", "--n-contexts", "2"]  # a baseline of seconds: --alphas is then refused, which counts
    ctx = {"--contexts": [f["contexts"]], "--n-contexts": ["1"], "--chat": ["--chat"]}
    llm_judge = ["--judge", "llm"]
    sweet = ["--method", "sweet-spot", "-p", f["p"], "-n", f["n"]]  # sweet-spot's targets come from P and N
    return {
        "models show": Walk([f["model"], "--device", "cpu"], {
            "spec": [Replace([f["model2"], "--device", "cpu"])], "--dtype": ["bfloat16"], "--blocks-path": ["model.embed_tokens"]}),
        "plot": Walk([], {}),  # its one argument is in ALLOWED
        "config show": Walk([], {"--preset": ["paper"], "--config": [f["config"]], "overrides": ["seed=3"]}),
        "run": Walk([f"model.spec={f['model']}", "layers=1", "--only", "prompts", "--out", "{out}"], {
            "overrides": ["concepts=evil"], "--preset": ["paper"], "--config": [f["config"]],
            "--only": ["prompts,vectors"]}, stdout=False),
        "prompts": Walk(["--concept", "joy", "--out", "{out}/p.jsonl", "--n", "2", "--max-new-tokens", "4", "--model",
                         f["model"], "--device", "cpu"], {
            "--concept": ["evil"], "--kind": ["negative"], "--setting": [(["random"], ["--kind", "negative"])],
            "--n": ["3"], "--max-new-tokens": ["6"], "--temperature": ["0.5"], "--top-p": ["0.5"], "--top-k": ["3"],
            "--seed": ["1"], "--opposite": [(["sad"], ["--kind", "negative"])], "--generator": [f["model2"]],
            "--model": [f["model2"]], "--from-file": [f["p"]],
            # bfloat16 moves a sampled token now and then: enough draws that one moves
            "--dtype": [(["bfloat16"], ["--n", "4", "--max-new-tokens", "40"])]}),
        "export-gguf": Walk([f["v"], "{out}/v.gguf"], {
            "vectors_file": [Replace([f["v2"], "{out}/v.gguf"])], "--layers": ["2"], "--model": [f["wide_model"]],
            "--model-hint": ["llama"], "--dtype": ["bfloat16"], "--alpha": ["0.5"],
            # resid needs r_l: measured on --model; raw multiplies the stored vector
            "--alpha-unit": [(["raw"], ["--alpha", "0.5", "--model", f["model"]])],
            "--recommended": [f["p"]], "--method": ["iso-kl"]}),  # not a run or recommend.json; no --recommended
        "generate": Walk(["generate", "the cat saw", "-v", f["v"], "--model", f["model"], "--device", "cpu", "--layer",
                          "1", "--alpha", "0,1", "--max-new-tokens", "4"], {
            "prompts": [Replace(["generate", "my friend is", "-v", f["v"], "--model", f["model"], "--device", "cpu",
                                 "--layer", "1", "--alpha", "0,1", "--max-new-tokens", "4"])],
            "--vectors": [f["v2"]], "--layer": ["2"], "--alpha": ["0,3"], "--alpha-unit": ["raw"],
            "--recommended": [f["p"]], "--method": ["iso-kl"], "--n": ["2"], "--max-new-tokens": ["6"],
            "--temperature": ["0.5"], "--top-p": ["0.5"], "--seed": ["1"], "--chat": ["--no-chat"], "--json": ["--json"],
            "--stream": [(["--no-stream"], ["--alpha", "1"])], "--model": [f["model2"]],
            "--dtype": [(["bfloat16"], ["--json"])],  # the KL's digits, which the table rounds
            "--blocks-path": ["model.embed_tokens"]}),
        # serve's server is replaced by a print of what it would serve (test_every_option_is_honoured_or_refused)
        "serve": Walk(["serve", "-v", f["v"], "--model", f["model"], "--device", "cpu"], {
            "run": [Replace(["serve", f["p"], "--model", f["model"], "--device", "cpu"])], "--vectors": [f["v2"]],
            "--recommended": [f["p"]], "--port": ["9000"], "--model": [f["model2"]], "--dtype": ["bfloat16"],
            "--blocks-path": ["model.embed_tokens"]}),
        "vectors": Walk(["--concept", "joy", "--model", f["model"], "--device", "cpu", "--layers", "1",
                         "--out", "{out}/v.safetensors"], {
            "--positive": [f["p"]], "--negative": [f["n"]], "--layers": ["2"], "--resamples": ["2"], "--seed": ["1"],
            "--normalize": ["--no-normalize"], "--skip-first-token": ["--no-skip-first-token"],
            "--gguf-out": ["{out}/v.gguf"], "--concept": ["evil"], "--setting": ["random"], "--max-length": ["3"],
            "--model": [f["model2"]], "--preset": ["paper"], "--dtype": ["bfloat16"]}),
        "vectors scan": Walk(["--concept", "joy", "--model", f["model"], "--device", "cpu", "--out", "{out}"], {
            "--concept": ["evil"], "--positive": [f["p"]], "--negative": [f["n"]], "--top-k": ["3"],
            "--model": [f["model2"]], "--dtype": ["bfloat16"]}),
        "sweep tokens": Walk(["sweep", "tokens", *small, *tiny], {
            **steer, **grid, **ctx, "--top-k": ["5"], "--top-each": [(["0"], ["--top-k", "5"])],  # the top-k tracks all of a tiny vocabulary
            "--certify": [(["--no-certify"], ["--dtype", "bfloat16"])], "--controls": ["1"]}),
        "sweep logodds": Walk(["sweep", "logodds", "-p", f["p"], "-n", f["n"], *small, *tiny], {
            **steer, **grid, **ctx, "--positive": [f["p2"]], "--negative": [f["n2"]], "--tokens-dir": ["{tokens}"],
            "--top-k": ["5"], "--max-tokens": ["2"], "--n-dominant": ["2"], "--extremal-fraction": ["0.2"],
            "--n-target": ["5"], "--heldout-positive": [([f["p2"], "--heldout-negative", f["n2"]], [])],
            "--heldout-negative": [([f["n2"], "--heldout-positive", f["p2"]], [])]}),
        "sweep limit": Walk(["sweep", "limit", "--n-contexts", "2", *tiny], {**steer, **ctx, "--alphas": ["5,50"],
                                                                           "--controls": ["1"]}),
        "sweep xent": Walk(["sweep", "xent", "--corpus", f["corpus"], "--seq-len", "8", "--n-alphas", "4",
                            "--max-tokens", "32", *tiny], {
            **steer, **grid, "--corpus": [f["corpus2"]], "--field": ["body"], "--split": ["test"],
            "--data-files": ["x.parquet"], "--max-texts": ["3"], "--n-samples": ["2"], "--sample-tokens": ["4"],
            "--seed": ["1"], "--seq-len": ["4"], "--packing": ["--packing"], "--max-tokens": ["16"],
            "--spacing": ["linear"], "--curvature": ["--no-curvature"], "--curvature-tokens": ["4"], "--controls": ["1"]}),
        "sweep concept": Walk(["sweep", "concept", "--judge", "lexicon", "--n-prompts", "1", "--completions", "1",
                               "--max-new-tokens", "4", "--n-alphas", "2", *tiny], {
            **steer, **grid, "--judge": ["probe"], "--judge-model": [([f["model2"]], llm_judge)],
            "--positive": [f["p2"]], "--negative": [f["n2"]], "--holdout": [(["0.3"], ["--judge", "probe"])],
            "--prompts": [f["prompts"]], "--n-prompts": ["2"], "--completions": ["2"], "--max-new-tokens": ["6"],
            "--temperature": ["0.5"], "--top-p": ["0.5"], "--top-k": ["3"], "--seed": ["1"], "--chat": ["--no-chat"],
            "--controls": ["1"]}),
        "sweep mmlu": Walk(["sweep", "mmlu", "--source", "sample", "--limit", "1", "--k-shots", "0", "--n-alphas", "2",
                            *tiny], {
            **steer, **grid, "--source": ["mmlu"], "--mmlu-dir": ["{mmlu_sample}"], "--mmlu-parquet": ["x.parquet"],
            "--subjects": ["{mmlu_subject}"], "--k-shots": ["1"], "--limit": ["2"], "--chat": ["--chat"],
            "--controls": ["1"]}),
        "recommend": Walk(["recommend", "--method", "iso-kl", "--layer", "1", "--n-prompts", "1", "--completions", "1",
                           "--max-new-tokens", "4", *tiny], {
            **{k: v for k, v in steer.items() if k not in ("--layers", "--alpha-unit")}, "--layer": ["2"],
            "--method": ["curvature"], "--budget": ["0.1"], "--sweet-spot-rule": [(["between"], sweet)],
            "--curvature-scope": [(["corpus", "--corpus", f["corpus"]], ["--method", "curvature"])],
            "--corpus": [([f["corpus2"]], ["--method", "curvature", "--curvature-scope", "corpus", "--corpus",
                                          f["corpus"]])],
            "--prompts": [f["prompts"]], "--n-prompts": ["2"],
            "--positive": [([f["p2"]], sweet)], "--negative": [([f["n2"]], sweet)],
            "--judge": [(["lexicon"], ["--method", "grid-judge"])],
            "--judge-model": [([f["model2"]], ["--method", "grid-judge", *llm_judge])],
            "--alpha-max": ["0.5"], "--n-alphas": [(["3"], ["--alpha-max", "1"])], "--alphas": ["0,0.5"],
            "--n-target": [(["5"], sweet)], "--entropy-floor": [(["1.0"], sweet)], "--completions": ["2"],
            "--max-new-tokens": ["6"], "--refine-steps": ["1"], "--seed": ["1"], "--chat": ["--no-chat"]}),
        "theory verify": Walk(["theory", "verify", "--steps", "20", "--alpha-points", "21"], {
            "--family": ["b3"], "--groups": ["2"], "--size": ["2"], "--context-length": ["3"], "--eps": ["0.1"],
            "--d": ["4"], "--negatives": ["contrastive"], "--q": ["3"], "--target": ["1"], "--seed": ["1"],
            "--alpha-max": ["4"], "--alpha-points": ["11"], "--steps": ["30"], "--lr": ["0.05"],
            "--all-contexts": ["--all-contexts"], "--json": ["{out}/verify.json"]}, done=(0, 1)),
        "theory figures": Walk(["theory", "figures", "--out", "{out}", "--steps", "20", "--alpha-points", "21"], {
            "--family": ["b1"], "--context": ["1"]}),
        "train-tiny": Walk(["--out", "{out}", "--steps", "2", "--d-model", "16", "--n-head", "2",
                            "--seq-len", "16", "--eval-every", "1"], {
            "--steps": ["3"], "--d-model": ["8"], "--n-head": ["4"], "--seq-len": ["8"], "--batch-size": ["2"],
            "--lr": ["0.01"], "--warmup": ["0.5"], "--upper-fraction": ["0.5"], "--eval-every": ["2"], "--seed": ["1"]}),
    }


def allowed(command: str, option: str) -> bool:
    return (option in ALLOWED and not (command == "train-tiny" and option == "--batch-size")) \
        or f"{command} {option}" in ALLOWED or (command == "theory figures" and option in SAME_AS_VERIFY)


def test_the_walk_covers_every_option_of_every_command(inputs):
    walks = specs(inputs)
    assert set(walks) == set(commands())
    for command, cmd in commands().items():
        missing = [o for o in option_names(cmd) if o not in walks[command].values and not allowed(command, o)]
        assert not missing, f"`{command}`: give the walk a non-default value for {missing} (or justify it in ALLOWED)"


TIMING = re.compile(r"\b\d+(\.\d+)?\s*(s|sec|seconds|min)\b")


def _clean(obj):
    """JSON without what changes run to run (timings, dates, versions)."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()
                if not re.search(r"second|minute|time|timing|started|ended|finished|when|date|versions|host|pid|duration", k)}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def fingerprint(out: Path, stdout: str, with_stdout: bool) -> dict:
    """What a command wrote: each file's content (tables as data, JSON without timings), and stdout."""
    import pandas as pd

    seen = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()) if out.exists() else []:
        rel = str(path.relative_to(out))
        if rel.endswith(".set.json"):  # the index of a set: the other files' hashes, timings included
            continue
        if path.suffix == ".parquet":
            seen[rel] = hashlib.sha256(pd.read_parquet(path).to_csv().encode()).hexdigest()
        elif path.suffix == ".json":
            seen[rel] = json.dumps(_clean(json.loads(path.read_text())), sort_keys=True)
        elif path.suffix not in (".pdf", ".html", ".lock") and ".chunks" not in rel:
            seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    if with_stdout:
        try:
            seen["<stdout>"] = json.dumps(_clean(json.loads(stdout)), sort_keys=True)
        except ValueError:
            seen["<stdout>"] = TIMING.sub("T", stdout)
    return seen


@pytest.fixture(scope="module")
def places(inputs, tmp_path_factory) -> dict:
    """Directories some options point at: a token sweep's output, a copy of the packaged MMLU sample."""
    from importlib.resources import files

    root = tmp_path_factory.mktemp("places")
    sample = Path(shutil.copytree(files("steerstrength") / "data" / "mmlu_sample", root / "mmlu_sample"))
    subject = sorted(p.name.removesuffix("_test.csv") for p in (sample / "test").glob("*_test.csv"))[0]
    return {"{tokens}": str(root / "tokens"), "{mmlu_sample}": str(sample), "{mmlu_subject}": subject}


# train-tiny trains on SmolLM2's tokenizer (the embedded model's) and the packaged Wikipedia: ~25 s a case, 4 min in
# all, so it is `long` (left out of `make test`; run it with `pytest -m long`).
WALKS = ["models show", "config show", "run", "prompts", "export-gguf", "vectors", "vectors scan", "sweep tokens",
         "sweep logodds", "sweep limit", "sweep xent", "sweep concept", "sweep mmlu", "recommend", "theory verify",
         "theory figures", "generate", "serve", pytest.param("train-tiny", marks=pytest.mark.long)]


@pytest.mark.parametrize("command", WALKS)
def test_every_option_is_honoured_or_refused(inputs, places, tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("STEERSTRENGTH_CACHE", str(tmp_path / "cache"))
    if command == "serve":  # what the page would serve, instead of serving it until Ctrl-C
        monkeypatch.setattr("steerstrength.serve.serve", lambda s, port=None, print_fn=print: print(json.dumps(
            dict(s.describe(), port=port, dtype=str(s.model.dtype)), sort_keys=True, default=str)))
    monkeypatch.chdir(tmp_path)
    walk = specs(inputs)[command]
    out = tmp_path / "out"
    prefix = command.split() if command.split()[0] in ("models", "config", "vectors", "prompts", "export-gguf",
                                                         "train-tiny", "run") else []

    def fill(args):
        subs = dict(places, **{"{out}": str(out)})
        return [subs.get(str(a), str(a).replace("{out}", str(out))) for a in args]

    if "{tokens}" in str(walk.values):
        code, _, err = run_cli(fill(["sweep", "tokens", "--model", inputs["model"], "--vectors", inputs["v"],
                                     "--device", "cpu", "--n-alphas", "4", "--out", places["{tokens}"]]),
                               monkeypatch, capsys, quiet=True)
        assert code == 0, err

    def observe(args):
        shutil.rmtree(out, ignore_errors=True)
        code, stdout, err = run_cli(fill([*prefix, *args]), monkeypatch, capsys, quiet=True)
        return code, err, fingerprint(out, stdout, walk.stdout)

    baselines = {}
    problems = []
    for option in option_names(commands()[command]):
        if allowed(command, option):
            continue
        for value in walk.values[option]:
            args, extra = value if isinstance(value, tuple) else ([value], [])
            if option.startswith("-") and not str(args[0]).startswith("--"):
                args = [option, *args]
            if isinstance(value, Replace):
                args, extra = value.args, []
            key = tuple(map(str, extra))
            if key not in baselines:
                code, err, seen = observe([*walk.base, *extra])
                assert code in walk.done, f"`{command}` baseline {extra}: {err}"
                if not baselines:  # the comparison means something only if the same invocation writes the same
                    assert observe([*walk.base, *extra])[2] == seen, f"`{command}`: the baseline is not reproducible"
                baselines[key] = seen
            code, err, seen = observe(args if isinstance(value, Replace) else [*walk.base, *extra, *args])
            if code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err:
                continue  # refused, in one line
            if code in walk.done and seen != baselines[key]:
                continue  # honoured: the output changed
            problems.append(f"{option} {args[1:] if args[0] == option else args}: "
                            + (f"exit {code}: {err.strip()[-300:]}" if code else "the output did not change"))
    assert not problems, f"`{command}`:\n" + "\n".join(problems)
