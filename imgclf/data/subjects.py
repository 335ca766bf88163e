"""Patient-level (subject) groups: images of one patient stay in one split, and no patient identifier is written.

`data.groups.by` says where an image's subject comes from:
  none      no subject groups (identical content and near-copies are still grouped)
  dicom     a DICOM attribute, `data.groups.dicom_tag` (PatientID by default)
  pattern   the first matching group of the regular expression `data.groups.pattern`, searched in the path
            relative to data.root (`person(\\d+)_` keys `PNEUMONIA/person1_virus_6.jpeg` as 1)
  csv       the table `data.groups.csv` (path relative to data.root, inside it so that DVC tracks it), with the
            columns path,group

The raw key (a patient ID, a name) is identifying, and no DVC output or tracked file holds it or anything
derived from it: subject groups join the identical-content and near-copy groups in one union (`join_groups`),
and the manifest's `group` stays the smallest sha256 of each connected set, which split keeps in one split.
So the outputs are the same on every machine. For the data steward (which files are patient X's?), prepare
writes `logs/subjects.csv` (git-ignored, no DVC output): each kept path with its subject as a one-way keyed
hash, HMAC-SHA256 with a secret key of this site, truncated to 128 bits. The key is 32 random bytes in a file
outside the project (`~/.config/imgclf/group.key` by default, or the file named by the environment variable
IMGCLF_GROUP_KEY_FILE), made on first use, readable by its owner only, never committed: without it nobody can
test a guessed patient ID against the table (a plain hash of a 7-digit ID falls to a dictionary in seconds).
With `by: pattern` the key is part of the file's path, which is written as it is everywhere.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from hashlib import sha256
from pathlib import Path
from typing import Any

import pandas as pd

from imgclf.core.errors import UserError, log
from imgclf.data.groups import union_groups

KEY_ENV = "IMGCLF_GROUP_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/imgclf/group.key")


def key_file() -> Path:
    """Where this site's group-hash key lives (IMGCLF_GROUP_KEY_FILE, else ~/.config/imgclf/group.key)."""
    return Path(os.environ.get(KEY_ENV) or DEFAULT_KEY_FILE).expanduser()


def load_key(project: str | Path = ".") -> bytes:
    """The secret key, made (32 random bytes, mode 0600) when missing; a UserError when unusable or inside the
    project (where git or DVC could pick it up)."""
    path = key_file()
    if Path(os.path.realpath(path)).is_relative_to(os.path.realpath(project)):
        raise UserError(
            f"the group-hash key file {path} is inside the project, where it could be committed; set {KEY_ENV} "
            "to a path outside it (the default is ~/.config/imgclf/group.key)"
        )
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(32))
        except FileExistsError:
            pass  # made meanwhile by another run: read it below
        except OSError as exc:
            raise UserError(
                f"cannot make the group-hash key {path} ({exc.strerror or exc}); set {KEY_ENV} to a writable path "
                "outside the project"
            ) from None
        log.warning(
            "prepare: made a new group-hash key at %s (keep it private and out of git: it keys the subject hashes "
            "in logs/subjects.csv; see docs/medical.md)",
            path,
        )
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read the group-hash key {path} ({exc.strerror or exc}); fix its permissions") from None
    if len(key) < 16:
        raise UserError(f"the group-hash key {path} holds {len(key)} bytes, fewer than 16; delete it to make a new one")
    return key


def keyed_hash(value: str, key: bytes) -> str:
    """HMAC-SHA256 of a subject key, 32 hex digits: the only form in which a subject is written."""
    return hmac.new(key, value.encode("utf-8"), sha256).hexdigest()[:32]


def check_pattern(pattern: str) -> re.Pattern[str]:
    """The compiled data.groups.pattern, which must have at least one capturing group."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"data.groups.pattern={pattern!r} is not a valid regular expression ({exc})") from None
    if compiled.groups < 1:
        raise UserError(
            f"data.groups.pattern={pattern!r} has no capturing group; put the subject's part in parentheses, "
            r"e.g. 'person(\d+)_'"
        )
    return compiled


def csv_path(root: str | Path, table: str) -> Path:
    """data.groups.csv, relative to data.root and inside it (so that DVC's dependency on data.root covers it)."""
    path = Path(root) / table
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)):
        raise UserError(
            f"data.groups.csv={table!r} is outside data.root={str(root)!r}; put the table inside data.root (DVC "
            "tracks data.root, so an edited table reruns prepare) and give its path relative to it"
        )
    if not path.is_file():
        raise UserError(
            f"data.groups.csv: no table at {path}; write one with the columns path,group (paths relative to data.root)"
        )
    return path


def raw_keys(manifest: pd.DataFrame, root: str | Path, groups: dict[str, Any]) -> pd.Series:
    """The raw subject key of every kept row ("" when the rule cannot key it), indexed like the manifest.
    Identifying: hash it (keyed_hash) before anything is written."""
    ok = manifest[manifest.status == "ok"]
    rule = groups["by"]
    if rule == "dicom":
        from imgclf.data.dicom import read_tag

        tag = groups["dicom_tag"]
        values = [
            read_tag(Path(root) / p, tag) if f == "DICOM" else "" for p, f in zip(ok.path, ok.format, strict=True)
        ]
        return pd.Series(values, index=ok.index, dtype=object)
    if rule == "pattern":
        compiled = check_pattern(groups["pattern"])

        def first_group(path: str) -> str:
            match = compiled.search(path)
            found = [g for g in match.groups() if g] if match else []
            return found[0] if found else ""

        return pd.Series([first_group(p) for p in ok.path], index=ok.index, dtype=object)
    if rule == "csv":
        path = csv_path(root, groups["csv"])
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"data.groups.csv: cannot read {path} as CSV ({exc})") from None
        if not {"path", "group"} <= set(table.columns):
            raise UserError(
                f"data.groups.csv: {path} has the columns {', '.join(table.columns) or 'none'}; expected path,group"
            )
        repeated = table.path[table.path.duplicated()]
        if len(repeated):
            raise UserError(f"data.groups.csv: {path} lists {repeated.iloc[0]!r} more than once; keep one row per path")
        lookup = dict(zip(table.path.str.strip(), table.group.str.strip(), strict=True))
        return pd.Series([lookup.get(p, "") for p in ok.path], index=ok.index, dtype=object)
    raise ValueError(f"data.groups.by must be dicom, pattern or csv. Received: {rule!r}")


