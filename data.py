"""Data: normalized records (records.py reads every form) -> tokenized, label-masked samples with Mini-Gemini
image tensors, batches and samplers.

Entry points come first; images, the dataset, collator, samplers and the `check` CLI next; tokenization and label
masking last.
"""
from __future__ import annotations

import ctypes
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

from cli import ArgumentParser, UserError, check_path, field_comments, int_at_least, run
from records import (RECORD_EXTENSIONS, RECORD_FEATURES, check_data_path, converter_fingerprint,  # noqa: F401
                     load_records)
from conversation import (IGNORE_INDEX, IMAGE_TAG, IMAGE_TOKEN_INDEX,  # noqa: F401 - re-exported
                          TEMPLATES, ConversationError, Segment, Template, get_template, normalize_messages)
from images import (ASPECT_RATIOS, CLIP_MEAN, CLIP_STD, BadSample, ImageProcessor, _bilinear,  # noqa: F401
                    image_size, load_image, parse_pinpoints, to_rgb)
from samplers import GroupedBatchSampler, PackedBatchSampler, pack_lengths  # noqa: F401 - re-exported



# ---- Entry points: datasets, collator, sampler ----
# Records come from records.py (every source form normalized into one memory-mapped Arrow table); this file turns
# them into tokens with exact labels and into image tensors, batches and samplers.
#
# Bad records are never swapped for another sample. SupervisedDataset.__getitem__ either raises BadSample naming the
# record (bad_sample="error") or returns a marker {"id", "skipped": reason} (bad_sample="skip"); collate() drops the
# markers and lists them in batch["skipped"] = [(id, reason), ...], so the main process can count them (workers are
# other processes; train.py counts them by reason_kind). A batch whose samples were all skipped becomes one padding
# row with nothing to learn, so every rank still runs the same forward and backward.
# Reasons are str(BadSample): "<kind>: <detail>", the kind named where the problem is found; reason_kind reads it back.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

