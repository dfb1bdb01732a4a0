"""Name -> factory registries (backbones, approaches, task sequences, scenarios).

Modelled on timm's registry: a decorator registers a factory under a name (and
aliases); an unknown name raises an error that lists the closest valid names.
"""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message suggests close names."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str, flag: str | None = None) -> None:
        self.kind = kind
        self.flag = flag or kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._loaders: list[Callable[[], None]] = []

    def register(self, name: str | None = None, *, aliases: tuple[str, ...] = (), options: type | None = None,
                 **declared) -> Callable[[T], T]:
        """`options`: the entry's Options dataclass (mmcl.options), kept as `obj.Options`; an approach class
        declares it as a class attribute instead. Other keywords are declarations kept as attributes of the
        entry (a backbone's `modalities` and `provides`, read by mmcl/compat.py)."""

        def decorator(obj: T) -> T:
            key = name or getattr(obj, "name", None) or obj.__name__  # type: ignore[attr-defined]
            if options is not None:
                obj.Options = options  # type: ignore[attr-defined]
            for attr, value in declared.items():
                setattr(obj, attr, value)
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            for alias in aliases:
                self._aliases[alias] = key
            return obj

        return decorator

    def add_loader(self, loader: Callable[[], None]) -> None:
        """A function that imports the modules defining entries, run on first lookup.

        Keeps `import mmcl` cheap: heavy modules (timm, peft) load only when needed.
        """
        self._loaders.append(loader)

    def _load(self) -> None:
        while self._loaders:
            self._loaders.pop(0)()

    def canonical(self, name: str) -> str:
        self._load()
        if name in self._items:
            return name
        if name in self._aliases:
            return self._aliases[name]
        valid = self.names(with_aliases=True)
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownNameError(
            f"Unknown {self.kind} '{name}' (--{self.flag}).{hint} Valid names: {', '.join(self.names())}."
        )

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self, with_aliases: bool = False) -> list[str]:
        self._load()
        names = sorted(self._items)
        return sorted(names + list(self._aliases)) if with_aliases else names

    def __contains__(self, name: str) -> bool:
        try:
            self.canonical(name)
            return True
        except UnknownNameError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
