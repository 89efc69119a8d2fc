"""Settings declared once: a config field's default, help text and allowed values.

Each job has one frozen config dataclass that is the single source of its defaults
(`ExtractConfig`, `FinetuneConfig`, `CaptionConfig`, `ClusterConfig`, `FeatureConfig`, the audit and
reproduce `Settings`). A field made with `option` also carries the help a person reads and, for a
choice, the registry its value must come from (the guidance methods, the samplers, the feature
extractors, ...). From that, `experiments/_app.py` declares each binary's flags and `check_choices`
checks a config built in Python, so a new method, sampler or extractor is one registration: it
appears in every binary's flag and every config's check without being listed anywhere else.

A job that repeats another job's setting (the audit runs an extraction) takes the field with
`same_as`, which copies its help and choices, so the wording and the allowed values cannot drift.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from finextract_jax.errors import InputError

DTYPES = ("float32", "bfloat16")  # compute dtypes every job accepts (mapped to jnp types where used)
_HELP, _CHOICES, _FLAG = "help", "choices", "flag"


def option(default: Any = dataclasses.MISSING, help: str = "", choices: Iterable | None = None,
           flag: bool = True):
    """A dataclass field with its help text and, for a choice, the allowed values.

    `flag=False` keeps a setting out of the command line (library-only knobs).
    """
    metadata = {_HELP: help, _CHOICES: tuple(choices) if choices is not None else None, _FLAG: flag}
    return dataclasses.field(default=default, metadata=metadata)


def same_as(cls, name: str, default: Any = dataclasses.MISSING, help: str | None = None):
    """The field `name` of another config: same help and choices; `default`/`help` may differ."""
    source = {f.name: f for f in dataclasses.fields(cls)}[name]
    return option(source.default if default is dataclasses.MISSING else default,
                  source.metadata.get(_HELP, "") if help is None else help,
                  source.metadata.get(_CHOICES), source.metadata.get(_FLAG, True))


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get(_HELP, "")


def choices_of(field: dataclasses.Field) -> tuple | None:
    return field.metadata.get(_CHOICES)


def is_flag(field: dataclasses.Field) -> bool:
    return field.metadata.get(_FLAG, False)


def check_choices(config) -> None:
    """Every field with choices holds one of them (each item, for a tuple); the error names the flag."""
    for field in dataclasses.fields(config):
        choices = choices_of(field)
        value = getattr(config, field.name)
        if choices is None or value is None:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            if item not in choices:
                raise InputError(f"--{field.name}={item!r} is not one of {', '.join(map(str, choices))}")
