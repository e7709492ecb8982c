"""Every option two commands share, declared once, and the option groups commands take them in.

typer builds a command's options from its signature. A group is a parameter whose default is a `Group`: `grouped`
puts the group's options into the command's signature in its place and hands the command one object built from
them, so a command lists only what is its own. An `option_group` class declares each of its fields with its option;
a `section_group` is options that override fields of one config section. Defaults are None (the preset's config
section decides) or read from config.py, the only home of defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer

from steerstrength.config import DEFAULT_PRESET, ModelConfig, RunConfig

_MODEL = ModelConfig()
_RUN = RunConfig()


@dataclass(frozen=True)
class Group:
    """Options that travel together: `kind` is built from their values (keyword per option name)."""

    kind: Callable[..., Any]
    options: dict  # parameter name -> typer.Option, in the order --help lists them

    def but(self, **options) -> "Group":
        """The same group with some options said differently for one command (None: the command lacks it)."""
        merged = {**self.options, **options}
        return Group(self.kind, {name: opt for name, opt in merged.items() if opt is not None})

    def only(self, **options) -> "Group":
        """The group with only these options (said this command's way); the kind's other fields keep their
        defaults."""
        return Group(self.kind, options)

    def fields(self) -> dict:
        """{name: annotation} of the options, from the kind's fields (a section's: Optional, None is "not given")."""
        hints = typing.get_type_hints(self.kind)
        return {name: hints[name] for name in self.options}


def grouped(command: Callable) -> Callable:
    """The command with each Group-valued parameter replaced by the group's options (typer reads the signature);
    called, it builds each group's object from them."""
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command)
    params, groups = [], {}
    for p in signature.parameters.values():
        if isinstance(p.default, Group):
            groups[p.name] = p.default
            params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=hint)
                       for (name, opt), hint in zip(p.default.options.items(), p.default.fields().values())]
        else:
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation)))
    names = [p.name for p in params]
    if len(names) != len(set(names)):
        raise TypeError(f"{command.__name__}: an option is in two of its groups")

    @functools.wraps(command)
    def run(**given):
        # every group's values first: a group may bear the name of another group's option (`model` holds --model)
        values = {name: {field: given.pop(field) for field in group.options} for name, group in groups.items()}
        return command(**given, **{name: groups[name].kind(**v) for name, v in values.items()})

    run.__signature__ = signature.replace(parameters=params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def option_group(cls):
    """A class whose fields are declared with their typer options, once: it becomes a dataclass (each field's default
    is its option's; None for a required one) and `cls.group`, the Group of its options."""
    options = {name: value for name, value in vars(cls).items() if isinstance(value, typer.models.ParameterInfo)}
    for name, option in options.items():
        setattr(cls, name, None if option.default is ... else option.default)
    cls = dataclass(cls)
    cls.group = Group(cls, options)
    return cls


# --- single options several commands take -------------------------------------------------------------------------------

def PresetOpt(help: str = "Where the defaults come from: that preset's section of `steerstrength config show "
                          "--preset NAME` (demo or paper).") -> Any:
    return typer.Option(DEFAULT_PRESET, "--preset", help=help)


def OutOpt(help: str = "Output directory.", default: Any = Path(".")) -> Any:
    return typer.Option(default, "--out", "-o", help=help)


def SeedOpt(help: Optional[str] = None, default: Any = _RUN.seed) -> Any:
    return typer.Option(default, "--seed", help=help)


ControlsOpt = typer.Option(None, "--controls", help="Random directions of v's norm, orthogonal to v, steered beside "
                                                   "each vector (rows with direction random-0, ...), as a run steers "
                                                   "controls.n_random of them; default: the preset's "
                                                   "controls.n_sweep (0: v alone).")


# --- the model -------------------------------------------------------------------------------------------------------

def ModelOpt(help: str = "HF id, model directory, .gguf file or embedded name.") -> Any:
    return typer.Option(None, "--model", "-m", help=help)


DtypeOpt = typer.Option(_MODEL.dtype, "--dtype", help="float32 (reference), bfloat16 or float16.")
DeviceOpt = typer.Option(_MODEL.device, "--device", help="auto, cpu, cuda, cuda:N or mps.")
BlocksPathOpt = typer.Option(None, "--blocks-path", help="Dotted path of the decoder blocks, for unknown architectures.")


@option_group
class ModelOptions:
    """Which model, loaded how (config.ModelConfig)."""

    model: Optional[str] = ModelOpt()
    dtype: str = DtypeOpt
    device: str = DeviceOpt
    blocks_path: Optional[str] = BlocksPathOpt

    def load(self):
        from steerstrength.loading import load_model

        return load_model(self.model, dtype=self.dtype, device=self.device, blocks_path=self.blocks_path)


MODEL = ModelOptions.group


def model_group(help: str) -> Group:
    """A command that loads a model with no --blocks-path (P / N texts, vectors): --model said its own way."""
    return MODEL.but(model=ModelOpt(help), blocks_path=None)


# --- what is steered -------------------------------------------------------------------------------------------------

VectorsOpt = typer.Option(..., "--vectors", "-v", help="Steering vectors (.safetensors from `steerstrength vectors`).")
LayerOpt = typer.Option(None, "--layer", "-l", help="The layer to steer; default: the file's only layer.")


@option_group
class SteeredOptions:
    """The vectors, the layers steered, how (positions, raw or unit v), and the labels of the rows."""

    vectors: Optional[Path] = VectorsOpt
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="e.g. 15 or 5,15,25, 'middle', 'all'; default: "
                                         "every layer in the vector file.")
    positions: str = typer.Option(_RUN.positions, "--positions", help="Steer all positions or only the last one.")
    normalize: bool = typer.Option(False, "--normalize", help="Steer with v / ||v|| instead of the raw vector.")
    concept: Optional[str] = typer.Option(None, "--concept", help="Concept label; default: from the vector file.")
    setting: Optional[str] = typer.Option(None, "--setting", help="Setting label (random / contrastive); default: "
                                          "from the vector file.")


