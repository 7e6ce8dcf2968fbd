"""A run's DAG as a picture: a layered layout, drawn as server-side SVG (the admin's workflow editor) or sent
as compact data that static/js/dag.js draws on a canvas (the run page, up to 10,000 tasks and more). Pure
functions over the dicts `tasks_app.dashboard.panels.run_graph` returns; no Django, no DB.

Columns are dependency depths (the seed's "waves"), left to right. A barycenter heuristic orders each column to
cut edge crossings, and a column taller than MAX_COLUMN_PX wraps into sub-columns, so a 500-task wave stays
legible and the picture stays roughly landscape. Colours come from CSS classes only (static/css/dag.css), so
the page's light or dark theme applies, and every state is written in words as well (or, in the compact style,
in the legend and tooltip). static/js/dag.js adds pan and zoom to the SVG; on the run page it draws
`picture_data` and applies live updates (`state_map`) to it.

The layout stays here, on the server, for both: one owner, already tested, and its cost (~0.3 s at 10,000
tasks) is paid once per run and cached by the page (a run's graph does not change), not on every load.
"""

from __future__ import annotations

import html
import re
from collections import defaultdict
from dataclasses import dataclass
from itertools import accumulate

from ..states import TaskState
from .gantt import fmt_duration

COMPACT_ABOVE = 150  # nodes: beyond this the compact style (small boxes, no state line) keeps the picture usable
MAX_COLUMN_PX = 1000  # a depth taller than this wraps into sub-columns
SWEEPS = 8  # barycenter passes (down, up, ...); it stops sooner once two passes in a row gain nothing
PAD, LEGEND_H = 10, 26
LIVE = TaskState.LIVE
# Where each legend item starts: a 12 px swatch, its word (about 7 px a letter at 11 px) and a gap.
LEGEND_X = list(accumulate((30 + 7 * len(state) for state in TaskState.ALL), initial=0))
SVG_NS = "http://www.w3.org/2000/svg"


@dataclass(frozen=True)
class Style:
    node_w: int
    node_h: int
    gap_x: int  # between depths: room for the edge curves
    sub_gap: int  # between the sub-columns of one wrapped depth
    gap_y: int
    font: int
    key_chars: int  # longer keys are cut with an ellipsis (the tooltip keeps the whole key)
    pbar_inset: int
    pbar_h: int
    rx: int


NORMAL = Style(150, 44, 56, 14, 12, 12, 20, 5, 3, 6)
COMPACT = Style(96, 20, 36, 8, 6, 10, 15, 2, 2, 3)


@dataclass
class Layout:
    style: Style
    pos: dict  # node id -> (x, y): the top-left corner of its box
    depth: dict  # node id -> the depth its column stands for
    columns: list  # one list of node ids per depth, left to right, in top-to-bottom (row-major) order
    edges: list  # (upstream id, downstream id), both known, deduplicated
    width: int
    height: int


_DIGITS = re.compile(r"(\d+)")


