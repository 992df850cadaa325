"""``aotgrad explain --html``: an ``ExplainReport`` as one self-contained page.

``render_html(report)`` returns the page: inline CSS and inline SVG drawn
here, no script and no reference to anything outside the file, so it opens
offline and can be mailed or attached to an issue.  It shows

* ``#timeline`` -- the memory of the training step (Note [Peak of a step]):
  bytes live after each node of the forward, then of the backward, stacked by
  what holds them (parameters and inputs, saved, recomputed, offloaded,
  temporaries, ...), the total as one polyline with a point per step, the
  peak marked, and the byte budget (``--budget-bytes``) as a horizontal
  ``.budget-line``;
* ``#pareto`` -- one point per plan of the budget sweep (``pareto_sweep``):
  its peak against its warm step time, the non-dominated plans joined;
* ``#plan-table`` -- each value saved, recomputed or offloaded, with its bytes;
* ``#forward-graph`` and ``#backward-graph`` -- the graphs, layered top-down
  (a node sits one layer below the lowest of its inputs; a placeholder just
  above its first user), nodes coloured by kind, the peak's node outlined.

Only this module knows about HTML; it reads the report's plain data
(``aotgrad.explain``'s dataclasses) and never the graphs themselves.
"""

from __future__ import annotations

import html
import math
from typing import Iterable

from .explain import ExplainReport, GraphNode, GraphStats, ParetoPoint, PlanRow

# what holds memory (Buffer.kind, GraphNode.kind) -> (colour, legend label)
KINDS: dict[str, tuple[str, str]] = {
    "input": ("#a3acb9", "parameters and inputs"),
    "saved": ("#f4a261", "saved for the backward"),
    "offloaded": ("#2a9d8f", "offloaded to CPU"),
    "reloaded": ("#8fd3c7", "reloaded from CPU"),
    "recomputed": ("#9b5de5", "recomputed in the backward"),
    "activation": ("#8ecae6", "forward temporaries"),
    "temporary": ("#bcd4e6", "backward temporaries"),
    "output": ("#1d6fa5", "outputs"),
    "tangent": ("#e9c46a", "tangents"),
    "gradient": ("#e76f51", "gradients"),
    "view": ("#eef3f7", "views (no new memory)"),
    "": ("#ffffff", "not a tensor"),
    "return": ("#444444", "graph output"),
}
ALWAYS_IN_LEGEND = ("saved", "recomputed", "offloaded")   # even when nothing is
STACK = ("input", "saved", "offloaded", "reloaded", "recomputed", "activation", "temporary",
         "output", "tangent", "gradient")

CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px 24px;
       color: #1f2328; background: #fff; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