@dataclass
class DataArguments:
    data_path: str                      # LLaVA JSON/JSONL, parquet, or a datasets directory; several joined by ","
    image_folder: str = "."             # image, frame and video-folder paths are relative to this
    template: str = "vicuna_v1"         # the chat template that renders conversations ("auto": the tokenizer's)
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
                  tokens_per_image: int = 1, *, pairs: bool = False, reference=None) -> SupervisedDataset:
    """Records of data_args.data_path -> a map-style dataset of tokenized samples with image tensors.

    image_settings: model.image_settings() (image_size, image_size_aux, image_mean, image_std, image_grid,
    image_global; an AnyRes model's also image_grid_pinpoints, anyres_max_tiles, patch_size); None for a text-only
    model. tokens_per_image: LLM positions one image takes (AnyRes: the most any image takes; each image is counted
    by its own size). With data_args.packing or AnyRes the exact length of every record is measured here (once;
    cached), so that under accelerator.main_process_first() one process does the work and the others read the
    cache: packs and length groups then use the true count of every image.
    pairs: preference pairs (PreferenceDataset; reference: its precomputed reference log-probs, if any)."""
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
    if pairs:
        dataset = PreferenceDataset(records, tokenizer, data_args, processor, tokens_per_image, reference=reference)
    else:
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
        tokens = self.encode(record, conversations, len(sources), self.image_tokens(sources))
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
            tokens = self.encode(record, conversations, len(sources), per_image)
            for source in sources:
                self.load(source)
        except BadSample as e:
            return record["id"], 0, 0, str(e)
        return record["id"], len(sources), self.positions(tokens, per_image), None

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

    def encode(self, record: dict, conversations: list[dict], num_images: int, image_tokens: int | list[int]) -> dict:
        """The token part of a sample (PreferenceDataset: both rows of a pair)."""
        return self.tokenize(conversations, num_images, image_tokens)

    def positions(self, tokens: dict, image_tokens: int | list[int]) -> int:
        """LLM positions of an encoded sample, images expanded (its longest row)."""
        return expanded_length(tokens["input_ids"], image_tokens)

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
        image counted as its tokens); 0 for a record that tokenization rejects. No image is decoded: AnyRes
        reads each image's size from its header, the other layouts open no image at all. Runs as a
        datasets.map (data_args.num_proc processes) whose result is cached in Arrow next to the records,
        keyed by the tokenizer and the settings that change a length; packs are built from these."""
        a = self.args
        settings = DataArguments("", image_folder=a.image_folder, template=a.template, max_length=a.max_length,
                                 num_frames=a.num_frames)
        settings.max_image_pixels, anyres = a.max_image_pixels, None
        names = ["id", "conversations", "video", "n_images", "problem"]    # no bytes, unless AnyRes needs sizes
        pairs = isinstance(self, PreferenceDataset)     # a pair's length: its longer row
        if pairs:
            names.append("rejected")
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
                       "anyres": anyres, "pairs": pairs})
        self.measured_lengths = np.asarray(measured.with_format("numpy")["length"], dtype=np.int64)
        return self.measured_lengths

    def is_multimodal(self) -> np.ndarray:
        return np.asarray(self.records.select_columns(["n_images"]).with_format("numpy")["n_images"]) != 0


class PreferenceDataset(SupervisedDataset):
    """Preference pairs (records whose "rejected" is set, records.py reads every published form): index ->
    {"id", "chosen": {input_ids, labels}, "rejected": {...}, "images", "images_aux"} (each pair's images once),
    plus "ref_logps" [2] (chosen, rejected) when precomputed reference log-probs are given, or a skip marker as
    SupervisedDataset. A record without a rejected reply is unusable here ("not a pair")."""

    def __init__(self, *args, reference: torch.Tensor | None = None, **kw):
        super().__init__(*args, **kw)
        self.reference = reference        # [len(self), 2] float64, precomputed reference log-probs, or None

    def __getitem__(self, i):
        sample = super().__getitem__(i)
        if self.reference is not None and "skipped" not in sample:
            sample["ref_logps"] = self.reference[int(i)]
        return sample

    def encode(self, record: dict, conversations: list[dict], num_images: int, image_tokens: int | list[int]) -> dict:
        if not record["rejected"]:
            raise BadSample("not a pair", "no rejected reply (a preference record needs chosen and rejected)")
        if not conversations or conversations[-1]["from"] not in ("gpt", "assistant"):
            raise BadSample("roles out of order", "a preference pair's conversation must end with the chosen reply")
        return tokenize_pair(conversations[:-1], conversations[-1]["value"], record["rejected"], self.tokenizer,
                             self.args.template, self.args.max_length, image_token_len=image_tokens,
                             num_images=num_images)

    def positions(self, tokens: dict, image_tokens: int | list[int]) -> int:
        return max(expanded_length(tokens[row]["input_ids"], image_tokens) for row in ("chosen", "rejected"))


def holds_pairs(records: datasets.Dataset) -> bool:
    """Whether any record is a preference pair (then `check` checks pairs)."""
    return any(records.select_columns(["rejected"])["rejected"])


def collate_pairs(samples: list[dict], pad_token_id: int) -> dict:
    """Pair samples -> one batch of 2B right-padded rows, [chosen x B ; rejected x B], with each pair's images ONCE
    (images [N, V, 3, S, S] in pair order, as collate; AnyRes: views back to back and image_sizes [N, 2]): the model
    splices them into both rows of their pair. image_counts is per row (2B), so all rows' placeholders add up to it.
    ids: the pairs'; ref_logps [2B] (chosen rows, then rejected rows) when the samples carry precomputed reference
    log-probs; skipped: as collate."""
    skipped = [(s["id"], s["skipped"]) for s in samples if "skipped" in s]
    kept = [s for s in samples if "skipped" not in s]
    if not kept:   # every pair was unusable: one padding pair with nothing to learn keeps the ranks in step
        pad = {"input_ids": torch.tensor([pad_token_id]), "labels": torch.tensor([IGNORE_INDEX])}
        kept = [{"id": None, "chosen": pad, "rejected": pad, "images": None, "images_aux": None}]
    rows = [s["chosen"] for s in kept] + [s["rejected"] for s in kept]
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    images = [s["images"] for s in kept if s["images"] is not None]
    aux = [s["images_aux"] for s in kept if s.get("images_aux") is not None]
    counts = torch.tensor([_image_count(s) for s in kept], dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
             "images": torch.cat(images) if images else None, "images_aux": torch.cat(aux) if aux else None,
             "image_counts": torch.cat([counts, counts]), "ids": [s["id"] for s in kept if s["id"] is not None],
             "skipped": skipped}
    sizes = [s["image_sizes"] for s in kept if s.get("image_sizes") is not None]
    if sizes:           # AnyRes: the views of each image back to back; the sizes say how many
        batch["image_sizes"] = torch.cat(sizes)
    if any("ref_logps" in s for s in samples if "skipped" not in s):
        ref = torch.stack([s.get("ref_logps", torch.zeros(2, dtype=torch.float64)) for s in kept])
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])
    return batch


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


def check(data_path: str, tokenizer, template: str, *, image_folder: str = ".", max_length: int = 2048,
          tokens_per_image: int = 576, num_frames: int = 8, max_image_pixels: int = 89_478_485,
          num_workers: int = 2, cache_dir: str | None = None, anyres: dict | None = None, out=None) -> int:
    """Validate every record (structure, roles, tags, images decoded, tokenization, length); print one line per bad
    record and a summary to `out` (stdout), with a progress bar on stderr. Returns the exit code: 1 if any record is
    unusable, else 0. anyres: an AnyRes model's image settings (image_size, image_grid_pinpoints, patch_size,
    anyres_max_tiles): each image is then counted by its own size, as training counts it, not as tokens_per_image."""
    out = out or sys.stdout
    args = DataArguments(data_path, image_folder=image_folder, template=template, max_length=max_length,
                         num_frames=num_frames, max_image_pixels=max_image_pixels, cache_dir=cache_dir)
    records = load_records(data_path, cache_dir=cache_dir)
    kind = PreferenceDataset if holds_pairs(records) else SupervisedDataset   # pairs: both rows of each checked
    processor = ImageProcessor(**anyres, aspect_ratio="anyres") if anyres else None
    dataset = kind(records, tokenizer, args, processor, tokens_per_image)
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


DATA_HELP = """\
Tools for training data. One command: check.