def natural_key(key) -> tuple:
    """A task key's sort key for people: its runs of digits compare as numbers, so impl-2 comes before
    impl-10 (a text sort puts impl-10 first). Each part is a (kind, value) pair, so a number never meets a
    string in a comparison."""
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p) for p in _DIGITS.split(str(key)) if p)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _trunc(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _depths(ids: list, ups: dict, downs: dict) -> dict:
    """Longest path from a root (Kahn's order). Nodes on a cycle (an invalid graph) go after everything else
    rather than hanging the page."""
    indeg = {n: len(ups[n]) for n in ids}
    depth = dict.fromkeys(ids, 0)
    queue = [n for n in ids if not indeg[n]]
    for n in queue:  # the list grows while we walk it: a breadth-first topological order
        for m in downs[n]:
            depth[m] = max(depth[m], depth[n] + 1)
            indeg[m] -= 1
            if not indeg[m]:
                queue.append(m)
    if len(queue) < len(ids):
        last = max(depth.values(), default=0) + 1
        depth.update({n: last for n in ids if indeg[n]})
    return depth


def _crossings(groups: dict, index: dict) -> int:
    """Crossings among edges joining the same pair of columns: inversions of the downstream positions once the
    edges are sorted by upstream position, counted with a Fenwick tree (O(E log V))."""
    total = 0
    for pairs in groups.values():
        if len(pairs) < 2:
            continue
        seq = sorted((index[u], index[v]) for u, v in pairs)
        tree = [0] * (max(b for _, b in seq) + 2)
        for seen, (_, b) in enumerate(seq):
            i, not_above = b + 1, 0
            while i > 0:
                not_above += tree[i]
                i -= i & -i
            total += seen - not_above
            i = b + 1
            while i < len(tree):
                tree[i] += 1
                i += i & -i
    return total


def _order(cols: list, edges: list, ups: dict, downs: dict, shapes: list, rows_max: int) -> None:
    """Barycenter ordering in place: each node moves to the mean height of its neighbours in the columns
    already swept. Heights are in rows, as drawn (columns are centred vertically, wrapped ones row-major), so
    columns of different sizes compare fairly. The best ordering seen is kept; O((V+E) log V) per pass."""
    col_of = {n: c for c, col in enumerate(cols) for n in col}
    groups: dict = defaultdict(list)
    for u, v in edges:
        groups[col_of[u], col_of[v]].append((u, v))
    y, index = {}, {}

    def place(c: int) -> None:
        k, rows = shapes[c]
        off = (rows_max - rows) / 2
        for i, n in enumerate(cols[c]):
            y[n], index[n] = off + i / k, i

    for c in range(len(cols)):
        place(c)
    best, best_x, idle = [list(col) for col in cols], _crossings(groups, index), 0
    for sweep in range(SWEEPS):
        if not best_x or idle >= 2:
            break
        down = sweep % 2 == 0
        nbrs = ups if down else downs
        for c in range(1, len(cols)) if down else range(len(cols) - 2, -1, -1):

            def bary(item, nbrs=nbrs):
                i, n = item
                ns = nbrs.get(n)
                return (sum(y[m] for m in ns) / len(ns) if ns else y[n]), i

            cols[c] = [n for _, n in sorted(enumerate(cols[c]), key=bary)]
            place(c)
        crossings = _crossings(groups, index)
        if crossings < best_x:
            best, best_x, idle = [list(col) for col in cols], crossings, 0
        else:
            idle += 1
    cols[:] = best


def layout(nodes: list[dict], edges, *, compact: bool | None = None) -> Layout:
    """Place every node: x by depth (wrapped depths take several sub-columns), y by barycenter order."""
    by_id = {n["id"]: n for n in nodes}
    ids = list(by_id)
    edges = [(u, v) for u, v in dict.fromkeys(tuple(e) for e in edges) if u in by_id and v in by_id and u != v]
    ups: dict = defaultdict(list)
    downs: dict = defaultdict(list)
    for u, v in edges:
        ups[v].append(u)
        downs[u].append(v)
    if all(by_id[n].get("depth") is not None for n in ids):
        depth = {n: int(by_id[n]["depth"]) for n in ids}
    else:  # one missing depth and we compute them all, so that edges cannot point backwards
        depth = _depths(ids, ups, downs)
    by_depth: dict = defaultdict(list)
    # Within a depth, keys in natural order to start from (impl-2 above impl-10): the barycenter sweeps
    # keep it where it does not cost crossings.
    for n in sorted(ids, key=lambda n: natural_key(by_id[n].get("key") or n)):
        by_depth[depth[n]].append(n)
    cols = [by_depth[d] for d in sorted(by_depth)]
    s = (COMPACT if len(ids) > COMPACT_ABOVE else NORMAL) if compact is None else (COMPACT if compact else NORMAL)
    pitch_y = s.node_h + s.gap_y
    limit = max(1, MAX_COLUMN_PX // pitch_y)
    shapes = []  # per column: (sub-columns, rows), the rows balanced across the sub-columns
    for col in cols:
        k = -(-len(col) // limit)
        shapes.append((k, -(-len(col) // k)))
    rows_max = max((rows for _, rows in shapes), default=0)
    _order(cols, edges, ups, downs, shapes, rows_max)

    pos, x, top = {}, PAD, PAD + LEGEND_H
    for col, (k, rows) in zip(cols, shapes, strict=True):
        off = top + (rows_max - rows) * pitch_y // 2
        for i, n in enumerate(col):
            pos[n] = (x + (i % k) * (s.node_w + s.sub_gap), off + (i // k) * pitch_y)
        x += k * s.node_w + (k - 1) * s.sub_gap + s.gap_x
    width = max(x - s.gap_x + PAD if cols else 0, 2 * PAD + LEGEND_X[-1])
    height = top + max(rows_max * pitch_y - s.gap_y, 0) + PAD
    return Layout(s, pos, {n: depth[n] for n in ids}, cols, edges, width, height)


def _state(node: dict) -> tuple[str, float]:
    state = str(node.get("state") or TaskState.BLOCKED)
    try:
        progress = min(1.0, max(0.0, float(node.get("progress") or 0)))
    except (TypeError, ValueError):
        progress = 0.0
    return state, progress


def state_line(state: str, progress: float) -> str:
    """The tooltip's last line; dag.js rewrites it in the same words on live updates."""
    return f"state: {state}" + (f" · {round(progress * 100)}%" if state in LIVE else "")


def _node(n: dict, x: int, y: int, s: Style, compact: bool) -> str:
    state, progress = _state(n)
    key = str(n.get("key") or n["id"])
    tip = [key]
    if n.get("title"):
        tip.append(str(n["title"]))
    if n.get("estimate_s"):
        tip.append(f"estimate: {fmt_duration(float(n['estimate_s']))}")
    tip.append(state_line(state, progress))
    st = _esc(state)
    out = [
        f'<g class="node st-{st}" id="n-{_esc(n["id"])}" data-state="{st}" data-key="{_esc(key)}">'
        f"<title>{_esc(chr(10).join(tip))}</title>"
        f'<rect class="box" x="{x}" y="{y}" width="{s.node_w}" height="{s.node_h}" rx="{s.rx}"/>'
    ]
    if state in LIVE:
        w = round((s.node_w - 2 * s.pbar_inset) * progress)
        out.append(
            f'<rect class="pbar" x="{x + s.pbar_inset}" y="{y + s.node_h - s.pbar_inset - s.pbar_h}" '
            f'width="{w}" height="{s.pbar_h}"/>'
        )
    pad = 8 if not compact else 5
    out.append(f'<text class="key" x="{x + pad}" y="{y + s.font + (3 if compact else 6)}">')
    out.append(f"{_esc(_trunc(key, s.key_chars))}</text>")
    if not compact:
        out.append(f'<text class="st" x="{x + pad}" y="{y + 32}" font-size="10">{st}</text>')
        commit = n.get("commit") or {}
        if commit.get("sha"):  # what the task changed in a workspace run
            plus, minus = int(commit.get("insertions") or 0), int(commit.get("deletions") or 0)
            out.append(
                f'<text class="diffstat" x="{x + s.node_w - pad}" y="{y + 32}" font-size="10" text-anchor="end">'
                f'<tspan class="add">+{plus}</tspan> <tspan class="del">−{minus}</tspan></text>'
            )
    out.append("</g>")
    return "".join(out)


def _legend() -> str:
    items = []
    for state, x in zip(TaskState.ALL, LEGEND_X, strict=False):
        items.append(
            f'<g class="lg st-{state}"><rect class="box" x="{x}" y="0" width="12" height="12" rx="2"/>'
            f'<text x="{x + 17}" y="10" font-size="11">{state.replace("_", " ")}</text></g>'
        )
    return f'<g class="legend" transform="translate({PAD},{PAD})">{"".join(items)}</g>'


def render_svg(
    nodes: list[dict], edges, *, compact: bool | None = None, href: str | None = "/tasks/{id}/", legend: bool = True
) -> str:
    """SVG markup, every text escaped, safe for `|safe`. `href` (with `{id}`) is where dag.js sends a click on
    a node; None turns the click off (the admin's editor). Edges are drawn first, under the nodes. `legend`:
    the run states' colours (a workflow's picture, a template, has no states to explain)."""
    lay = layout(nodes, edges, compact=compact)
    s, pos = lay.style, lay.pos
    compact = s is COMPACT
    attrs = f' data-node-href="{_esc(href)}"' if href else ""
    out = [
        f'<svg xmlns="{SVG_NS}" class="dag{" compact" if compact else ""}" viewBox="0 0 {lay.width} {lay.height}" '
        f'width="{lay.width}" height="{lay.height}" font-size="{s.font}" role="img" '
        f'aria-label="Task graph: {len(pos)} tasks" data-pbar="{s.pbar_inset} {s.pbar_h}"{attrs}>',
        _legend() if legend else "",
        '<g class="edges" fill="none">',
    ]
    half = s.node_h // 2
    for u, v in lay.edges:
        (x1, y1), (x2, y2) = pos[u], pos[v]
        x1, y1, y2 = x1 + s.node_w, y1 + half, y2 + half
        dx = max(12, (x2 - x1) // 2)  # horizontal tangents at both ends: a smooth S between the columns
        out.append(
            f'<path class="edge" data-from="{_esc(u)}" data-to="{_esc(v)}" '
            f'd="M{x1} {y1}C{x1 + dx} {y1} {x2 - dx} {y2} {x2} {y2}"/>'
        )
    out.append('</g><g class="nodes">')
    by_id = {n["id"]: n for n in nodes}
    for col in lay.columns:
        for n in col:
            out.append(_node(by_id[n], *pos[n], s, compact))
    out.append("</g></svg>")
    return "".join(out)


def picture_size(svg: str) -> tuple[int, int]:
    """(width, height) of a picture `render_svg` drew, from its viewBox: pages size the picture's box to its
    shape, so a small DAG does not sit in a screen-high frame."""
    match = re.search(r'viewBox="0 0 (\d+) (\d+)"', svg)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def state_codes(nodes: list[dict], by: str = "id") -> dict:
    """The live-update map dag.js applies: {str(node[by]): [state, progress 0..1]}. The run page's picture
    names its nodes by key (`by="key"`: unique in a run, and shorter than an id in every push)."""
    return {str(n[by]): [state, round(progress, 3)] for n in nodes for state, progress in [_state(n)]}


def state_map(nodes: list[dict]) -> dict:
    """The run page's live-update map, by task key: {key: [state, progress]} for a live task, {key: state} for
    the others (no progress to show): a 10,000-task map is ~150 KB rather than ~250."""
    codes = state_codes(nodes, by="key")
    return {k: v if v[0] in LIVE else v[0] for k, v in codes.items()}


def picture_data(nodes: list[dict], edges, *, details: bool = True) -> dict:
    """The laid-out graph as compact JSON-ready data for dag.js's canvas, structure only (states go separately,
    `picture_states`): nodes are indexes into `keys`, in drawing order. Per node its sub-column (`col`, an index
    into the sub-columns' x, `cx`) and its row in half-pitch units (`row`: y = top + row * pitch / 2), the
    edges as a flat list of index pairs (`e`). `details` adds titles and estimates for the tooltip (a small
    run's; a 10,000-task run leaves them to the task page). Nodes are named by key, not id, on the page and in
    the cache: 10,000 ids are 360 KB of JSON, and unpickling as many UUIDs from a cache takes ~0.4 s."""
    lay = layout(nodes, edges)
    s = lay.style
    ids = [n for col in lay.columns for n in col]
    index = {n: i for i, n in enumerate(ids)}
    cx = sorted({x for x, _ in lay.pos.values()})
    col_of_x = {x: i for i, x in enumerate(cx)}
    pitch, top = s.node_h + s.gap_y, PAD + LEGEND_H
    by_id = {n["id"]: n for n in nodes}
    data = {
        "w": lay.width,
        "h": lay.height,
        "compact": s is COMPACT,
        "style": {
            "nw": s.node_w,
            "nh": s.node_h,
            "font": s.font,
            "chars": s.key_chars,
            "pitch": pitch,
            "top": top,
            "inset": s.pbar_inset,
            "bar": s.pbar_h,
            "rx": s.rx,
        },  # fmt: skip
        "states": list(TaskState.ALL),
        "keys": [str(by_id[n].get("key") or n) for n in ids],
        "cx": cx,
        "col": [col_of_x[lay.pos[n][0]] for n in ids],
        "row": [round((lay.pos[n][1] - top) * 2 / pitch) for n in ids],
        "e": [i for u, v in lay.edges for i in (index[u], index[v])],
    }
    if details:
        data["titles"] = [str(by_id[n].get("title") or "") for n in ids]
        data["estimates"] = [round(float(by_id[n].get("estimate_s") or 0), 1) for n in ids]
    return data


def picture_states(keys: list, nodes: list[dict]) -> dict:
    """The picture's changing part, for `keys` in drawing order (a picture's `keys`; by key, not id: a task id
    costs more to read from the database than the whole rest of the row): each node's state as an index into
    TaskState.ALL (`s`), the progress of live ones by index (`p`), and a workspace run's diffstats by index
    (`diff`: [insertions, deletions]) when the nodes carry commits (the normal style shows them)."""
    code = {state: i for i, state in enumerate(TaskState.ALL)}
    index = {key: i for i, key in enumerate(keys)}
    # One pass over the rows, no per-node function calls: this runs on every load of a 10,000-task page.
    s, p, diff = [code[TaskState.BLOCKED]] * len(keys), {}, {}
    for node in nodes:
        i = index.get(str(node["key"]))
        if i is None:
            continue
        state = node.get("state") or TaskState.BLOCKED
        s[i] = code.get(state, s[i])
        if state in LIVE:
            p[i] = _state(node)[1]
        commit = node.get("commit")
        if commit and commit.get("sha"):
            diff[i] = [int(commit.get("insertions") or 0), int(commit.get("deletions") or 0)]
    return {"s": s, "p": p, "diff": diff}
