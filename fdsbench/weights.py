"""Known checkpoints, where to find them offline, how to check and load them.

Nothing here downloads. A weights file is looked up, in order, at

1. an explicit path (a file, or a directory holding the table's file name),
2. ``$FDSBENCH_WEIGHTS`` (one directory, or several joined with ``os.pathsep``),
3. the cache dir ``$FDSBENCH_CACHE/weights`` (default ``~/.cache/fdsbench/weights``).

A missing file raises :class:`WeightsError` naming the file, the expected sha256 and where it is
published; a file whose sha256 differs from the table's (or from the 8-hex prefix torchvision puts
in its file names) raises :class:`WeightsError`. Only a full sha256 match is "ok": a matching 8-hex
prefix or an entry without a published hash (not verifiable offline) is "unverified" — usable, shown
as UNVERIFIED by ``weights verify``, and the file's own sha256 is recorded in the provenance, never a
made-up one.

The table is ``fdsbench/weights_table.json`` (package data). CLI: ``fdsbench weights list``,
``fdsbench weights verify NAME|all``, ``fdsbench weights where NAME`` (see :func:`add_weights_cli`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UnknownNameError, WeightsError
from .io import sha256_file

TABLE_PATH = Path(__file__).with_name("weights_table.json")


@dataclasses.dataclass(frozen=True)
class WeightsEntry:
    name: str
    kind: str  # "encoder" | "method"
    file: str
    sha256: str | None
    sha256_prefix: str | None
    url: str
    publisher: str
    licence: str
    format: str = ""
    used_by: tuple[str, ...] = ()
    provenance: str = ""  # where the weights come from when the file is derived (e.g. "hed_bsds500")

    @property
    def expected(self) -> str:
        """The expected hash in words (for error messages)."""
        if self.sha256:
            return f"sha256 {self.sha256}"
        if self.sha256_prefix:
            return f"sha256 starting {self.sha256_prefix}"
        return "no published sha256"


_TABLE: dict[str, WeightsEntry] | None = None


def table() -> dict[str, WeightsEntry]:
    """name -> :class:`WeightsEntry` of every known checkpoint."""
    global _TABLE
    if _TABLE is None:
        raw = json.loads(TABLE_PATH.read_text())
        entries = {}
        for d in raw["weights"]:
            d = dict(d)
            d["used_by"] = tuple(d.get("used_by", ()))
            entries[d["name"]] = WeightsEntry(**d)
        _TABLE = entries
    return _TABLE


def get_entry(name: str) -> WeightsEntry:
    t = table()
    if name not in t:
        raise UnknownNameError("weights", name, t)
    return t[name]


# ---- where ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("FDSBENCH_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "fdsbench") / "weights"


def search_dirs() -> list[Path]:
    """Directories searched after an explicit path: $FDSBENCH_WEIGHTS entries, then the cache dir."""
    dirs = [Path(p).expanduser() for p in os.environ.get("FDSBENCH_WEIGHTS", "").split(os.pathsep) if p]
    return dirs + [cache_dir()]


def candidates(name: str, path: str | os.PathLike | None = None) -> list[Path]:
    """Every place looked at for ``name``, in lookup order."""
    entry = get_entry(name)
    out = []
    if path is not None:
        p = Path(path).expanduser()
        out.append(p / entry.file if p.is_dir() else p)
    out += [d / entry.file for d in search_dirs()]
    return out


def locate(name: str, path: str | os.PathLike | None = None) -> Path:
    """The first existing file for ``name`` (see the module doc for the order).

    An explicit ``path`` that does not exist is an error by itself (no silent fallback)."""
    entry = get_entry(name)
    if path is not None:
        p = Path(path).expanduser()
        p = p / entry.file if p.is_dir() else p
        if p.is_file():
            return p
        raise WeightsError(_missing_message(entry, [p]))
    looked = candidates(name)
    for p in looked:
        if p.is_file():
            return p
    raise WeightsError(_missing_message(entry, looked))


def _missing_message(entry: WeightsEntry, looked) -> str:
    where = ", ".join(str(p) for p in looked)
    return (f"weights '{entry.name}' not found: file {entry.file} ({entry.expected}) is not at {where}; "
            f"download it from {entry.url} and put it in $FDSBENCH_WEIGHTS or {cache_dir()}, "
            f"or pass its path (or use weights=random for an explicit random-init run)")


# ---- check ---------------------------------------------------------------------------------------
_SHA_MEMO: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised per (path, size, mtime) for this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(p)
    return _SHA_MEMO[key]


@dataclasses.dataclass
class Check:
    name: str
    path: Path | None
    status: str  # "ok" | UNVERIFIED_PREFIX | UNVERIFIED | "mismatch" | "missing"
    sha256: str | None
    message: str

    @property
    def ok(self) -> bool:
        """Usable: the full sha256 matches, or there is no full published hash to refute the file."""
        return self.status in ("ok", UNVERIFIED_PREFIX, UNVERIFIED)

    @property
    def verified(self) -> bool:
        """The file's full sha256 equals the published one (the only status that proves the bytes)."""
        return self.status == "ok"


