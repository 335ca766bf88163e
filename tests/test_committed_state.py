"""The committed state is consistent: on this very repository's last commit, as a fresh clone sees it, `dvc status`
reports no stage whose code, params or data changed since dvc.lock recorded its results. And the check itself
fails on a stale lock, committed or in the workspace, and ignores what only the workspace holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import dvc, run

from imgclf.core.errors import UserError
from imgclf.lockcheck import check, check_committed, stale_stages

ROOT = Path(__file__).resolve().parents[1]


def test_this_repository_has_no_stale_stage() -> None:
    """Fails when a commit changes code or params a stage depends on without rerunning `dvc repro` and
    committing dvc.lock and the results: a fresh clone would then rerun the stage and change the results.
    Reads the last commit, not the workspace: outputs regenerated on another CPU type, a `git checkout .` after
    a local run, or an uncommitted edit of params.yaml are the user's, not the commit's."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the committed state cannot be read (python -m imgclf.lockcheck --workspace)")
    try:
        stale, unknown = check_committed(ROOT)
    except UserError as exc:  # git refuses the repository (another owner): not the commit's fault
        pytest.skip(str(exc))
    assert unknown == []  # everything the stages read is in this repository's commits
    assert not stale, "run `dvc repro` and commit dvc.lock with the results; stale: " + "; ".join(
        f"{stage}: {', '.join(reasons)}" for stage, reasons in stale.items()
    )


def test_status_parsing_counts_changed_code_and_params_but_not_missing_outputs() -> None:
    status = {
        "features@vgg16": [{"changed deps": {"imgclf/device.py": "modified", "data/split/images.csv": "deleted"}}],
        "train@vgg16": [{"changed deps": {"data/features/vgg16": "deleted"}}, {"changed outs": {"m": "deleted"}}],
        "evaluate@vgg16": [{"changed deps": {"params.yaml": {"evaluate.bootstrap": "modified"}}}],
        "compare": ["changed command"],
        "split": [{"changed deps": {"imgclf/groups.py": "new"}}],
    }
    status["prepare"] = [
        {"changed deps": {"data/mine": "deleted"}},
        {"changed outs": {"metrics/prepare.json": "modified"}},
    ]
    produced = {"data/split", "data/features/vgg16"}  # in dvc.lock: a missing one is just not pulled
    assert stale_stages(status, produced) == {
        "prepare": ["data/mine (deleted)", "metrics/prepare.json (output modified)"],
        "features@vgg16": ["imgclf/device.py (modified)"],
        "evaluate@vgg16": ["params: evaluate.bootstrap"],
        "compare": ["command"],
        "split": ["imgclf/groups.py (new)"],
    }


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    (tmp_path / "step.py").write_text("import sys\nopen('out.txt', 'w').write(open('in.txt').read())\n")
    (tmp_path / "in.txt").write_text("a\n")
    (tmp_path / "params.yaml").write_text("copy:\n  times: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: python step.py\n    deps: [step.py, in.txt]\n    params: [copy.times]\n"
        "    outs: [out.txt]\n"
    )
    run(["git", "init", "-q"], tmp_path)
    run(["git", "config", "user.email", "test@example.invalid"], tmp_path)
    run(["git", "config", "user.name", "imgclf tests"], tmp_path)
    dvc(tmp_path, "init", "-q")
    dvc(tmp_path, "repro", "-q")
    run(["git", "add", "-A"], tmp_path)
    run(["git", "commit", "-qm", "consistent"], tmp_path)
    return tmp_path


def test_a_deliberately_stale_lock_is_found(tiny_project: Path) -> None:
    assert check(tiny_project) == {}
    (tiny_project / "out.txt").write_text("edited by hand\n")  # a result that is not what the lock recorded
    assert check(tiny_project) == {"copy": ["out.txt (output modified)"]}
    (tiny_project / "out.txt").unlink()  # a missing output (a fresh clone without the cache) is fine
    assert check(tiny_project) == {}
    (tiny_project / "step.py").write_text("open('out.txt', 'w').write('changed')\n")
    assert check(tiny_project) == {"copy": ["step.py (modified)"]}
    (tiny_project / "params.yaml").write_text("copy:\n  times: 2\n")
    assert check(tiny_project)["copy"] == ["step.py (modified)", "params: copy.times"]
    done = subprocess.run(
        [sys.executable, "-m", "imgclf.lockcheck", "--workspace"], cwd=tiny_project, capture_output=True, text=True
    )
    assert done.returncode == 1 and "stale: copy: step.py (modified); params: copy.times" in done.stdout


def test_the_committed_check_ignores_the_workspace_and_finds_a_stale_commit(tiny_project: Path) -> None:
    """What a user's own runs and edits leave in the workspace is not the commit's; a commit that changed code or
    params without rerunning is."""
    (tiny_project / "out.txt").write_text("regenerated on another CPU type\n")
    (tiny_project / "params.yaml").write_text("copy:\n  times: 3\n")  # edited, not rerun, not committed
    assert check(tiny_project) != {}  # the workspace is stale ...
    assert check_committed(tiny_project) == ({}, [])  # ... the commit is not
    run(["git", "checkout", "-q", "."], tiny_project)  # the committed results back, over local outputs
    assert check_committed(tiny_project) == ({}, [])
    (tiny_project / "step.py").write_text("open('out.txt', 'w').write('changed')\n")
    run(["git", "commit", "-qam", "code changed without a rerun"], tiny_project)
    assert check_committed(tiny_project) == ({"copy": ["step.py (modified)"]}, [])
    (tiny_project / "params.yaml").write_text("copy:\n  times: 2\n")
    run(["git", "commit", "-qam", "params changed without a rerun"], tiny_project)
    assert check_committed(tiny_project)[0]["copy"] == ["step.py (modified)", "params: copy.times"]
    done = subprocess.run([sys.executable, "-m", "imgclf.lockcheck"], cwd=tiny_project, capture_output=True, text=True)
    assert done.returncode == 1 and "stale: copy: step.py (modified); params: copy.times" in done.stdout


def test_data_kept_out_of_git_is_named_not_called_stale(tiny_project: Path) -> None:
    """Data or weights that git ignores (or DVC tracks) are not in the commit: the check says so instead of
    reporting the stage stale forever; what the commit does hold is still checked."""
    (tiny_project / ".gitignore").write_text("in.txt\n")
    run(["git", "rm", "-q", "--cached", "in.txt"], tiny_project)
    run(["git", "add", ".gitignore"], tiny_project)
    run(["git", "commit", "-qm", "the data leaves git"], tiny_project)
    assert check_committed(tiny_project) == ({}, ["in.txt"])
    (tiny_project / "step.py").write_text("open('out.txt', 'w').write('changed')\n")
    run(["git", "commit", "-qam", "code changed without a rerun"], tiny_project)
    assert check_committed(tiny_project) == ({"copy": ["step.py (modified)"]}, ["in.txt"])
    done = subprocess.run([sys.executable, "-m", "imgclf.lockcheck"], cwd=tiny_project, capture_output=True, text=True)
    assert "not checked (kept out of git, so not in the commit): in.txt" in done.stdout


def test_a_folder_that_is_not_a_repository_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "imgclf.lockcheck"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: cannot read the last commit of ")
    assert "Traceback" not in done.stderr and "--workspace" in done.stderr
