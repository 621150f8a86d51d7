"""The `tritonchat` command. Each sub-command lives in its own module; this file only wires them."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Build, serve, call and measure a chat LLM behind NVIDIA Triton Inference Server.")


def _register():
    from tritonchat import commands

    for name, fn in commands.COMMANDS.items():
        app.command(name)(fn)


_register()

if __name__ == "__main__":
    app()
