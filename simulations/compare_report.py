"""Outputs of :mod:`simulations.compare`: the markdown table, the JSON and two PNG plots.

Everything here reads the results dict that :func:`simulations.compare.compare` returns (the content
of ``compare.json``), so the outputs can be re-made from the JSON alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from samatch.metrics import summarize
from samatch.stats import case_means

REFERENCE = "centralized"
DIGITS = {"dice": 3, "hd95": 2}
BAR_ARMS = ("local", "federated", REFERENCE)  # bars per site, left to right


def arm_order(arms: list[str]) -> list[str]:
    """centralized, federated, local, then local:<site> in site order."""
    head = [a for a in (REFERENCE, "federated", "local") if a in arms]
    return head + [a for a in arms if a not in head]


def fmt(mean: float, std: float, metric: str) -> str:
    d = DIGITS[metric]
    return f"{mean:.{d}f} ± {std:.{d}f}"


def iterations_cell(result: dict, arm: str) -> str:
    c = result["compute"]
    k, r, loc = c["sites"], c["rounds"], c["local_iterations"]
    if arm == REFERENCE:
        return str(c["iterations"][REFERENCE])
    if arm == "federated":
        return f"{k}×{r}×{loc} = {c['iterations']['federated']}"
    if arm == "local":
        return f"{k}×{r * loc} = {c['iterations']['local']}"
    return str(c["per_site"]["local"][arm.split(":", 1)[1]])


def metric_table(result: dict, metric: str) -> list[str]:
    """Markdown lines: one row per arm, mean ± std over cases per class and of the per-case mean."""
    names = result["class_names"][1:]
    tests = {t["run"]: t for t in result["tests"][metric]}
    header = ["arm", "iterations", *names, "mean", "Δ mean", "p", "p (Bonferroni)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in arm_order(list(result["arms"])):
        rows = result["arms"][arm]["rows"]
        classes = summarize(rows)["classes"]
        cells = [fmt(classes[c][metric]["mean"], classes[c][metric]["std"], metric) for c in sorted(classes)]
        per_case = np.array(list(case_means(rows, metric).values()))
        cells.append(fmt(per_case.mean(), per_case.std(), metric))
        if arm == REFERENCE:
            cells += ["ref", "", ""]
        else:
            t = tests[arm]
            cells += [f"{t['diff']:+.{DIGITS[metric]}f}", f"{t['p']:.3g}", f"{t['p_bonferroni']:.3g}"]
        lines.append("| " + " | ".join([arm, iterations_cell(result, arm), *cells]) + " |")
    return lines


def site_line(site: dict) -> str:
    n = len(site["labeled_patients"])
    return (
        f"{site['name']}: {n} labeled patient{'s' * (n != 1)} ({', '.join(site['labeled_patients'])}; "
        f"{site['labeled_slices']} slices), {site['unlabeled_slices']} unlabeled slices, "
        f"{len(site['val_cases'])} validation cases"
    )


def markdown(result: dict) -> str:
    """The whole comparison as markdown: set-up lines, then a Dice and an HD95 table."""
    c, hw = result["compute"], result["hardware"]
    gpu = hw.get("gpu") or hw.get("cuda")  # results before samatch.hardware named the GPU "cuda"
    units = result["arms"][REFERENCE]["rows"][0]["units"]
    n_cases = len(result["case_site"])
    m = len(result["tests"]["dice"])
    budget = sum(len(s["labeled_patients"]) for s in result["sites"])
    slices = sum(s["labeled_slices"] for s in result["sites"])
    total = c["iterations"][REFERENCE]
    lines = [
        f"## Centralized vs federated vs local-only: {result['dataset']}, method {result['method']}",
        "",
        f"- Sites ({c['sites']}): " + "; ".join(site_line(s) for s in result["sites"]) + ".",
        f"- Label budget: {budget} patients ({slices} labeled slices) in every arm; "
        "centralized trains on the union of the sites' data.",
        f"- Schedule (matched compute): {total} iterations of batch {c['batch_size']} per arm: federated "
        f"{c['sites']} sites × {c['rounds']} rounds × {c['local_iterations']} local iterations, "
        f"local-only {c['sites']} × {c['rounds'] * c['local_iterations']}, centralized {total}.",
        f"- Evaluation: final models on the same {n_cases} validation cases (union of the sites'), per "
        f"volume at native resolution; mean ± std over cases; HD95 in {units}. `local` = each case by its "
        "own site's model; `local:<site>` = that site's model on every case.",
        "- Test: two-sided Wilcoxon signed-rank vs centralized, paired by patient (mean over classes "
        f"per case, then over the patient's cases), Bonferroni over {m} comparisons; Δ mean = arm − "
        "centralized over patients (the mean column is over cases).",
        f"- Hardware: {hw['cpu'] or 'CPU'}, {hw['cores']} cores, torch {hw['torch']} "
        f"({hw['torch_threads']} threads){', ' + gpu if gpu else ''}; wall time "
        + ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
        + ".",
        f"- Command: `{result.get('command', '')}`",
        "",
        "Dice",
        "",
        *metric_table(result, "dice"),
        "",
        f"HD95 ({units})",
        "",
        *metric_table(result, "hd95"),
        "",
    ]
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_rounds(result: dict, path: Path) -> Path:
    """Federated validation Dice per round (per class and mean), centralized at the same compute,
    and the local-only final mean as a horizontal line."""
    plt = _pyplot()
    fed = result["rounds"]["federated"]
    central = result["rounds"][REFERENCE]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    x = [r["round"] for r in fed]
    for name in result["class_names"][1:]:
        ax.plot(x, [r[f"dice_{name}"] for r in fed], lw=1, alpha=0.6, label=f"federated {name}")
    ax.plot(x, [r["dice_mean"] for r in fed], "o-", lw=2.5, color="black", label="federated mean")
    if central:
        ax.plot(
            [h["round"] for h in central], [h["dice_mean"] for h in central], "s--", label="centralized mean"
        )
    local = summarize(result["arms"]["local"]["rows"])["mean"]["dice"]
    ax.axhline(local, ls=":", color="gray", label="local-only mean (final)")
    k, loc = result["compute"]["sites"], result["compute"]["local_iterations"]
    ax.set_xlabel(f"round ({k} sites × {loc} iterations; centralized: every {k * loc} iterations)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"{result['method']}: Dice per round (all {len(result['case_site'])} val cases)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def site_bars(result: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """{site: {arm: (mean, std)}} of per-case mean Dice over that site's validation cases."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for site in result["sites"]:
        own = set(site["val_cases"])
        out[site["name"]] = {}
        for arm in BAR_ARMS:
            values = [v for c, v in case_means(result["arms"][arm]["rows"], "dice").items() if c in own]
            out[site["name"]][arm] = (float(np.mean(values)), float(np.std(values)))
    return out


def plot_sites(result: dict, path: Path) -> Path:
    """Bars per site: local-only (its own model), federated and centralized on that site's cases."""
    plt = _pyplot()
    bars = site_bars(result)
    sites = list(bars)
    width = 0.8 / len(BAR_ARMS)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for i, arm in enumerate(BAR_ARMS):
        xs = [j + (i - (len(BAR_ARMS) - 1) / 2) * width for j in range(len(sites))]
        means = [bars[s][arm][0] for s in sites]
        stds = [bars[s][arm][1] for s in sites]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label="local-only" if arm == "local" else arm)
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylabel("validation Dice (mean over classes)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{result['method']}: each site's validation cases (mean ± std over cases)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """compare.json, comparison.md, dice_per_round.png, local_sites.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "compare.json",
        "table": out / "comparison.md",
        "rounds_png": out / "dice_per_round.png",
        "sites_png": out / "local_sites.png",
    }
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths["table"].write_text(markdown(result))
    plot_rounds(result, paths["rounds_png"])
    plot_sites(result, paths["sites_png"])
    return paths
