"""Write a comparison (from `compare.compare_methods`) as report.json, report.md and PNG plots."""
from __future__ import annotations

import json
import math
import platform
import re
from pathlib import Path

import torch

from .. import plotting
from ..guidance import NULL_LABEL

MAX_PER_CLASS = 16  # images per class in the sample pictures of a conditional target (one class per row)


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def report_chains(report: dict) -> list[str]:
    """The chains (reprs) of a report's rows, in order (none for a report from before chains were recorded)."""
    return list(dict.fromkeys(r["chain"] for r in report["results"] if r.get("chain") is not None))


def chain_note(report: dict) -> str:
    """The line that names a report's one chain (a report of several chains has a chain column instead)."""
    chains = report_chains(report)
    return f"Chain (the ancestral baseline and every method): `{chains[0]}`" if len(chains) == 1 else ""


def markdown_table(report: dict) -> str:
    """Speculative methods against the ancestral baseline, one row per (num_steps, method); a conditional
    target's tables add the guidance scale and, with a classifier, the label accuracy; a report of several
    chains, the chain (one chain: `chain_note`)."""
    has_data = any("vs_data" in r for r in report["results"])
    has_chain = len(report_chains(report)) > 1
    has_scale = any(r.get("guidance_scale") is not None for r in report["results"])
    has_accuracy = any("label_accuracy" in r for r in report["results"])
    quality_col = "energy dist. to data" if report["config"]["sample_shape"].__len__() == 1 else "FID to data"
    header = ["steps", "method", "target calls/sample", "speedup", "acceptance", "accepted/round",
              "wall-clock (x ancestral)", "exactness p (vs ancestral)"]
    header[2:2] = (["chain"] if has_chain else []) + (["guidance"] if has_scale else [])
    header += ([quality_col] if has_data else []) + (["label accuracy"] if has_accuracy else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report["results"]:
        exact = r.get("vs_ancestral")
        p = None if exact is None else min(exact["energy_p_value"], exact["mmd_p_value"])
        flag = "" if r.get("exact_ok", True) else " FLAGGED"
        row = [str(r["num_steps"]), r["method"], _fmt(r["target_calls_per_sample"], ".1f"), _fmt(r["speedup"], ".2f") + "x",
               _fmt(r.get("acceptance_rate"), ".3f"), _fmt(r.get("mean_accepted_per_round"), ".2f"),
               _fmt(r["wall_clock_ratio"], ".2f"), (_fmt(p, ".3f") + flag) if exact else "-"]
        row[2:2] = (([str(r.get("chain"))] if has_chain else [])
                    + ([_fmt(r.get("guidance_scale"), "g")] if has_scale else []))
        if has_data:
            data = r.get("vs_data", {})
            row.append(_fmt(data.get("fid", data.get("energy_distance")), ".4f"))
        if has_accuracy:
            row.append(_fmt(r.get("label_accuracy"), ".3f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def class_rows(samples: torch.Tensor, labels, per_class: int = MAX_PER_CLASS):
    """Samples and labels for a picture of a conditional target's samples: images regrouped one label per
    row (classes in order, unconditional -1 first), as many per row as the rarest label has (at most
    `per_class`); points keep all their labels (coloured by class). (samples, None) without labels."""
    if labels is None or all(label == NULL_LABEL for label in labels):
        return samples, None
    labels = [int(label) for label in labels]
    if samples.dim() != 4:
        return samples, labels
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(label, []).append(index)
    count = min(per_class, min(len(group) for group in groups.values()))
    order = [index for label in sorted(groups) for index in groups[label][:count]]
    return samples[order], [labels[index] for index in order]


def window_order(window) -> tuple:
    """Sort key of report windows: fixed windows (ints) by size, then policies ("auto", ...) by name."""
    if window is None:
        return (2, 0, "")
    return (0, window, "") if isinstance(window, int) else (1, 0, str(window))


def window_label(window) -> str:
    """A window in a legend: "w8" for a fixed window, the policy's name ("auto") otherwise."""
    return f"w{window}" if isinstance(window, int) else str(window)


def legend_chain(chain: str | None) -> str:
    """A chain's repr for a legend: without its unset (None) options."""
    return re.sub(r"\(, ", "(", re.sub(r",? ?\w+=None", "", str(chain)))


LINESTYLES = {"block": "-", "tokenwise-reflection": "--", "tokenwise-residual": ":"}
MARKERS = "osD^vP*X"


def acceptance_plot(report: dict, path: Path | None = None):
    """Acceptance versus diffusion time: one panel per drafter; in a panel, a colour per window, a line
    style per verifier (solid block, dashed token-wise reflection, dotted residual) and a marker per
    num_steps (and guidance scale and chain, when there are several); each legend sits below its panel, off the
    data. Returns the matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [r for r in report["results"] if r.get("acceptance_by_time")]
    drafters = list(dict.fromkeys(r["method"].split("/")[0] for r in curves))
    windows = sorted({r.get("window") for r in curves}, key=window_order)
    steps = sorted({r["num_steps"] for r in curves})
    scales = sorted({r.get("guidance_scale") for r in curves if r.get("guidance_scale") is not None})
    chains = list(dict.fromkeys(r.get("chain") for r in curves))
    ncols = min(3, max(1, len(drafters)))
    nrows = max(1, -(-len(drafters) // ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.9 * nrows))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(max(1, len(drafters)))]
    colours = [f"C{i % 10}" for i in range(len(windows))]
    for ax, drafter in zip(axes, drafters):
        for r in (r for r in curves if r["method"].split("/")[0] == drafter):
            curve = r["acceptance_by_time"]
            xs = [(i + 0.5) / len(curve) for i, v in enumerate(curve) if v is not None]
            ys = [v for v in curve if v is not None]
            verifier = r["method"].split("/")[1]
            label = f"{verifier}, {window_label(r.get('window'))}" + (f", {r['num_steps']} steps" if len(steps) > 1 else "")
            scale = r.get("guidance_scale")
            label += f", guidance {scale:g}" if len(scales) > 1 else ""
            label += f", {legend_chain(r.get('chain'))}" if len(chains) > 1 else ""
            marker = steps.index(r["num_steps"]) + len(steps) * (scales.index(scale) if len(scales) > 1 else 0)
            marker += len(steps) * max(1, len(scales)) * chains.index(r.get("chain"))
            ax.plot(xs, ys, color=colours[windows.index(r.get("window"))], linestyle=LINESTYLES.get(verifier, "-."),
                    marker=MARKERS[marker % len(MARKERS)], ms=3, lw=1.4, label=label)
        ax.set_title(drafter, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("diffusion time t / T  (0 = data)", fontsize=8)
        ax.set_ylabel("acceptance", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7, frameon=False)
    fig.suptitle("Acceptance of drafted steps versus diffusion time", fontsize=11)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.json (every number), report.md (the table, and the chain), acceptance.png and sample pictures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = dict(config=report["config"], results=[{k: v for k, v in r.items() if not k.startswith("_")}
                                                     for r in report["results"]])
    public["environment"] = dict(torch=torch.__version__, python=platform.python_version())
    public["warnings"] = list(report.get("warnings", []))
    paths = dict(json=out_dir / "report.json", markdown=out_dir / "report.md", acceptance=out_dir / "acceptance.png")
    paths["json"].write_text(json.dumps(public, indent=2))
    notes = "".join(f"\n**Warning**: {note}\n" for note in report.get("warnings", []))
    if chain_note(report):
        notes = f"\n{chain_note(report)}.\n" + notes
    if report["config"].get("reference"):  # a conditional target: what the quality numbers compare with
        notes = f"\nQuality (FID / energy distance) against: {report['config']['reference']}.\n" + notes
    paths["markdown"].write_text("# Speculative sampling against ancestral sampling\n\n" + markdown_table(report) + "\n" + notes)
    acceptance_plot(report, paths["acceptance"])
    # Samples: ancestral and the method with the fewest calls, at the first num_steps (guidance scale, chain).
    first = report["results"][0]
    same = [r for r in report["results"] if r["num_steps"] == first["num_steps"] and "_samples" in r
            and r.get("guidance_scale") == first.get("guidance_scale") and r.get("chain") == first.get("chain")]
    best = min((r for r in same if r["method"] != "ancestral"), key=lambda r: r["target_calls_per_sample"], default=None)
    for tag, r in (("ancestral", same[0] if same else None), ("best", best)):
        if r is not None:
            paths[f"samples_{tag}"] = _plot_row_samples(r, report.get("_labels"), out_dir / f"samples_{tag}.png")
    return paths


def _plot_row_samples(row: dict, labels, path: Path) -> Path:
    """A report row's samples as a picture; a conditional target's one class per row (`class_rows`)."""
    samples, labels = class_rows(row["_samples"], labels)
    title = f"{row['method']}, {row['num_steps']} steps"
    if row.get("guidance_scale") is not None:
        title += f", guidance {row['guidance_scale']:g}"
    if labels is not None and samples.dim() == 4:
        title += ", one class per row"
    plotting.plot_samples(samples, path=path, title=title, labels=labels)
    return path
