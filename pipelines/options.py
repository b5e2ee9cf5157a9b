"""Pipeline options shared by several Loopline pipelines.

Beam parses every loaded ``PipelineOptions`` subclass into one argument parser
(``PipelineOptions.get_all_options``), so two pipelines imported into one process (a test run,
a notebook, the demo) that both declare ``--blueprint`` would make argparse refuse the second.
Flags that several pipelines share are therefore declared with ``add_shared_argument``, which
leaves a flag alone when another options class already declared it: the flag means the same
thing (a plain string value) in each.
"""

from __future__ import annotations

import argparse

SHARED_FLAGS = (
    "--blueprint",
    "--output",
    "--decisions",
    "--observations",
    "--decisions_table",
    "--observations_table",
    "--pii_key_secret",
)
# The one help text of --pii_key_secret: whichever pipeline declares it first, it reads right.
PII_KEY_SECRET_HELP = (
    "Secret Manager secret version holding the pseudonymisation key "
    "(projects/P/secrets/S/versions/V); default: the blueprint's privacy.key_env variable."
)


def add_shared_argument(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """``parser.add_argument(flag, **kwargs)`` unless the parser already has ``flag``."""
    if flag not in SHARED_FLAGS:
        raise ValueError(f"{flag} is not a shared flag; declare it with parser.add_argument")
    if flag in parser._option_string_actions:  # argparse keeps no public lookup
        return
    parser.add_argument(flag, **kwargs)
