"""Packing: whole samples back to back in rows of max_length positions, with no attention across samples.

The packer (PackedBatchSampler, pack_lengths), the packed batch (collate of packs), and the model on packed rows:
each sample's logits equal its logits alone, and loss and gradients equal those of the same samples padded.
"""
import numpy as np
import pytest
import torch

from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, PackedBatchSampler, collate, pack_lengths
from model import set_stage
from tests.tiny_models import build

IMG = IMAGE_TOKEN_INDEX
PAD = 3


# ---- the packer -----------------------------------------------------------------------------------------------------
def packs_of(batches):
    return [list(pack) for batch in batches for pack in batch]


def test_every_sample_is_packed_once_and_no_row_overflows():
    lengths = np.random.default_rng(0).integers(1, 300, 500)
    lengths[:5] = [300, 300, 0, 7, 299]                               # full rows and an empty (rejected) record
    sampler = PackedBatchSampler(lengths, 300, batch_size=4, seed=1)
    packs = packs_of(sampler)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert max(lengths[pack].sum() for pack in packs) <= 300
    assert len(packs) < 1.1 * lengths.sum() / 300                     # few rows waste room
    assert len(list(sampler)) == len(sampler) == sampler.batches_per_epoch == -(-len(packs) // 4)


def test_best_fit_decreasing_fills_the_tightest_row():
    assert pack_lengths([5, 4, 6, 3, 2], 10) == [[2, 1], [0, 3, 4]]  # 6+4, then 5+3+2
    assert pack_lengths([12, 3], 10) == [[0], [1]]                    # too long: a row of its own


def test_ranks_get_disjoint_packs_of_the_same_number_of_batches():
    lengths = np.random.default_rng(0).integers(1, 300, 503)
    per_rank = [list(PackedBatchSampler(lengths, 300, 2, num_replicas=3, rank=r, seed=1)) for r in range(3)]
    assert len({len(batches) for batches in per_rank}) == 1
    packs = [tuple(pack) for batches in per_rank for pack in packs_of(batches)]
    assert sorted(i for pack in set(packs) for i in pack) == list(range(503))
    assert len(packs) - len(set(packs)) < 3                            # only the last step wraps around (< world)
    for step in zip(*per_rank):                                        # within a step the ranks never share
        ids = [i for batch in step for pack in batch for i in pack]
        assert len(ids) == len(set(ids))


def test_packing_reshuffles_every_epoch_by_seed_and_resumes_mid_epoch():
    lengths = np.random.default_rng(0).integers(1, 300, 400)

    def epoch(e, start=0, rank=1):
        sampler = PackedBatchSampler(lengths, 300, 3, num_replicas=2, rank=rank, seed=7)
        sampler.set_epoch(e, start_batch=start)
        return list(sampler)
    assert epoch(3) == epoch(3) and epoch(3) != epoch(4)
    assert epoch(3, start=5) == epoch(3)[5:]
    assert set(map(tuple, packs_of(epoch(3)))) != set(map(tuple, packs_of(epoch(4))))   # new packs, not only order


def test_fill_on_a_llava_665k_like_length_mix():
    """bench.py padding's mix (LLaVA-665K: instruct, academic VQA, TextCaps with one 576-token image; ShareGPT
    text-only), 5% scale. Real tokens / computed tokens (rows padded to the longest row of their batch of 8)."""
    rng = np.random.default_rng(0)
    mix = [(7900, 1, 230, 0.6), (22250, 1, 110, 0.7), (1100, 1, 40, 0.3), (2000, 0, 650, 0.9)]
    lengths = np.concatenate([np.minimum(rng.lognormal(np.log(median), sigma, n).astype(int) + 1 + 576 * images,
                                         2048) for n, images, median, sigma in mix])
    batches = PackedBatchSampler(lengths, 2048, 8, seed=0).epoch_batches(0)
    real = sum(int(lengths[pack].sum()) for batch in batches for pack in batch)
    computed = sum(len(batch) * max(int(lengths[pack].sum()) for pack in batch) for batch in batches)
    assert real / computed >= 0.95


# ---- the packed batch -----------------------------------------------------------------------------------------------
def sample(name, ids, supervised_from, n_images=0, side=28, aux=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(ids)
    labels = ids.clone()
    labels[:supervised_from] = IGNORE_INDEX
    labels[ids == IMG] = IGNORE_INDEX
    images = torch.randn(n_images, 1, 3, side, side, generator=g) if n_images else None
    images_aux = torch.randn(n_images, 3, aux, aux, generator=g) if n_images else None
    return {"id": name, "input_ids": ids, "labels": labels, "images": images, "images_aux": images_aux}


SAMPLES = [
    sample("a", [1, IMG, 5, 6, 7, 8], 2, n_images=1, seed=1),
    sample("b", [1, 9, 10, 11, 12, 13, 14], 3),
    sample("c", [1, 15, IMG, 16, IMG, 17, 18, 19], 5, n_images=2, seed=2),
    sample("d", [1, 20, 21, 22, 23], 2),
    sample("e", [1, IMG, 24, 25, 26], 2, n_images=1, seed=3),
]
PACKS = [[SAMPLES[0], SAMPLES[1], SAMPLES[3]], [SAMPLES[2], SAMPLES[4]]]   # rows of 18 and 13 input ids


def test_a_packed_row_holds_its_samples_back_to_back():
    batch = collate(PACKS + [[{"id": "bad", "skipped": "image not found: x.jpg"}]], pad_token_id=PAD)
    assert batch["position_ids"].tolist() == [list(range(6)) + list(range(7)) + list(range(5)),
                                              list(range(8)) + list(range(5)) + list(range(5))]  # padding: its own
    assert batch["input_ids"][1, 13:].tolist() == [PAD] * 5 and batch["attention_mask"].sum(1).tolist() == [18, 13]
    starts = [0, 6, 13], [0, 8]
    for row, (pack, first) in enumerate(zip(PACKS, starts)):
        for s, at in zip(pack, first):
            assert batch["input_ids"][row, at:at + len(s["input_ids"])].tolist() == s["input_ids"].tolist()
            assert batch["labels"][row, at] == IGNORE_INDEX       # a sample's first label: nothing predicts it
            assert torch.equal(batch["labels"][row, at + 1:at + len(s["labels"])], s["labels"][1:])
    assert batch["image_counts"].tolist() == [1, 3] and len(batch["images"]) == len(batch["images_aux"]) == 4
    assert torch.equal(batch["images"][1:3], SAMPLES[2]["images"])          # images in sample order
    assert batch["ids"] == ["a", "b", "d", "c", "e"]                        # every sample: len(ids) samples
    assert batch["skipped"] == [("bad", "image not found: x.jpg")]          # its pack was empty: no row


# ---- the model on packed rows ---------------------------------------------------------------------------------------


def inputs(batch):
    return {k: v for k, v in batch.items() if k not in ("ids", "skipped")}


@pytest.mark.parametrize("family,attention", [("llama", "sdpa"), ("llama", "eager"), ("llama", "mmca"),
                                              ("gemma", "sdpa"), ("qwen2", "sdpa")])
def test_each_packed_sample_sees_only_itself(root, tok, family, attention):
    model = build(root, tok, family=family, attention=attention).eval()
    k = model.tokens_per_image
    batch = collate(PACKS, pad_token_id=PAD)
    with torch.no_grad():
        packed = model(**inputs(batch)).logits
        crossing = model(**inputs({**batch, "position_ids": None})).logits   # the same rows, one sequence each
        for row, pack in enumerate(PACKS):
            at = 0
            for s in pack:
                alone = model(**inputs(collate([s], pad_token_id=PAD))).logits[0]
                torch.testing.assert_close(packed[row, at:at + len(alone)], alone, atol=1e-5, rtol=1e-4)
                at += len(alone)
                assert len(alone) == len(s["input_ids"]) + (k - 1) * int((s["input_ids"] == IMG).sum())
    later = slice(6 + (k - 1), 13 + (k - 1))                                 # sample b, behind a's image
    assert not torch.allclose(packed[0, later], crossing[0, later], atol=1e-3)   # so the test can tell


def test_packed_loss_and_gradients_equal_the_padded_run(root, tok):
    model = build(root, tok)
    set_stage(model, "finetune", print_fn=None)
    padded, packed = collate(SAMPLES, pad_token_id=PAD), collate(PACKS, pad_token_id=PAD)
    n = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())               # what train.py counts
    assert int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == n
    results = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**inputs(batch), num_items_in_batch=n).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                        if p.grad is not None}))
    (loss_padded, grads_padded), (loss_packed, grads_packed) = results
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-6, rtol=1e-5)
    assert grads_padded.keys() == grads_packed.keys() and any(name.startswith("llm.") for name in grads_padded)
    for name, g in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], g, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_flash_attention_gets_the_sample_boundaries_of_packed_rows():
    from model import packed_attention_kwargs
    # two rows of 6: samples of 3+3, then 4 + a padding tail of 2 (its own sequence, restarting at 0)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]])
    kw = packed_attention_kwargs(position_ids, "flash_attention_2")
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 6, 10, 12] and kw["max_length_q"] == 4
    assert packed_attention_kwargs(position_ids, "sdpa") == {}
    with pytest.raises(ValueError, match="isolates samples"):
        packed_attention_kwargs(position_ids, "some_custom_kernel")
