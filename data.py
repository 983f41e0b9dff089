"""Data: records (LLaVA, messages with role/content, content parts, videos; JSON/JSONL, parquet, datasets
directories: README.md lists the forms) -> tokenized, label-masked samples with Mini-Gemini image tensors.

Entry points and record loading come first; images, the dataset, collator, samplers and the `check` CLI next;
tokenization and label masking last.
"""
from __future__ import annotations

import base64
import bisect
import ctypes
import hashlib
import inspect
import json
import os
import re
import sys
import weakref
from collections import Counter
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cli import ArgumentParser, UserError, check_path, field_comments, int_at_least, relative, run
from conversation import TEMPLATES, ConversationError, Segment, Template, get_template, normalize_messages
from images import (ASPECT_RATIOS, CLIP_MEAN, CLIP_STD, BadSample, ImageProcessor, _bilinear,  # noqa: F401
                    image_size, load_image, parse_pinpoints, to_rgb)

IGNORE_INDEX = -100        # label value the loss ignores
IMAGE_TOKEN_INDEX = -200   # one placeholder id per image; the model splices the image features there
IMAGE_TAG = "<image>"


# ---- Entry points: records, images, datasets, collator, sampler ----
# Records from every source (LLaVA JSON/JSONL, parquet, a saved `datasets` directory) are normalized into one Arrow
# table (RECORD_FEATURES) in the datasets cache. Arrow is memory-mapped, so dataloader workers share its pages instead
# of each holding a copy of a 1.5M-entry Python list.
#
# Bad records are never swapped for another sample. SupervisedDataset.__getitem__ either raises BadSample naming the
# record (bad_sample="error") or returns a marker {"id", "skipped": reason} (bad_sample="skip"); collate() drops the
# markers and lists them in batch["skipped"] = [(id, reason), ...], so the main process can count them (workers are
# other processes; train.py counts them by reason_kind). A batch whose samples were all skipped becomes one padding
# row with nothing to learn, so every rank still runs the same forward and backward.
# Reasons are str(BadSample): "<kind>: <detail>", the kind named where the problem is found; reason_kind reads it back.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
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


@dataclass
class DataArguments:
    data_path: str                      # LLaVA JSON/JSONL, parquet, or a datasets directory; several joined by ","
    image_folder: str = "."             # image, frame and video-folder paths are relative to this
    template: str = "vicuna_v1"         # a name from conversation.py, or "auto" for the tokenizer's chat template
    image_aspect_ratio: str = "pad"     # pad: to square with the mean colour; resize: stretch to square;
    #                                     crop: short side resized, center crop (MGM's stage-1 default, 'square');
    #                                     anyres: LLaVA-NeXT's tiles on the best grid of image_grid_pinpoints (model)
    max_length: int = 2048              # LLM positions per sample, each image counted as its tokens (AnyRes: by size)
    num_frames: int = 8                 # frames sampled uniformly from each video
    bad_sample: str = "skip"            # skip: drop, count and log an unusable record; error: stop naming it
    group_by_modality_length: bool = True  # batches of one modality (image or text-only) and similar lengths
    max_image_pixels: int = 89_478_485  # bigger images are rejected as decompression bombs (Pillow's own limit)
    cache_dir: str | None = None        # datasets cache for the normalized records (none: HF_DATASETS_CACHE)
    num_proc: int | None = None         # processes normalizing sources and measuring lengths (packing); none: one
    packing: bool = False               # whole samples packed into rows of max_length; a batch is then B rows
    # Image sizes, grid and mean/std are not here: they come from the model (model.image_settings()).


def build_dataset(data_args: DataArguments, tokenizer, image_settings: dict | None,
                  tokens_per_image: int = 1) -> SupervisedDataset:
    """Records of data_args.data_path -> a map-style dataset of tokenized samples with image tensors.

    image_settings: model.image_settings() (image_size, image_size_aux, image_mean, image_std, image_grid,
    image_global; an AnyRes model's also image_grid_pinpoints, anyres_max_tiles, patch_size); None for a text-only
    model. tokens_per_image: LLM positions one image takes (AnyRes: the most any image takes; each image is counted
    by its own size). With data_args.packing or AnyRes the exact length of every record is measured here (once;
    cached), so that under accelerator.main_process_first() one process does the work and the others read the
    cache: packs and length groups then use the true count of every image."""
    if data_args.bad_sample not in ("skip", "error"):
        raise UserError(f"bad_sample must be 'skip' or 'error', not {data_args.bad_sample!r}")
    if image_settings is not None and data_args.max_length <= tokens_per_image:
        raise UserError(f"max_length {data_args.max_length} cannot hold one image ({tokens_per_image} positions): "
                        "every image record would be skipped as too long")
    check_template(data_args.template, tokenizer)
    records = load_records(data_args.data_path, cache_dir=data_args.cache_dir, num_proc=data_args.num_proc)
    processor = None
    if image_settings is not None:
        processor = image_processor(image_settings, data_args.image_aspect_ratio)
    dataset = SupervisedDataset(records, tokenizer, data_args, processor, tokens_per_image)
    if data_args.packing or dataset.anyres:
        dataset.measure_lengths()
    return dataset