example:
  python data.py check data/mine.json --image_folder data/images --tokenizer runs/mgm-7b --template vicuna_v1"""
CHECK_HELP = """\
Read every record as training would (the record forms train.py reads, its images, its tokens under the chat
template), print each unusable one by id with the reason, then a summary: records usable, images, token lengths
(p50 / p90 / p99 / max), and each reason's count. Exit status 1 if any record is unusable, 0 otherwise.

examples:
  python data.py check data/mine.json --image_folder data/images --tokenizer runs/mgm-7b --template vicuna_v1
  python data.py check data/MGM-Finetune/mgm_instruction.json --image_folder data/MGM-Finetune \\
      --tokenizer lmsys/vicuna-7b-v1.5 --template vicuna_v1 --max_length 2048"""

def main(argv: list[str] | None = None) -> int:
    notes = field_comments(DataArguments)   # the options that are DataArguments fields are explained as there
    parser = ArgumentParser(prog="data.py", description=DATA_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("check", help="validate every record and summarise (exit status 1 if any is unusable)",
                            description=CHECK_HELP)
    c.add_argument("data", help=notes["data_path"])
    c.add_argument("--image_folder", default=".", help=notes["image_folder"] + " (default: %(default)s)")
    c.add_argument("--tokenizer", required=True, help="the LLM's tokenizer: a directory or a hub name")
    c.add_argument("--template", required=True, choices=sorted(TEMPLATES), help=notes["template"])
    c.add_argument("--max_length", type=int_at_least(1), default=2048,
                   help=notes["max_length"] + " (default: %(default)s)")
    c.add_argument("--tokens_per_image", type=int_at_least(1), default=576,
                   help="LLM positions per image (default: %(default)s, CLIP-L/336; HD: 5 * 576)")
    c.add_argument("--image_grid_pinpoints", default=None,
                   help="AnyRes (LLaVA-NeXT's tiles): count each image by its own size instead of --tokens_per_image; "
                        "'default' or HxW,HxW,... as the recipe's image_grid_pinpoints (default: none)")
    c.add_argument("--image_size", type=int_at_least(1), default=336,
                   help="with --image_grid_pinpoints: the low-res tower's input side (default: %(default)s)")
    c.add_argument("--patch_size", type=int_at_least(1), default=14,
                   help="with --image_grid_pinpoints: the low-res tower's patch side (default: %(default)s)")
    c.add_argument("--anyres_max_tiles", type=int_at_least(0), default=0,
                   help="with --image_grid_pinpoints: as the recipe's anyres_max_tiles (default: %(default)s, no cap)")
    c.add_argument("--num_frames", type=int_at_least(1), default=8,
                   help=notes["num_frames"] + " (default: %(default)s)")
    c.add_argument("--max_image_pixels", type=int_at_least(1), default=89_478_485,
                   help=notes["max_image_pixels"] + " (default: %(default)s)")
    c.add_argument("--num_workers", type=int_at_least(0), default=2,
                   help="processes decoding the images (default: %(default)s; 0: this one)")
    c.add_argument("--cache_dir", default=None, help=notes["cache_dir"] + " (default: none)")
    a = parser.parse_args(argv)
    check_data_path(a.data, "data")
    check_path(a.image_folder, "--image_folder", "dir")
    from refs import check_model_ref
    check_model_ref(a.tokenizer, "--tokenizer", kind="tokenizer")
    from transformers import AutoTokenizer
    anyres = None
    if a.image_grid_pinpoints:
        if a.image_size % a.patch_size:
            raise UserError(f"--image_size {a.image_size} is not a multiple of --patch_size {a.patch_size}")
        try:
            pinpoints = parse_pinpoints(a.image_grid_pinpoints, a.image_size)
        except ValueError as e:
            raise UserError(f"--{e}") from None
        anyres = dict(image_size=a.image_size, image_grid_pinpoints=pinpoints, patch_size=a.patch_size,
                      anyres_max_tiles=a.anyres_max_tiles)
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    return check(a.data, tokenizer, a.template, image_folder=a.image_folder, max_length=a.max_length,
                 tokens_per_image=a.tokens_per_image, num_frames=a.num_frames, max_image_pixels=a.max_image_pixels,
                 num_workers=a.num_workers, cache_dir=a.cache_dir, anyres=anyres)


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
                   anyres: dict | None = None, pairs: bool = False) -> dict:
    """SupervisedDataset.measure_lengths' map function: a batch of records (the image column only for AnyRes,
    whose settings `anyres` holds; pairs: preference records) -> {"length"}."""
    processor = ImageProcessor(**anyres, aspect_ratio="anyres") if anyres else None
    measurer = (PreferenceDataset if pairs else SupervisedDataset)(None, tokenizer, args, processor, tokens_per_image)
    lengths = []
    for j in range(len(batch["id"])):
        record = {k: v[j] for k, v in batch.items()}
        if not anyres:
            record["images"] = [{}] * max(record["n_images"], 0)   # parse() only counts them
        try:
            conversations, sources = measurer.parse(record)
            per_image = measurer.image_tokens(sources)
            tokens = measurer.encode(record, conversations, len(sources), per_image)
            lengths.append(measurer.positions(tokens, per_image))
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


def tokenize_prompt(messages: list[dict], tokenizer, template: str | Template, *,
                    num_images: int | None = None) -> torch.Tensor:
    """Inference prompt ids (1-D), ending where the assistant's answer starts; the same ids training saw there."""
    template = get_template(template) if isinstance(template, str) else template
    messages = _place_image_tags(normalize_messages(messages, for_prompt=True), num_images)
    input_ids, _ = encode_segments(template.prompt_segments(messages, tokenizer), tokenizer)
    return torch.tensor(input_ids, dtype=torch.long)