.meta { color: #555; margin: 2px 0; } .ok { color: #1a7f37; font-weight: 600; }
.bad { color: #cf222e; font-weight: 600; }
.facts { display: flex; flex-wrap: wrap; gap: 8px 28px; margin: 10px 0; }
.facts div b { display: block; font-size: 17px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: 12px; margin: 4px 0; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #0003;
          vertical-align: -2px; margin-right: 4px; }
.row2 { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 24px; }
.scroll { overflow: auto; border: 1px solid #d0d7de; border-radius: 4px; }
table { border-collapse: collapse; font-size: 12px; width: 100%; }
th, td { padding: 2px 8px; border-bottom: 1px solid #eaeef2; text-align: left;
         white-space: nowrap; }
th { position: sticky; top: 0; background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.chip { display: inline-block; padding: 0 6px; border-radius: 8px; color: #fff; }
svg text { font-family: system-ui, sans-serif; }
.axis line, .axis path { stroke: #888; } .axis text { font-size: 11px; fill: #444; }
.grid { stroke: #eee; }
.live-total { fill: none; stroke: #222; stroke-width: 1.5; }
.budget-line { stroke: #cf222e; stroke-width: 2; stroke-dasharray: 8 4; }
.frontier { fill: none; stroke: #1d6fa5; stroke-width: 1.5; }
.step-hit { fill: transparent; } .step-hit:hover { fill: #0001; }
.edge { fill: none; stroke: #8c959f; stroke-opacity: .55; stroke-width: .8; }
.gnode rect { stroke: #57606a; stroke-width: .6; } .gnode text { font-size: 10px; fill: #111; }
.gnode.peak rect { stroke: #cf222e; stroke-width: 2.5; }
pre { font-size: 11px; background: #f6f8fa; padding: 8px; overflow: auto; max-height: 480px; }
"""


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def _nice_step(span: float, ticks: int = 5) -> float:
    """A round tick spacing (1, 2, 5 times a power of ten) for ``span``."""
    raw = max(span, 1e-12) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _byte_ticks(hi: float) -> list[tuple[float, str]]:
    """(value, label) ticks at round numbers of one unit (B, KiB, MiB, GiB) up to ``hi``."""
    unit, name = next(((u, n) for u, n in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB"))
                       if hi >= u), (1, "B"))
    step = _nice_step(hi / unit)
    return [(k * step * unit, f"{k * step:g} {name}") for k in range(int(hi / unit / step) + 1)]


def _legend(kinds: Iterable[str]) -> str:
    items = "".join(f'<span class="legend-{k or "none"}"><span class="swatch" style="background:'
                    f'{KINDS[k][0]}"></span>{_e(KINDS[k][1])}</span>' for k in kinds)
    return f'<div class="legend">{items}</div>'


# ---------------------------------------------------------------- (a) the timeline


def timeline_svg(report: ExplainReport, width: int = 1340, height: int = 380) -> str:
    tl = report.timeline
    if tl is None or not tl.steps:
        return '<svg id="timeline" width="400" height="40"><text x="8" y="24">no steps</text></svg>'
    n, nf = len(tl.steps), tl.num_forward_steps
    per_kind = {k: [0] * (n + 1) for k in STACK}
    for b in tl.buffers:
        delta = per_kind.setdefault(b.kind, [0] * (n + 1))
        delta[b.start] += b.nbytes
        delta[b.end + 1] -= b.nbytes
    kinds = [k for k in per_kind if any(per_kind[k])]
    levels = {}
    for k in kinds:
        running, row = 0, []
        for d in per_kind[k][:n]:
            running += d
            row.append(running)
        levels[k] = row
    live = tl.live
    top = max(max(live), report.budget_bytes or 0, 1) * 1.08
    left, right, up, down = 78, 16, 26, 44
    pw, ph = width - left - right, height - up - down

    def x(i: float) -> float:
        return left + (i * pw / (n - 1) if n > 1 else pw / 2)

    def y(v: float) -> float:
        return up + ph - v * ph / top

    out = [f'<svg id="timeline" width="{width}" height="{height}" role="img" '
           f'aria-label="memory live after each step">']
    out.append('<g class="axis">')
    for t, label in _byte_ticks(top):
        out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y(t):.1f}" '
                   f'y2="{y(t):.1f}"/><text x="{left - 6}" y="{y(t) + 4:.1f}" '
                   f'text-anchor="end">{_e(label)}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{up}" y2="{up + ph}"/>'
               f'<line x1="{left}" x2="{left + pw}" y1="{up + ph}" y2="{up + ph}"/></g>')
    cum = [0] * n
    for k in kinds:
        lower = cum[:]
        cum = [a + b for a, b in zip(cum, levels[k])]
        pts = [f"{x(i):.1f},{y(cum[i]):.1f}" for i in range(n)] + \
              [f"{x(i):.1f},{y(lower[i]):.1f}" for i in reversed(range(n))]
        out.append(f'<polygon class="area area-{k}" fill="{KINDS.get(k, ("#ccc",))[0]}" '
                   f'fill-opacity=".85" points="{" ".join(pts)}"><title>{_e(KINDS[k][1])}'
                   f'</title></polygon>')
    pts = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(live))
    out.append(f'<polyline class="live-total" points="{pts}"/>')
    if 0 < nf < n:  # forward | backward
        xb = (x(nf - 1) + x(nf)) / 2
        out.append(f'<line x1="{xb:.1f}" x2="{xb:.1f}" y1="{up}" y2="{up + ph}" stroke="#555" '
                   f'stroke-dasharray="3 3"/>')
    out.append(f'<text x="{(left + (x(nf - 1) if nf else left)) / 2:.1f}" y="{height - 12}" '
               f'text-anchor="middle" font-size="12">forward ({nf} steps)</text>')
    if nf < n:
        out.append(f'<text x="{(x(nf) + left + pw) / 2:.1f}" y="{height - 12}" '
                   f'text-anchor="middle" font-size="12">backward ({n - nf} steps)</text>')
    slot = pw / max(n, 1)
    for i, (step, v) in enumerate(zip(tl.steps, live)):  # a hover target per step
        out.append(f'<rect class="step-hit" x="{x(i) - slot / 2:.1f}" y="{up}" '
                   f'width="{slot:.2f}" height="{ph}"><title>step {i}: {_e(step)}\n'
                   f'{_e(fmt_bytes(v))} live</title></rect>')
    p = tl.peak_step
    anchor = "end" if x(p) > left + pw * 0.7 else "start"
    dx = -8 if anchor == "end" else 8
    out.append(f'<circle class="peak" cx="{x(p):.1f}" cy="{y(live[p]):.1f}" r="4" fill="#cf222e"/>'
               f'<text x="{x(p) + dx:.1f}" y="{max(y(live[p]) - 6, 12):.1f}" text-anchor="{anchor}" '
               f'font-size="12" font-weight="600">peak {_e(fmt_bytes(live[p]))} at '
               f'{_e(tl.steps[p])}</text>')
    if report.budget_bytes is not None:
        yb = y(report.budget_bytes)
        out.append(f'<line class="budget-line" x1="{left}" x2="{left + pw}" y1="{yb:.1f}" '
                   f'y2="{yb:.1f}"><title>budget {_e(fmt_bytes(report.budget_bytes))}</title>'
                   f'</line><text x="{left + pw - 4}" y="{yb - 5:.1f}" text-anchor="end" '
                   f'fill="#cf222e" font-size="12">budget {_e(fmt_bytes(report.budget_bytes))}'
                   f'</text>')
    out.append("</svg>")
    legend = [k for k in STACK if k in kinds or k in ALWAYS_IN_LEGEND]
    return "\n".join(out) + _legend(legend)


# ---------------------------------------------------------------- (b) the Pareto curve


def _point_label(p: ParetoPoint) -> str:
    return p.partitioner if p.budget is None else f"{p.budget}"


def pareto_svg(report: ExplainReport, width: int = 640, height: int = 340) -> str:
    points = report.pareto
    if not points:
        return ('<div id="pareto" class="meta">no sweep was run (<code>--pareto</code> '
                'lists budgets to sweep)</div>')
    timed = [p.warm_step_seconds for p in points if p.warm_step_seconds is not None]
    xs = [p.peak_bytes for p in points] + ([report.budget_bytes] if report.budget_bytes else [])
    lo, hi = min(xs), max(xs)
    pad = max((hi - lo) * 0.08, hi * 0.03, 1)
    lo, hi = max(lo - pad, 0), hi + pad
    ttop = max(timed, default=1e-3) * 1.15
    left, right, up, down = 64, 20, 16, 46
    pw, ph = width - left - right, height - up - down

    def x(v: float) -> float:
        return left + (v - lo) * pw / (hi - lo)

    def y(s: float | None) -> float:
        return up + ph / 2 if s is None else up + ph - s * ph / ttop

    out = [f'<svg id="pareto" width="{width}" height="{height}" role="img" '
           f'aria-label="peak memory against step time, one point per plan"><g class="axis">']
    step = _nice_step(hi - lo)
    t = math.ceil(lo / step) * step
    while t <= hi:
        out.append(f'<line class="grid" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{up}" '
                   f'y2="{up + ph}"/><text x="{x(t):.1f}" y="{up + ph + 14}" '
                   f'text-anchor="middle">{_e(fmt_bytes(t))}</text>')
        t += step
    if timed:
        step = _nice_step(ttop)
        for k in range(int(ttop / step) + 1):
            out.append(f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{y(k * step):.1f}" '
                       f'y2="{y(k * step):.1f}"/><text x="{left - 6}" y="{y(k * step) + 4:.1f}" '
                       f'text-anchor="end">{k * step * 1e3:g} ms</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{up}" y2="{up + ph}"/>'
               f'<line x1="{left}" x2="{left + pw}" y1="{up + ph}" y2="{up + ph}"/></g>'
               f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="12">'
               f'estimated peak of the step</text><text transform="translate(13 {up + ph / 2}) '
               f'rotate(-90)" text-anchor="middle" font-size="12">'
               f'{"warm step time (median)" if timed else "not timed (--repeat 0)"}</text>')
    if report.budget_bytes is not None:
        xb = x(report.budget_bytes)
        out.append(f'<line class="budget-line" x1="{xb:.1f}" x2="{xb:.1f}" y1="{up}" '
                   f'y2="{up + ph}"><title>budget {_e(fmt_bytes(report.budget_bytes))}</title>'
                   f'</line>')
    front, best = [], math.inf  # the plans no other plan beats on both peak and time
    for p in sorted((p for p in points if p.ok and p.warm_step_seconds is not None),
                    key=lambda p: (p.peak_bytes, p.warm_step_seconds)):
        if p.warm_step_seconds < best:
            front.append(p)
            best = p.warm_step_seconds
    if len(front) > 1:
        pts = " ".join(f"{x(p.peak_bytes):.1f},{y(p.warm_step_seconds):.1f}" for p in front)
        out.append(f'<polyline class="frontier" points="{pts}"/>')
    labels: dict[tuple[int, int], list[str]] = {}
    for p in points:
        cx, cy = x(p.peak_bytes), y(p.warm_step_seconds)
        tip = (f"{_point_label(p)}: peak {fmt_bytes(p.peak_bytes)}, step "
               f"{_fmt_ms(p.warm_step_seconds)}, saved {fmt_bytes(p.saved_activation_bytes)}, "
               f"{p.recomputed_ops} ops recomputed, "
               f"{'matches eager' if p.ok else 'DOES NOT match eager'}")
        colour = "#1d6fa5" if p.ok else "#cf222e"
        if p.chosen:
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#111" '
                       f'stroke-width="1.5"/>')
        out.append(f'<circle class="pareto-point{" chosen" if p.chosen else ""}" '
                   f'data-budget="{_e(_point_label(p))}" data-peak="{p.peak_bytes}" cx="{cx:.1f}" '
                   f'cy="{cy:.1f}" r="5" fill="{colour}"><title>{_e(tip)}</title></circle>')
        labels.setdefault((round(cx / 10), round(cy / 10)), []).append(
            _point_label(p) + ("*" if p.chosen else ""))
    for (gx, gy), names in labels.items():
        out.append(f'<text x="{gx * 10 + 8}" y="{gy * 10 - 7}" font-size="11">'
                   f'{_e(", ".join(names))}</text>')
    out.append("</svg>")
    rows = "".join(
        f'<tr><td>{_e(_point_label(p))}{" (explained)" if p.chosen else ""}</td>'
        f'<td class="num">{_e(fmt_bytes(p.peak_bytes))}</td>'
        f'<td class="num">{_e(_fmt_ms(p.warm_step_seconds))}</td>'
        f'<td class="num">{_e(fmt_bytes(p.saved_activation_bytes))}</td>'
        f'<td class="num">{p.recomputed_ops}</td>'
        f'<td class="{"ok" if p.ok else "bad"}">{"yes" if p.ok else "NO"}</td></tr>'
        for p in points)
    return "\n".join(out) + (
        '<table><tr><th>activation budget</th><th class="num">peak</th><th class="num">warm '
        'step</th><th class="num">saved</th><th class="num">recomputed ops</th><th>matches '
        f'eager</th></tr>{rows}</table>')


# ---------------------------------------------------------------- (c) the plan


def plan_table(rows: list[PlanRow]) -> str:
    body = []
    for r in rows:
        colour = KINDS[r.decision][0]
        shape = "x".join(map(str, r.shape)) if r.shape else ("scalar" if r.shape == [] else "-")
        body.append(f'<tr class="plan-row {r.decision}" data-name="{_e(r.name)}" '
                    f'data-bytes="{r.bytes}"><td><span class="chip" style="background:{colour}">'
                    f'{r.decision}</span></td><td>{_e(r.name)}</td><td>{_e(r.op)}</td>'
                    f'<td>{_e(shape)}</td><td>{_e(r.dtype)}</td><td class="num">{r.bytes}</td>'
                    f'<td>{_e(r.note)}</td></tr>')
    summary = []
    for d in ("saved", "recomputed", "offloaded"):
        chosen = [r for r in rows if r.decision == d]
        summary.append(f"{len(chosen)} {d} ({fmt_bytes(sum(r.bytes for r in chosen))})"
                       if chosen else f"nothing {d}")
    return (f'<p class="meta">{_e("; ".join(summary))}</p><div class="scroll" '
            f'style="max-height:440px"><table id="plan-table"><thead><tr><th>decision</th>'
            f'<th>value</th><th>op</th><th>shape</th><th>dtype</th><th class="num">bytes</th>'
            f'<th>source</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>')


# ---------------------------------------------------------------- (d) the graphs

NODE_W, NODE_H, GAP_X, GAP_Y = 124, 20, 10, 30


def layout(nodes: list[GraphNode]) -> dict[str, tuple[float, float]]:
    """Top-left corner of each node: layered, ordered to keep edges short."""
    names = {n.name for n in nodes}
    inputs = {n.name: [a for a in n.inputs if a in names] for n in nodes}
    users: dict[str, list[str]] = {n.name: [] for n in nodes}
    for n in nodes:
        for a in inputs[n.name]:
            users[a].append(n.name)
    layer: dict[str, int] = {}
    for n in nodes:  # graph order is topological
        if n.op != "placeholder":
            layer[n.name] = 1 + max((layer[a] for a in inputs[n.name] if a in layer), default=0)
    for n in nodes:
        if n.op == "placeholder":
            layer[n.name] = min((layer[u] for u in users[n.name]), default=1) - 1
    depth = max(layer.values(), default=0)
    rows: list[list[str]] = [[] for _ in range(depth + 1)]
    for n in nodes:
        rows[layer[n.name]].append(n.name)
    step = NODE_W + GAP_X
    xs = {name: k * step for row in rows for k, name in enumerate(row)}
    for sweep in range(4):  # barycentres: down (by inputs), then up (by users)
        order = rows if sweep % 2 == 0 else rows[::-1]
        for row in order:
            def want(name: str) -> float:
                near = inputs[name] if sweep % 2 == 0 else users[name]
                near = near or users[name] or inputs[name]
                return sum(xs[a] for a in near) / len(near) if near else xs[name]
            wanted = sorted(((want(name), name) for name in row), key=lambda t: t[0])
            prev = -math.inf
            placed = []
            for w, name in wanted:
                prev = max(w, prev + step)
                placed.append((prev, name))
            for p, name in placed:
                xs[name] = p
    lo = min(xs.values(), default=0)
    return {name: (xs[name] - lo + 8, layer[name] * (NODE_H + GAP_Y) + 8) for name in xs}


def graph_svg(stats: GraphStats, svg_id: str, peak_node: str | None) -> str:
    nodes = stats.nodes
    if not nodes:
        return f'<div id="{svg_id}" class="meta">no nodes</div>'
    pos = layout(nodes)
    width = max(x for x, _ in pos.values()) + NODE_W + 16
    height = max(y for _, y in pos.values()) + NODE_H + 16
    out = [f'<svg id="{svg_id}" width="{width:.0f}" height="{height:.0f}" role="img">']
    for n in nodes:
        x1, y1 = pos[n.name]
        for a in n.inputs:
            if a not in pos:
                continue
            x0, y0 = pos[a]
            sx, sy, tx, ty = x0 + NODE_W / 2, y0 + NODE_H, x1 + NODE_W / 2, y1
            mid = (sy + ty) / 2
            out.append(f'<path class="edge" d="M{sx:.1f},{sy:.1f} C{sx:.1f},{mid:.1f} '
                       f'{tx:.1f},{mid:.1f} {tx:.1f},{ty:.1f}"/>')
    for n in nodes:
        x, y = pos[n.name]
        colour = KINDS.get(n.kind, ("#ddd",))[0]
        label = n.name if n.op in ("placeholder", "output") else n.target.removesuffix(".default")
        label = label if len(label) <= 20 else label[:19] + "\u2026"
        shape = "x".join(map(str, n.shape)) if n.shape else ""
        tip = f"{n.name} = {n.target}\n{n.kind or 'not a tensor'}" + \
            (f", {shape}, {n.bytes} bytes" if n.shape is not None else "")
        peak = " peak" if n.name == peak_node else ""
        fg = "#fff" if n.kind in ("return", "output", "offloaded", "recomputed") else "#111"
        out.append(f'<g class="gnode {n.kind or "none"}{peak}" data-name="{_e(n.name)}">'
                   f'<title>{_e(tip)}</title><rect x="{x:.1f}" y="{y:.1f}" width="{NODE_W}" '
                   f'height="{NODE_H}" rx="4" fill="{colour}"/><text x="{x + NODE_W / 2:.1f}" '
                   f'y="{y + 14:.1f}" text-anchor="middle" style="fill:{fg}">{_e(label)}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------- the page


def render_html(report: ExplainReport) -> str:
    tl = report.timeline
    peak_step = tl.steps[tl.peak_step] if tl is not None and tl.steps else ""
    phase, _, peak_node = peak_step.partition(":")

    def check(label: str, match: bool | None) -> str:
        cls, word = ("ok", "yes") if match else ("meta", "n/a") if match is None else ("bad", "NO")
        return f'{label}: <span class="{cls}">{word}</span>'

    facts = [("peak (estimated)", fmt_bytes(tl.peak) if tl is not None else "-"),
             ("saved for the backward", fmt_bytes(report.saved_activation_bytes)),
             ("recomputed ops", str(sum(report.recomputed.values()))),
             ("warm step, compiled", _fmt_ms(report.warm_step_seconds)),
             ("warm step, eager", _fmt_ms(report.eager_step_seconds)),
             ("compile", _fmt_ms(report.compile_seconds))]
    if report.budget_bytes is not None:
        facts.append(("byte budget", fmt_bytes(report.budget_bytes)))
    plan = f"partition_fn={report.partitioner}" + (
        "" if report.budget is None else f", activation_memory_budget={report.budget}")
    fw_title = "Forward graph" if report.backward else "Inference graph"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>aotgrad explain: {_e(report.target)}</title><style>{CSS}</style></head><body>",
        f"<h1>aotgrad explain: {_e(report.description)}</h1>",
        f'<p class="meta">{_e(report.target)} &middot; {_e(report.api)}({_e(plan)}) &middot; '
        f'{_e(report.mode)} &middot; torch {_e(report.torch_version)}</p>',
        f'<p class="meta">{check("outputs match eager", report.outputs.match)} &middot; '
        f'{check("gradients match eager", report.gradients.match)}</p>',
        '<div class="facts">' + "".join(f"<div>{_e(k)}<b>{_e(v)}</b></div>" for k, v in facts)
        + "</div>",
        "<h2>Memory of the step (Note [Peak of a step]: bytes live after each node, graph "
        "order, each value freed after its last use)</h2>", timeline_svg(report),
        '<div class="row2"><div><h2>Peak against step time, one plan per budget (min-cut '
        'partitioner, activation_memory_budget)</h2>', pareto_svg(report), "</div>",
        "<div><h2>The plan: saved, recomputed, offloaded</h2>",
        plan_table(report.plan), "</div></div>",
        "<h2>Graphs (top-down; hover a node for its value)</h2>",
        _legend(["input", "activation", "saved", "offloaded", "output", "tangent", "temporary",
                 "recomputed", "reloaded", "gradient", "view", "return"]),
        f'<div><div><h2>{fw_title} ({report.forward.call_function} ops)</h2>'
        f'<div class="scroll" style="max-height:900px">'
        f'{graph_svg(report.forward, "forward-graph", peak_node if phase == "forward" else None)}'
        "</div></div><div>"]
    if report.backward is not None:
        parts.append(f"<h2>Backward graph ({report.backward.call_function} ops)</h2>"
                     f'<div class="scroll" style="max-height:900px">'
                     f'{graph_svg(report.backward, "backward-graph", peak_node if phase == "backward" else None)}'
                     "</div>")
    else:
        parts.append('<h2>Backward graph</h2><div id="backward-graph" class="meta">none: '
                     'nothing requires grad (inference)</div>')
    parts.append("</div></div><h2>Graph code</h2>")
    parts.append(f"<details><summary>{fw_title}</summary><pre>{_e(report.forward.code)}</pre>"
                 "</details>")
    if report.backward is not None:
        parts.append(f"<details><summary>Backward graph</summary><pre>"
                     f"{_e(report.backward.code)}</pre></details>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: ExplainReport, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_html(report))