def image_processor(image_settings: dict, aspect_ratio: str) -> ImageProcessor:
    """The ImageProcessor of a model's image_settings; AnyRes goes with an AnyRes model only (UserError)."""
    if (aspect_ratio == "anyres") != bool(image_settings.get("image_grid_pinpoints")):
        raise UserError("image_aspect_ratio anyres needs an AnyRes model (image_grid_pinpoints set, e.g. 'default'), "
                        "and an AnyRes model needs image_aspect_ratio anyres" if aspect_ratio == "anyres" else
                        f"image_aspect_ratio {aspect_ratio}: this model is an AnyRes one (image_grid_pinpoints): "
                        "use image_aspect_ratio anyres")
    return ImageProcessor(**image_settings, aspect_ratio=aspect_ratio)


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


def check_template(template: str, tokenizer) -> None:
    """Fail at start, not as a skip of every record, when the template cannot render with this tokenizer."""
    probe = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A test."}]
    try:
        tokenize_conversation(probe, tokenizer, template)
    except (BadSample, KeyError) as e:
        raise UserError(f"template {template!r} does not work with this tokenizer: {e}") from None


def build_sampler(dataset: SupervisedDataset, data_args: DataArguments, batch_size: int, *, num_replicas: int = 1,
                  rank: int = 0, seed: int = 0) -> GroupedBatchSampler | PackedBatchSampler:
    """This rank's batch sampler: packed rows (data_args.packing; batch_size rows of up to max_length positions)
    or modality/length-grouped padded batches (batch_size samples). Both resume with set_epoch(epoch, start_batch)."""
    if data_args.packing:
        return PackedBatchSampler(dataset.lengths(), data_args.max_length, batch_size, num_replicas=num_replicas,
                                  rank=rank, seed=seed)
    return GroupedBatchSampler(dataset.lengths(), dataset.is_multimodal(), batch_size, num_replicas=num_replicas,
                               rank=rank, seed=seed, group_by_modality_length=data_args.group_by_modality_length)


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


# ---- Images, the dataset, collator, samplers, the check CLI ----------------------------------------------------