#: statuses of a file that could not be proven genuine: an 8-hex prefix (32 bits) is easy to forge,
#: and without a published sha256 there is nothing to compare with
UNVERIFIED_PREFIX = "unverified (only the 8-hex prefix is published; it matches)"
UNVERIFIED = "unverified (no published sha256)"


def check_file(entry: WeightsEntry, path: Path, expected_sha256: str | None = None) -> Check:
    """Compare a file's sha256 with ``expected_sha256`` (if given) else with the table entry."""
    sha = file_sha256(path)
    want = expected_sha256 or entry.sha256
    if want:
        if sha == want.lower():
            return Check(entry.name, path, "ok", sha, "sha256 matches")
        return Check(entry.name, path, "mismatch", sha,
                     f"weights file {path} for '{entry.name}' has sha256 {sha}, expected {want}; "
                     f"re-download it from {entry.url}")
    if entry.sha256_prefix:
        if sha.startswith(entry.sha256_prefix.lower()):
            return Check(entry.name, path, UNVERIFIED_PREFIX, sha,
                         f"sha256 starts with the published prefix {entry.sha256_prefix}; the full hash is not "
                         f"published, so the file is not proven genuine (its sha256 {sha} is recorded)")
        return Check(entry.name, path, "mismatch", sha,
                     f"weights file {path} for '{entry.name}' has sha256 {sha}, which does not start with "
                     f"the published prefix {entry.sha256_prefix}; re-download it from {entry.url}")
    return Check(entry.name, path, UNVERIFIED, sha,
                 f"unverified: no published sha256 in the table to compare with; file sha256 is {sha} (recorded)")


def resolve(name: str, path: str | os.PathLike | None = None, *, expected_sha256: str | None = None,
            verify: bool = True) -> tuple[Path, dict]:
    """Find and check the weights file of ``name``; return (path, provenance).

    An explicit ``path`` whose file name differs from the table's is treated as the user's own file
    (e.g. a fine-tuned checkpoint): its sha256 is recorded but not compared with the table (pass
    ``expected_sha256`` to enforce one). Provenance: {"name", "sha256", "path", "check"}."""
    entry = get_entry(name)
    p = locate(name, path)
    own_file = path is not None and p.name != entry.file and expected_sha256 is None
    if not verify:
        return p, {"name": name, "sha256": file_sha256(p), "path": str(p), "check": "not verified"}
    if own_file:
        sha = file_sha256(p)
        return p, {"name": name, "sha256": sha, "path": str(p), "check": "user file (not in table)"}
    c = check_file(entry, p, expected_sha256)
    if not c.ok:
        raise WeightsError(c.message)
    return p, {"name": name, "sha256": c.sha256, "path": str(p), "check": c.status}


