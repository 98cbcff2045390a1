"""Callbacks: code of your own at fixed points of the training loop, on every worker, without the loop knowing what
it does (logging to a tracker of your own, a drill that injects faults: jobs/faults.py).

A recipe names them, each a class importable where the workers run:

    train:
      callbacks:
        - use: mypackage.hooks:LogToSlack
          args: {channel: "#training"}

Only modules the operator lists may be named: RUNNER_CALLBACKS, a comma-separated list of module names (or
prefixes ending in `.`), default `jobs.faults`; the server refuses a recipe naming another, and the workers check
again before importing anything.

The class subclasses `Callback` and overrides what it needs; its constructor takes `args` and must be cheap and
free of side effects (pre-flight builds it to check the arguments). Every method runs on every rank; `loop.rank == 0`
picks one. A callback that raises fails the job with its message, as any other error of the loop would.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from jobs.schema import callback_refusal as refusal


@dataclass
class Loop:
    """Where the loop is, as a callback sees it (read only)."""

    job_dir: Path
    rank: int  # this worker's rank, 0 .. world - 1
    world: int  # workers in all
    step: int = 0  # optimizer steps done (after a resume: counted from the start of the job)
    epoch: int = 0  # passes over train begun, from 0


class Callback:
    def on_plan(self, plan: dict) -> None:
        """The distribution plan (jobs.strategy.distribution) before the accelerator is made; it may change it."""

    def on_start(self, loop: Loop) -> None:
        """The model is built and prepared and a checkpoint (if any) restored; the first step comes next."""

    def on_batch(self, loop: Loop, rows: list[int]) -> None:
        """This rank trains on these train rows (their indices) in this forward pass."""

    def on_step(self, loop: Loop) -> None:
        """An optimizer step is done (and its checkpoint, where one was due); loop.step counts it."""

    def on_end(self, loop: Loop, model) -> None:
        """The last step is done; `model` holds the weights as they are now, before the test."""


class Callbacks(Callback):
    """Several callbacks called in the recipe's order."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = callbacks

    def on_plan(self, plan):
        for c in self.callbacks:
            c.on_plan(plan)

    def on_start(self, loop):
        for c in self.callbacks:
            c.on_start(loop)

    def on_batch(self, loop, rows):
        for c in self.callbacks:
            c.on_batch(loop, rows)

    def on_step(self, loop):
        for c in self.callbacks:
            c.on_step(loop)

    def on_end(self, loop, model):
        for c in self.callbacks:
            c.on_end(loop, model)


class CallbackError(Exception):
    """A recipe's callback that cannot be imported or built: the recipe's key, and why."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def build(specs) -> Callbacks:
    """The recipe's `train.callbacks` (each with `use` and `args`), checked against RUNNER_CALLBACKS, imported and
    built."""
    out = []
    for i, spec in enumerate(specs):
        key = f"train.callbacks.{i}"
        module, _, name = spec.use.partition(":")
        why = refusal(spec.use)
        if why:  # before the import: a module's own code runs as it is imported
            raise CallbackError(f"{key}.use", why)
        try:
            cls = getattr(importlib.import_module(module), name)
        except ImportError as e:
            raise CallbackError(f"{key}.use", f"{spec.use}: cannot import {module} ({e}); the module must be "
                                              f"installed where the workers run") from None
        except AttributeError:
            raise CallbackError(f"{key}.use", f"{spec.use}: {module} has no {name}") from None
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise CallbackError(f"{key}.use", f"{spec.use}: not a subclass of jobs.callbacks.Callback")
        try:
            out.append(cls(**spec.args))
        except (TypeError, ValueError) as e:
            raise CallbackError(f"{key}.args", f"{name} does not take them: {e}") from None
    return Callbacks(out)