def reuse_freed_memory(worker_id: int | None = None) -> bool:
    """Make glibc keep freed large blocks for reuse (the DataLoader's worker_init_fn; train.py also calls it in the
    main process when it loads data itself). Every sample allocates fresh image tensors of many MB (28 MB for one HD
    HR tensor); by default glibc maps each one anew and returns it to the OS when freed, so every sample pays its
    page faults again: a third of the preprocessing time at 768 px and 45% at HD (bench.py data). Fixed thresholds
    (the largest mmap threshold glibc accepts, 32 MB, and 128 MB of free heap kept before trimming) bound what a
    worker holds. Returns False where there is no glibc (macOS, musl): nothing changes there."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3                          # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 128 << 20))


class SupervisedDataset(torch.utils.data.Dataset):
    """Map-style dataset: index -> {"id", "input_ids", "labels", "images" [n, V, 3, S, S] | None,
    "images_aux" [n, 3, A, A] | None}, or, for a bad record under bad_sample="skip", {"id", "skipped": reason}.
    AnyRes: "images" is every image's views back to back [sum of 1 + tiles, 3, S, S], "images_aux" the HR canvases
    cut in A x A tiles [sum of tiles, 3, A, A] | None, and "image_sizes" [n, 2] the images' (height, width).

    A pack (list of indices, as PackedBatchSampler yields them) -> the list of its samples.
    Text-only records carry no image tensors at all. Records live in Arrow (self.records), never in a Python list."""

    def __init__(self, records: datasets.Dataset, tokenizer, args: DataArguments,
                 processor: ImageProcessor | None, tokens_per_image: int = 1):
        self.records, self.tokenizer, self.args = records, tokenizer, args
        self.processor, self.tokens_per_image = processor, tokens_per_image
        self.anyres = processor is not None and processor.aspect_ratio == "anyres"
        self.measured_lengths: np.ndarray | None = None   # set by measure_lengths()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int | list[int]) -> dict | list[dict]:
        if isinstance(i, list):
            return [self[j] for j in i]
        record = self.records[int(i)]
        try:
            return self.sample(record)
        except BadSample as e:
            if self.args.bad_sample == "error":
                raise BadSample(e.kind, e.detail, record=record["id"]) from None
            return {"id": record["id"], "skipped": str(e)}

    def sample(self, record: dict) -> dict:
        """One record -> tensors; raises BadSample."""
        conversations, sources = self.parse(record)
        if sources and self.processor is None:
            raise BadSample("unsupported", "record has images but the model has no vision tower")
        tokens = self.tokenize(conversations, len(sources), self.image_tokens(sources))
        sample = {"id": record["id"], **tokens, "images": None, "images_aux": None}
        if sources:
            views, aux, sizes = zip(*(self.processor.process(self.load(s)) for s in sources))
            if self.anyres:     # views differ in number per image: back to back, the sizes say how many
                sample["images"] = torch.cat(views)
                sample["images_aux"] = None if aux[0] is None else torch.cat(aux)
                sample["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
            else:
                sample["images"] = torch.stack(views)
                sample["images_aux"] = None if aux[0] is None else torch.stack(aux)
        return sample

    def image_tokens(self, sources: list[dict]) -> int | list[int]:
        """LLM positions of each image: tokens_per_image, or for AnyRes each image's own count, from its size
        (read from the file's header; the same size process() finds once the image is decoded)."""
        if not self.anyres:
            return self.tokens_per_image
        return [self.processor.tokens(image_size(s, self.args.image_folder, self.args.max_image_pixels))
                for s in sources]


    def inspect(self, i: int) -> tuple[str, int, int, str | None]:
        """What `data.py check` needs: (id, images, LLM length with images expanded, bad reason or None).
        Decodes every image but builds no tensors."""
        record = self.records[int(i)]
        try:
            conversations, sources = self.parse(record)
            per_image = self.image_tokens(sources)
            tokens = self.tokenize(conversations, len(sources), per_image)
            for source in sources:
                self.load(source)
        except BadSample as e:
            return record["id"], 0, 0, str(e)
        return record["id"], len(sources), expanded_length(tokens["input_ids"], per_image), None

    def parse(self, record: dict) -> tuple[list[dict], list[dict]]:
        """Record -> (conversations, image sources); a video becomes its sampled frames, its tag one tag each."""
        if record["problem"]:
            kind, _, detail = record["problem"].partition(": ")   # "<kind>: <detail>", set by _normalize_record
            raise BadSample(kind, detail)
        conversations, sources = record["conversations"], record["images"]
        if record["video"]:
            if sources:
                raise BadSample("image/tag mismatch", "a record has either images or a video, not both")
            frames = self.video_frames(record["video"])
            n_tags = sum(turn["value"].count("<video>") for turn in conversations)
            if n_tags != 1:
                raise BadSample("image/tag mismatch", f"a video record needs one <video> tag, found {n_tags}")
            conversations = [{"from": turn["from"], "value": turn["value"].replace("<video>", IMAGE_TAG * len(frames))}
                             for turn in conversations]
            sources = [{"path": frame, "bytes": None} for frame in frames]
        return conversations, sources   # tokenize() checks the <image> tags against len(sources)

    def video_frames(self, video: list[str]) -> list[str]:
        """[folder] or [frame files] -> num_frames frame paths sampled uniformly (first and last included)."""
        frames = video
        if len(video) == 1 and not video[0].lower().endswith(IMAGE_EXTENSIONS):
            folder = os.path.join(self.args.image_folder, video[0])
            if not os.path.isdir(folder):
                raise BadSample("video not found", video[0])
            names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)
            frames = [os.path.join(video[0], n) for n in names]
        if not frames:
            raise BadSample("video has no frames", video[0])
        picks = np.linspace(0, len(frames) - 1, min(self.args.num_frames, len(frames))).round().astype(int)
        return [frames[j] for j in picks]

    def tokenize(self, conversations: list[dict], num_images: int, image_tokens: int | list[int]) -> dict:
        return tokenize_conversation(conversations, self.tokenizer, self.args.template, self.args.max_length,
                                     image_token_len=image_tokens, num_images=num_images)

    def load(self, source: dict) -> Image.Image:
        return load_image(source, self.args.image_folder, self.args.max_image_pixels)

    def lengths(self) -> np.ndarray:
        """LLM length of every record, images expanded: exact once measure_lengths() ran (build_dataset runs it when
        packing and for AnyRes), else an estimate from the Arrow columns (words + images * tokens_per_image)."""
        if self.measured_lengths is not None:
            return self.measured_lengths
        columns = self.records.select_columns(["n_words", "n_images"]).with_format("numpy")
        n_images = np.asarray(columns["n_images"])
        n_images = np.where(n_images < 0, self.args.num_frames, n_images)
        return np.asarray(columns["n_words"]).astype(np.int64) + n_images * self.tokens_per_image

    def measure_lengths(self) -> np.ndarray:
        """Exact LLM length of every record as __getitem__ will build it (tokenized and truncated like training, each
        image counted as its tokens); 0 for a record that tokenization rejects. No image is decoded: AnyRes reads
        each image's size from its header, the other layouts open no image at all. Runs as a datasets.map (data_args.num_proc processes) whose result is cached in Arrow next to the records,
        keyed by the tokenizer and the settings that change a length; packs are built from these."""
        a = self.args
        settings = DataArguments("", image_folder=a.image_folder, template=a.template, max_length=a.max_length,
                                 num_frames=a.num_frames)
        settings.max_image_pixels, anyres = a.max_image_pixels, None
        names = ["id", "conversations", "video", "n_images", "problem"]    # no bytes, unless AnyRes needs sizes
        if self.anyres:
            p = self.processor
            anyres = dict(image_size=p.image_size, image_grid_pinpoints=p.pinpoints, anyres_max_tiles=p.max_tiles,
                          patch_size=p.patch_size)
            names.append("images")
        columns = self.records.select_columns(names)
        measured = columns.map(
            _measure_batch, batched=True, remove_columns=columns.column_names, num_proc=a.num_proc,
            features=datasets.Features({"length": datasets.Value("int32")}), desc="measuring token lengths",
            fn_kwargs={"tokenizer": self.tokenizer, "args": settings, "tokens_per_image": self.tokens_per_image,
                       "anyres": anyres})
        self.measured_lengths = np.asarray(measured.with_format("numpy")["length"], dtype=np.int64)
        return self.measured_lengths

    def is_multimodal(self) -> np.ndarray:
        return np.asarray(self.records.select_columns(["n_images"]).with_format("numpy")["n_images"]) != 0


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """Samples -> the batch the model takes: right-padded input_ids/labels, attention_mask, images as one flat
    [N, V, 3, S, S] tensor with per-sample image_counts, ids, and skipped = [(id, reason)] for dropped samples.
    Use functools.partial(collate, pad_token_id=...) as the DataLoader's collate_fn. With a PackedBatchSampler the
    DataLoader hands over packs (lists of samples) instead, and they become packed rows (collate_rows)."""
    if pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to unk or eos) first")
    if samples and isinstance(samples[0], list):
        return collate_rows(samples, pad_token_id, packed=True)
    return collate_rows([[s] for s in samples], pad_token_id, packed=False)