# ---- load ----------------------------------------------------------------------------------------
_WRAPPERS = ("state_dict", "model", "model_state_dict", "teacher", "module", "net", "student")
_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")


def read_checkpoint(path: str | os.PathLike, strip_prefixes: bool = True) -> dict:
    """Load a checkpoint file as a flat ``{name: tensor}`` dict (CPU, ``weights_only=True``).

    Unwraps the usual containers (``state_dict``, ``model``, ``teacher`` …) and, with
    ``strip_prefixes``, strips a prefix shared by all keys (``module.`` from DataParallel,
    ``_orig_mod.`` from torch.compile, ``backbone.`` from DINO training checkpoints, whose
    ``head.*`` keys are then dropped). :func:`load_into` strips only what makes the keys fit the
    target module."""
    import torch

    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - corrupt file, pickled objects, not a torch file
        raise WeightsError(f"cannot read weights file {path} as a tensor checkpoint "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); re-download it") from None
    sd = unwrap_state_dict(obj, source=str(path))
    return _strip_all(sd) if strip_prefixes else sd


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict:
    import torch

    for _ in range(3):  # checkpoint containers: {'state_dict': {...}, 'epoch': ...} and nested ones
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: not a state dict (got {type(obj).__name__}); "
                           "expected a dict of tensors or a checkpoint with 'state_dict'/'model'")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{source}: no tensors found (keys: {', '.join(list(obj)[:8])})")
    return sd


def _strip_once(sd: dict) -> list[dict]:
    """Every dict obtained by stripping one known prefix shared by all keys."""
    out = []
    for pre in _PREFIXES:
        keep = [k for k in sd if k.startswith(pre)]
        if keep and (len(keep) == len(sd) or (pre == "backbone." and all(
                k.startswith(("backbone.", "head.")) for k in sd))):
            out.append({k[len(pre):]: sd[k] for k in keep})
    return out


def _strip_all(sd: dict) -> dict:
    nxt = _strip_once(sd)
    while nxt:
        sd = nxt[0]
        nxt = _strip_once(sd)
    return sd


def _fit_prefixes(sd: dict, own_keys: set) -> dict:
    """The prefix-stripped variant of ``sd`` whose keys overlap ``own_keys`` most (``sd`` itself
    first, so a module whose own names carry ``encoder.``/``backbone.`` keeps them)."""
    best, best_score = sd, len(own_keys & set(sd))
    frontier = [sd]
    for _ in range(4):
        frontier = [c for f in frontier for c in _strip_once(f)]
        for c in frontier:
            score = len(own_keys & set(c))
            if score > best_score:
                best, best_score = c, score
    return best


def load_into(module, state: Mapping | str | os.PathLike, *, strict: bool = True,
              key_map: Callable[[dict, Any], dict] | None = None, source: str | None = None):
    """Load a state dict (or a checkpoint file) into ``module``, strict by default.

    ``key_map(sd, module) -> sd`` adapts official names where they differ. Key or shape mismatches
    raise :class:`WeightsError` with the counts and the first offending names. Returns the
    (missing, unexpected) key lists (empty when strict)."""
    if not isinstance(state, Mapping):
        source = source or str(state)
        state = read_checkpoint(state, strip_prefixes=False)
    source = source or "state dict"
    own = module.state_dict()
    sd = _fit_prefixes(dict(state), set(own))
    if key_map is not None:
        sd = key_map(sd, module)
    bad_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shape:
        raise WeightsError(f"{source}: {len(bad_shape)} tensors have the wrong shape for "
                           f"{type(module).__name__} (file vs model: {'; '.join(bad_shape[:3])}); "
                           "is it the checkpoint of another model size?")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise WeightsError(f"{source}: keys do not match {type(module).__name__}: "
                           f"{len(missing)} missing (e.g. {', '.join(missing[:3]) or '-'}), "
                           f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'}); "
                           "is it the right checkpoint for this model?")
    module.load_state_dict(sd, strict=strict)
    return missing, unexpected


