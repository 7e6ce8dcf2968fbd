"""The DAG picture, as a specification: columns by depth, no overlaps, edges left to right, fewer crossings than
the input order, 1,000 tasks, well-formed and escaped SVG with each state in class and in words."""

import random
import xml.etree.ElementTree as ET
from itertools import combinations

from tasks_app.dashboard.dagsvg import (
    COMPACT,
    NORMAL,
    layout,
    picture_data,
    picture_states,
    render_svg,
    state_codes,
    state_map,
)
from tasks_app.states import TaskState

NS = {"s": "http://www.w3.org/2000/svg"}


def node(i, depth=None, state="ready", **extra):
    n = {"id": i, "key": f"task-{i}", "title": f"Task {i}", "state": state, "progress": 0.0, **extra}
    if depth is not None:
        n["depth"] = depth
    return n


def random_dag(n, m, seed=7):
    rng = random.Random(seed)
    edges = set()
    while len(edges) < m:
        a, b = sorted(rng.sample(range(n), 2))
        edges.add((a, b))
    states = list(TaskState.ALL)
    return [node(i, state=rng.choice(states), progress=rng.random()) for i in range(n)], sorted(edges)


def brute_crossings(lay, edges):
    """Pairs of edges between the same two columns whose ends are in opposite vertical order."""
    y = {n: lay.pos[n][1] + lay.pos[n][0] * 1e-6 for n in lay.pos}  # ties in a wrapped row broken by x
    col = {n: lay.depth[n] for n in lay.pos}
    count = 0
    for (a, b), (c, d) in combinations(edges, 2):
        if col[a] == col[c] and col[b] == col[d] and (y[a] - y[c]) * (y[b] - y[d]) < 0:
            count += 1
    return count


def assert_no_overlap(lay):
    s = lay.style
    boxes = sorted(lay.pos.values())
    for (x1, y1), (x2, y2) in combinations(boxes, 2):
        if x2 >= x1 + s.node_w:
            continue  # sorted by x, but later boxes may still share x1's column: keep checking the rest
        assert y2 >= y1 + s.node_h or y1 >= y2 + s.node_h, f"boxes at {(x1, y1)} and {(x2, y2)} overlap"


def test_every_node_sits_in_the_column_of_its_depth_and_depths_run_left_to_right():
    nodes = [node(0, 0), node(1, 1), node(2, 1), node(3, 2), node(4, 0)]
    lay = layout(nodes, [(0, 1), (0, 2), (1, 3), (2, 3)])
    xs = {d: {lay.pos[n["id"]][0] for n in nodes if n["depth"] == d} for d in (0, 1, 2)}
    assert all(len(v) == 1 for v in xs.values())
    assert min(xs[0]) < min(xs[1]) < min(xs[2])


def test_a_wide_depth_wraps_into_sub_columns_that_stay_between_its_neighbours():
    nodes = [node(0, 0)] + [node(i, 1) for i in range(1, 501)] + [node(501, 2)]
    edges = [(0, i) for i in range(1, 501)] + [(i, 501) for i in range(1, 501)]
    lay = layout(nodes, edges)
    wave = [lay.pos[i] for i in range(1, 501)]
    xs = {x for x, _ in wave}
    assert len(xs) > 1, "500 tasks in one depth are wrapped"
    assert lay.pos[0][0] < min(xs) and max(xs) < lay.pos[501][0]
    assert lay.width > lay.height, "the picture stays landscape"
    assert_no_overlap(lay)


def test_depth_is_computed_from_the_edges_when_missing_as_the_longest_path_from_a_root():
    nodes = [node(i) for i in "abcd"]
    lay = layout(nodes, [("a", "b"), ("b", "c"), ("a", "c"), ("d", "c")])
    assert lay.depth == {"a": 0, "b": 1, "c": 2, "d": 0}


def test_a_cycle_does_not_hang_the_layout():
    lay = layout([node("a"), node("b"), node("c")], [("a", "b"), ("b", "c"), ("c", "b")])
    assert set(lay.pos) == {"a", "b", "c"}


def test_no_two_nodes_overlap():
    nodes, edges = random_dag(300, 600)
    assert_no_overlap(layout(nodes, edges))


