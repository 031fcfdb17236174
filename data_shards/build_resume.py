"""The grouped build's bookkeeping (:mod:`data_shards.ray_build`): its plan, fingerprint, completion
records, resume and append rules, and the record ids and split over every revision.

Build state, under ``OUT/_build`` (:data:`STATE_DIR`; a local folder or object storage):

* ``plan.json``: the fingerprint of the command (inputs, options, input names, revision), the first
  group id of this revision, whether it finished, and every revision built so far;
* ``a-<g>.spool`` / ``a-<g>.json``: group ``g``'s spooled records and phase-A completion record;
* ``b-<g>.json``: its phase-B completion record (the shards written; the spool is then removed).

Each file appears whole (local files by rename, object storage by single PUTs), so a file that
exists is complete. A rerun with the same command (same fingerprint) reuses every group whose
completion record exists and matches (:func:`resolve_revision`), and ends with the same manifest
as an uninterrupted build.

Append (``--append``): a build over new inputs into a finished OUT is a new revision: its groups
are numbered after the existing ones (:func:`load_history` reads what they hold), record ids stay
unique over all revisions (:func:`final_rows`), and a new record that shares a split cluster with a
built one goes to that record's side (:func:`sides`).

Limit: the fingerprint covers input names and options, not file contents (do not edit inputs
between a kill and the rerun).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_shards import storage
from data_shards.build import _split_of, cluster_roots, side_of
from data_shards.build_inputs import BuildConfig, BuildInputError
from data_shards.manifest import MANIFEST_NAME, load_manifest

STATE_DIR = "_build"


def state_file(state: str, gid: int, ext: str) -> str | Path:
    """Where group ``gid``'s state file lives: ``ext`` "a.json" gives ``<state>/a-<gid:06d>.json``."""
    return storage.join(state, f"{ext[0]}-{gid:06d}{ext[1:]}")


def read_json(location) -> dict | None:
    """The JSON object at ``location``, or None when there is none."""
    try:
        return json.loads(storage.read_bytes(location).decode("utf-8")) if storage.exists(location) else None
    except FileNotFoundError:
        return None


def write_json(location, data: dict) -> None:
    """Write ``data`` to ``location`` whole (keys sorted, no NaN)."""
    storage.write_text(location, json.dumps(data, sort_keys=True, allow_nan=False))


def chunks(kind: str, items: list, size: int) -> list[tuple[str, list]]:
    """``items`` cut, in order, into groups of at most ``size``: [(kind, group items)]."""
    return [(kind, items[i : i + size]) for i in range(0, len(items), size)]


