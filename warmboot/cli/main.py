"""The ``warmboot`` console script: a thin Typer app that registers one command per module.

To add a command, write ``warmboot/cli/<name>.py`` with a function whose docstring is its help (with an
example), and add one line to :data:`COMMANDS` below.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from warmboot.cli import dashboard, deploy, doctor, manage, run, snapshots, web
from warmboot.errors import WarmbootError

HELP = """\
[bold]warmboot[/bold] runs serverless Python functions on your own machines, with cold starts in
milliseconds: each function's container is started once, checkpointed with CRIU into a memory snapshot,
and every later cold start restores a copy of that snapshot instead of booting Python again.

Start by checking that this host can do it (root, kernel, CRIU, namespaces, disk):

    [cyan]sudo warmboot doctor[/cyan]

Run [cyan]warmboot COMMAND --help[/cyan] for the details and an example of each command.
"""

# (name, function) of every command, in the order `warmboot --help` lists them. One line per command.
COMMANDS: list[tuple[str, Callable[..., Any]]] = [
    ("run", run.run),
    ("deploy", deploy.deploy),
    ("serve", web.serve),
    ("logs", manage.logs),
    ("dashboard", dashboard.dashboard),
    ("doctor", doctor.doctor),
]
# (name, sub-app) of every command group, e.g. `warmboot app list`.
GROUPS: list[tuple[str, typer.Typer]] = [
    ("app", manage.apps),
    ("container", manage.containers),
    ("agent", manage.agents),
    ("secret", manage.secrets),
    ("volume", manage.volumes),
    ("snapshot", snapshots.snapshots),
    ("endpoint", web.endpoints),
    ("token", web.tokens),
    ("server", manage.server),
]

app = typer.Typer(
    name="warmboot",
    help=HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """Keep ``warmboot`` a group of commands even while it has only one (so ``warmboot doctor`` works)."""


for _name, _func in COMMANDS:
    app.command(name=_name)(_func)
for _name, _group in GROUPS:
    app.add_typer(_group, name=_name)


def main() -> None:
    """The console script: a warmboot error from any command ends here, as one line and exit status 1."""
    try:
        app()
    except WarmbootError as exc:
        Console(stderr=True).print(f"[red]Error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