def test_every_edge_goes_from_the_right_of_its_upstream_to_the_left_of_its_downstream():
    nodes, edges = random_dag(200, 400)
    lay = layout(nodes, edges)
    for u, v in edges:
        assert lay.pos[u][0] + lay.style.node_w < lay.pos[v][0]


def test_barycenter_ordering_has_fewer_crossings_than_the_input_order():
    # Input order pairs every upstream with the downstream at the opposite end: all edges cross.
    up = [node(f"u{i}", 0) for i in range(5)]
    down = [node(f"d{i}", 1) for i in range(5)]
    edges = [(f"u{i}", f"d{4 - i}") for i in range(5)] + [("u0", "d3"), ("u4", "d1")]
    lay = layout(up + down, edges)
    input_y = {n["id"]: i for i, n in enumerate(up)} | {n["id"]: i for i, n in enumerate(down)}
    before = sum(
        1 for (a, b), (c, d) in combinations(edges, 2) if (input_y[a] - input_y[c]) * (input_y[b] - input_y[d]) < 0
    )
    after = brute_crossings(lay, edges)
    assert before > 0 and after < before
    assert after == 0


def test_a_1000_node_dag_lays_out_with_every_node_placed_and_no_overlap():
    nodes, edges = random_dag(1000, 2000)
    lay = layout(nodes, edges)
    assert len(lay.pos) == 1000 and lay.style is COMPACT
    assert len(lay.edges) == 2000
    for u, v in edges:
        assert lay.pos[u][0] < lay.pos[v][0]
    assert len(set(lay.pos.values())) == 1000


def test_the_svg_is_well_formed_xml_with_edges_drawn_before_nodes():
    nodes, edges = random_dag(40, 80)
    root = ET.fromstring(render_svg(nodes, edges))
    assert root.get("viewBox") and root.get("width") and root.get("height")
    groups = [g.get("class") for g in root.findall("s:g", NS)]
    assert groups.index("edges") < groups.index("nodes")
    paths = root.findall(".//s:path[@class='edge']", NS)
    assert {(int(p.get("data-from")), int(p.get("data-to"))) for p in paths} == set(edges)
    assert all(p.get("d").startswith("M") and "C" in p.get("d") for p in paths)


def test_text_is_escaped_so_a_hostile_title_or_key_cannot_inject_markup():
    evil = node("x", 0, title="<script>alert(1)</script>", key='k"><script>alert(2)</script>')
    svg = render_svg([evil], [])
    assert "<script" not in svg
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in svg
    title = ET.fromstring(svg).find(".//s:g[@id='n-x']/s:title", NS).text
    assert "<script>alert(1)</script>" in title  # the reader's tooltip shows the text as written


def test_each_node_carries_its_state_as_class_data_attribute_and_word():
    nodes = [node(i, 0, state=s) for i, s in enumerate(TaskState.ALL)]
    root = ET.fromstring(render_svg(nodes, []))
    for i, state in enumerate(TaskState.ALL):
        g = root.find(f".//s:g[@id='n-{i}']", NS)
        assert f"st-{state}" in g.get("class").split() and "node" in g.get("class").split()
        assert g.get("data-state") == state and g.get("data-key") == f"task-{i}"
        assert g.find("s:text[@class='st']", NS).text == state
        assert f"state: {state}" in g.find("s:title", NS).text


def test_live_nodes_show_a_progress_bar_proportional_to_progress():
    nodes = [node(0, 0, state="running", progress=0.5), node(1, 0, state="assigned"), node(2, 0, state="ready")]
    root = ET.fromstring(render_svg(nodes, []))
    bar = root.find(".//s:g[@id='n-0']/s:rect[@class='pbar']", NS)
    assert int(bar.get("width")) == (NORMAL.node_w - 2 * NORMAL.pbar_inset) // 2
    assert root.find(".//s:g[@id='n-1']/s:rect[@class='pbar']", NS).get("width") == "0"
    assert root.find(".//s:g[@id='n-2']/s:rect[@class='pbar']", NS) is None
    assert "50%" in root.find(".//s:g[@id='n-0']/s:title", NS).text


