"""The `crosskd` Typer app: one explicit command list and the only error boundary."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from crosskd_cli import __version__
from crosskd_cli.commands import distill, export, inspect, predict, quickstart, teacher
from crosskd_cli.commands import eval as eval_cmd
from crosskd_cli.errors import CrossKDError, Interrupted

err_console = Console(stderr=True)


class _FlagsAsFlags:
    """Help shows a flag as `--resume`, not typer's `--resume <bool>`: a flag takes no value."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


# Click's UsageError as typer raises it (recent typers vendor their own Click)
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _SetNeedsEquals:
    """`--set train.epochs 3` (a space for the `=`) reads `3` as a stray argument, which
    Click reports as "unexpected extra argument (3)": say what was meant instead."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["set_needs_equals"] = meant = set_without_equals(args)
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except _USAGE_ERROR:
            if meant is None:
                raise
            raise _USAGE_ERROR(meant, ctx) from None

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """A group (`crosskd teacher`) reads the stray `3` as a subcommand's name."""
        try:
            return super().resolve_command(ctx, args)  # type: ignore[misc]
        except _USAGE_ERROR:
            meant = ctx.meta.get("set_needs_equals")
            if meant is None:
                raise
            raise _USAGE_ERROR(meant, ctx) from None


def set_without_equals(args: list[str]) -> str | None:
    """The fix for the first `--set KEY VALUE` in `args`, if any."""
    for option, key, value in zip(args, args[1:], args[2:], strict=False):
        if option == "--set" and "=" not in key and not value.startswith("-"):
            return f"--set {key} {value}: --set takes KEY=VALUE; write --set {key}={value}"
    return None


class Command(_SetNeedsEquals, _FlagsAsFlags, TyperCommand):
    pass


class Group(_SetNeedsEquals, _FlagsAsFlags, TyperGroup):
    pass


app = typer.Typer(
    cls=Group,
    name="crosskd",
    help=(
        "Cross-Head Knowledge Distillation for dense object detectors.\n\n"
        "Train or import a teacher, distill a student with CrossKD, evaluate it, and inspect "
        "what the cross-head branch reuses. Every command runs offline on the built-in data "
        "(--data builtin:shapes)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def error_boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a CrossKDError into one red line plus a dim hint and exit code 2 (an `Interrupted`
    run: a yellow line and 130/143, the codes of the signal that stopped it).

    Any other exception is a bug and keeps its traceback. CROSSKD_DEBUG=1 shows the traceback of
    user errors too.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CrossKDError as exc:
            if os.environ.get("CROSSKD_DEBUG"):
                raise
            if isinstance(exc, Interrupted):  # a requested stop with its state saved
                label, code = "[bold yellow]Interrupted:[/]", exc.exit_code
            else:
                label, code = "[bold red]Error:[/]", 2
            # escaped: messages quote user values such as --set data.scale=[640,480]
            err_console.print(f"{label} {escape(exc.message)}", markup=True, highlight=False)
            if exc.hint:  # not wrapped: a command in it must paste whole
                err_console.print(f"[dim]{escape(exc.hint)}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(code=code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"crosskd {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Cross-Head Knowledge Distillation for dense object detectors."""


# The command list: one place, in the order a user meets them.
teacher_app = typer.Typer(cls=Group, no_args_is_help=False, rich_markup_mode="rich")
teacher_app.callback(invoke_without_command=True)(error_boundary(teacher.train))
teacher_app.command("import", cls=Command)(error_boundary(teacher.import_weights))
app.add_typer(teacher_app, name="teacher")
app.command("distill", cls=Command)(error_boundary(distill.distill))
app.command("eval", cls=Command)(error_boundary(eval_cmd.evaluate))
app.command("inspect", cls=Command)(error_boundary(inspect.inspect))
app.command("predict", cls=Command)(error_boundary(predict.predict))
app.command("export", cls=Command)(error_boundary(export.export))
app.command("quickstart", cls=Command)(error_boundary(quickstart.quickstart))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