def fingerprint(config: BuildConfig, group_size: int, groups: list, revision: int) -> str:
    """sha256 of what the build makes: the config (less where and how it runs), the group size, the
    revision and every group's input names."""
    described = {
        "config": {k: v for k, v in vars(config).items() if k not in ("out", "workers", "overwrite")},
        "group_size": group_size,
        "revision": revision,
        "groups": [[kind, [getattr(x, "display", None) or repr(x) for x in items]] for kind, items in groups],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _existing_manifests(out: str) -> list:
    found = []
    for name in ("train", "heldout", None):
        target = storage.join(out, name) if name else out
        if storage.exists(storage.join(target, MANIFEST_NAME)):
            found.append(target)
    return found


def _start_over(out: str, state: str) -> None:
    """--overwrite: remove the build state and every shard the existing manifests list."""
    for target in _existing_manifests(out):
        try:
            manifest = load_manifest(target)
        except ValueError:
            manifest = None
        for shard in manifest.shards if manifest else []:
            storage.remove_file(shard.path)
        storage.remove_file(storage.join(target, MANIFEST_NAME))
    storage.remove_tree(state)


def load_history(state: str, upto_gid: int, with_split: bool) -> dict:
    """Ids, split keys, sides, accessions used and shard records of the groups before ``upto_gid``
    (the earlier revisions); BuildInputError when a completion record is missing."""
    history = {"ids": [], "keys": [], "sides": [], "used_accessions": set(), "shards": {}}
    for gid in range(upto_gid):
        a = read_json(state_file(state, gid, "a.json"))
        b = read_json(state_file(state, gid, "b.json"))
        if a is None or b is None:
            raise BuildInputError(f"{state}: completion records of group {gid} are missing (damaged build state)")
        history["ids"] += b["ids"]
        history["keys"] += [keys for _, keys, _ in a["records"]]
        history["sides"] += b["sides"] if with_split else []
        history["used_accessions"] |= set(a["used_accessions"])
        history["shards"][gid] = b
    return history


def resolve_revision(
    config: BuildConfig, group_size: int, append: bool, groups: list, out: str, state: str, split_names: list
) -> tuple[int, int, str, dict | None]:
    """(revision, first group id, fingerprint, plan of the previous state) of this build.

    The same command as the build in ``out`` resumes it (or, finished, redoes nothing), with or
    without ``--overwrite``; another command needs ``--overwrite`` (start over) or, once the build
    in ``out`` is finished, ``--append`` (a new revision).

    Raises:
        BuildInputError: ``out`` holds another build and neither applies, or ``--append`` changes
            the split or prefix.
    """
    plan = read_json(storage.join(state, "plan.json"))
    if plan is not None:
        same = fingerprint(config, group_size, groups, plan["revision"])
        if same == plan["fingerprint"]:
            return plan["revision"], plan["first_gid"], same, plan
    if config.overwrite:
        _start_over(out, state)
        return 0, 0, fingerprint(config, group_size, groups, 0), None
    if plan is None:
        if _existing_manifests(out):
            raise BuildInputError(f"{out}: holds shards of another build; pass --overwrite to replace them")
        return 0, 0, fingerprint(config, group_size, groups, 0), None
    if not plan["finished"]:
        raise BuildInputError(
            f"{out}: holds an unfinished build of another command; rerun that command to finish it, "
            "or pass --overwrite to start over"
        )
    if not append:
        raise BuildInputError(f"{out}: holds a finished build; pass --append to add a revision, or --overwrite")
    layout = {"split_names": split_names, "prefix": config.prefix}
    if plan.get("layout", layout) != layout:
        raise BuildInputError(
            f"{out}: --append must keep the split and prefix of the build there ({plan['layout']}, not {layout})"
        )
    revision = plan["revision"] + 1
    return revision, plan["next_gid"], fingerprint(config, group_size, groups, revision), plan


def final_rows(records_a: list[dict], used_ids: set, clusters: dict | None) -> list[tuple]:
    """Every record of this revision's phase-A completion records, in input order, under an id
    unique over every revision (``id#2``, ``id#3`` ... after ``used_ids``, which grows), with its
    split keys (joined by its sequence cluster when ``clusters`` lists it).

    Returns:
        [(gid, final id, split keys, props, listed in ``clusters``)].
    """
    rows = []
    for record in records_a:
        for requested, cluster_keys, props in record["records"]:
            final, n = requested, 1
            while final in used_ids:
                n += 1
                final = f"{requested}#{n}"
            used_ids.add(final)
            rep = clusters.get(final) if clusters else None
            keys = [*cluster_keys, f"cluster:{rep}"] if rep is not None else cluster_keys
            rows.append((record["gid"], final, keys, props, rep is not None))
    return rows


def sides(keys: list[list[str]], fraction: float, seed: int, history: dict) -> list[str]:
    """Train/held-out per new record; a cluster that holds records of earlier revisions keeps their side."""
    if not history["keys"]:
        return _split_of(keys, fraction, seed)  # exactly the single-pass build's split
    roots = cluster_roots(history["keys"] + keys)
    old = len(history["keys"])
    fixed: dict[str, str] = {}
    for root, side in zip(roots[:old], history["sides"]):
        fixed.setdefault(root, side)
    return [fixed.setdefault(root, side_of(root, fraction, seed)) for root in roots[old:]]
