"""``python -m data_shards rewrite``: language-model rewrites of terse annotations, stored in shards.

Align-Pro augments function text with descriptions rewritten by a language model. This step runs
offline as a batch over a shard set and writes a new shard set whose records carry up to
``variants`` rewrites in ``text["rewrites"]`` (the schema's optional field); everything else,
including the manifest's ``sample_props`` and ``extra``, is copied (rewrites already in the input
are replaced). Training then picks a stored rewrite with probability ``data.text_rewrite_prob``
(``data_shards.text_rules``).

* Prompts: the record's annotations as plain "field: value" lines (name, function, location,
  similarity, GO term names by aspect, EC numbers; never the stored rewrites), with one of
  :data:`STYLES` per variant so variants differ even under greedy decoding.
* Cache and resume: every raw model output is stored in an sqlite file under a key hashing
  (instruction, annotation text, model id, decoding parameters, variant); each batch is committed
  as soon as it returns. A rerun after a crash calls the model only for the missing keys, and a
  second complete run calls it not at all. Outputs are validated after the cache, so changing the
  bounds needs no new calls.
* Validation (:func:`check_rewrite`): non-empty, within ``min_chars`` / ``max_chars``, and no GO
  id or EC number that the record does not already have (an invented identifier is a
  hallucination). A rejected output is counted by reason and replaced by a rule-based description
  (``text_augment.augment_text`` seeded from its cache key) unless ``fallback="none"``.

Output shards keep the input's shard prefixes and sample order; a sample that cannot be read is
skipped and counted. An unreachable endpoint or an unloadable model stops the run with an error
that names it; the shards of the prefix being written are discarded (those of prefixes already
finished stay, listed in the manifest), and the cache keeps every answer received, including
those of the failed batch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_shards.llm_backends import BackendError, GenerationParams, LLMBackend, Prompt
from data_shards.manifest import ShardInfo, load_manifest, write_manifest
from data_shards.reader import BadSampleError, BadShardError, ShardReader
from data_shards.schema import MAX_REWRITES, TEXT_REWRITES_FIELD, ProteinRecord
from data_shards.text_rules import augment_text  # the rule-based descriptions training uses too
from data_shards.writer import ShardWriter

CACHE_FORMAT = 1  # bump when the cache key's layout changes
INSTRUCTION = (
    "You rewrite terse protein annotations into a natural description of the protein for a "
    "biologist. Use only the facts given; do not add functions, locations, organisms or "
    "identifiers that are not listed. Do not mention GO identifiers. Answer with the description "
    "only."
)
STYLES = (
    "Write two or three plain sentences.",
    "Write one concise sentence, as a UniProt curator would.",
    "Write a short paragraph that starts with what the protein does and ends with where it acts.",
    "Write two sentences in the style of a textbook, in your own words.",
)
_ASPECT_LABELS = (("F", "Molecular function"), ("P", "Biological process"), ("C", "Cellular component"))
_GO_RE = re.compile(r"GO[:_ ]?(\d{7})")
# a full EC number or an EC class prefix ("EC 3.4.21", "EC 3.4.-.-"); bare four-part numbers too
# ("EC50" is a potency, not an enzyme class: a bare "EC" must be followed by a separator or a dot)
_EC_PREFIXED_RE = re.compile(r"\bEC(?:[\s:]+|(?=\d+\.))((?:\d+|-)(?:\.(?:n?\d+|-)){0,3})")
_EC_BARE_RE = re.compile(r"(?<![\w.])(\d+\.(?:\d+|-)\.(?:\d+|-)\.(?:n?\d+|-))(?!\w)(?!\.\d)")
_LABEL_RE = re.compile(r"^(?:description|rewritten description|answer)\s*:\s*", re.IGNORECASE)


class RewriteError(ValueError):
    """The input shards or the cache cannot be used; the message names the file or folder."""


@dataclass
class RewriteConfig:
    """What to rewrite and how.

    Attributes:
        shards: input shard directory (with manifest.json).
        out: output shard directory (must differ from ``shards``).
        variants: rewrites per record (1..MAX_REWRITES).
        params: decoding parameters (part of the cache key).
        cache: sqlite cache file; None puts ``rewrite-cache.sqlite`` in ``out``.
        min_chars: shortest accepted rewrite.
        max_chars: longest accepted rewrite.
        batch_size: prompts sent to the backend per call (and per cache commit).
        fallback: "rule" stores a rule-based description for a rejected output, "none" drops it.
        overwrite: replace existing shards in ``out``.
    """

    shards: str | Path
    out: str | Path
    variants: int = 2
    params: GenerationParams = field(default_factory=GenerationParams)
    cache: str | Path | None = None
    min_chars: int = 20
    max_chars: int = 1200
    batch_size: int = 16
    fallback: str = "rule"
    overwrite: bool = False


# ----------------------------------------------------------------------------- prompts and checks


def annotation_text(fields: dict) -> str:
    """The record's annotations as "label: value" lines (no rewrites, no GO ids); "" if none."""
    lines = []
    for key, label in (("name", "Protein name"), ("function", "Function"), ("location", "Subcellular location")):
        value = " ".join((fields.get(key) or "").split())
        if value:
            lines.append(f"{label}: {value}")
    for aspect, label in _ASPECT_LABELS:
        names = [t.get("name", "").strip() for t in fields.get("go") or [] if t.get("aspect") == aspect]
        names = list(dict.fromkeys(n for n in names if n))
        if names:
            lines.append(f"{label}: {'; '.join(names)}")
    if fields.get("ec"):
        lines.append(f"EC numbers: {', '.join(fields['ec'])}")
    similarity = " ".join((fields.get("similarity") or "").split())
    if similarity:
        lines.append(f"Similarity: {similarity}")
    return "\n".join(lines)


