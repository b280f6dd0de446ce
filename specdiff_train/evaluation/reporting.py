"""Write a comparison (from `compare.compare_methods`) as report.json, report.md and PNG plots."""
from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

from .. import plotting


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def markdown_table(report: dict) -> str:
    """Speculative methods against the ancestral baseline, one row per (num_steps, method)."""
    has_data = any("vs_data" in r for r in report["results"])
    quality_col = "energy dist. to data" if report["config"]["sample_shape"].__len__() == 1 else "FID to data"
    header = ["steps", "method", "target calls/sample", "speedup", "acceptance", "accepted/round",
              "wall-clock (x ancestral)", "exactness p (vs ancestral)"]
    if has_data:
        header.append(quality_col)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in report["results"]:
        exact = r.get("vs_ancestral")
        p = None if exact is None else min(exact["energy_p_value"], exact["mmd_p_value"])
        flag = "" if r.get("exact_ok", True) else " FLAGGED"
        row = [str(r["num_steps"]), r["method"], _fmt(r["target_calls_per_sample"], ".1f"), _fmt(r["speedup"], ".2f") + "x",
               _fmt(r.get("acceptance_rate"), ".3f"), _fmt(r.get("mean_accepted_per_round"), ".2f"),
               _fmt(r["wall_clock_ratio"], ".2f"), (_fmt(p, ".3f") + flag) if exact else "-"]
        if has_data:
            data = r.get("vs_data", {})
            row.append(_fmt(data.get("fid", data.get("energy_distance")), ".4f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def acceptance_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in report["results"]:
        curve = r.get("acceptance_by_time")
        if not curve:
            continue
        xs = [(i + 0.5) / len(curve) for i, v in enumerate(curve) if v is not None]
        ys = [v for v in curve if v is not None]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['method']} ({r['num_steps']} steps)")
    ax.set_xlabel("diffusion time t / T")
    ax.set_ylabel("acceptance")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6)
    ax.set_title("Acceptance of drafted steps versus diffusion time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """report.json (every number), report.md (the table), acceptance.png and sample pictures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    public = dict(config=report["config"], results=[{k: v for k, v in r.items() if not k.startswith("_")}
                                                     for r in report["results"]])
    public["environment"] = dict(torch=torch.__version__, python=platform.python_version())
    public["warnings"] = list(report.get("warnings", []))
    paths = dict(json=out_dir / "report.json", markdown=out_dir / "report.md", acceptance=out_dir / "acceptance.png")
    paths["json"].write_text(json.dumps(public, indent=2))
    notes = "".join(f"\n**Warning**: {note}\n" for note in report.get("warnings", []))
    paths["markdown"].write_text("# Speculative sampling against ancestral sampling\n\n" + markdown_table(report) + "\n" + notes)
    acceptance_plot(report, paths["acceptance"])
    # Samples: ancestral and the method with the fewest calls, at the first num_steps.
    first = report["results"][0]["num_steps"]
    same = [r for r in report["results"] if r["num_steps"] == first and "_samples" in r]
    best = min((r for r in same if r["method"] != "ancestral"), key=lambda r: r["target_calls_per_sample"], default=None)
    for tag, r in (("ancestral", same[0] if same else None), ("best", best)):
        if r is not None:
            path = out_dir / f"samples_{tag}.png"
            plotting.plot_samples(r["_samples"], path=path, title=f"{r['method']}, {first} steps")
            paths[f"samples_{tag}"] = path
    return paths
