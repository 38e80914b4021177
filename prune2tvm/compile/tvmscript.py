"""TVMScript's parser, made affordable in a process that has imported torch.

Every ``@T.prim_func`` (and ``@I.ir_module``, ``@R.function``) calls ``inspect.stack()``, which
builds a FrameInfo for every frame of the caller's stack, reading its source file. Of what it
builds, the parser reads only ``frame`` of each entry and ``code_context`` of the third. A frame
of the import machinery (``<frozen importlib._bootstrap>``) has no file, and ``inspect`` then
searches all of ``sys.modules`` for it. So TVM's ``tvm.s_tir.tensor_intrin``, which parses about
500 functions while it is imported (meta_schedule imports it when tuning starts), took 25 s here
once torch was loaded; with the lazy stack below, 3.6 s.
"""

from __future__ import annotations

import importlib
import inspect
import linecache
import sys

_PARSER_ENTRIES = ("tvm.tirx.script.parser.entry", "tvm.script.parser.ir.entry", "tvm.relax.script.parser.entry")


class _LazyFrameInfo:
    """``inspect.FrameInfo`` of one frame at the line it was at when the stack was taken; its
    source line read only when ``code_context`` is asked for."""

    __slots__ = ("frame", "lineno")

    def __init__(self, frame):
        self.frame = frame
        self.lineno = frame.f_lineno

    @property
    def filename(self) -> str:
        return self.frame.f_code.co_filename

    @property
    def function(self) -> str:
        return self.frame.f_code.co_name

    @property
    def code_context(self) -> list[str] | None:
        line = linecache.getline(self.filename, self.lineno, self.frame.f_globals)
        return [line] if line else None

    @property
    def index(self) -> int | None:
        return 0 if self.code_context else None


class _Inspect:
    """The ``inspect`` module as the parser's entry modules see it: ``stack`` lazy."""

    def __getattr__(self, name):
        return getattr(inspect, name)

    @staticmethod
    def stack(context: int = 1) -> list:
        frame, frames = sys._getframe(1), []
        while frame is not None:
            frames.append(_LazyFrameInfo(frame))
            frame = frame.f_back
        return frames


def install() -> None:
    for name in _PARSER_ENTRIES:
        module = importlib.import_module(name)
        if not isinstance(module.inspect, _Inspect):
            module.inspect = _Inspect()