def _padding_sample(pad_token_id: int) -> dict:
    """Stands in for a micro-batch whose samples were all skipped: one padding token, nothing supervised."""
    return {"id": None, "input_ids": torch.tensor([pad_token_id]), "labels": torch.tensor([IGNORE_INDEX]),
            "images": None, "images_aux": None}


def collate_rows(packs: list[list[dict]], pad_token_id: int, packed: bool) -> dict:
    """Packs of samples -> one row each: the samples' tokens back to back, rows right-padded to the longest.
    A padded batch is packs of one sample (packed=False: no position_ids, labels untouched).

    Packed, the batch is collate()'s plus position_ids [B, T] that restart at 0 at every sample. They count input_ids (an
    image placeholder is one position here; the model's splice widens it to tokens_per_image and keeps the
    restarts), and they are how the model and transformers tell packed samples apart: no attention across them.
    A row's padding tail is a sequence of its own (positions from 0 again). Each sample's first label is
    IGNORE_INDEX, so the previous sample's last token predicts nothing, as at the end of a padded row; the loss and
    the supervised-token count are then those of the same samples padded. image_counts are per row, images in
    sample order, and ids name every packed sample (len(ids) = samples in the batch). AnyRes batches also carry
    image_sizes [N, 2] (images and images_aux then hold every image's views / HR tiles back to back)."""
    skipped = [(s["id"], s["skipped"]) for pack in packs for s in pack if "skipped" in s]
    packs = [kept for pack in packs if (kept := [s for s in pack if "skipped" not in s])] or \
        [[_padding_sample(pad_token_id)]]
    sizes = [[len(s["input_ids"]) for s in pack] for pack in packs]
    used = torch.tensor([sum(n) for n in sizes], dtype=torch.long)
    width = int(used.max())
    input_ids = torch.full((len(packs), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(packs), width), dtype=torch.long)
    for row, (pack, n) in enumerate(zip(packs, sizes)):
        input_ids[row, :used[row]] = torch.cat([s["input_ids"] for s in pack])
        labels[row, :used[row]] = torch.cat([s["labels"].index_fill(0, torch.tensor([0]), IGNORE_INDEX)
                                             if packed else s["labels"] for s in pack])
        position_ids[row] = torch.cat([torch.arange(k) for k in (*n, width - int(used[row]))])
    samples = [s for pack in packs for s in pack]
    images = [s["images"] for s in samples if s["images"] is not None]
    images_aux = [s["images_aux"] for s in samples if s["images_aux"] is not None]
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": (torch.arange(width)[None] < used[:, None]).long(),
        "images": torch.cat(images) if images else None,
        "images_aux": torch.cat(images_aux) if images_aux else None,
        "image_counts": torch.tensor([sum(_image_count(s) for s in pack) for pack in packs], dtype=torch.long),
        "ids": [s["id"] for s in samples if s["id"] is not None],
        "skipped": skipped,
    }
    image_sizes = [s["image_sizes"] for s in samples if s.get("image_sizes") is not None]
    if image_sizes:     # AnyRes: images / images_aux hold views / HR tiles back to back; the sizes say how many
        batch["image_sizes"] = torch.cat(image_sizes)
    if packed:
        batch["position_ids"] = position_ids
    return batch


