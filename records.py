"""Record forms: what a dataset row is, and how it becomes one normalized record with a conversation.

A source is a LLaVA .json (array) or .jsonl file, a .parquet file (images as paths or bytes, e.g. an HF Image
column), or a directory written by `Dataset.save_to_disk`. Every row, whatever its form (LLaVA `image` /
`conversations`, chat `messages` with `role` / `content`, content as parts with image parts, a video), becomes one
RECORD_FEATURES row: id, images (path or bytes), video, conversations in LLaVA form, cheap length estimates, and the
structural problem found while loading ("" if none). Rows are stored in one Arrow table in the datasets cache,
memory-mapped, so dataloader workers share its pages instead of each holding a copy of a 1.5M-entry Python list.

Loading never fails on a bad record: its problem is kept in the "problem" column and reported where the record is
used (data.SupervisedDataset) or checked (`python data.py check`). A new record form is one more branch in
_normalize_record (and a test in tests/test_records.py); data.py, which turns records into tokens and tensors, does
not change.
"""
from __future__ import annotations

import base64
import hashlib
import inspect
import json
import os

import datasets

from cli import UserError, relative
from conversation import IMAGE_TAG

RECORD_EXTENSIONS = (".json", ".jsonl", ".parquet")                # besides saved `datasets` directories

RECORD_FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "images": datasets.List({"path": datasets.Value("string"), "bytes": datasets.Value("binary")}),
    "video": datasets.List(datasets.Value("string")),   # [folder of frames] or [frame files]; [] for no video
    "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
    "n_words": datasets.Value("int32"),                  # cheap length estimate for the sampler
    "n_images": datasets.Value("int32"),                 # -1: a video (counted as num_frames images)
    "problem": datasets.Value("string"),                 # a structural problem found while loading, "" if none
})


def check_data_path(data_path: str, setting: str = "data_path") -> None:
    """Every source of data_path (several joined by ",") exists and is a form load_records reads: a UserError
    naming the setting and the source otherwise."""
    for path in (p.strip() for p in data_path.split(",")):
        if not path:
            continue
        if not os.path.exists(path):
            raise UserError(f"{setting}: {path}: no such file or directory{relative(path)}")
        if os.path.isdir(path):
            saved = [os.path.exists(os.path.join(path, n)) for n in ("state.json", "dataset_dict.json")]
            if not any(saved):
                raise UserError(f"{setting}: {path} is a directory but not a saved datasets one (no state.json / "
                                "dataset_dict.json from save_to_disk); name the record files in it")
        elif not path.endswith(RECORD_EXTENSIONS):
            raise UserError(f"{setting}: {path} is not a {' / '.join(RECORD_EXTENSIONS)} file (nor a saved datasets "
                            "directory)")


def load_records(data_path: str | list[str], *, cache_dir: str | None = None,
                 num_proc: int | None = None) -> datasets.Dataset:
    """One or more sources -> one memory-mapped datasets.Dataset with RECORD_FEATURES columns.

    A source is a LLaVA .json (array) or .jsonl file, a .parquet file (images as paths or bytes, e.g. an HF Image
    column), or a directory written by Dataset.save_to_disk. Loading never fails on a bad record: its problem is
    stored in the "problem" column and reported when the record is used or checked."""
    paths = [p.strip() for p in data_path.split(",")] if isinstance(data_path, str) else list(data_path)
    parts = [_load_source(p, cache_dir, num_proc) for p in paths if p]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# ---- Record loading: every source -> RECORD_FEATURES rows (cached; the key covers this code) ----------------

def _load_source(path: str, cache_dir: str | None, num_proc: int | None) -> datasets.Dataset:
    source = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"]
    elif path.endswith((".json", ".jsonl")):
        stat = os.stat(path)   # in the generator's arguments, so an edited file is not served from a stale cache
        try:
            ds = datasets.Dataset.from_generator(
                _json_records, features=RECORD_FEATURES, cache_dir=cache_dir,
                gen_kwargs={"path": os.path.abspath(path), "stamp": f"{stat.st_size}-{stat.st_mtime_ns}",
                            "converter": converter_fingerprint()})
        except datasets.exceptions.DatasetGenerationError as e:   # its own message names neither file nor cause
            cause = e.__cause__
            if isinstance(cause, (json.JSONDecodeError, UserError)):   # the file's fault, not ours
                raise UserError(f"{path}: not a valid JSON array of records ({cause})" if isinstance(
                    cause, json.JSONDecodeError) else f"{path}: {cause}") from e
            raise ValueError(f"{path}: {cause or e}") from e
        return ds
    elif path.endswith(".parquet"):
        ds = datasets.Dataset.from_parquet(path, cache_dir=cache_dir)
    else:
        raise ValueError(f"{path}: expected a .json/.jsonl/.parquet file or a saved datasets directory")
    for name, feature in ds.features.items():   # keep image bytes as bytes: decoding belongs to the workers
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds.map(_normalize_batch, batched=True, with_indices=True, remove_columns=ds.column_names,
                  features=RECORD_FEATURES, fn_kwargs={"source": source, "converter": converter_fingerprint()},
                  num_proc=num_proc,
                  desc=f"normalizing {source}")


