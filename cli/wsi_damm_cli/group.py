"""The `wsi-damm` command group and what its commands share: logging (stderr, --log-file, -v), the one-line
error for bad input, and option definitions used by several commands."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import click

from wsi_damm import __version__
from wsi_damm.training.config import PRESETS
from wsi_damm.util.errors import InputError
from wsi_damm.util.precision import AMP_MODES

LOG = logging.getLogger("wsi_damm")
RECORD = logging.getLogger("wsi_damm.cli")  # the command line, warnings and errors: for --log-file only (stderr has them already)


class _Stderr(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record comes, not the stream of the first command: a command
    run in process (click's CliRunner, the Python API after a command) swaps it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _console() -> logging.Handler:
    """stderr: the library's INFO lines (progress where no terminal is), DEBUG with -v."""
    for h in LOG.handlers:
        if getattr(h, "wsi_damm_console", False):
            return h
    h = _Stderr()
    h.wsi_damm_console = True
    h.setFormatter(logging.Formatter("wsi-damm: %(message)s"))
    h.addFilter(lambda r: not r.name.startswith(RECORD.name))
    h.setLevel(logging.INFO)
    LOG.addHandler(h)
    LOG.setLevel(logging.DEBUG)
    return h


def _verbose(ctx, param, value: int) -> None:
    _console().setLevel(logging.DEBUG if value else logging.INFO)


def _log_file(ctx, param, value: Path | None) -> None:
    if value is None:
        return
    value.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(value, encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    LOG.addHandler(h)
    LOG.setLevel(logging.DEBUG)
    RECORD.info("wsi-damm " + " ".join(sys.argv[1:]))


LOGGING_OPTIONS = (  # on every command (added by _Group.add_command)
    click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_verbose, help="Debug messages on stderr too."),
    click.Option(
        ["--log-file"],
        type=click.Path(dir_okay=False, path_type=Path),
        expose_value=False,
        callback=_log_file,
        help="Append everything (progress lines, warnings, errors) with timestamps to this file.",
    ),
)


class _Group(click.Group):
    """Turns InputError into one line on stderr and exit code 2; warnings into one line each; gives every
    command -v/--verbose and --log-file."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.params.extend(LOGGING_OPTIONS)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        _console()

        def warn(msg, *a, **k):
            click.echo(f"wsi-damm: warning: {msg}", err=True)
            RECORD.warning(str(msg))

        warnings.showwarning = warn
        handlers = list(LOG.handlers)
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"wsi-damm: error: {exc.one_line()}", err=True)
            RECORD.error(exc.one_line())
            # reads still in flight on zarr's event loop when the error was raised (e.g. other chunks of a
            # corrupted shard) are abandoned: asyncio's "Task was destroyed" notes at exit are not the user's business
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("wsi-damm: interrupted; rerun the same command with --resume to continue", err=True)
            ctx.exit(130)
        finally:  # a command run in process (CliRunner, a notebook) leaves no --log-file open behind it
            for h in [h for h in LOG.handlers if h not in handlers]:
                LOG.removeHandler(h)
                h.close()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="wsi-damm")
def cli() -> None:
    """Predict whole-slide nanoparticle maps from CD31 + DAPI with DAMM-Diffusion."""


def registration_options(fn):
    """--register / --size-tolerance: shared by every command that reads slides."""
    fn = click.option(
        "--size-tolerance",
        default=0.0,
        type=click.FloatRange(0, 0.5),
        help="Per-channel files may differ in size by this fraction (align them with --register).",
    )(fn)
    return click.option(
        "--register",
        default="none",
        type=click.Choice(["none", "translation", "rigid"]),
        help="Align nuclei and target channels to the vessels channel (separately scanned stains).",
    )(fn)


AMP = click.Choice(AMP_MODES)
WORKERS_HELP = "Tasks run at once on this machine (default: all cores): {kind}."
MAX_SLIDE_HELP = "Refuse slides declaring more pixel data than this (GiB): corrupt headers declare terabytes."
BLEND_HELP = "Window that weights overlapping patches: gaussian, cosine, linear (taper to the edges) or mean (flat)."


def preset_help(text: str, section: str, key: str) -> str:
    """Help text with the value each preset resolves the option to, so `--help` shows real defaults."""
    values = ", ".join(f"{name} {getattr(getattr(cfg, section), key)}" for name, cfg in PRESETS.items())
    return f"{text} [preset defaults: {values}]."


def say(msg: str) -> None:
    """A workflow's step line (demo, study, registration): on stderr, and with its time in --log-file,
    where a long run's steps are read back."""
    click.echo(msg, err=True)
    RECORD.info(msg)


def registration_log(msg: str) -> None:
    say(f"registration: {msg}")


AMP_HELP = "Autocast of the diffusion U-Net, the same in train and predict: bf16, fp16 (training adds a gradient scaler) or off."
DIST_TIMEOUT_HELP = "torchrun: minutes a rank may wait in a collective before the run fails."

IMAGE_MPP = "Pixel size (µm) of slides that carry none: plain JPEG / PNG / BMP images need it."


BLENDS = click.Choice(["gaussian", "cosine", "linear", "mean"])  # wsi_damm.stitching.merge.BLENDS: not imported, so --help stays fast
DEFAULT_BLEND = "cosine"  # wsi_damm.stitching.DEFAULT_BLEND