def check_rule(root: str | Path, groups: dict[str, Any]) -> None:
    """Before the scan: a pattern compiles with a group, a table lies inside data.root (one line otherwise)."""
    if groups["by"] == "pattern":
        check_pattern(groups["pattern"])
    elif groups["by"] == "csv":
        csv_path(root, groups["csv"])


KEY_IN_PATH_MIN = 4  # shorter keys (a patient "12") match paths by chance, and identify nobody alone


def key_in_path(key: str, path: str) -> bool:
    """Whether a subject key is written in a path, as a person would read it: letters and digits compared without
    case, separators or punctuation (`DOE^JANE` in `Doe_Jane/`, `AB 1234` in `ab-1234.dcm`); a key of digits only
    must stand on its own, not inside a longer name or number (patient `0003` in `0003/IM1.dcm` or
    `p_0003_1.png`, not in `IM0003.dcm` or `20003/`)."""
    letters = re.sub(r"[\W_]+", "", key).casefold()
    if len(letters) < KEY_IN_PATH_MIN:
        return False
    if letters.isdigit():
        return re.search(rf"(?<![^\W_]){re.escape(letters)}(?![^\W_])", path) is not None
    return letters in re.sub(r"[\W_]+", "", path).casefold()


def check_key_in_path(raw: pd.Series, paths: pd.Series, groups: dict[str, Any]) -> None:
    """Stop when a file's own raw subject key is written in its path relative to data.root (key_in_path), as in a
    PACS export `<PatientID>/IM0001.dcm`: the paths go into tracked files (the manifest, predictions, out-of-fold
    and label-issue tables), the key with them. With `by: pattern` the key is in the path by the rule's own
    definition, and data.groups.key_in_path: allow accepts keys that are already public pseudonyms. The message
    names neither a key nor a path (both would identify)."""
    rule = groups["by"]
    if rule not in ("dicom", "csv") or groups["key_in_path"] == "allow":
        return
    hits = sum(1 for key, path in zip(raw, paths, strict=True) if key and key_in_path(key, path))
    if hits:
        source = f"its DICOM {groups['dicom_tag']}" if rule == "dicom" else f"its group in {groups['csv']}"
        raise UserError(
            f"data.groups.by={rule}: {hits} kept file(s) have their subject key ({source}) in their own path under "
            "data.root, and paths are written to tracked files (the manifest, predictions.csv, oof.csv, "
            "label_issues.csv); rename those folders or files (e.g. to a study number), or set "
            "data.groups.key_in_path: allow if the keys are public pseudonyms"
        )


def subject_keys(manifest: pd.DataFrame, root: str | Path, groups: dict[str, Any], key: bytes) -> pd.Series:
    """Each kept row's subject as a keyed hash (the raw key never leaves this function). Rows the rule cannot
    key stop the run with one line naming the first few, unless data.groups.unkeyed is own_group: each is then
    its own subject (its content hash)."""
    raw = raw_keys(manifest, root, groups)
    check_key_in_path(raw, manifest.path[raw.index], groups)
    missing = raw[raw == ""]
    if len(missing):
        rule = groups["by"]
        why = {
            "dicom": f"no {groups['dicom_tag']} (or not DICOM)",
            "pattern": f"no match of {groups['pattern']!r}",
            "csv": f"not in {groups['csv']}",
        }[rule]
        if groups["unkeyed"] == "stop":
            names = ", ".join(manifest.path[missing.index[:3]])
            raise UserError(
                f"data.groups.by={rule}: {len(missing)} kept file(s) have {why}, e.g. {names}; fix the rule or "
                "the files, or set data.groups.unkeyed: own_group to treat each such file as its own subject"
            )
        log.warning(
            "prepare: %d kept file(s) have %s: each is its own subject (data.groups.unkeyed=own_group)",
            len(missing), why,
        )  # fmt: skip
    hashed = [keyed_hash(value, key) if value else "" for value in raw]
    out = pd.Series(hashed, index=raw.index, dtype=object)
    own = out == ""
    out[own] = [keyed_hash("\0content:" + digest, key) for digest in manifest.sha256[out.index[own]]]
    return out


def join_groups(manifest: pd.DataFrame, subject: pd.Series) -> pd.DataFrame:
    """Merge into one `group` every group that shares a subject (`subject`: kept rows' keys, indexed like the
    manifest), a union with the identical-content and near-copy groups: each
    row is linked to the first row of its group and to the first row of its subject. The merged group is the
    smallest content hash of its rows, so the result does not depend on how subjects are keyed or hashed."""
    rows = manifest[manifest.status == "ok"]
    links = []
    for keys in (rows.group, subject[rows.index]):
        first: dict[str, str] = {}
        links += [(first.setdefault(key, path), path) for path, key in zip(rows.path, keys, strict=True)]
    return union_groups(manifest, pd.DataFrame(links, columns=["path_a", "path_b"]))
