"""What a run shows on the console: live progress, the run's messages, the end-of-run
summary and the dry-run plan. Ray-free.

In a terminal, progress is one status line that updates in place (rich); when output goes to
a file or a pipe it is plain lines, printed when something changed and every
``QSEARCH_PROGRESS_EVERY`` seconds (default 60) while trials run, never the same line twice.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from qsearch.budget import format_cost
from qsearch.candidate import bit_summary
from qsearch.schedule import schedule_text, scheduler_settings

if TYPE_CHECKING:
    from qsearch.planning import Budgets
    from qsearch.space import SearchSpace
    from qsearch.spec import Spec
    from qsearch.strategy import Strategy


def heartbeat_s() -> float:
    """Seconds between repeated progress lines while trials run."""
    return float(os.environ.get("QSEARCH_PROGRESS_EVERY", "60"))


@dataclass(frozen=True)
class Snapshot:
    """A run's progress at one moment. ``eta_s`` is None when no trial limit is known;
    ``at_steps``: (step, total steps) of each running trial that has reported."""

    done: int
    running: int
    failed: int
    best_acc: float | None
    best_c_size: float | None
    elapsed_s: float
    eta_s: float | None = None
    at_steps: tuple[tuple[int, int], ...] = ()


def _duration(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s"


def status_text(s: Snapshot) -> str:
    best = (f"best val {s.best_acc:.2%} at {format_cost(s.best_c_size, 'size')}"
            if s.best_acc is not None else "best val -")
    eta = f" | ETA {_duration(s.eta_s)}" if s.eta_s is not None else ""
    mem = f" | driver rss {_rss_mib()} MiB" if os.environ.get("QSEARCH_MEMORY_LOG") else ""
    return (f"trials done {s.done}, running {s.running}{_at_steps(s.at_steps)}, failed "
            f"{s.failed} | {best} | elapsed {_duration(s.elapsed_s)}{eta}{mem}")


def _at_steps(at: tuple[tuple[int, int], ...], most: int = 4) -> str:
    """Where the running trials are: `` (at step 300/842)``, the first ``most`` of them."""
    if not at:
        return ""
    more = f", +{len(at) - most}" if len(at) > most else ""
    steps = ", ".join(f"{step}/{total}" for step, total in at[:most])
    return f" (at step{'s' * (len(at) > 1)} {steps}{more})"


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) // 1024 for ln in f if ln.startswith("VmRSS"))


class Display:
    """Progress and messages of one run: a live status line in a terminal, plain lines
    elsewhere. ``live=None`` decides by whether ``stream`` is a terminal."""

    def __init__(self, *, stream: TextIO | None = None, live: bool | None = None,
                 quiet: bool = False):
        from rich.console import Console

        self.console = Console(file=stream or sys.stdout, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self.quiet = quiet
        self._live = None  # rich.live.Live while a status line is shown
        self._last_text: str | None = None
        self._last_key: tuple | None = None
        self.last_update = 0.0

    def __getstate__(self) -> dict:  # Ray Tune pickles its searcher and callbacks
        return {"live": self.live, "quiet": self.quiet}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def use_stream(self, stream: TextIO) -> None:
        """Write to ``stream`` from now on (the terminal, while Ray's output is diverted)."""
        self.console.file = stream

    def say(self, text: str) -> None:
        """A message line (above the live status line in a terminal)."""
        if self._live is not None:
            self._live.console.print(text, markup=False)
        else:
            print(text, file=self.console.file, flush=True)

    def progress(self, snap: Snapshot, *, heartbeat: bool = False) -> None:
        """Show ``snap``. Plain output prints a line when the counts or the best changed, or
        for a ``heartbeat`` (the same state, later), and never the same text twice."""
        if self.quiet:
            return
        text = status_text(snap)
        key = (snap.done, snap.running, snap.failed, snap.best_acc)
        if self.live:
            self._show_live(text)
        elif (key != self._last_key or heartbeat) and text != self._last_text:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.console.file, flush=True)
        else:
            return
        self._last_key, self._last_text, self.last_update = key, text, time.time()

    def due(self) -> bool:
        """A repeated progress update is due (plain output: every ``heartbeat_s``; live: 1 s)."""
        return time.time() - self.last_update >= (1.0 if self.live else heartbeat_s())

    def _show_live(self, text: str) -> None:
        from rich.live import Live
        from rich.text import Text

        if self._live is None:
            self._live = Live(Text(text), console=self.console, refresh_per_second=4,
                              transient=False)
            self._live.start()
        else:
            self._live.update(Text(text))

    def close(self) -> None:
        """End the live status line (its last state stays on screen)."""
        if self._live is not None:
            self._live.stop()
            self._live = None


