"""Turn a pytest-benchmark JSON of this suite into a markdown table and a PNG plot.

    python benchmarks/report.py RESULTS.json [--out DIR]

writes ``DIR/<name>.md`` (medians per form, peak extra memory, ratios of the fused kernels to the
eager forms and torch.compile, fraction of the HBM floor reached) and ``DIR/<name>.png`` (median
time against shape per form, log scale). Cases that were not timed (out of memory, too long) appear
with their reason. DIR defaults to the JSON's folder.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict

BASELINES = {"led": "eager-vectorized", "mld": "eager-authors", "l2d": "eager-authors"}
LOOPS = {"led": "eager-loops", "mld": None, "l2d": None}
FORM_ORDER = ["fused-cuda", "fused-triton", "fused-cuda+graph", "fused-triton+graph", "torch.compile",
              "eager-vectorized", "eager-stable", "eager-authors", "eager-loops"]
GRAPHED = "+graph"  # a form replayed from a CUDA graph (benchmarks/harness.py): its time without the host


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if abs(seconds) < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else (f"{value:.0f}x" if value >= 10 else f"{value:.2f}x")


def load(path: pathlib.Path):
    """Cases keyed by (loss, pass, shape, dtype) -> {form: cell}, plus the run's metadata."""
    data = json.loads(path.read_text())
    cases: dict[tuple, dict] = defaultdict(dict)
    shapes: dict[str, tuple] = {}
    for bench in data.get("benchmarks", []):
        info = bench["extra_info"]
        key = (info["loss"], info["pass_"], info["shape"], info["dtype"].removeprefix("torch."))
        cases[key][info["form"]] = dict(median=bench["stats"]["median"], peak=info.get("peak_extra_mib"),
                                        floor_us=info.get("floor_us"))
        if "paired_losses_s" in info:  # the training step's paired rounds (benchmarks/test_step.py)
            cases[key][info["form"]]["paired_losses_s"] = info["paired_losses_s"]
        shapes[(info["loss"], info["shape"])] = (info["B"], info["C"], info["D"])
    for info in data.get("l2d_unmeasured", []):
        key = (info["loss"], info["pass_"], info["shape"], info["dtype"].removeprefix("torch."))
        cases[key][info["form"]] = dict(status=info["status"])
        shapes[(info["loss"], info["shape"])] = (info["B"], info["C"], info["D"])
    device = next((b["extra_info"].get("device") for b in data.get("benchmarks", [])), "unknown device")
    torch_version = next((b["extra_info"].get("torch") for b in data.get("benchmarks", [])), "?")
    meta = dict(device=device, torch=torch_version, copy_tbps=data.get("l2d_copy_tbps"),
                datetime=data.get("datetime", ""), commit=(data.get("commit_info") or {}).get("id", "")[:10])
    return cases, shapes, meta


def _size(shape: tuple) -> int:
    B, C, D = shape
    return B * C * max(D, 1)


def _forms_present(cells: dict) -> list[str]:
    return [f for f in FORM_ORDER if f in cells] + sorted(f for f in cells if f not in FORM_ORDER)


def _best_fused(cells: dict, graphed: bool = False):
    """(median, form) of the fastest fused form called eagerly (or, ``graphed``, replayed from a graph)."""
    timed = [(c["median"], f) for f, c in cells.items()
             if f.startswith("fused-") and f.endswith(GRAPHED) == graphed and "median" in c]
    return min(timed) if timed else (None, None)


def _ratio(cells: dict, form: str | None, fused_time: float | None):
    if form is None or fused_time is None or "median" not in cells.get(form, {}):
        return None
    return cells[form]["median"] / fused_time