STEERED = SteeredOptions.group


# --- the contexts a next-token sweep reads ----------------------------------------------------------------------------

@option_group
class ContextOptions:
    """The contexts whose next token a sweep reads: a user's file, or the built-in ones the run uses."""

    contexts: Optional[Path] = typer.Option(None, "--contexts", help="Contexts: JSONL with 'text' (and optional 'id'), "
                                            "or one per line; default: 44 neutral + the concept's 4 built-in "
                                            "contexts.")
    n_contexts: Optional[int] = typer.Option(None, "--n-contexts", help="Keep the first N contexts (of the built-in "
                                             "ones, half the concept's own); default: all of --contexts, or the "
                                             "preset's count of the built-in ones.")
    chat: bool = typer.Option(False, "--chat", help="Wrap contexts in the model's chat template.")


CONTEXTS = ContextOptions.group


# --- the alpha grid ----------------------------------------------------------------------------------------------------

def AlphaMaxOpt(help: str) -> Any:
    return typer.Option(None, "--alpha-max", help=help)


def NAlphasOpt(help: str = "linspace points (0 is added); default: the preset's.") -> Any:
    return typer.Option(None, "--n-alphas", help=help)


def AlphasOpt(help: str = "Explicit comma-separated alphas (overrides the linspace), e.g. --alphas=-5,0,5.") -> Any:
    return typer.Option(None, "--alphas", help=help)


def AlphaUnitOpt(help: str = "raw: alpha multiplies the stored vector; resid: the added alpha * v has alpha times the "
                             "layer's median residual norm (the same strength at any layer); default: the preset's "
                             "(resid). Tables carry both columns.") -> Any:
    return typer.Option(None, "--alpha-unit", help=help)


