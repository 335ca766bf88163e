"""Static pictures of the DVC plots, for a pull-request comment or a paper, rendered offline.

`python -m imgclf render-plots --out figures/` asks DVC for its plots as filled Vega-Lite specs (the data
inlined), the same charts `dvc plots show` draws, and renders each with vl-convert (no browser, no network)
to PNG or SVG. With revisions (`render-plots HEAD main`) it renders `dvc plots diff` instead: both
revisions in each chart. The pictures that are already PNG files (confusion, attention...) are not redrawn.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from imgclf.core.errors import UserError, log

VEGA_LITE = "5.21"  # DVC's plot templates are Vega-Lite 5 specs


def plot_specs(revisions: list[str], cwd: str | Path = ".") -> dict[str, dict]:
    """{plot id: filled Vega-Lite spec} from `dvc plots show --json` (or `dvc plots diff <revs> --json`)."""
    with tempfile.TemporaryDirectory() as tmp:
        command = ["diff", *revisions] if revisions else ["show"]
        result = subprocess.run(
            [sys.executable, "-m", "dvc", "plots", *command, "--json", "-o", tmp],
            cwd=cwd,
            capture_output=True,
            text=True,
        )
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        hint = "" if (Path(cwd) / "dvc.yaml").is_file() else "; run it from the project (where dvc.yaml is)"
        raise UserError(f"`dvc plots {' '.join(command)}` failed: {message}{hint}")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError as exc:
        raise UserError(f"`dvc plots {' '.join(command)} --json` did not print JSON ({exc})") from None
    for error in report.get("errors", []):  # e.g. a plot file missing in one revision: the chart lacks its lines
        log.warning("render-plots: DVC reported %s", error)
    return {
        plot_id: entry["content"]
        for plot_id, entries in report.get("data", {}).items()
        for entry in entries
        if entry.get("type") == "vega" and "content" in entry
    }


def render_plots(out_dir: str | Path, fmt: str = "png", revisions: list[str] = (), cwd: str | Path = ".") -> list[Path]:  # type: ignore[assignment]
    """Render every chart to out_dir/<plot id>.<fmt>; returns the files written."""
    import vl_convert

    if fmt not in ("png", "svg"):
        raise UserError(f"--format={fmt!r} must be png or svg")
    specs = plot_specs(list(revisions), cwd)
    if not specs:
        raise UserError("DVC reported no charts; run `dvc repro` first (the plots come from its outputs)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for plot_id, spec in specs.items():
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', plot_id).strip('_')}.{fmt}"
        if fmt == "png":
            path.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=2))
        else:
            path.write_text(vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE), encoding="utf-8")
        written.append(path)
    return written
