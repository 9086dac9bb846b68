"""DualPrecision (Pareto efficiency of quantized CNNs, Sec. 6 and Appendix E).

The optimal weight precision of a layer falls as its fan-in (Cin/groups x Kh x Kw) grows,
so depthwise convolutions want more bits than every other layer. DualPrecision therefore
searches two numbers only: one bit-width for the depthwise convolutions and one for all
other free layers (first and last layer keep the space's pinned bits). Every pair is
width-aligned to the budget, so the cells compare precisions at matched size; the grid is
|B| x |B| when the space has depthwise layers and |B| otherwise.

Cost trick (Sec. 6): one precision Pareto-dominates the others across sizes, so the grid can
be run at a small size (the paper uses the size of the 0.25x 8-bit model) and the winner
re-aligned to the target. That is the runner's proxy-budget mechanism (``proxy_budget`` in
the experiment spec): this strategy simply aligns every cell to the budget it is given.

A fixed-width model (its own channels) has no width to align: cells that do not fit are
infeasible, and cells that leave room for one group's next bit-width are dominated (the
grid runs the largest feasible bits only).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from qsearch import QSearchError
from qsearch.budget import Budget
from qsearch.space import Aligned, SearchSpace
from qsearch.strategy import GridStrategy, Proposal, bit_subset, register_strategy


@register_strategy("dualprecision")
class DualPrecision(GridStrategy):
    """Grid over (depthwise bits, other bits), each cell width-aligned to the budget.

    Args:
        bits: the precision set B (default: the space's bit choices). Cells are walked in
            row-major order of the table: depthwise bits ascending, then other bits ascending.

    ``summary()`` returns the grid as a table like the paper's Table 7 (rows: depthwise bits,
    columns: other bits; ``None`` where a cell did not produce an accuracy) and the best cell.

    Resume (the :class:`GridStrategy` contract): finished cells are never re-run; cells in
    flight when the state was saved stay in flight under their trial ids, because the runner
    runs those trials again after a resume and tells their results under the same ids
    (``qsearch.runner.Runner.replay``). Proposing them anew as well would train them twice.
    """

    def __init__(self, space: SearchSpace, budget: Budget, *, seed: int = 0,
                 bits: Sequence[int] | None = None):
        super().__init__(space, budget, seed=seed)
        self.bits = sorted(set(bit_subset("dualprecision", bits, space)))
        self.group_names = list(space.groups)  # "depthwise" (if any), then "other"
        grid = [dict(zip(self.group_names, combo))
                for combo in itertools.product(self.bits, repeat=len(self.group_names))]
        # Align every cell up front: a budget no cell fits is a user error, reported now;
        # cells that alone cannot fit (e.g. 8/8 at a tiny budget) are shown as infeasible.
        self.cells: list[dict[str, int]] = []
        self.aligned: list[Aligned] = []
        self.infeasible: list[tuple[dict[str, int], str]] = []
        for cell in grid:
            try:
                aligned = space.align(space.candidate(cell), budget)
            except QSearchError as e:
                self.infeasible.append((cell, str(e)))
                continue
            self.cells.append(cell)
            self.aligned.append(aligned)
        if not self.cells:
            raise QSearchError(f"no dualprecision cell fits the budget {budget}: "
                               f"{self.infeasible[0][1]}")
        self.dominated: list[dict[str, int]] = []
        if space.family.fixed_width:
            self._drop_dominated()

    def _drop_dominated(self) -> None:
        """Fixed width: keep the cells no group of which can take the next bit-width and
        still fit (the largest feasible bits); the others leave budget unused with nothing
        to trade for it, and are listed as ``dominated``."""
        up = dict(zip(self.bits, self.bits[1:]))
        def fits(cell: dict[str, int]) -> bool:
            cost = self.space.cost(self.space.candidate(cell), self.budget.kind)
            return cost <= self.budget.value
        keep = [not any(cell[g] in up and fits({**cell, g: up[cell[g]]}) for g in cell)
                for cell in self.cells]
        self.dominated = [c for c, k in zip(self.cells, keep) if not k]
        self.aligned = [a for a, k in zip(self.aligned, keep) if k]
        self.cells = [c for c, k in zip(self.cells, keep) if k]

    def propose(self, cell: dict[str, int]) -> Proposal:
        i = self.cells.index(cell)
        return Proposal(self.aligned[i].candidate, params={"cell": dict(cell)})

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bits": self.bits, "groups": self.group_names}

    def load_state_dict(self, state: dict) -> None:
        if state.get("bits") != self.bits or state.get("groups") != self.group_names:
            raise QSearchError(
                f"dualprecision state is for bits {state.get('bits')} over groups "
                f"{state.get('groups')}, this search has bits {self.bits} over "
                f"{self.group_names}: resume with the same space and bits")
        super().load_state_dict(state)

    # ----- results ---------------------------------------------------------------------
    def summary(self) -> dict:
        """The grid table (rows: depthwise bits, columns: other bits) and the best cell."""
        rows = self.bits if "depthwise" in self.group_names else [None]
        cols = self.bits if "other" in self.group_names else [None]
        table = [[None] * len(cols) for _ in rows]
        cells = []
        for i, (cell, aligned) in enumerate(zip(self.cells, self.aligned)):
            status = self.cell_status(i)
            acc = self.done[i] if status in ("ok", "stopped") else None
            table[rows.index(cell.get("depthwise"))][cols.index(cell.get("other"))] = acc
            cells.append({**cell, "status": status, "val_acc": acc,
                          "stopped_at_step": self.stopped_at.get(i),
                          "width": aligned.candidate.width, "cost": aligned.cost,
                          "budget_ratio": aligned.ratio, "error": self.errors.get(i)})
        cells += [{**cell, "status": "infeasible", "val_acc": None, "error": why}
                  for cell, why in self.infeasible]
        cells += [{**cell, "status": "dominated", "val_acc": None} for cell in self.dominated]
        i, best = self.best_cell(), None
        if i is not None:
            best = {**self.cells[i], "val_acc": self.done[i],
                    "candidate": self.aligned[i].candidate.to_dict()}
        return {"rows": "depthwise", "cols": "other", "row_bits": rows, "col_bits": cols,
                "table": table, "cells": cells, "best": best, "budget": str(self.budget)}

    def summary_text(self) -> str:
        """The grid as a text table in Table 7's layout; ``*`` marks the best cell."""
        s = self.summary()
        best = s["best"] or {}
        corner, fmt = "dw \\ other", "{:>9}".format
        lines = [f"grid at {s['budget']}, validation accuracy per cell:",
                 f"  {corner:>11} " + "".join(fmt(str(c)) for c in s["col_bits"])]
        for r, accs in zip(s["row_bits"], s["table"]):
            cells = ["-" if acc is None else
                     ("*" if (best.get("depthwise"), best.get("other")) == (r, c) else "")
                     + f"{acc:.2%}" for c, acc in zip(s["col_bits"], accs)]
            lines.append(f"  {'n/a' if r is None else r:>11} " + "".join(map(fmt, cells)))
        early = [f"dw {c.get('depthwise', 'n/a')} / other {c.get('other', 'n/a')} at "
                 f"{c['stopped_at_step']} steps" for c in s["cells"] if c["status"] == "stopped"]
        if early:
            lines.append("  stopped early by the scheduler (accuracy at that fidelity): "
                         + "; ".join(early))
        return "\n".join(lines)
