"""Run the `steerstrength` command line in-process, through `cli.main` and its error handling."""

from __future__ import annotations

import sys


def run_cli(args, monkeypatch, capsys, *, quiet: bool = False) -> tuple[int, str, str]:
    """`steerstrength [--quiet] ARGS`: (exit code, stdout, stderr); a command that returns normally exits 0."""
    from steerstrength.cli import main

    monkeypatch.setattr(sys, "argv", ["steerstrength", *(["--quiet"] if quiet else []), *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    """The non-blank stderr lines, progress-bar redraws split apart (transformers' "Loading weights" bar left out)."""
    return [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "Loading weights" not in line]
