"""What a calibration found: `report.png` (one panel per pruning layer) and a summary table."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PANEL_WIDTH_IN, PANEL_HEIGHT_IN, DPI = 8.0, 2.8, 100  # report.png is 800 x 280*layers pixels


def _segment_after(calibration: dict, layer: int) -> dict | None:
    return next((s for s in calibration["segments"] if s["after_layer"] == layer), None)


def _draw_panel(axis, records: list[dict], position: int, segment: dict | None) -> None:
    layer = records[0]["layers"][position]["layer"]
    keeps = [r["layers"][position]["keep_count"] for r in records]
    low = min(keeps)
    high = max(keeps)
    title = f"pruning layer {layer}: keep count"
    if segment is not None:
        widths = [r["segments"][segment["index"]]["visual_width"] for r in records]
        low, high = min(low, min(widths)), max(high, max(widths))
        title += f" and segment {segment['index']} visual width (keep + recycled)"
    bins = range(low, high + 2)  # one bin per integer value
    axis.hist(keeps, bins=bins, color="tab:blue", alpha=0.6, label="keep count")
    if segment is not None:
        axis.hist(widths, bins=bins, histtype="step", color="black", label="visual width")
        for number, (b_min, b_opt, b_max) in enumerate(segment["buckets"]):
            axis.axvspan(b_min, b_max + 1, color=f"C{2 + number % 6}", alpha=0.15,
                         label=f"profile [{b_min}, {b_opt}, {b_max}]")
            axis.axvline(b_opt + 0.5, color=f"C{2 + number % 6}", linestyle="--", linewidth=1)
        title += f" - coverage {segment['coverage']:.3f}, padding {segment['expected_padding']:.1%}"
    axis.set_title(title, fontsize=8)
    axis.set_ylabel("samples", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=6, loc="upper right")


def write_report(records: list[dict], calibration: dict, path: Path) -> int:
    """Write the PNG atomically; return the number of panels drawn."""
    import matplotlib
    matplotlib.use("Agg")  # headless; the report is a file
    import matplotlib.pyplot as plt

    count = len(records[0]["layers"])
    figure, axes = plt.subplots(count, 1, figsize=(PANEL_WIDTH_IN, PANEL_HEIGHT_IN * count), dpi=DPI,
                                squeeze=False)
    for position in range(count):
        layer = records[0]["layers"][position]["layer"]
        _draw_panel(axes[position, 0], records, position, _segment_after(calibration, layer))
    axes[-1, 0].set_xlabel("visual tokens")
    figure.tight_layout()
    path = Path(path)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count


def _stats_cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"{stats['min']} / {stats['median']:g} / {stats['max']}"


def summary_table(calibration: dict):
    from rich.table import Table

    method = calibration["method"]
    table = Table(title=f"calibration: {method['method']} {method.get('variant') or ''} "
                        f"on {calibration['num_samples']} samples "
                        f"(target coverage {calibration['coverage_target']}, <= {calibration['max_profiles']} profiles)")
    for column in ("layer", "keep min/med/max", "rank min/med/max", "recycled min/med/max",
                   "profiles [min, opt, max]", "coverage", "expected padding"):
        table.add_column(column, justify="left" if column.startswith("profiles") else "right")
    for layer in calibration["layers"]:
        segment = _segment_after(calibration, layer["layer"])
        profiles = " ".join(str(b) for b in segment["buckets"]) if segment else "-"
        coverage = f"{segment['coverage']:.4f}" if segment else "-"
        padding = f"{segment['expected_padding']:.2%}" if segment else "-"
        table.add_row(str(layer["layer"]), _stats_cell(layer["keep_count"]), _stats_cell(layer["rank"]),
                      _stats_cell(layer["recycled"]), profiles, coverage, padding)
    return table


def print_summary(calibration: dict, console=None) -> None:
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: wide enough that the profiles stay on one line
            console = Console(width=160)
    console.print(summary_table(calibration))
