"""Is the committed state consistent? `dvc status` must report no stage whose code, data or params changed since
its results were recorded in dvc.lock. Missing outputs are fine (a fresh clone has no DVC cache); a changed
dependency is not: it means the committed results were not produced by the committed code, and a fresh clone's
`dvc repro` would silently replace them.

    python -m imgclf.lockcheck              # the last commit, as a fresh clone sees it; exit 1 and one line
                                            # per stale stage, 0 when consistent
    python -m imgclf.lockcheck --workspace  # this working tree, local runs and edits included

The committed check reads a clone of HEAD (no DVC outputs, no uncommitted edit), so outputs regenerated on
another CPU type, a `git checkout .` after a local run, or an edit not yet committed do not count: only what a
fresh clone would see does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from imgclf.core.errors import USER_ERROR_EXIT, UserError


def stale_stages(status: dict[str, Any], produced: set[str] = frozenset()) -> dict[str, list[str]]:  # type: ignore[assignment]
    """From `dvc status --json`: each stage whose command, params or dependencies changed (a dependency modified,
    new to the stage, or deleted when no stage produces it), or whose outputs exist but differ from dvc.lock
    (results committed without their lock). A dependency that is only missing because it is another stage's
    output (`produced`: the outs recorded in dvc.lock), and outputs that are missing, do not count: a fresh
    clone has no DVC cache. DVC lists a params file among the changed deps, with a dict of the changed keys:
    `{"changed deps": {"params.yaml": {"train.lr": "modified"}}}`."""

    def is_produced(path: str) -> bool:
        return any(path == out or path.startswith(out.rstrip("/") + "/") for out in produced)

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
                    elif how in ("modified", "new") or (how == "deleted" and not is_produced(path)):
                        reasons.append(f"{path} ({how})")
                reasons += [
                    f"{path} (output modified)"
                    for path, how in item.get("changed outs", {}).items()
                    if how == "modified"
                ]
        if reasons:
            stale[stage] = reasons
    return stale


def produced_paths(root: Path) -> set[str]:
    """Every output path recorded in dvc.lock."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return set()
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {out["path"] for stage in stages.values() for out in stage.get("outs", [])}


def dvc_status(root: Path) -> dict[str, Any]:
    """`dvc status --json` of the project at `root` (the dvc of this Python environment)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines() or ["no output"]
        raise UserError(f"`dvc status` failed in {root}: {lines[-1]}")
    return json.loads(done.stdout or "{}")


def check(root: Path) -> dict[str, list[str]]:
    """The stale stages of the project at `root`."""
    return stale_stages(dvc_status(root), produced_paths(root))


def check_committed(root: Path) -> dict[str, list[str]]:
    """The stale stages of the last commit of the git repository at `root`, as a fresh clone of it sees them
    (a local clone of HEAD into a temporary folder: committed files only, no DVC outputs)."""
    with tempfile.TemporaryDirectory(prefix="imgclf-lockcheck-") as tmp:
        clone = Path(tmp) / "clone"
        done = subprocess.run(
            ["git", "clone", "-q", "--shared", "--no-checkout", str(root), str(clone)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
            done = subprocess.run(
                ["git", "-C", str(clone), "checkout", "-q", "--detach", head.stdout.strip()],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["no output"]
            raise UserError(
                f"cannot read the last commit of {root} ({lines[-1]}); in a folder without git history use --workspace"
            )
        return check(clone)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Is the committed state consistent? (dvc.lock against the code)")
    parser.add_argument("--workspace", action="store_true", help="check this working tree instead of HEAD")
    args = parser.parse_args(argv)
    try:
        stale = check(Path.cwd()) if args.workspace else check_committed(Path.cwd())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    for stage, reasons in stale.items():
        print(f"stale: {stage}: {'; '.join(reasons)}")
    if stale:
        print("dvc.lock does not match the code and params: run `dvc repro` and commit dvc.lock with the results")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
