"""The command line's option groups (cli/options.py): each shared option is declared once, a command lists only what
is its own, and a group's options reach the command as one object."""

from __future__ import annotations

import inspect
from typing import Optional

import pytest
import typer
from typer.testing import CliRunner

from steerstrength.cli.options import grouped, option_group, section_group

MAX_PARAMETERS = 15  # issue 28: a command that takes more has option blocks of its own that belong in a group


def written_commands() -> dict:
    """{'sweep tokens': the function as written (before its groups are spliced in), ...}."""
    from steerstrength.cli import app

    found = {}

    def walk(cmd, path):
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])
        if cmd.callback is not None:
            found[" ".join(path)] = inspect.unwrap(cmd.callback)

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_takes_at_most_15_parameters():
    counts = {name: len(inspect.signature(f).parameters) for name, f in written_commands().items()}
    assert {"sweep tokens", "sweep concept", "recommend", "theory verify", "prompts"} <= set(counts)
    assert {name: n for name, n in counts.items() if n > MAX_PARAMETERS} == {}


@option_group
class Pair:
    """A toy group."""

    left: Optional[int] = typer.Option(None, "--left")
    right: str = typer.Option("r", "--right", "-r", help="The right one.")


def toy_app(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(grouped(command))
    app.command("other")(lambda: None)  # two commands: typer then dispatches by name
    return app


def test_a_group_becomes_its_options_and_reaches_the_command_as_one_object():
    seen = {}

    def show(pair: Pair = Pair.group, own: int = typer.Option(0, "--own")) -> None:
        seen.update(pair=pair, own=own)

    app = toy_app(show)
    result = CliRunner().invoke(app, ["show", "--left", "3", "-r", "x", "--own", "5"])
    assert result.exit_code == 0, result.output
    assert seen == {"pair": Pair(left=3, right="x"), "own": 5}
    names = [p.name for p in typer.main.get_command(app).commands["show"].params]
    assert names == ["left", "right", "own"]  # spliced where the group stands, in its declared order


def test_but_says_an_option_one_commands_way_and_drops_one_the_command_lacks():
    group = Pair.group.but(right=typer.Option("s", "--right", help="Said otherwise."), left=None)
    assert list(group.options) == ["right"]
    assert group.options["right"].help == "Said otherwise."
    assert Pair.group.options["right"].help == "The right one."  # the declaration itself is unchanged


def test_a_section_group_overrides_only_the_fields_given():
    seen = {}

    def show(tokens=section_group("tokens", top_k=typer.Option(None, "--top-k"),
                                  top_each=typer.Option(None, "--top-each"))) -> None:
        seen["section"] = tokens.of("demo")[1]

    app = toy_app(show)
    assert CliRunner().invoke(app, ["show", "--top-k", "7"]).exit_code == 0
    from steerstrength.config import preset

    assert seen["section"].top_k == 7
    assert seen["section"].top_each == preset("demo").tokens.top_each  # not given: the preset's


def test_two_groups_may_not_declare_the_same_option():
    def clash(a: Pair = Pair.group, b: Pair = Pair.group) -> None:
        pass

    with pytest.raises(TypeError, match="two of its groups"):
        grouped(clash)


def test_group_options_default_to_none_or_to_config():
    """No literal default in a group: None (the preset's section decides), or config.py's value."""
    from steerstrength.cli.options import ModelOptions, SteeredOptions
    from steerstrength.config import ModelConfig, RunConfig

    assert ModelOptions() == ModelOptions(model=None, dtype=ModelConfig().dtype, device=ModelConfig().device)
    assert SteeredOptions().positions == RunConfig().positions
