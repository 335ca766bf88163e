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
import os
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


def dvc_status(root: Path, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """`dvc status --json` of the project at `root` (the dvc of this Python environment)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root, capture_output=True, text=True, check=False, env={**os.environ, **(environ or {})},
    )  # fmt: skip
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines() or ["no output"]
        raise UserError(f"`dvc status` failed in {root}: {lines[-1]}")
    return json.loads(done.stdout or "{}")


def check(root: Path, environ: dict[str, str] | None = None) -> dict[str, list[str]]:
    """The stale stages of the project at `root`."""
    return stale_stages(dvc_status(root, environ), produced_paths(root))


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError("git is not installed: the last commit cannot be read; use --workspace") from None


def _git_refusal(done: subprocess.CompletedProcess, root: Path) -> UserError:
    lines = done.stderr.strip().splitlines() or ["no output"]
    first = next((line for line in lines if line.startswith("fatal:")), lines[0])
    hint = "use --workspace to check the working tree instead"
    if "dubious ownership" in done.stderr:
        hint = f"git refuses a repository owned by another user: git config --global --add safe.directory {root}"
    return UserError(f"cannot read the last commit of {root} ({first}); {hint}")


def not_in_git(root: Path, paths: list[str]) -> list[str]:
    """Of these dependency paths, those whose content the commit does not hold: ignored by git, tracked by DVC
    (a `.dvc` file beside them) or with ignored files inside (data or weights kept out of git). A clone of the
    commit cannot check them."""
    out = []
    for path in paths:
        ignored = _git(root, "check-ignore", "-q", path).returncode == 0
        inside = _git(root, "ls-files", "--others", "--ignored", "--exclude-standard", "--", path).stdout.strip()
        if ignored or inside or (root / f"{path}.dvc").exists():
            out.append(path)
    return out


def check_committed(root: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The stale stages of the last commit of the git repository at `root`, as a fresh clone of it sees them
    (a local clone of HEAD into a temporary folder: committed files only, no DVC outputs); and the dependencies
    that only the working tree holds (kept out of git), which the commit cannot be checked against."""
    top = _git(root, "rev-parse", "--show-toplevel")
    head = _git(root, "rev-parse", "HEAD")
    if top.returncode != 0 or head.returncode != 0:
        raise _git_refusal(top if top.returncode else head, root)
    top_dir = Path(top.stdout.strip())
    # ignore_cleanup_errors: a DVC helper process may still be writing into the clone's site cache as it closes
    # (seen once under xdist: "Directory not empty"); a leftover temporary folder is not the check's failure.
    with tempfile.TemporaryDirectory(prefix="imgclf-lockcheck-", ignore_cleanup_errors=True) as tmp:
        clone = Path(tmp) / "clone"
        done = _git(top_dir, "clone", "-q", "--shared", "--no-checkout", str(top_dir), str(clone))
        if done.returncode == 0:
            done = _git(clone, "checkout", "-q", "--detach", head.stdout.strip())
        if done.returncode != 0:
            raise _git_refusal(done, root)
        project = clone / Path(root).resolve().relative_to(top_dir.resolve())
        # DVC keeps a per-repository cache of its own under /var/tmp; this clone's goes with it.
        stale = check(project, {"DVC_SITE_CACHE_DIR": str(Path(tmp) / "site-cache")})
    unknown: list[str] = []
    for stage, reasons in list(stale.items()):
        paths = [reason.rsplit(" (", 1)[0] for reason in reasons if not reason.startswith(("params:", "command"))]
        outside = set(not_in_git(Path(root), paths))
        kept = [reason for reason in reasons if reason.rsplit(" (", 1)[0] not in outside]
        unknown += sorted(outside - set(unknown))
        if kept:
            stale[stage] = kept
        else:
            del stale[stage]
    return stale, unknown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Is the committed state consistent? (dvc.lock against the code)")
    parser.add_argument("--workspace", action="store_true", help="check this working tree instead of HEAD")
    args = parser.parse_args(argv)
    unknown: list[str] = []
    try:
        if args.workspace:
            stale = check(Path.cwd())
        else:
            stale, unknown = check_committed(Path.cwd())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT
    if unknown:
        print(f"not checked (kept out of git, so not in the commit): {', '.join(unknown)}")
    for stage, reasons in stale.items():
        print(f"stale: {stage}: {'; '.join(reasons)}")
    if stale:
        print("dvc.lock does not match the code and params: run `dvc repro` and commit dvc.lock with the results")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
