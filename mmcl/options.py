"""A method's own options, declared beside it.

Each approach (its class attribute `Options`) and each backbone (`register(..., options=...)`) declares
its options as a dataclass subclassing `Options`, one field per flag with its help string:

    @dataclass
    class EWCOptions(Options):
        lamb: float = option(5000.0, "penalty weight lambda (PyContinual --lamb)")

The CLI turns the fields into flags of the same name, one argument group per class that declares
them (so options shared by several methods, such as `MemoryOptions.memory_size`, appear once);
`RunConfig.options` holds the values of the methods a run uses; each method reads its own as a typed
dataclass (`self.opts`) and checks them in `validate`, named by flag.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

_HELP = "help"


def option(default: Any, help: str, **metadata: Any) -> Any:  # noqa: A002 - argparse's word
    """A field of an Options dataclass: its default and the help line `mmcl run --help` shows."""
    return field(default=default, metadata={_HELP: help, **metadata})


@dataclass
class Options:
    """Base of every method's options."""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "Options":
        """This class's fields from `values` (other keys belong to other methods); defaults for the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def validate(self) -> None:
        """Raise ValueError naming the flag (`--name`) for a value that cannot be used."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def positive(opts: Options, *names: str) -> None:
    """The common check: each named option is > 0."""
    for name in names:
        if not getattr(opts, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(opts, name)}")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get(_HELP, "")


def declaring_class(cls: type, name: str) -> type:
    """The class in `cls`'s hierarchy that declares field `name` (its argument group)."""
    for klass in reversed(cls.__mro__):
        if name in getattr(klass, "__annotations__", {}):
            return klass
    return cls


def flag_type(cls: type, f: dataclasses.Field) -> type:
    """The argparse type of a field: its annotation without `| None`."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def fields_of(classes: Iterable[type]) -> dict[str, tuple[type, dataclasses.Field]]:
    """Every option field of `classes`, once: name -> (declaring class, field)."""
    out: dict[str, tuple[type, dataclasses.Field]] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            out.setdefault(f.name, (declaring_class(cls, f.name), f))
    return out


def defaults(classes: Iterable[type]) -> dict[str, Any]:
    return {name: f.default for name, (_, f) in fields_of(classes).items()}


def group_title(cls: type) -> str:
    """`EWCOptions` -> `ewc options`; a class may set `title` itself."""
    title = getattr(cls, "title", None)
    if title:
        return title
    name = cls.__name__.removesuffix("Options")
    return f"{name.lower() or 'method'} options"