# ---- CLI -----------------------------------------------------------------------------------------
def weights_list() -> list[dict]:
    """One row per known checkpoint: name, kind, file, expected hash, found path (or None), url, licence."""
    rows = []
    for e in table().values():
        try:
            found = str(locate(e.name))
        except WeightsError:
            found = None
        rows.append({"name": e.name, "kind": e.kind, "file": e.file, "sha256": e.sha256,
                     "sha256_prefix": e.sha256_prefix, "found": found, "url": e.url,
                     "licence": e.licence, "publisher": e.publisher})
    return rows


def weights_verify(name: str = "all", path: str | os.PathLike | None = None) -> list[Check]:
    """Check the file of ``name`` (or of every entry for ``all``); missing files give status "missing"."""
    names = list(table()) if name == "all" else [get_entry(name).name]
    out = []
    for n in names:
        entry = get_entry(n)
        try:
            p = locate(n, path if name != "all" else None)
        except WeightsError as e:
            out.append(Check(n, None, "missing", None, str(e)))
            continue
        out.append(check_file(entry, p))
    return out


def weights_where(name: str) -> dict:
    """Where ``name`` is looked for and where it was found."""
    entry = get_entry(name)
    looked = candidates(name)
    found = next((str(p) for p in looked if p.is_file()), None)
    return {"name": name, "file": entry.file, "searched": [str(p) for p in looked], "found": found,
            "url": entry.url}


def add_weights_cli(subparsers) -> None:
    """Register ``weights list|verify|where`` on an argparse subparsers object.

    The parser's ``func(args) -> int`` runs the command (0 ok, 1 when a verify failed or a file is
    missing)."""
    p = subparsers.add_parser("weights", help="list, verify and locate pretrained weights (offline)")
    sub = p.add_subparsers(dest="weights_cmd", required=True)
    sub.add_parser("list", help="known checkpoints and whether they are found").set_defaults(func=_cli_list)
    v = sub.add_parser("verify", help="check sha256 of a checkpoint file (NAME or all)")
    v.add_argument("name", nargs="?", default="all")
    v.add_argument("--path", default=None, help="explicit file or directory")
    v.set_defaults(func=_cli_verify)
    w = sub.add_parser("where", help="where a checkpoint is looked for")
    w.add_argument("name")
    w.set_defaults(func=_cli_where)


def _cli_list(args) -> int:
    rows = weights_list()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        hashed = r["sha256"] or (f"{r['sha256_prefix']}… (prefix only)" if r["sha256_prefix"] else "no published sha256")
        print(f"{r['name']:<{width}}  {r['kind']:<7}  {r['file']:<28}  {hashed:<22}  "
              f"{r['found'] or 'missing'}  [{r['licence']}]  {r['url']}")
    return 0


def _cli_verify(args) -> int:
    """Exit 1 on a mismatch (or a missing named file); files whose bytes cannot be proven genuine
    are listed as UNVERIFIED, never as fine."""
    bad, unverified = 0, 0
    for c in weights_verify(args.name, args.path):
        if c.status in ("missing", "mismatch"):
            shown = c.message
        elif c.verified:
            shown = f"ok: {c.path} sha256 {c.sha256} (matches the published sha256)"
        else:
            shown = f"UNVERIFIED: {c.path} sha256 {c.sha256} — {c.status}"
            unverified += 1
        print(f"{c.name}: {shown}")
        bad += c.status == "mismatch" or (c.status == "missing" and args.name != "all")
    if unverified:
        print(f"{unverified} file(s) UNVERIFIED: no full published sha256 to compare with; their sha256 is recorded "
              f"in every run record, compare it with a copy you trust")
    return 1 if bad else 0


def _cli_where(args) -> int:
    w = weights_where(args.name)
    print(f"{w['name']}: file {w['file']}")
    for p in w["searched"]:
        print(f"  {'found ' if p == w['found'] else 'looked'} {p}")
    if not w["found"]:
        print(f"  missing; published at {w['url']}")
    return 0 if w["found"] else 1
