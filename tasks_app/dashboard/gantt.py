"""A run's timeline as a Gantt chart (server-side SVG): one row per agent, one bar per attempt, each with its
task's estimate drawn as a dashed outline from the same start, so estimate against actual shows at a glance.
Pure: it takes the dicts `tasks_app.dashboard.panels.timeline` returns, no Django, no DB. Colours come from the
`att-<state>` classes in static/css/dag.css; every text is escaped, so the markup is safe for `|safe`.
"""

from __future__ import annotations

import html
from collections import defaultdict
from datetime import datetime

LABEL_W = 150  # the agents' names
PLOT_W = 1000  # the time axis; dag.js adds zoom for long runs
LANE_H, LANE_GAP, ROW_PAD = 18, 3, 4
AXIS_H, PAD, RIGHT = 22, 10, 30  # RIGHT: room for the last tick's label
CHAR_W = 6.2  # average width of an 11 px character, for fitting keys in bars
TICK_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
LIVE = ("assigned", "running")
SVG_NS = "http://www.w3.org/2000/svg"


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt_duration(s: float) -> str:
    """Short and exact enough for ticks and tooltips: 2.5s, 45s, 3m, 3m20s, 1h, 1h05m."""
    if s < 10 and s != int(s):
        return f"{s:.1f}s"
    s = round(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, sec = divmod(s, 60)
        return f"{m}m{sec:02d}s" if sec else f"{m}m"
    h, rest = divmod(s, 3600)
    return f"{h}h{rest // 60:02d}m" if rest >= 60 else f"{h}h"


def _tick_step(span: float) -> float:
    for step in TICK_STEPS:
        if span / step <= 10:
            return step
    return 86400 * -(-span // (86400 * 10))


def _f(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _empty() -> str:
    return (
        f'<svg xmlns="{SVG_NS}" class="gantt gantt-empty" viewBox="0 0 240 40" width="240" height="40" '
        'role="img" aria-label="No attempts yet"><text x="10" y="25" font-size="13">No attempts yet</text></svg>'
    )


def render_gantt_svg(attempts: list[dict], now: datetime | None = None) -> str:
    """x is time since the run's first assignment; live attempts (finished_at None) run up to `now`."""
    bars = []
    for a in attempts:
        start = a.get("started_at") or a.get("assigned_at")
        if start is not None:
            bars.append((a, start))
    if not bars:
        return _empty()
    if now is None:  # same awareness as the data: Django's aware datetimes, or naive ones in tests and scripts
        now = datetime.now(bars[0][1].tzinfo)
    t0 = min(a.get("assigned_at") or start for a, start in bars)

    def sec(t: datetime) -> float:
        return (t - t0).total_seconds()

    rows: dict = defaultdict(list)  # agent -> [(attempt, start s, end s, estimate s)]
    t_end, live = 0.0, False
    for a, start in bars:
        b = sec(start)
        e = max(b, sec(a.get("finished_at") or now))
        live = live or (a.get("finished_at") is None and a.get("state") in LIVE)
        est = float(a.get("task__estimate_s") or 0)
        t_end = max(t_end, e, b + est)
        rows[a.get("agent__name") or "(no agent)"].append((a, b, e, est))
    span = max(t_end, 1.0)
    scale = PLOT_W / span
    x0 = PAD + LABEL_W

    layout, y = _lay_out(rows, PAD + AXIS_H)
    height = y + PAD
    width = x0 + PLOT_W + RIGHT

    out = [
        f'<svg xmlns="{SVG_NS}" class="gantt" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'font-size="11" role="img" aria-label="Timeline: {len(bars)} attempts on {len(rows)} agents">',
        '<g class="axis">',
        *_ticks(span, scale, x0, y),
        "</g>",
    ]
    for i, (agent, top, h, placed) in enumerate(layout):
        out.append(f'<g class="row" data-agent="{_esc(agent)}">')
        if i % 2:
            out.append(f'<rect class="row-bg" x="{PAD}" y="{top}" width="{LABEL_W + PLOT_W}" height="{h}"/>')
        out.append(
            f'<text class="agent" x="{PAD + 4}" y="{top + ROW_PAD + 13}"><title>{_esc(agent)}</title>'
            f"{_esc(agent if len(agent) <= 22 else agent[:21] + '…')}</text>"
        )
        for lane, a, b, e, est in placed:
            out.append(_bar(a, agent, b, e, est, x0 + b * scale, top + ROW_PAD + lane * (LANE_H + LANE_GAP), scale))
        out.append("</g>")
    if live:
        x = _f(x0 + sec(now) * scale)
        out.append(f'<line class="now" x1="{x}" y1="{PAD + AXIS_H - 4}" x2="{x}" y2="{y}"><title>now</title></line>')
    out.append("</svg>")
    return "".join(out)


def _lay_out(rows: dict, top: int) -> tuple[list, int]:
    """([(agent, y, height, [(lane, attempt, start s, end s, estimate s)])], the bottom y), agents sorted by
    name from `top` down. Concurrent attempts of one agent (capacity > 1) go in lanes: each to the first lane
    free at its start."""
    layout, y = [], top
    for agent in sorted(rows):
        lanes: list[float] = []
        placed = []
        for a, b, e, est in sorted(rows[agent], key=lambda r: (r[1], r[2])):
            lane = next((i for i, end in enumerate(lanes) if end <= b), len(lanes))
            if lane == len(lanes):
                lanes.append(e)
            lanes[lane] = e
            placed.append((lane, a, b, e, est))
        h = len(lanes) * (LANE_H + LANE_GAP) - LANE_GAP + 2 * ROW_PAD
        layout.append((agent, y, h, placed))
        y += h
    return layout, y


def _ticks(span: float, scale: float, x0: float, bottom: int) -> list[str]:
    """The time axis: a grid line down to `bottom` and a label every tick step, from 0 to `span` seconds."""
    out = []
    step = _tick_step(span)
    t = 0.0
    while t <= span + 1e-9:
        x = _f(x0 + t * scale)
        out.append(
            f'<line class="grid" x1="{x}" y1="{PAD + AXIS_H - 4}" x2="{x}" y2="{bottom}"/>'
            f'<text class="tick" x="{x}" y="{PAD + 10}" text-anchor="middle">{fmt_duration(t)}</text>'
        )
        t += step
    return out


def _bar(a: dict, agent: str, b: float, e: float, est: float, x: float, y: int, scale: float) -> str:
    """One attempt: the wait from assignment to start (thin line), the actual bar, the estimate's outline on
    top of it (so an overrun shows where the estimate ended), the key when it fits, and a tooltip."""
    state = str(a.get("state") or "")
    key = str(a.get("task__key") or "")
    actual = e - b
    tip = [key + (f" — {a['task__title']}" if a.get("task__title") else "")]
    tip.append(f"agent: {agent}" + (f", attempt {a['number']}" if a.get("number") else ""))
    tip.append(f"state: {state}")
    if est:
        tip.append(f"actual {fmt_duration(actual)} vs estimate {fmt_duration(est)} ({round(100 * actual / est)}%)")
    else:
        tip.append(f"actual {fmt_duration(actual)}, no estimate")
    w = actual * scale
    out = [
        f'<g class="bar att-{_esc(state)}" data-id="{_esc(a.get("id", ""))}" data-state="{_esc(state)}">'
        f"<title>{_esc(chr(10).join(tip))}</title>"
    ]
    assigned, started = a.get("assigned_at"), a.get("started_at")
    if assigned and started and started > assigned:
        wx = x - (started - assigned).total_seconds() * scale
        out.append(f'<line class="wait" x1="{_f(wx)}" y1="{y + LANE_H // 2}" x2="{_f(x)}" y2="{y + LANE_H // 2}"/>')
    out.append(f'<rect class="act" x="{_f(x)}" y="{y}" width="{_f(w)}" height="{LANE_H}" rx="2"/>')
    if est:
        out.append(f'<rect class="est" x="{_f(x)}" y="{y}" width="{_f(est * scale)}" height="{LANE_H}" rx="2"/>')
    fits = int((w - 6) // CHAR_W)
    if fits >= 3 and key:
        label = key if len(key) <= fits else key[: fits - 1] + "…"
        out.append(f'<text class="lbl" x="{_f(x + 3)}" y="{y + 13}">{_esc(label)}</text>')
    out.append("</g>")
    return "".join(out)