def test_long_keys_are_cut_with_an_ellipsis_and_kept_whole_in_the_tooltip():
    key = "implement-the-very-long-module-name"
    g = ET.fromstring(render_svg([node(0, 0, key=key)], [])).find(".//s:g[@id='n-0']", NS)
    shown = g.find("s:text[@class='key']", NS).text
    assert shown.endswith("…") and len(shown) <= NORMAL.key_chars
    assert g.get("data-key") == key and key in g.find("s:title", NS).text


def test_big_graphs_use_the_compact_style_without_the_state_line_but_with_tooltip_and_legend():
    nodes, edges = random_dag(200, 300)
    root = ET.fromstring(render_svg(nodes, edges))
    assert "compact" in root.get("class").split()
    assert root.find(".//s:text[@class='st']", NS) is None
    assert len(root.findall(".//s:g[@class='nodes']/s:g/s:title", NS)) == 200
    assert "compact" not in ET.fromstring(render_svg(nodes, edges, compact=False)).get("class").split()


def test_the_legend_names_every_state_with_its_colour_class():
    legend = ET.fromstring(render_svg([node(0, 0)], [])).find("s:g[@class='legend']", NS)
    items = {g.get("class"): g.find("s:text", NS).text for g in legend.findall("s:g", NS)}
    assert items == {f"lg st-{s}": s.replace("_", " ") for s in TaskState.ALL}  # "awaiting approval" in words


def test_nodes_link_to_their_task_page_unless_links_are_turned_off():
    assert ET.fromstring(render_svg([node(0, 0)], [])).get("data-node-href") == "/tasks/{id}/"
    assert ET.fromstring(render_svg([node(0, 0)], [], href=None)).get("data-node-href") is None


def test_edges_to_unknown_nodes_and_duplicates_are_ignored():
    lay = layout([node(0, 0), node(1, 1)], [(0, 1), (0, 1), (0, 99)])
    assert lay.edges == [(0, 1)]


def test_an_empty_graph_still_renders_a_legend():
    root = ET.fromstring(render_svg([], []))
    assert root.find("s:g[@class='legend']", NS) is not None


def test_state_codes_map_each_id_as_a_string_to_state_and_clamped_progress():
    nodes = [node(1, state="running", progress=0.4567), node("b", state="succeeded", progress=None)]
    nodes.append(node(3, state="running", progress=7))
    assert state_codes(nodes) == {"1": ["running", 0.457], "b": ["succeeded", 0.0], "3": ["running", 1.0]}


def test_picture_data_carries_the_layout_as_indexes_and_numbers_not_markup():
    nodes, edges = random_dag(200, 300)
    lay = layout(nodes, edges)
    data = picture_data(nodes, edges)
    ids = [int(key.removeprefix("task-")) for key in data["keys"]]
    assert sorted(ids) == list(range(200))
    s = data["style"]
    for i, n in enumerate(ids):  # the page's arithmetic puts every box where the layout did
        x, y = lay.pos[n]
        assert data["cx"][data["col"][i]] == x and abs(s["top"] + data["row"][i] * s["pitch"] / 2 - y) <= 0.5
    pairs = list(zip(data["e"][::2], data["e"][1::2], strict=True))
    assert {(ids[u], ids[v]) for u, v in pairs} == set(edges)
    assert (data["w"], data["h"], data["compact"]) == (lay.width, lay.height, True)
    assert len(data["titles"]) == 200 and "titles" not in picture_data(nodes, edges, details=False)


def test_picture_states_are_state_indexes_with_the_progress_of_live_tasks_only():
    nodes = [node(0, 0, state="running", progress=0.25), node(1, 0, state="succeeded", progress=1.0)]
    nodes.append(node(2, 0, state="ready", commit={"sha": "abc", "insertions": 3, "deletions": 1}))
    got = picture_states(["task-2", "task-0", "task-1"], nodes)
    assert [TaskState.ALL[i] for i in got["s"]] == ["ready", "running", "succeeded"]
    assert got["p"] == {1: 0.25} and got["diff"] == {0: [3, 1]}


def test_the_run_pages_state_map_is_by_key_with_progress_only_for_live_tasks():
    nodes = [node(1, state="running", progress=0.4567), node(2, state="blocked")]
    assert state_map(nodes) == {"task-1": ["running", 0.457], "task-2": "blocked"}