@option_group
class GridOptions:
    """--alphas, else a linspace over the preset's section (grid.AlphaGrid.from_options), in --alpha-unit."""

    alpha_min: Optional[float] = typer.Option(None, "--alpha-min", help="default: -alpha_max.")
    alpha_max: Optional[float] = AlphaMaxOpt("default: the preset's tokens.alpha_max.")
    n_alphas: Optional[int] = NAlphasOpt()
    alphas: Optional[str] = AlphasOpt()
    alpha_unit: Optional[str] = AlphaUnitOpt()


def grid_group(section: str) -> Group:
    """The grid of a sweep whose defaults are the preset's `section` (its alpha_max and n_alphas)."""
    return GridOptions.group.but(alpha_max=AlphaMaxOpt(f"default: the preset's {section}.alpha_max."))


# --- the corpus Delta CE is measured on ------------------------------------------------------------------------------

@option_group
class CorpusOptions:
    """The evaluation texts of Delta CE (corpus.py, stages.corpus_texts), and whether they are packed."""

    corpus: Optional[str] = typer.Option(None, "--corpus", help="wikipedia[:train|:test] (packaged), model (samples of "
                                         "the unsteered model), a .txt/.jsonl/.parquet file, a Parquet directory, or "
                                         "hf:NAME[:CONFIG]; default: the preset's xent.corpus (wikipedia).")
    field: Optional[str] = typer.Option(None, "--field", help="The text column / field of a dataset or JSON corpus "
                                        "(default: text).")
    split: Optional[str] = typer.Option(None, "--split", help="Split of a hf: dataset or of a local dataset directory "
                                        "(default: train).")
    data_files: Optional[List[str]] = typer.Option(None, "--data-files", help="Files of a hf: dataset (paths or globs; "
                                                   "repeatable).")
    max_texts: Optional[int] = typer.Option(None, "--max-texts", help="Use the first N texts (hf: default 1000).")
    n_samples: Optional[int] = typer.Option(None, "--n-samples", help="Model-samples corpus: number of texts; default: "
                                            "enough for --max-tokens.")
    sample_tokens: Optional[int] = typer.Option(None, "--sample-tokens", help="Model-samples corpus: tokens per text; "
                                                "default: seq_len + 8.")
    seed: Optional[int] = SeedOpt("Model-samples corpus: sampling seed (default 0).", default=None)
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing", help="Concatenate texts before windowing; "
                                           "default: the preset's xent.packing (on for wikipedia).")


# --- texts: P and N, and the prompts a generation stage steers --------------------------------------------------------

def read_texts(path: Optional[Path], what: str, min_count: int = 1) -> Optional[list[str]]:
    """The 'text' of each row of a user's file (io.read_texts), or None without a file."""
    from steerstrength.io import read_texts as read_rows

    return [r["text"] for r in read_rows(path, min_count=min_count, what=what)] if path else None


@option_group
class TextsOptions:
    """P and N text files (JSONL 'text' or one per line): both or neither."""

    positive: Optional[Path] = typer.Option(None, "--positive", "-p")
    negative: Optional[Path] = typer.Option(None, "--negative", "-n", help="N texts, same formats.")

    def given(self, refusal: str = "give both --positive and --negative (P and N texts), or neither") -> bool:
        if (self.positive is None) != (self.negative is None):
            from steerstrength.errors import InputError

            raise InputError(refusal)
        return self.positive is not None

    def read(self, what: str, min_count: int = 1) -> tuple[Optional[list[str]], Optional[list[str]]]:
        """(P texts, N texts), or (None, None) when neither file is given."""
        if not self.given():
            return None, None
        return (read_texts(self.positive, f"positive {what}", min_count),
                read_texts(self.negative, f"negative {what}", min_count))


