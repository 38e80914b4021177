"""Registries are plain dicts filled by decorators; a failed lookup lists the valid keys."""

from __future__ import annotations

from typing import Callable, TypeVar

from prune2tvm.errors import ConfigError

F = TypeVar("F", bound=Callable)


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        def decorate(fn: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = fn
            return fn

        return decorate

    def lookup(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} {name!r}; valid choices: {', '.join(self)}") from None
