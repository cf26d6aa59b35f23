"""Results of an evaluation: one JSON file and one markdown table, the same for scored files and model runs."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

POPE_COLUMNS = ("split", "n", "accuracy", "precision", "recall", "f1", "yes_ratio")
CHAIR_COLUMNS = ("split", "n", "chair_s", "chair_i", "recall", "mean_length")
_PERCENT = {"accuracy", "precision", "recall", "f1", "yes_ratio", "chair_s", "chair_i"}


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A GitHub-markdown table of ``rows`` (missing cells print '-')."""
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def table_row(result: Mapping[str, object]) -> dict[str, object]:
    """A table row from a result dict: rates as percentages with one decimal, the rest as they are."""
    metrics = dict(result["metrics"])  # type: ignore[arg-type]
    row: dict[str, object] = {"split": result.get("split", "-"), "mitigation": result.get("mitigation_label", "-")}
    for key, value in metrics.items():
        if key in _PERCENT:
            row[key] = f"{100 * float(value):.1f}"
        elif key == "clip_score":
            row[key] = f"{float(value):.3f}"
        elif isinstance(value, float):
            row[key] = f"{value:.1f}"
        else:
            row[key] = value
    if "questions_per_s" in result:
        row["items/s"] = f"{float(result['questions_per_s']):.2f}"
    return row


def results_table(results: Sequence[Mapping[str, object]]) -> str:
    """The markdown table of one task's results (POPE or CHAIR columns, chosen from the first result)."""
    task = results[0]["task"]
    columns = list(POPE_COLUMNS if task == "pope" else CHAIR_COLUMNS)
    rows = [table_row(r) for r in results]
    if any(r.get("mitigation_label", "-") != "-" for r in rows):
        columns.insert(1, "mitigation")
    if task == "chair" and any("clip_score" in r for r in rows):
        columns.append("clip_score")
    if any("items/s" in r for r in rows):
        columns.append("items/s")
    title = "POPE (rates in %)" if task == "pope" else "CHAIR (rates in %, length in words)"
    return f"{title}\n\n" + markdown_table(rows, columns)


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON atomically (temporary file + rename), so a crash leaves no half file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: ranks may race
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_results(results: Sequence[Mapping[str, object]], json_path: str | Path, md_path: str | Path) -> str:
    """Write the results JSON (a list of result dicts) and the markdown table; returns the table."""
    table = results_table(results)
    write_json(json_path, list(results))
    Path(md_path).write_text(table + "\n", encoding="utf-8")
    return table