def make_prompt(fields: dict, variant: int, params: GenerationParams) -> Prompt:
    """The request for one variant of one record (style ``STYLES[variant % len(STYLES)]``)."""
    instruction = f"{INSTRUCTION} {STYLES[variant % len(STYLES)]}"
    return Prompt(instruction=instruction, content=annotation_text(fields), seed=params.seed + variant)


def cache_key(prompt: Prompt, model_id: str, params: GenerationParams, variant: int) -> str:
    """sha256 over (format, instruction, annotation text, model id, parameters, variant, seed)."""
    payload = {
        "format": CACHE_FORMAT,
        "instruction": prompt.instruction,
        "content": prompt.content,
        "model": model_id,
        "params": params.to_json(),
        "variant": variant,
        "seed": prompt.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def _ec_compatible(mention: str, allowed: set[str]) -> bool:
    """True when ``mention`` (full or a class prefix) names one of the ``allowed`` EC numbers."""
    parts = [p for p in mention.split(".") if p]
    for number in allowed:
        known = number.split(".")
        if len(parts) <= len(known) and all(p == "-" or p == k for p, k in zip(parts, known)):
            return True
    return False


def clean_output(text: str) -> str:
    """Strip whitespace, wrapping quotes and a leading "Description:" label; collapse whitespace."""
    text = " ".join((text or "").split())
    text = _LABEL_RE.sub("", text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def check_rewrite(text: str, fields: dict, min_chars: int, max_chars: int) -> tuple[str, str | None]:
    """Clean and validate one output.

    Args:
        text: the raw model output.
        fields: the record's text dict (the source of allowed GO ids and EC numbers).
        min_chars, max_chars: accepted length range of the cleaned text.

    Returns:
        (cleaned text, None) when accepted, else (cleaned text, reason).
    """
    cleaned = clean_output(text)
    if not cleaned:
        return cleaned, "empty"
    if len(cleaned) < min_chars:
        return cleaned, "too short"
    if len(cleaned) > max_chars:
        return cleaned, "too long"
    source = " ".join(str(fields.get(k) or "") for k in ("name", "function", "location", "similarity"))
    go_ids = {t.get("id") for t in fields.get("go") or []} | {f"GO:{m}" for m in _GO_RE.findall(source)}
    for match in _GO_RE.findall(cleaned):
        if f"GO:{match}" not in go_ids:
            return cleaned, "invented GO id"
    ecs = set(fields.get("ec") or [])
    ecs |= set(_EC_PREFIXED_RE.findall(source)) | set(_EC_BARE_RE.findall(source))
    for mention in _EC_PREFIXED_RE.findall(cleaned) + _EC_BARE_RE.findall(cleaned):
        if not _ec_compatible(mention.rstrip("."), ecs):
            return cleaned, "invented EC number"
    return cleaned, None


def _rule_fallback(fields: dict, key: str) -> str:

    rng = np.random.default_rng(int(key[:16], 16))
    plain = {k: v for k, v in fields.items() if k != TEXT_REWRITES_FIELD}
    return augment_text(plain, rng)


# ----------------------------------------------------------------------------- cache


class RewriteCache:
    """Raw model outputs keyed by :func:`cache_key`, in one sqlite file (WAL, committed per batch).

    Args:
        path: the cache file (created with its folder when missing).

    Raises:
        RewriteError: the file exists but is not a usable cache (message names it).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS rewrites (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                "output TEXT NOT NULL, created REAL NOT NULL)"
            )
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise RewriteError(f"{self.path}: not a usable rewrite cache ({exc})") from None

    def get_many(self, keys: list[str]) -> dict[str, str]:
        """{key: output} for the keys that are cached."""
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # stay under sqlite's parameter limit
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, output FROM rewrites WHERE key IN ({marks})", chunk)
            found.update(rows.fetchall())
        return found

    def put_many(self, model_id: str, items: list[tuple[str, str]]) -> None:
        """Store (key, output) pairs and commit."""
        now = time.time()
        self._db.executemany(
            "INSERT OR REPLACE INTO rewrites (key, model, output, created) VALUES (?, ?, ?, ?)",
            [(key, model_id, output, now) for key, output in items],
        )
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM rewrites").fetchone()[0])

    def close(self) -> None:
        """Close the database."""
        self._db.close()


# ----------------------------------------------------------------------------- the run


@dataclass
class _Stats:
    records: int = 0
    records_rewritten: int = 0
    records_without_text: int = 0
    bad_samples: int = 0
    items: int = 0
    model_calls: int = 0
    cache_hits: int = 0
    accepted: int = 0
    fallback: int = 0
    dropped: int = 0
    duplicates: int = 0
    rejected: collections.Counter = field(default_factory=collections.Counter)
    bad_examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("rejected", "bad_examples")}
        out["rejected"] = dict(sorted(self.rejected.items()))
        out["bad_examples"] = list(self.bad_examples)
        return out


def _prefix_of(name: str) -> str:
    match = re.fullmatch(r"(.+)-\d{6}\.tar", name)
    return match.group(1) if match else Path(name).stem


def _read_shard(info: ShardInfo, stats: _Stats) -> list[tuple[ProteinRecord, dict | None]]:
    """(record, sample props) of one input shard; unreadable samples are counted and skipped."""
    out = []
    props = info.sample_props or {}
    try:
        reader = ShardReader(info.path)
    except BadShardError as exc:
        raise RewriteError(str(exc)) from None
    with reader:
        for i in range(len(reader)):
            try:
                record = reader.read(i)
            except BadSampleError as exc:
                stats.bad_samples += 1
                if len(stats.bad_examples) < 5:
                    stats.bad_examples.append(str(exc))
                continue
            sample_props = {name: values[i] for name, values in props.items() if values[i] is not None}
            out.append((record, sample_props or None))
    return out


def _rewrite_records(
    records: list[ProteinRecord],
    backend: LLMBackend,
    cache: RewriteCache,
    config: RewriteConfig,
    stats: _Stats,
    progress: Callable[[str], None] | None,
) -> None:
    """Fill ``text["rewrites"]`` of ``records`` in place (model calls only for uncached items)."""
    items = []  # (record index, variant, prompt, key)
    for index, record in enumerate(records):
        fields = record.text
        if not fields or not annotation_text(fields):
            stats.records_without_text += 1
            if fields and TEXT_REWRITES_FIELD in fields:  # stale rewrites are replaced, here by none
                record.text = {k: v for k, v in fields.items() if k != TEXT_REWRITES_FIELD}
            continue
        for variant in range(config.variants):
            prompt = make_prompt(fields, variant, config.params)
            items.append((index, variant, prompt, cache_key(prompt, backend.model_id, config.params, variant)))
    stats.items += len(items)
    outputs = cache.get_many([key for *_, key in items])
    stats.cache_hits += sum(1 for *_, key in items if key in outputs)
    missing = list({key: prompt for _, _, prompt, key in items if key not in outputs}.items())
    for start in range(0, len(missing), config.batch_size):
        batch = missing[start : start + config.batch_size]
        try:
            texts = backend.generate([prompt for _, prompt in batch], config.params)
        except BackendError as exc:  # keep what did arrive: a rerun then asks only for the rest
            received = [(batch[i][0], text) for i, text in sorted(exc.partial.items()) if 0 <= i < len(batch)]
            cache.put_many(backend.model_id, received)
            raise
        if len(texts) != len(batch):
            raise RewriteError(f"{backend.model_id}: returned {len(texts)} outputs for {len(batch)} prompts")
        pairs = [(key, text) for (key, _), text in zip(batch, texts)]
        cache.put_many(backend.model_id, pairs)  # committed now: a crash later loses nothing
        outputs.update(pairs)
        stats.model_calls += len(batch)
        if progress is not None:
            progress(f"{stats.model_calls} model calls")
    per_record: dict[int, list[str]] = collections.defaultdict(list)
    for index, _, _, key in items:
        fields = records[index].text
        text, reason = check_rewrite(outputs[key], fields, config.min_chars, config.max_chars)
        if reason is None:
            stats.accepted += 1
        else:
            stats.rejected[reason] += 1
            if config.fallback == "none":
                stats.dropped += 1
                continue
            text = _rule_fallback(fields, key)
            if not text:
                stats.dropped += 1
                continue
            stats.fallback += 1
        if text in per_record[index]:
            stats.duplicates += 1
            continue
        per_record[index].append(text)
    for index in sorted({index for index, *_ in items}):  # new rewrites replace any the input had
        record = records[index]
        text = {k: v for k, v in record.text.items() if k != TEXT_REWRITES_FIELD}
        if per_record.get(index):
            text[TEXT_REWRITES_FIELD] = per_record[index]
            stats.records_rewritten += 1
        record.text = text


def rewrite_shards(config: RewriteConfig, backend: LLMBackend, progress: Callable[[str], None] | None = None) -> dict:
    """Rewrite every record of ``config.shards`` into ``config.out``; returns a JSON-able summary.

    Args:
        config: what to rewrite.
        backend: the language model (:mod:`data_shards.llm_backends`).
        progress: optional callback receiving short progress lines.

    Raises:
        RewriteError: bad configuration, unreadable input shard set or cache.
        BackendError: the model or endpoint failed (the message names it).
    """
    if not 1 <= config.variants <= MAX_REWRITES:
        raise RewriteError(f"variants must be in 1..{MAX_REWRITES}, got {config.variants}")
    if config.fallback not in ("rule", "none"):
        raise RewriteError(f"fallback must be 'rule' or 'none', got {config.fallback!r}")
    if not 0 <= config.min_chars <= config.max_chars or config.batch_size < 1:
        raise RewriteError("need 0 <= min_chars <= max_chars and batch_size >= 1")
    start = time.perf_counter()
    manifest = load_manifest(config.shards)
    out = Path(config.out)
    if out.resolve() == manifest.dir.resolve():
        raise RewriteError(f"{out}: the output directory must differ from the input shard directory")
    cache = RewriteCache(config.cache if config.cache is not None else out / "rewrite-cache.sqlite")
    stats = _Stats()
    groups: dict[str, list[ShardInfo]] = collections.defaultdict(list)
    for info in manifest.shards:
        groups[_prefix_of(info.name)].append(info)
    summary_extra = {
        "backend_model": backend.model_id,
        "variants": config.variants,
        "params": config.params.to_json(),
        "instruction_sha256": hashlib.sha256((INSTRUCTION + "".join(STYLES)).encode()).hexdigest()[:16],
        "source": str(manifest.dir),
    }
    try:
        # One writer per input prefix, each closed before the next opens: a writer merges the
        # manifest it finds on opening, so the shards of every prefix end up listed.
        for prefix, infos in groups.items():
            per_shard = max(info.num_samples for info in infos) or 1
            with ShardWriter(out, prefix=prefix, samples_per_shard=per_shard, overwrite=config.overwrite) as writer:
                writer.extra.update(manifest.extra)
                for info in infos:
                    rows = _read_shard(info, stats)
                    _rewrite_records([record for record, _ in rows], backend, cache, config, stats, progress)
                    for record, props in rows:
                        writer.write(record, props)
                        stats.records += 1
                    if progress is not None:
                        progress(f"{info.name}: {len(rows)} records")
        written = load_manifest(out)
        write_manifest(out, written.shards, {**written.extra, "rewrite": {**summary_extra, "stats": stats.to_json()}})
    finally:
        cache_size = len(cache)
        cache.close()
    return {
        "ok": stats.records > 0,
        "out": str(out),
        "cache": str(cache.path),
        "cache_entries": cache_size,
        **summary_extra,
        **stats.to_json(),
        "seconds": round(time.perf_counter() - start, 2),
    }