# ----- fixed texts ------------------------------------------------------------------------
def start_lines(spec: Spec, budgets: Budgets, out: object) -> list[str]:
    evaluator = ", supernet evaluator" if spec.evaluator == "supernet" else ""
    lines = [f"qsearch: {spec.strategy} on {spec.model}/{spec.dataset}, budget "
             f"{budgets.target} ({spec.trials} trials max{evaluator}, output {out})"]
    if budgets.reason:
        lines.append(f"proxy: searching at {budgets.search} because {budgets.reason}; the "
                     f"winner is re-aligned to {budgets.target}")
    if schedule := scheduler_settings(spec):
        lines.append(f"scheduler {schedule_text(schedule)}")
    if spec.checkpoint:
        how = ("post-training quantized (calibrated, no training)" if spec.trial_mode == "ptq"
               else "fine-tuned")
        lines.append(f"pretrained: trials start from {spec.checkpoint}, {how}; bits only, "
                     "at the model's own channels")
    elif spec.fixed_width:
        lines.append("fixed width: bits only, at the model's own channels")
    return lines


_HOW = {"supernet-eval": " (cut out of the supernet)", "ptq": " (post-training quantized)"}


def summary_lines(best: dict, cand, cost: float, space: SearchSpace,
                  budgets: Budgets) -> list[str]:
    """The search's best trial and the final candidate at the target budget."""
    b = budgets
    where = f"re-aligned to the target {b.target}" if b.reason else f"at the budget {b.target}"
    c_size = space.c_size(cand)
    early = (f", stopped early at {best.get('steps')} steps: no trial ran its full length"
             if best["status"] == "stopped" else "")
    return [
        f"best: {best['strategy']} trial {best['trial_index']} val acc {best['val_acc']:.2%}"
        f"{_HOW.get(best.get('task'), '')} "
        f"at {format_cost(best['c_size'], 'size')} (width {best['width']:.4g}, search budget "
        f"{b.search}{early})",
        f"final candidate {where}: width {cand.width:.4g}, C_size "
        f"{format_cost(c_size, 'size')} ({c_size:.6g} bits, {cost / b.target.value:.2%} of "
        f"the budget), BitOPs {format_cost(space.bitops(cand), 'bitops')}",
        f"bits per layer: {bit_summary(cand.w_bits, space)}",
    ]


def plan_lines(spec: Spec, space: SearchSpace, budgets: Budgets,
               strategy: Strategy) -> list[str]:
    """The dry-run plan: budgets, then the strategy's first proposals (made before any result
    is known) with their costs."""
    from qsearch.strategy import FINISHED

    b = budgets
    each = "supernet evaluations" if spec.evaluator == "supernet" else \
        f"trials of {json.dumps(spec.train)}"
    lines = [f"plan: {spec.strategy} on {spec.model}/{spec.dataset}, target {b.target}, search "
             f"at {b.search}{' (proxy: ' + b.reason + ')' if b.reason else ''}, up to "
             f"{spec.trials} {each}"]
    if spec.evaluator == "supernet":
        lines.append(f"  evaluator supernet: trained first ({json.dumps(spec.supernet_train)}; "
                     f"reused from {spec.supernet_cache} when there), each train trial below "
                     f"is cut out of it; then the {spec.top_k} best retrained stand-alone "
                     f"({json.dumps(spec.train)})")
    if schedule := scheduler_settings(spec):
        lines.append(f"  scheduler {schedule_text(schedule)}")
    for i in range(spec.trials):
        p = strategy.ask(f"dry-{i}")
        if p is None or p == FINISHED:
            lines.append(f"  ... {'then waits for results' if p is None else 'then finished'}")
            break
        c = p.candidate
        if c is None:
            lines.append(f"  {i:>3} task {p.task}: {json.dumps(p.params)[:80]}")
            continue
        lines.append(
            f"  {i:>3} task {p.task}: bits {bit_summary(c.w_bits, space)}, width {c.width:.4g}, "
            f"C_size {format_cost(space.c_size(c), 'size')}, BitOPs "
            f"{format_cost(space.bitops(c), 'bitops')}, "
            f"{space.cost(c, b.search.kind) / b.search.value:.2%} of {b.search}")
    if spec.final_seeds:
        lines.append(f"  final: best candidate re-aligned to {b.target}, retrained with "
                     f"{spec.final_seeds} seed{'s' * (spec.final_seeds > 1)} "
                     f"({json.dumps(spec.final_train)}), test accuracy")
    return lines
