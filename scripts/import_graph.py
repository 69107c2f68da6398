"""tfpar's import graph, read from the source: layers, circles, and a picture for docs/architecture.md.

  python scripts/import_graph.py                  # print the package-level graph and any circle
  python scripts/import_graph.py --png docs/architecture.png

Every ``import tfpar...`` counts, at module level or inside a function: an import
hidden in a function is still a dependency. ``tests/test_architecture.py`` uses
the same reader to hold the layers to their order.
"""

import argparse
import ast
import collections
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("core", "step", "kerasfix", "runtime", "parallel", "run")  # bottom to top
MODELS = "tfpar.models"  # installed from models/: plain Keras builders, outside the layers


def modules(repo=REPO):
    """``{dotted name: path}`` of every module under ``tfpar/``."""
    found = {}
    for path in sorted((repo / "tfpar").rglob("*.py")):
        parts = path.relative_to(repo).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _resolve(target, known):
    while target and target not in known and target != MODELS:
        target = target.rpartition(".")[0]
    return target


def imports(path, known):
    """The tfpar modules ``path`` imports (``from tfpar.x import y`` names module ``tfpar.x.y`` when it is one)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tfpar":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                targets.add(full if full in known or full == MODELS else _resolve(node.module, known))
        elif isinstance(node, ast.Import):
            targets.update(_resolve(a.name, known) for a in node.names if a.name.split(".")[0] == "tfpar")
    return {t for t in targets if t}


def graph(repo=REPO):
    """``{module: set of tfpar modules it imports}``."""
    known = modules(repo)
    return {name: imports(path, known) - {name} for name, path in known.items()}


def layer_of(module):
    """The layer index of a module in a layer package, or None (the public top-level modules, ``tfpar``)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def package_of(module):
    """'tfpar.parallel.pipeline.stages' -> 'parallel'; public modules -> 'public API'."""
    layer = layer_of(module)
    return LAYERS[layer] if layer is not None else ("models" if module == MODELS else "public API")


def circles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def package_edges(edges):
    """``{(from package, to package): number of module imports}`` between different packages."""
    counts = collections.Counter()
    for source, targets in edges.items():
        for target in targets:
            a, b = package_of(source), package_of(target)
            if a != b:
                counts[(a, b)] += 1
    return counts


def draw(edges, path):
    """A PNG: one row per layer (bottom layer at the bottom), its modules listed, arrows for imports."""
    from PIL import Image, ImageDraw, ImageFont

    rows = ["public API", *reversed(LAYERS)]
    members = collections.defaultdict(list)
    for module in sorted(edges):
        if module != "tfpar":
            members[package_of(module)].append(module.split(".", 2)[-1] if layer_of(module) is not None
                                               else module.split(".", 1)[1])
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 15)
        bold = ImageFont.truetype("DejaVuSans-Bold.ttf", 17)
    except OSError:
        font = bold = ImageFont.load_default()
    width, text_w, box_h, gap, left = 1500, 900, 96, 40, 30
    image = Image.new("RGB", (width, len(rows) * (box_h + gap) + gap), "white")
    pen = ImageDraw.Draw(image)
    boxes = {}
    for i, row in enumerate(rows):
        top = gap + i * (box_h + gap)
        boxes[row] = (left, top, left + text_w, top + box_h)
        pen.rounded_rectangle(boxes[row], radius=10, outline="#335", width=2,
                              fill="#eef3fb" if row != "public API" else "#f6f6f6")
        pen.text((left + 12, top + 8), row, font=bold, fill="#112")
        line, lines = "", []
        for name in members[row]:
            candidate = f"{line}  {name}" if line else name
            if pen.textlength(candidate, font=font) > text_w - 150:
                lines.append(line)
                line = name
            else:
                line = candidate
        lines.append(line)
        for j, shown in enumerate(lines[:3]):
            pen.text((left + 130, top + 10 + 26 * j), shown, font=font, fill="#222")
    # Arrows in the gutter right of the boxes: one column per importing package, one arrow per imported one.
    counts = package_edges(edges)
    column = {row: left + text_w + 40 + 75 * i for i, row in enumerate(rows)}
    for (a, b), n in sorted(counts.items()):
        if a not in boxes or b not in boxes:
            continue
        ia, ib = rows.index(a), rows.index(b)
        x = column[a] + 8 * (ib - ia)
        y0 = (boxes[a][1] + boxes[a][3]) // 2
        y1 = (boxes[b][1] + boxes[b][3]) // 2
        color = "#2a6" if ib > ia else "#c22"  # downward is allowed; upward would be a layering error
        pen.line((boxes[a][2], y0, x, y0), fill="#999", width=1)
        pen.line((x, y0, x, y1), fill=color, width=2)
        pen.line((boxes[b][2], y1, x, y1), fill=color, width=2)
        pen.polygon([(boxes[b][2], y1), (boxes[b][2] + 10, y1 - 5), (boxes[b][2] + 10, y1 + 5)], fill=color)
        pen.text((x + 3, y1 - 18), str(n), font=font, fill=color)
    image.save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png", help="write the layer picture here")
    args = parser.parse_args(argv)
    edges = graph()
    for (a, b), n in sorted(package_edges(edges).items(), key=lambda kv: (kv[0][0], kv[0][1])):
        print(f"{a:>10} -> {b:<10} {n} import(s)")
    found = circles(edges)
    print("import circles:", found or "none")
    if args.png:
        draw(edges, args.png)
        print("wrote", args.png)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
