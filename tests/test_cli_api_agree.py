"""The CLI and the Python API take the same options with the same defaults: each command's click parameters
against its `wsi_damm.api` function's signature (one test instead of a second source for either)."""

from __future__ import annotations

import inspect
from pathlib import Path

import click
import pytest

from wsi_damm import api
from wsi_damm_cli.main import cli

COMMANDS = ("synth", "tile", "train", "predict", "calibrate", "stitch", "evaluate", "compare", "export")
# click's name for a parameter → the API's (where a Python keyword or a clearer plural forced another name)
RENAMED = {
    "compile_": "compile",
    "config_file": "config",
    "do_stitch": "stitch",
    "pred_store": "prediction",
    "cleans": "clean",
    "truths": "truth",
}
RENAMED_IN = {"predict": {"map_path": "map"}}
CLI_ONLY = {"log_file", "verbose", "as_json"}  # where the command's output goes, and how it is printed
API_ONLY = {"log"}  # a callable for progress lines (the CLI passes its logger)


def _unset(value) -> bool:
    return value is None or (isinstance(value, tuple) and not value) or type(value).__name__ == "Sentinel"


@pytest.mark.parametrize("name", COMMANDS)
def test_the_command_and_its_api_function_take_the_same_options(name):
    cmd, fn = cli.commands[name], getattr(api, name)
    params = inspect.signature(fn).parameters
    renamed = RENAMED | RENAMED_IN.get(name, {})
    cli_names = {renamed.get(p.name, p.name): p for p in cmd.params if p.name not in CLI_ONLY}
    only_cli, only_api = sorted(set(cli_names) - set(params)), sorted(set(params) - API_ONLY - set(cli_names))
    assert not only_cli and not only_api, f"only on the command line: {only_cli}; only in the API: {only_api}"
    for key, p in cli_names.items():
        if isinstance(p, click.Argument) or params[key].default is inspect.Parameter.empty:
            continue
        cli_default, api_default = p.get_default(click.Context(cmd)), params[key].default  # resolves a flag's unset default
        if _unset(cli_default) and _unset(api_default):
            continue
        if p.is_flag and cli_default is False and api_default is False:
            continue
        if isinstance(cli_default, Path):
            cli_default = str(cli_default)
        assert cli_default == api_default or (isinstance(api_default, (list, tuple)) and tuple(cli_default) == tuple(api_default)), (
            f"{name} --{p.name}: {cli_default!r} on the command line, {api_default!r} in the API"
        )


def test_the_blend_windows_the_command_line_offers_are_the_stitchers():
    """The CLI names them without importing the library (a fast --help): the same names and the same default."""
    from wsi_damm import stitching
    from wsi_damm.stitching.merge import BLENDS
    from wsi_damm_cli import group

    assert tuple(group.BLENDS.choices) == BLENDS and group.DEFAULT_BLEND == stitching.DEFAULT_BLEND in BLENDS
