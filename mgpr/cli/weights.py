"""``mgpr-fetch-weights``: download torchvision weights into the torch hub cache ahead of a run.

Compute nodes often have no internet. Run this on a login node (same ``TORCH_HOME`` as the
job, e.g. a shared file system) before submitting::

    TORCH_HOME=/shared/torch mgpr-fetch-weights resnet50 fasterrcnn

Prints one line per file on stdout, ``<path><TAB><bytes> bytes``; diagnostics go to stderr.
A failure (offline, unknown model) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
from typing import Annotated

import typer

from mgpr.errors import EXIT_USAGE, MgprError, ModelError
from mgpr.models.registry import downloadable_models

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Download model weights into the torch hub cache (TORCH_HOME) for offline runs.",
)


@app.command()
def fetch(
    models: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL...",
            help=f"Model names with downloadable weights: {', '.join(downloadable_models())}.",
        ),
    ],
    weights: Annotated[
        str,
        typer.Option(help="DEFAULT or a torchvision enum member name, e.g. IMAGENET1K_V1."),
    ] = "DEFAULT",
    progress: Annotated[bool, typer.Option(help="Show a download progress bar on stderr.")] = True,
) -> None:
    """Download the weights of each MODEL (skipped when already cached) and print path and size."""
    # Imported here so `--help` stays fast (torchvision is heavy).
    from mgpr.models.weights import (
        enum_member,
        fetch_weights,
        resolve_weights,
        weights_enum_class,
    )

    try:
        for name in models:
            enum_cls = weights_enum_class(name)
            if enum_cls is None:
                raise ModelError(_not_downloadable(name))
            plain = weights.strip().lower()
            if plain not in ("default", "none") and enum_member(enum_cls, weights) is None:
                # resolve_weights would also offer none and a local path: nothing to download
                members = ", ".join(["DEFAULT", *(m.name for m in enum_cls)])
                raise ModelError(
                    f"--weights {weights} is not a torchvision weights name of {name}; "
                    f"use one of {members}."
                )
            if resolve_weights(name, weights).kind != "torchvision":  # raises for bad names
                raise ModelError(
                    f"weights={weights} for {name} is not a torchvision weights name, so there is "
                    "nothing to download; use --weights DEFAULT or an enum member name."
                )
            path = fetch_weights(name, weights, progress=progress)
            assert path is not None
            typer.echo(f"{path}\t{path.stat().st_size} bytes")
    except MgprError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _not_downloadable(name: str) -> str:
    """The one line for a MODEL argument without torchvision weights, with the likely fix.

    ``fasterrcnn:COCO_V1`` (a model and its weights in one word) gets the ``--weights`` spelling;
    a misspelt name the closest downloadable model.
    """
    known = downloadable_models()
    head = f"MODEL {name} has no downloadable weights"
    model, sep, member = name.partition(":")
    if sep and model in known and member:
        return f"{head}: give the weights apart, `mgpr-fetch-weights {model} --weights {member}`."
    close = difflib.get_close_matches(name.strip().lower(), known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{head}; {hint}mgpr-fetch-weights knows {', '.join(known)}."


def main() -> None:
    """Console-script entry point."""
    app()