def _json_records(path: str, stamp: str, converter: str):
    """Records of a JSON array or JSONL file, normalized (stamp and converter are cache keys only)."""
    source = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):   # a JSON array is parsed whole, once, in this process; then it lives in Arrow
            records = json.load(f)
            if not records:
                raise UserError("holds no records")   # load_records names the file
            for i, record in enumerate(records):
                yield _normalize_record(record, f"{source}:{i}")
            return
        found = False
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            found = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record = {"id": f"{source}:{line_no}", "_problem": f"malformed record: invalid JSON ({e})"}
            yield _normalize_record(record, f"{source}:{line_no}")
        if not found:
            raise UserError("holds no records")


def _normalize_batch(batch: dict, indices: list[int], source: str, converter: str) -> dict:
    """load_records' map function over parquet / datasets sources (converter: a cache key only)."""
    rows = [_normalize_record({k: v[j] for k, v in batch.items()}, f"{source}:{i}") for j, i in enumerate(indices)]
    return {k: [row[k] for row in rows] for k in RECORD_FEATURES}


def _normalize_record(record, fallback_id: str) -> dict:
    """Any LLaVA-like record -> a RECORD_FEATURES row. Never raises: problems go to the "problem" column."""
    row = {"id": fallback_id, "images": [], "video": [], "conversations": [], "n_words": 0, "n_images": 0,
           "problem": ""}
    if not isinstance(record, dict):
        row["problem"] = "malformed record: not a JSON object"
        return row
    if record.get("id") is not None:
        row["id"] = str(record["id"])
    problems = [record["_problem"]] if record.get("_problem") else []
    image = record.get("image", record.get("images"))
    for item in [] if image is None else image if isinstance(image, list) else [image]:
        if isinstance(item, str) and item:
            row["images"].append({"path": item, "bytes": None})
        elif isinstance(item, (bytes, bytearray)) and item:
            row["images"].append({"path": None, "bytes": bytes(item)})
        elif isinstance(item, dict) and (item.get("bytes") or item.get("path")):
            row["images"].append({"path": item.get("path"), "bytes": item.get("bytes")})
        else:
            problems.append(f"malformed record: unusable image entry {str(item)[:40]!r}")
    video = record.get("video")
    if video:
        if isinstance(video, str) or (isinstance(video, list) and all(isinstance(v, str) for v in video)):
            row["video"] = [video] if isinstance(video, str) else video
        else:
            problems.append("malformed record: video must be a folder or a list of frame files")
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list) or not turns:
        problems.append("malformed record: no conversations")
        turns = []
    for turn in turns:
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if isinstance(value, list):    # content as parts (transformers / OpenAI): text joined, an image tag per image
            value = _join_parts(value, row["images"], problems)
        if not isinstance(role, str) or not isinstance(value, str):
            problems.append("malformed record: a turn needs string from/value (or role/content)")
            continue
        row["conversations"].append({"from": role, "value": value})
    row["n_words"] = sum(len(turn["value"].split()) for turn in row["conversations"])
    row["n_images"] = -1 if row["video"] else len(row["images"])
    row["problem"] = problems[0] if problems else ""
    return row


def _join_parts(parts: list, images: list[dict], problems: list[str]) -> str | None:
    """[{"type": "text", "text": ...}, {"type": "image", ...}, ...] -> one string, parts on their own lines, each
    image part an <image> tag where it stands. An image part that names its image ("image", "path", "url", or
    OpenAI's "image_url": {"url"}; a data: URL holds the bytes) appends it to `images`; a bare {"type": "image"}
    (transformers' form) refers to the record's own "images" list, in order."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image", "image_url"):
            texts.append(IMAGE_TAG)
            source = part.get("image_url") or part.get("image") or part.get("path") or part.get("url")
            source = source.get("url") if isinstance(source, dict) else source
            if isinstance(source, str) and source.startswith("data:"):     # data:image/png;base64,....
                images.append({"path": None, "bytes": base64.b64decode(source.partition(",")[2])})
            elif isinstance(source, str) and source:
                images.append({"path": source, "bytes": None})
            elif source is not None:
                problems.append(f"malformed record: unusable image part {str(part)[:40]!r}")
        else:
            problems.append(f"malformed record: a content part needs type text or image, not {str(part)[:40]!r}")
            return None
    return "\n".join(texts)


def converter_fingerprint() -> str:
    """A hash of the code that turns source records into RECORD_FEATURES rows. It is part of the datasets cache key
    of every source (beside the file's path, size and mtime), so an edited converter, or a repo upgrade, never gets
    an unchanged file's records back in their old conversion."""
    code = [inspect.getsource(f) for f in (_json_records, _normalize_batch, _normalize_record, _join_parts)]
    return hashlib.sha256("".join(code + [repr(RECORD_FEATURES)]).encode()).hexdigest()[:16]
