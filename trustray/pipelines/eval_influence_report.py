"""The influence evaluation's report: JSON files, PNG plots and the table printed at the end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from trustray.artifacts import atomic_write_text
from trustray.core.influence.comparison import FEATURE_KINDS
from trustray.core.influence.evaluation import LESS_SCORE
from trustray.runtime import save_figure


def write_plots(report_dir: Path, fidelity: dict[str, list[dict]], lds: dict[str, Any],
                selection: dict[str, Any], lora_size: int, machine: dict[str, Any]) -> list[Path]:
    """fidelity.png (Spearman and top-5% overlap vs dim), lds.png (LDS vs dim), selection.png (target loss)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    paths = []
    # One colour per reduction in every panel, so lines can be compared across panels and figures.
    names = sorted({*fidelity, *(row["reduction"] for row in lds["rows"])})
    colour = {name: f"C{index % 10}" for index, name in enumerate(names)}
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for column, kind in enumerate(FEATURE_KINDS):
        for reduction, rows in sorted(fidelity.items()):
            chosen = [row for row in rows if row["features"] == kind]
            if not chosen:
                continue
            dims = [row["dim"] for row in chosen]
            for axis, key in ((axes[0][column], "spearman"), (axes[1][column], "top5_overlap")):
                axis.plot(dims, [row[key] for row in chosen], marker="o", label=reduction, color=colour[reduction])
        axes[0][column].set_title(f"{kind} features, cosine (LoRA size {lora_size:,})")
        axes[0][column].set_ylabel("Spearman vs exact")
        axes[1][column].set_ylabel("top-5% overlap with exact")
        axes[1][column].set_xlabel("feature dim")
        for row in axes:
            row[column].set_xscale("log")
            row[column].grid(alpha=0.3)
            row[column].legend(fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(report_dir / "fidelity.png")
    save_figure(figure, paths[-1], machine)
    plt.close(figure)

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for column, (kind, metric) in enumerate([LESS_SCORE, ("sgd", "inner_product")]):
        by_reduction: dict[str, list[dict]] = {}
        for row in lds["rows"]:
            if row["features"] == kind and row["metric"] == metric:
                by_reduction.setdefault(row["reduction"], []).append(row)
        for reduction, rows in sorted(by_reduction.items()):
            rows.sort(key=lambda row: row["dim"])
            axes[column].errorbar([r["dim"] for r in rows], [r["lds"] for r in rows], yerr=[r["lds_sem"] for r in rows],
                                  marker="o", capsize=2, label=reduction, color=colour[reduction])
        axes[column].set_title(f"LDS, {kind} features, {metric} ({lds['n_subsets']} retrains)")
        axes[column].set_xscale("log")
        axes[column].set_xlabel("feature dim")
        axes[column].grid(alpha=0.3)
        axes[column].legend(fontsize=7)
    axes[0].set_ylabel("LDS (mean Spearman over targets)")
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(report_dir / "lds.png")
    save_figure(figure, paths[-1], machine)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(9, 4))
    rows = selection["rows"]
    axis.barh([f"{row['method']} ({row['examples']})" for row in rows], [row["target_loss"] for row in rows])
    axis.set_xlabel("mean target loss (lower is better)")
    low = min(row["target_loss"] for row in rows)
    axis.set_xlim(left=low - 0.05 * abs(low))
    axis.invert_yaxis()
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    paths.append(report_dir / "selection.png")
    save_figure(figure, paths[-1], machine)
    plt.close(figure)
    return paths


def format_table(summary: dict[str, Any]) -> str:
    """Fidelity of LESS scores (adam, cosine) per reduction and dim, the best LDS rows, and selection losses."""
    lines = ["fidelity (adam features, cosine): Spearman / top-5% overlap vs exact"]
    for reduction, rows in sorted(summary["fidelity"].items()):
        cells = [f"{r['dim']}: {r['spearman']:.3f}/{r['top5_overlap']:.2f}" for r in rows if r["features"] == "adam"]
        cells = cells or [f"{r['dim']}: {r['spearman']:.3f}/{r['top5_overlap']:.2f} (sgd)" for r in rows]
        lines.append(f"  {reduction:<12} " + "  ".join(cells))
    kind, metric = LESS_SCORE
    lines.append(f"LDS ({kind} features, {metric}; {summary['lds']['n_subsets']} retrains)")
    for row in summary["lds"]["rows"]:
        if row["features"] == kind and row["metric"] == metric:
            lines.append(f"  {row['reduction']:<12} dim {row['dim']:>7}: {row['lds']:+.3f} ± {row['lds_sem']:.3f}")
    lines.append("selection: mean target loss")
    for row in summary["selection"]["rows"]:
        lines.append(f"  {row['method']:<22} {row['examples']:>5} examples  {row['target_loss']:.4f}")
    lines.append(f"written: {summary['written']}")
    return "\n".join(lines)


def write_report(report_dir: Path, common: dict[str, Any], fidelity: dict[str, list[dict]], lds: dict[str, Any],
                 selection: dict[str, Any], score_info: dict[str, Any], methods: dict[str, list[int]],
                 results_dir: str | None) -> None:
    """The three report JSON files (each with the run's `common` description) and the plots under `report_dir`,
    also copied to `results_dir` when set."""
    report_dir.mkdir(exist_ok=True)
    files = {
        "influence_fidelity.json": {
            **common,
            "exact": "unreduced per-example LoRA gradients, cosine, combined over checkpoints by learning rate",
            "aggregation": "max over target tasks of the mean over the task's targets (LESS)",
            "features": "adam: pool gradients Adam-preconditioned with the checkpoint's AdamW state (LESS); "
            "sgd: plain gradients (kron is only defined on these); targets are plain in both",
            "fitted_on": f"pca and kron-pca are fitted on {common['fit_sample']} other pool-like examples (out of sample)",
            "results": fidelity,
            "skipped": score_info["skipped"],
            "reduction_seconds_last_checkpoint": score_info["seconds"],
            "kron_actual_dims": score_info["actual_dims"],
        },
        "influence_lds.json": {**common, **lds},
        "influence_selection.json": {**common, **selection, "methods": {k: len(v) for k, v in methods.items()}},
    }
    for name, content in files.items():
        atomic_write_text(report_dir / name, json.dumps(content, indent=2) + "\n")
    plots = write_plots(report_dir, fidelity, lds, selection, score_info["lora_size"], common["machine"])
    if results_dir:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        for path in [*(report_dir / name for name in files), *plots]:
            shutil.copy2(path, Path(results_dir) / (path.name if path.suffix == ".json" else f"influence_{path.name}"))
