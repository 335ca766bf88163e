"""Is the committed state consistent? `dvc status` must report no stage whose code, data or params changed since
its results were recorded in dvc.lock. Missing outputs are fine (a fresh clone has no DVC cache); a changed
dependency is not: it means the committed results were not produced by the committed code, and a fresh clone's
`dvc repro` would silently replace them.

    python -m imgclf.lockcheck        # exit 1 and one line per stale stage, 0 when consistent
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def stale_stages(status: dict[str, Any]) -> dict[str, list[str]]:
    """From `dvc status --json`: each stage whose command, params, or dependencies (modified, or new to the
    stage) changed, with what changed. Dependencies that are only missing ("deleted": an upstream output not
    pulled) and changed outputs do not count. DVC lists a params file among the changed deps, with a dict of
    the changed keys: `{"changed deps": {"params.yaml": {"train.lr": "modified"}}}`."""
    stale: dict[str, list[str]] = {}
    for stage, items in status.items():
        reasons: list[str] = []
        for item in items if isinstance(items, list) else []:
            if item == "changed command":
                reasons.append("command")
            elif isinstance(item, dict):
                for path, how in item.get("changed deps", {}).items():
                    if isinstance(how, dict):
                        reasons.append(f"params: {', '.join(sorted(how))}")
                    elif how in ("modified", "new"):
                        reasons.append(f"{path} ({how})")
        if reasons:
            stale[stage] = reasons
    return stale


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json` of the project at `root` (the dvc of this Python environment)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"dvc status failed in {root}: {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(done.stdout or "{}")


def main() -> int:
    stale = stale_stages(dvc_status(Path.cwd()))
    for stage, reasons in stale.items():
        print(f"stale: {stage}: {'; '.join(reasons)}")
    if stale:
        print("dvc.lock does not match the code and params: run `dvc repro` and commit dvc.lock with the results")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