def _image_count(sample: dict) -> int:
    if sample.get("image_sizes") is not None:
        return len(sample["image_sizes"])
    return 0 if sample["images"] is None else len(sample["images"])


def reason_kind(reason: str) -> str:
    """"image not found: a.jpg" -> "image not found": the part a summary counts."""
    return reason.split(":", 1)[0].strip()


class GroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices for one rank: DataLoader(dataset, batch_sampler=this, collate_fn=...).

    Each epoch is a pure function of (seed, epoch): the indices of each modality (image vs text-only) are shuffled
    separately, cut into mega-batches of megabatch_mult global steps, sorted by length inside a mega-batch and cut into
    global steps of batch_size * num_replicas, so similar lengths share a step and no step mixes modalities. The step
    order is then shuffled. Rank r takes the r-th slice of every step: ranks never share a sample, except that a
    modality's last step is topped up by wrapping around so every rank has the same number of batches.
    Resume mid-epoch with set_epoch(epoch, start_batch=batches already consumed). The sampler is already rank-aware:
    do not let accelerate shard its DataLoader again."""

    def __init__(self, lengths, is_multimodal, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, group_by_modality_length: bool = True, megabatch_mult: int = 50):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.num_replicas, self.rank, self.seed = batch_size, num_replicas, rank, seed
        self.grouped, self.megabatch_mult = group_by_modality_length, megabatch_mult
        is_multimodal = np.asarray(is_multimodal, dtype=bool)
        groups = [np.flatnonzero(is_multimodal), np.flatnonzero(~is_multimodal)] if self.grouped \
            else [np.arange(len(self.lengths))]
        self.groups = [g for g in groups if len(g)]
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        step = self.batch_size * self.num_replicas
        return sum(-(-len(g) // step) for g in self.groups)

    def __len__(self) -> int:
        """Batches left in this epoch from start_batch (batches_per_epoch for a whole epoch)."""
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self):
        for batch in self.epoch_batches(self.epoch)[self.start_batch:]:
            yield batch.tolist()

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        step, steps = self.batch_size * self.num_replicas, []
        for group in self.groups:
            order = group[rng.permutation(len(group))]
            mega = step * self.megabatch_mult if self.grouped else step
            for start in range(0, len(order), mega):
                chunk = order[start:start + mega]
                if self.grouped:
                    chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                steps += [chunk[i:i + step] for i in range(0, len(chunk), step)]
            short = -len(steps[-1]) % self.num_replicas   # top up the last step so every rank gets a batch
            steps[-1] = np.concatenate([steps[-1], order[np.arange(short) % len(order)]])
        return [np.array_split(steps[j], self.num_replicas)[self.rank] for j in rng.permutation(len(steps))]


class PackedBatchSampler(torch.utils.data.Sampler):
    """Batches of packs for one rank: DataLoader(dataset, batch_sampler=this, collate_fn=collate). A pack is a list
    of dataset indices whose lengths sum to at most max_length; collate turns each pack into one row.

    Each epoch is a pure function of (seed, epoch): the indices are shuffled and every `buffer` of them is packed
    best-fit decreasing (pack_lengths); a buffer's packs are sorted by length, so a batch holds rows of similar
    length (little padding), then cut into global steps of batch_size * num_replicas packs, and the step order is
    shuffled. Rank r takes the r-th slice of every step; the last step is topped up by wrapping around so every rank
    has the same number of batches (the only samples seen twice in an epoch). Modalities mix freely in a row.
    Lengths must be exact (SupervisedDataset.measure_lengths) or rows may overflow; a longer sample gets a row alone.
    Resume mid-epoch with set_epoch(epoch, start_batch=batches already consumed). The number of packs may differ by
    a few between epochs: batches_per_epoch is that of the epoch set last. Do not let accelerate shard its
    DataLoader again."""

    def __init__(self, lengths, max_length: int, batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, buffer: int = 16384):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.max_length, self.batch_size, self.buffer = max_length, batch_size, buffer
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch = 0, 0
        self._cached: tuple[int, list[list[np.ndarray]]] | None = None   # (epoch, its batches): packing takes seconds

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __len__(self) -> int:
        """Batches left in this epoch from start_batch (batches_per_epoch for a whole epoch)."""
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self):
        for batch in self.epoch_batches(self.epoch)[self.start_batch:]:
            yield [pack.tolist() for pack in batch]

    def epoch_batches(self, epoch: int) -> list[list[np.ndarray]]:
        """This rank's batches of the epoch, each a list of packs (arrays of dataset indices)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        packs = []
        for start in range(0, len(order), self.buffer):
            chunk = order[start:start + self.buffer]
            chunk_packs = [chunk[p] for p in pack_lengths(self.lengths[chunk], self.max_length)]
            packs += sorted(chunk_packs, key=lambda p: -int(self.lengths[p].sum()))
        step = self.batch_size * self.num_replicas
        steps = [packs[i:i + step] for i in range(0, len(packs), step)]
        if steps:   # top up the last step so every rank gets a batch of packs
            steps[-1] = steps[-1] + [packs[i % len(packs)] for i in range(-len(steps[-1]) % self.num_replicas)]
        batches = []
        for j in rng.permutation(len(steps)):
            share = len(steps[j]) // self.num_replicas   # exact: every step holds a multiple of num_replicas
            batches.append(steps[j][self.rank * share:(self.rank + 1) * share])
        self._cached = (epoch, batches)
        return batches