def markdown(cases, shapes, meta) -> str:
    lines = [f"# l2d_kernels benchmarks: {meta['device']}", "",
             f"torch {meta['torch']}; {meta['datetime']}; commit {meta['commit'] or '?'}; "
             + (f"measured copy bandwidth {meta['copy_tbps']:.2f} TB/s." if meta["copy_tbps"] else "no GPU."),
             "", "Median time per call (peak extra device memory in brackets). Ratios: how many times faster "
             "the fastest fused backend, called eagerly, is than the form named; floor: the HBM floor (bytes "
             "that must move over the copy bandwidth) as a fraction of the fused time. A `+graph` form is "
             "the fused call captured in a CUDA graph and replayed: the time without the host's share "
             "(Python, autograd, launches); floor, graphed: the floor as a fraction of that time.", ""]
    lines += targets_table(cases, shapes)
    groups = defaultdict(list)
    for key in cases:
        groups[key[:2]].append(key)
    for (loss, pass_) in sorted(groups):
        if loss == "step":
            lines += _step_table(cases, groups[(loss, pass_)])
            continue
        keys = sorted(groups[(loss, pass_)], key=lambda k: (_size(shapes[k[0], k[2]]),
                                                           k[3]))
        forms = []
        for key in keys:
            forms += [f for f in _forms_present(cases[key]) if f not in forms]
        baseline, loops = BASELINES[loss], LOOPS[loss]
        graphed = any(f.endswith(GRAPHED) for f in forms)
        ratio_cols = ([f"vs {baseline}", "vs torch.compile"] + ([f"vs {loops}"] if loops else []) + ["floor"]
                      + (["floor, graphed"] if graphed else []))
        lines += [f"## {loss.upper()} {pass_}", "",
                  "| shape | B x C x D | dtype | " + " | ".join(forms) + " | " + " | ".join(ratio_cols) + " |",
                  "|" + "---|" * (3 + len(forms) + len(ratio_cols))]
        for key in keys:
            cells = cases[key]
            B, C, D = shapes[key[0], key[2]]
            row = [key[2], f"{B} x {C}" + (f" x {D}" if D else ""), key[3]]
            for form in forms:
                cell = cells.get(form)
                if cell is None:
                    row.append("")
                elif "status" in cell:
                    row.append(cell["status"])
                else:
                    peak = cell.get("peak")
                    row.append(_fmt_time(cell["median"]) + (f" [{peak:.0f} MiB]" if peak is not None else ""))
            fused_time, fused_form = _best_fused(cells)
            row.append(_fmt_ratio(_ratio(cells, baseline, fused_time)))
            row.append(_fmt_ratio(_ratio(cells, "torch.compile", fused_time)))
            if loops:
                row.append(_fmt_ratio(_ratio(cells, loops, fused_time)))
            floor = cells.get(fused_form, {}).get("floor_us") if fused_form else None
            row.append(f"{floor * 1e-6 / fused_time:.0%}" if floor and fused_time else "-")
            if graphed:
                graph_time, graph_form = _best_fused(cells, graphed=True)
                floor = cells.get(graph_form, {}).get("floor_us") if graph_form else None
                row.append(f"{floor * 1e-6 / graph_time:.0%}" if floor and graph_time else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


# The kernel issue's performance targets (float32, forward + backward), read from a run's cases:
# (label, loss, shape, check); check(cells, form, shape) -> (value text, met) or None when the run
# lacks what it needs. Each is read for every fused backend, called eagerly and replayed from a graph.
def _time_at_most(limit_s):
    def check(cells, form, shape):
        t = cells.get(form, {}).get("median")
        return None if t is None else (_fmt_time(t), t <= limit_s)
    return check


def _faster_than(other, factor):
    def check(cells, form, shape):
        t, o = cells.get(form, {}).get("median"), cells.get(other, {}).get("median")
        return None if t is None or o is None else (_fmt_ratio(o / t), o / t >= factor)
    return check


def _peak_within_gradient(factor):
    def check(cells, form, shape):
        peak = cells.get(form.removesuffix(GRAPHED), {}).get("peak")
        if peak is None:
            return None
        B, C, D = shape
        gradient_mib = B * C * D * 4 / 2**20
        return f"{peak:.0f} MiB ({peak / gradient_mib:.2f}x)", peak <= factor * gradient_mib
    return check


def _floor_ratio_at_most(factor):
    def check(cells, form, shape):
        cell = cells.get(form, {})
        if cell.get("median") is None or not cell.get("floor_us"):
            return None
        ratio = cell["median"] / (cell["floor_us"] * 1e-6)
        return f"{ratio:.2f}x", ratio <= factor
    return check


TARGETS = [
    ("LED 64 x 80 x 768: at most 60 us", "led", "coco", _time_at_most(60e-6)),
    ("LED 64 x 80 x 768: 20x faster than torch.compile", "led", "coco", _faster_than("torch.compile", 20)),
    ("LED 64 x 80 x 768: 2000x faster than the authors' loops", "led", "coco", _faster_than("eager-loops", 2000)),
    ("LED 32 x 1000 x 768: at most 300 us", "led", "c1000", _time_at_most(300e-6)),
    ("LED 32 x 1000 x 768: peak extra memory at most 1.25x the gradient", "led", "c1000", _peak_within_gradient(1.25)),
    ("LED 16 x 9605 x 256: at most 1 ms", "led", "openimages", _time_at_most(1e-3)),
    ("MLD 64 x 80: 5x faster than torch.compile", "mld", "coco", _faster_than("torch.compile", 5)),
    ("MLD 4096 x 1000: time / forward + backward HBM floor, at most 1.5x (the issue reads the kernel "
     "alone: the profile)", "mld", "b4096-c1000", _floor_ratio_at_most(1.5)),
]


def targets_table(cases, shapes) -> list[str]:
    """The kernel issue's targets against this run: value and met (yes / no) per fused backend, called
    eagerly and replayed from a graph; "-" where the run lacks the case."""
    forms = sorted({f for key, cells in cases.items() if key[0] != "step" for f in cells if f.startswith("fused-")},
                   key=lambda f: (f.endswith(GRAPHED), f))
    if not forms:
        return []
    lines = ["## Targets of the kernel issue (float32, forward + backward)", "",
             "| target | " + " | ".join(forms) + " |", "|---|" + "---|" * len(forms)]
    for label, loss, shape_name, check in TARGETS:
        cells = cases.get((loss, "fwd+bwd", shape_name, "float32"), {})
        row = [label]
        for form in forms:
            got = check(cells, form, shapes.get((loss, shape_name))) if cells else None
            row.append("-" if got is None else f"{got[0]} ({'met' if got[1] else 'missed'})")
        lines.append("| " + " | ".join(row) + " |")
    for key, cells in cases.items():  # the training step: the losses' share, under 2%
        if key[0] != "step":
            continue
        row = ["Training step: the fused losses under 2% of the step"]
        for form in forms:
            cell = cells.get(form, {})
            losses, t = cell.get("paired_losses_s"), cell.get("median")
            row.append("-" if losses is None or not t else
                       f"{max(losses, 0.0) / t:.1%} ({'met' if max(losses, 0.0) / t < 0.02 else 'missed'})")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _step_table(cases, keys) -> list[str]:
    """The training step: median per form and the share of the step spent in the losses."""
    lines = ["## Whole training step (ResNet-101 teacher, ResNet-34 student, batch 64, 224 x 224, bf16 autocast, Adam)",
             "", "Losses per step: the median of (form step - the BCE-only step timed just before it), over "
             "paired rounds; losses' share: that over the form's median step (without pairs: the difference "
             "of the two medians).", "",
             "| form | median step | losses per step | losses' share | step vs eager-authors |", "|---|---|---|---|---|"]
    for key in keys:
        cells = cases[key]
        floor = cells.get("bce-only", {}).get("median")
        authors = cells.get("eager-authors", {}).get("median")
        for form in ["bce-only"] + [f for f in _forms_present(cells) if f != "bce-only"]:
            cell = cells.get(form)
            if cell is None:
                continue
            if "status" in cell:
                lines.append(f"| {form} | {cell['status']} | - | - | - |")
                continue
            t = cell["median"]
            losses = cell.get("paired_losses_s")
            if losses is None and floor is not None and form != "bce-only":
                losses = t - floor
            cost = "-" if losses is None else _fmt_time(losses) + ("" if "paired_losses_s" in cell else " (unpaired)")
            share = "-" if losses is None else f"{max(losses, 0.0) / t:.1%}"
            speed = "-" if authors is None else _fmt_ratio(authors / t)
            lines.append(f"| {form} | {_fmt_time(t)} | {cost} | {share} | {speed} |")
    return lines + [""]


def plot(cases, shapes, meta, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({key[:2] + (key[3],) for key in cases if key[0] != "step"})
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (loss, pass_, dtype) in zip(axes.flat, panels):
        keys = sorted((k for k in cases if k[:2] == (loss, pass_) and k[3] == dtype),
                      key=lambda k: _size(shapes[k[0], k[2]]))
        labels = [k[2] for k in keys]
        forms = []
        for key in keys:
            forms += [f for f in _forms_present(cases[key]) if f not in forms]
        for form in forms:
            xs = [i for i, k in enumerate(keys) if "median" in cases[k].get(form, {})]
            ys = [cases[keys[i]][form]["median"] * 1e3 for i in xs]
            if xs:
                ax.plot(xs, ys, marker="o", label=form, linewidth=2.5 if form.startswith("fused") else 1.2,
                        linestyle="--" if form.endswith(GRAPHED) else "-")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("median time per call (ms, log)")
        ax.set_title(f"{loss.upper()} {pass_}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"l2d_kernels on {meta['device']} (torch {meta['torch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=pathlib.Path, nargs="+",
                        help="pytest-benchmark JSON files; several are merged (one run split by file)")
    parser.add_argument("--merged", type=pathlib.Path, default=None,
                        help="with several inputs: write the merged JSON here and report on it")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    results = args.results[0]
    if len(args.results) > 1 or args.merged:
        if args.merged is None:
            parser.error("several result files need --merged PATH")
        results = merge(args.results, args.merged)
    out = args.out or results.parent
    out.mkdir(parents=True, exist_ok=True)
    cases, shapes, meta = load(results)
    (out / f"{results.stem}.md").write_text(markdown(cases, shapes, meta))
    if not args.no_plot:
        plot(cases, shapes, meta, out / f"{results.stem}.png")
    print(f"wrote {out / results.stem}.md" + ("" if args.no_plot else " and .png"))


def merge(paths: list[pathlib.Path], target: pathlib.Path) -> pathlib.Path:
    """One JSON of several pytest-benchmark files of the same run (benchmarks and unmeasured cases
    concatenated; metadata from the first file that has it)."""
    merged: dict = {}
    for path in paths:
        text = path.read_text() if path.exists() else ""
        if not text.strip():
            print(f"skipping {path}: not written (its pytest run did not finish)")
            continue
        data = json.loads(text)
        for key, value in data.items():
            if key in ("benchmarks", "l2d_unmeasured"):
                merged.setdefault(key, []).extend(value or [])
            elif merged.get(key) is None:
                merged[key] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(merged, indent=1))
    return target


if __name__ == "__main__":
    main()
