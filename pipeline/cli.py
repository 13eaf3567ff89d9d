"""The ``perceptclip`` command line. Thin: each command parses its arguments, loads config and calls one
library function. Heavy imports happen inside commands so ``--help`` stays fast."""

from __future__ import annotations

import logging
import sys

import click

from pipeline import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="perceptclip")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Perceptual scores (image quality, memorability, evoked emotion) for images at scale."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