def pack_lengths(lengths, capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: longest first, each item into the fullest pack it still fits (a new pack
    when none has room). Returns packs as lists of positions into `lengths`, each summing to <= capacity unless
    an item alone is longer. Ties go to the older pack, so the result is deterministic."""
    rooms: list[tuple[int, int]] = []   # (room left, pack number), sorted: bisect finds the tightest fit
    packs: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, p = rooms.pop(k)
        else:
            room, p = capacity, len(packs)
            packs.append([])
        packs[p].append(int(i))
        bisect.insort(rooms, (room - n, p))
    return packs


def check(data_path: str, tokenizer, template: str, *, image_folder: str = ".", max_length: int = 2048,
          tokens_per_image: int = 576, num_frames: int = 8, max_image_pixels: int = 89_478_485,
          num_workers: int = 2, cache_dir: str | None = None, out=None) -> int:
    """Validate every record (structure, roles, tags, images decoded, tokenization, length); print one line per bad
    record and a summary to `out` (stdout), with a progress bar on stderr. Returns the exit code: 1 if any record is
    unusable, else 0."""
    out = out or sys.stdout
    args = DataArguments(data_path, image_folder=image_folder, template=template, max_length=max_length,
                         num_frames=num_frames, max_image_pixels=max_image_pixels, cache_dir=cache_dir)
    dataset = SupervisedDataset(load_records(data_path, cache_dir=cache_dir), tokenizer, args, None, tokens_per_image)
    loader = torch.utils.data.DataLoader(_Inspection(dataset), batch_size=64, num_workers=num_workers,
                                         collate_fn=list)
    lengths, bad, n_images = [], Counter(), 0
    with tqdm(total=len(dataset), unit="rec", desc="check", file=sys.stderr) as bar:
        for results in loader:
            for record_id, n, length, reason in results:
                if reason is None:
                    lengths.append(length)
                    n_images += n
                else:
                    bad[reason_kind(reason)] += 1
                    bar.write(f"{record_id}: {reason}", file=out)
            bar.update(len(results))
    print(f"records: {len(dataset)}  usable: {len(lengths)}  bad: {sum(bad.values())}", file=out)
    print(f"images: {n_images}", file=out)
    if lengths:
        p = np.percentile(lengths, [50, 90, 99, 100]).astype(int)
        print(f"tokens (images expanded): p50 {p[0]}  p90 {p[1]}  p99 {p[2]}  max {p[3]}", file=out)
    for kind, n in bad.most_common():
        print(f"bad: {kind}: {n}", file=out)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    notes = field_comments(DataArguments)   # the options that are DataArguments fields are explained as there
    parser = ArgumentParser(prog="data.py", description="Mini-Gemini data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("check", help="validate every record and summarise (exit status 1 if any is unusable)")
    c.add_argument("data", help=notes["data_path"])
    c.add_argument("--image_folder", default=".", help=notes["image_folder"] + " (default: %(default)s)")
    c.add_argument("--tokenizer", required=True, help="the LLM's tokenizer: a directory or a hub name")
    c.add_argument("--template", required=True, choices=sorted(TEMPLATES), help=notes["template"])
    c.add_argument("--max_length", type=int_at_least(1), default=2048,
                   help=notes["max_length"] + " (default: %(default)s)")
    c.add_argument("--tokens_per_image", type=int_at_least(1), default=576,
                   help="LLM positions per image (default: %(default)s, CLIP-L/336; HD: 5 * 576)")
    c.add_argument("--num_frames", type=int_at_least(1), default=8,
                   help=notes["num_frames"] + " (default: %(default)s)")
    c.add_argument("--max_image_pixels", type=int_at_least(1), default=89_478_485, help=notes["max_image_pixels"])
    c.add_argument("--num_workers", type=int_at_least(0), default=2,
                   help="processes decoding the images (default: %(default)s; 0: this one)")
    c.add_argument("--cache_dir", default=None, help=notes["cache_dir"])
    a = parser.parse_args(argv)
    check_data_path(a.data, "data")
    check_path(a.image_folder, "--image_folder", "dir")
    from model import check_model_ref
    check_model_ref(a.tokenizer, "--tokenizer", kind="tokenizer")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    return check(a.data, tokenizer, a.template, image_folder=a.image_folder, max_length=a.max_length,
                 tokens_per_image=a.tokens_per_image, num_frames=a.num_frames, max_image_pixels=a.max_image_pixels,
                 num_workers=a.num_workers, cache_dir=a.cache_dir)


class _Inspection(torch.utils.data.Dataset):
    def __init__(self, dataset: SupervisedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset.inspect(i)


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _measure_batch(batch: dict, tokenizer, args: DataArguments, tokens_per_image: int,
                   anyres: dict | None = None) -> dict:
    """SupervisedDataset.measure_lengths' map function: a batch of records (the image column only for AnyRes,
    whose settings `anyres` holds) -> {"length"}."""
    processor = ImageProcessor(**anyres, aspect_ratio="anyres") if anyres else None
    measurer = SupervisedDataset(None, tokenizer, args, processor, tokens_per_image)
    lengths = []
    for j in range(len(batch["id"])):
        record = {k: v[j] for k, v in batch.items()}
        if not anyres:
            record["images"] = [{}] * max(record["n_images"], 0)   # parse() only counts them
        try:
            conversations, sources = measurer.parse(record)
            per_image = measurer.image_tokens(sources)
            tokens = measurer.tokenize(conversations, len(sources), per_image)
            lengths.append(expanded_length(tokens["input_ids"], per_image))
        except BadSample:
            lengths.append(0)
    return {"length": lengths}


def expanded_length(input_ids: torch.Tensor, image_tokens: int | list[int]) -> int:
    """LLM positions of a tokenized sample once each image placeholder becomes its image's tokens."""
    n = int((input_ids == IMAGE_TOKEN_INDEX).sum())
    extra = sum(image_tokens[:n]) - n if isinstance(image_tokens, list) else n * (image_tokens - 1)
    return len(input_ids) + extra