def tokenize_pair(prompt: list[dict], chosen: str, rejected: str, tokenizer, template: str | Template,
                  max_length: int | None = None, *, image_token_len: int | list[int] = 1,
                  num_images: int | None = None) -> dict:
    """Prompt turns (ending with the user's) + each reply -> {"chosen": {input_ids, labels}, "rejected": ...}.
    Each row is tokenize_conversation's (the ids supervised training sees), with every position before the reply
    masked, so the earlier assistant turns of a multi-turn prompt do not count: only the chosen / rejected reply
    (and the template's end of turn) is supervised. The prompt's ids are the inference prompt's (tokenize_prompt),
    which the contract makes a prefix of both rows; checked."""
    try:
        prompt_ids = tokenize_prompt(prompt, tokenizer, template, num_images=num_images).tolist()
    except ConversationError as e:
        raise BadSample(e.kind, str(e)) from None
    out = {}
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        row = tokenize_conversation([*prompt, {"from": "gpt", "value": reply}], tokenizer, template, max_length,
                                    image_token_len=image_token_len, num_images=num_images)
        n = len(prompt_ids)
        if row["input_ids"][:n].tolist() != prompt_ids[:len(row["input_ids"])]:
            raise BadSample("tokenization mismatch", f"the {name} row does not start with the prompt's ids")
        row["labels"][:n] = IGNORE_INDEX
        if not (row["labels"] != IGNORE_INDEX).any():
            raise BadSample("too long", f"the prompt leaves no room for the {name} reply in max_length={max_length}")
        out[name] = row
    return out


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
