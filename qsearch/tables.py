"""Plain-text tables the CLI prints: a space's layer inventory (`qsearch space show`) and an
experiment's trials (`qsearch results`)."""

from __future__ import annotations

from qsearch.budget import format_cost


def space_table(space, cand, aligned=None) -> str:
    """Per-layer roles, shapes, bits and costs of ``cand``, with the totals and, when the
    candidate was width-aligned, the alignment."""
    rows = space.table(cand)
    yes = {True: "yes", False: "no"}
    fixed = space.family.fixed_width
    width = "fixed width (its own channels)" if fixed else f"width {cand.width:.4g}"
    own = fixed or space.family.user_width  # the model decides its first/last channels
    channels = ("" if own else f"first/last channels fixed: {yes[space.fixed_first]}/"
                f"{yes[space.fixed_last]}, ")
    lines = [f"{space.model} on {space.dataset}: {len(rows)} quantizable layers, {width}, "
             f"activations {cand.a_bits} bit",
             f"first/last layer bits: {'free' if space.pin_bits is None else space.pin_bits}, "
             f"{channels}biases in C_size: {yes[space.count_bias]}",
             f"{'#':>3} {'layer':<22} {'role':<9} {'cin':>5} {'cout':>5} {'k':>3} {'s':>2} "
             f"{'out':>7} {'bits':>4} {'C_size':>10} {'share':>6} {'BitOPs':>10}"]
    for i, r in enumerate(rows):
        lines.append(f"{i:>3} {r['layer']:<22} {r['role']:<9} {r['cin']:>5} {r['cout']:>5} "
                     f"{r['kernel']:>3} {r['stride']:>2} {r['out']:>7} {r['bits']:>4} "
                     f"{format_cost(r['c_size_bits'], 'size'):>10} {r['share']:>6.1%} "
                     f"{format_cost(r['bitops'], 'bitops'):>10}")
    mem = space.memory_footprint(cand)
    packed = space.packed_bytes(cand)
    lines.append(f"C_size {format_cost(space.c_size(cand), 'size')} ({space.c_size(cand):.0f} "
                 f"bits), BitOPs {format_cost(space.bitops(cand), 'bitops')} "
                 f"({space.bitops(cand):.0f}), inference memory {format_cost(mem, 'size')}, "
                 f"packed file ~{packed['total_bytes']:,} bytes")
    if aligned and fixed:
        lines.append(f"fits {aligned.budget} at fixed width: {aligned.ratio:.2%} of the budget")
    elif aligned:
        lines.append(f"width aligned to {aligned.budget}: width {cand.width:.6g}, achieved "
                     f"{aligned.ratio:.2%} of the budget")
    return "\n".join(lines)


def trials_table(rows: list[dict]) -> str:
    """One line per stored trial: status, accuracy, the steps behind it (a trial a scheduler
    stopped shows the rung it reached), costs, times, node or error."""
    lines = [f"{'#':>3} {'stage':<6} {'strategy':<13} {'status':<8} {'val_acc':>8} "
             f"{'steps':>6} {'C_size':>9} {'ratio':>7} {'width':>7} {'train_s':>8} "
             f"{'wall_s':>7} node / error"]
    for r in rows:
        acc = f"{r['val_acc']:.2%}" if r["val_acc"] == r["val_acc"] else "-"
        size = format_cost(r["c_size"], "size") if r["c_size"] else "-"
        ratio = f"{r['budget_ratio']:.2%}" if r["budget_ratio"] else "-"
        width = f"{r['width']:.4g}" if r["width"] else "-"
        train_s = f"{r['train_seconds']:.1f}" if r["train_seconds"] else "-"
        steps = "-" if r.get("steps") is None else str(r["steps"])
        lines.append(f"{r['trial_index']:>3} {r['stage']:<6} {r['strategy']:<13} "
                     f"{r['status']:<8} {acc:>8} {steps:>6} {size:>9} {ratio:>7} {width:>7} "
                     f"{train_s:>8} {r['wall_seconds'] or 0:>7.1f} "
                     f"{r['error'] or r['node'] or ''}")
    return "\n".join(lines)