# ---- Tokenization and label masking --------------------------------------------------------------------------------

def tokenize_conversation(conversations: list[dict], tokenizer, template: str | Template, max_length: int | None = None,
                          *, image_token_len: int | list[int] = 1,
                          num_images: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize one conversation; labels are exact by construction.

    The template renders segments (text, trainable); each segment is tokenized on its own and the ids concatenated,
    so a token is supervised exactly when its segment is. Each `<image>` tag becomes one IMAGE_TOKEN_INDEX id.
    `num_images` (when known) is checked against the tags; a single image without a tag gets one in front of the first
    user turn. `max_length` counts each image as `image_token_len` positions (or, a list, each image in order as
    its own count: AnyRes); a sample is cut at the end, never
    inside or before an image, and a sample left with nothing to learn raises BadSample with the reason.
    """
    template = get_template(template) if isinstance(template, str) else template
    try:
        messages = _place_image_tags(normalize_messages(conversations), num_images)
        segments = template.segments(messages, tokenizer)
    except ConversationError as e:
        raise BadSample(e.kind, str(e)) from None
    input_ids, labels = encode_segments(segments, tokenizer)
    if not any(label != IGNORE_INDEX for label in labels):
        raise BadSample("empty reply", "no supervised tokens (no assistant reply)")
    if max_length is not None:
        input_ids, labels = _truncate(input_ids, labels, max_length, image_token_len)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def tokenize_prompt(messages: list[dict], tokenizer, template: str | Template, *, num_images: int | None = None) -> torch.Tensor:
    """Inference prompt ids (1-D), ending where the assistant's answer starts; the same ids training saw there."""
    template = get_template(template) if isinstance(template, str) else template
    messages = _place_image_tags(normalize_messages(messages, for_prompt=True), num_images)
    input_ids, _ = encode_segments(template.prompt_segments(messages, tokenizer), tokenizer)
    return torch.tensor(input_ids, dtype=torch.long)


def encode_segments(segments: list[Segment], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids and labels of rendered segments.

    The first piece of text is tokenized as the tokenizer tokenizes the start of a text (with its BOS, unless the
    template wrote the BOS itself). Every later piece is tokenized as a continuation: for tokenizers that put a
    SentencePiece "▁" in front of every text they encode, behind an anchor "\\n" whose ids are then dropped (and
    checked). Literal segments (message content) keep special-token strings as plain text.
    """
    ids: list[int] = []
    labels: list[int] = []
    text = "".join(s.text for s in segments)
    bos = tokenizer.bos_token
    if not (bos and text.startswith(bos)):
        ids += _bos_ids(tokenizer)
        labels += [IGNORE_INDEX] * len(ids)
    anchored = _adds_prefix_space(tokenizer)
    first = True
    for seg in segments:
        pieces = seg.text.split(IMAGE_TAG) if seg.literal else [seg.text]
        for j, piece in enumerate(pieces):
            if j > 0:
                ids.append(IMAGE_TOKEN_INDEX)
                labels.append(IGNORE_INDEX)
                first = False
            if not piece:
                continue
            piece_ids = _encode_piece(tokenizer, piece, literal=seg.literal, anchored=anchored and not first)
            ids += piece_ids
            labels += piece_ids if seg.trainable else [IGNORE_INDEX] * len(piece_ids)
            first = False
    return ids, labels


def _encode_piece(tokenizer, text: str, *, literal: bool, anchored: bool) -> list[int]:
    kwargs = dict(add_special_tokens=False, split_special_tokens=literal)
    if not anchored:
        return tokenizer(text, **kwargs)["input_ids"]
    anchor = tokenizer("\n", **kwargs)["input_ids"]
    both = tokenizer("\n" + text, **kwargs)["input_ids"]
    if both[: len(anchor)] != anchor:
        raise ValueError(f"{type(tokenizer).__name__} merges the anchor '\\n' into {text[:20]!r}: "
                         "cannot tokenize this segment as a continuation")
    return both[len(anchor):]


def _adds_prefix_space(tokenizer) -> bool:
    """True for SentencePiece-style tokenizers that put "▁" in front of every text they encode."""
    return _tokenizer_facts(tokenizer)[0]


def _bos_ids(tokenizer) -> list[int]:
    """What the tokenizer itself puts in front of a text (BOS or nothing); never an EOS it would append."""
    return list(_tokenizer_facts(tokenizer)[1])


_TOKENIZER_FACTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a cache: same answer per tokenizer


def _tokenizer_facts(tokenizer) -> tuple[bool, tuple[int, ...]]:
    if tokenizer not in _TOKENIZER_FACTS:
        def enc(t):
            return tokenizer(t, add_special_tokens=False)["input_ids"]
        ids = tokenizer("", add_special_tokens=True)["input_ids"]
        bos = tuple(i for i in ids if i != tokenizer.eos_token_id or i == tokenizer.bos_token_id)
        _TOKENIZER_FACTS[tokenizer] = (enc("\n") + enc("a") != enc("\na"), bos)
    return _TOKENIZER_FACTS[tokenizer]


def _place_image_tags(messages: list[dict], num_images: int | None) -> list[dict]:
    n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if num_images == 1 and n_tags == 0:
        first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [dict(m) for m in messages]
        messages[first_user]["content"] = IMAGE_TAG + "\n" + messages[first_user]["content"]
    elif num_images is not None and n_tags != num_images:
        raise BadSample("image/tag mismatch", f"{n_tags} <image> tags but {num_images} images")
    if any(IMAGE_TAG in m["content"] for m in messages if m["role"] != "user"):
        raise BadSample("image/tag mismatch", "<image> tag outside a user turn")
    return messages


def _truncate(ids: list[int], labels: list[int], max_length: int, image_token_len: int | list[int]):
    counts = iter(image_token_len) if isinstance(image_token_len, list) else None
    lengths = [(next(counts) if counts else image_token_len) if i == IMAGE_TOKEN_INDEX else 1 for i in ids]
    each = (f"{image_token_len} each" if counts is None else
            "their own counts, " + ", ".join(map(str, image_token_len)))
    total = sum(lengths)
    if total <= max_length:
        return ids, labels
    keep, used = 0, 0
    while keep < len(ids) and used + lengths[keep] <= max_length:
        used += lengths[keep]
        keep += 1
    if IMAGE_TOKEN_INDEX in ids[keep:]:
        raise BadSample("too long", f"needs {total} positions (images count {each}) but max_length is "
                        f"{max_length}: an image would be cut")
    if all(label == IGNORE_INDEX for label in labels[:keep]):
        raise BadSample("too long", f"the prompt alone needs more than max_length={max_length} positions "
                        f"(images count {each}); nothing left to learn")
    return ids[:keep], labels[:keep]


if __name__ == "__main__":
    import data   # run as the module `data`: its functions then hash alike, so `check` and training share the cache
    sys.exit(run(data.main, "data.py"))