def texts_group(positive_help: str, negative_help: str = "N texts, same formats.", required: bool = False) -> Group:
    return TextsOptions.group.but(
        positive=typer.Option(... if required else None, "--positive", "-p", help=positive_help),
        negative=typer.Option(... if required else None, "--negative", "-n", help=negative_help))


PromptChatOpt = typer.Option(None, "--chat/--no-chat", help="Chat template on prompts; default: on for chat models.")


@option_group
class PromptOptions:
    """The prompts steered generations start from: a user's file, used whole, or the preset's count of the neutral
    evaluation prompts (training half), as `steerstrength run` takes them."""

    prompts: Optional[Path] = typer.Option(None, "--prompts")
    n_prompts: Optional[int] = typer.Option(None, "--n-prompts")
    chat: Optional[bool] = PromptChatOpt

    def texts(self, preset_n: int) -> list[str]:
        from steerstrength.prompts import evaluation_prompts

        given = read_texts(self.prompts, "prompt file")
        keep = self.n_prompts if self.n_prompts is not None else (preset_n if given is None else None)
        return (given or evaluation_prompts("train"))[:keep]


def prompts_group(prompts_help: str, n_prompts_help: str) -> Group:
    return PromptOptions.group.but(prompts=typer.Option(None, "--prompts", help=prompts_help),
                                   n_prompts=typer.Option(None, "--n-prompts", help=n_prompts_help))


# --- a config section's own options ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SectionOptions:
    """A config section's options as given: each name is the section's field, None when not given."""

    name: str
    given: dict

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["given"][key]
        except KeyError:
            raise AttributeError(key) from None

    def of(self, preset: str, **more):
        """(the preset's RunConfig, its section `name` with these options and `more` where given)."""
        return preset_section(preset, self.name, **self.given, **more)


def section_group(name: str, **options) -> Group:
    """Options that override fields of the config section `name` (each parameter named as the field)."""
    hints = typing.get_type_hints(typing.get_type_hints(RunConfig)[name])

    def build(**given) -> SectionOptions:
        return SectionOptions(name, given)

    build.__annotations__ = {field: Optional[_unoptional(hints[field])] for field in options}
    return Group(build, options)


def _unoptional(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def preset_section(preset: str, name: str, **given):
    """The preset's config section `name` (config.py: the only defaults) with the options the user gave (not None)."""
    from steerstrength.config import preset as run_preset

    cfg = run_preset(preset)
    return cfg, dataclasses.replace(getattr(cfg, name), **{k: v for k, v in given.items() if v is not None})


# --- a sweep's run and what it writes -----------------------------------------------------------------------------------

@option_group
class SweepRun:
    """A sweep command's run: the preset its defaults come from, the folder its tables go to, the random directions
    steered beside v (vectors.random_controls), and its clock."""

    controls: Optional[int] = ControlsOpt
    preset: str = PresetOpt()
    out: Path = OutOpt()

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def check_out(self, *names: str) -> None:
        """--out may take these files (io.check_output_dir), before any work."""
        from steerstrength.io import check_output_dir

        check_output_dir(self.out, names=names)

    @contextlib.contextmanager
    def folder(self) -> Iterator[None]:
        """--out, locked: one writer; the tables it writes are one set each (runs.check_result_set)."""
        from steerstrength.runs import output_folder

        with output_folder(self.out):
            yield

    def write(self, result, header: dict) -> list:
        from steerstrength.runs import write_result

        return write_result(self.out, result, extra=header)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


SWEEP = SweepRun.group


# --- using an answer: a run's recommended strengths ---------------------------------------------------------------------

RecommendedOpt = typer.Option(None, "--recommended", help="A run directory or recommend.json: its recommended alphas "
                               "and fluent range (concept stage) travel in the file's metadata.")
MethodOpt = typer.Option(None, "--method", help="With --recommended and no --alpha: pre-scale at this method's alpha "
                         "(default: the first one-alpha method: iso-kl, global, corpus curvature; else the first).")
