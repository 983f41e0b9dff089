"""vision.py's contracts, exercised the way a fork changes the model: another HR trunk (a timm ResNet, a timm
ConvNeXt trained with ImageNet mean/std) and a projector that changes the tokens per image."""
import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import train
from data import CLIP_MEAN, CLIP_STD, DataArguments, build_dataset, collate
from model import MiniGemini, conv_forward_flops, set_stage, train_flops
from tests.tiny_models import build, save_tiny_timm_trunk, tiny_batch
from vision import GridPool2x, projector_tokens

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TRUNKS = {   # architecture, narrow model_args, the class FSDP should wrap, checkpointing possible
    "resnet": ("resnet18", dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64], stem_width=8), "BasicBlock", False),
    "convnext": ("convnext_atto", dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1]), "ConvNeXtStage", True),
}


def hr_model(root, tok, name, **kw):
    architecture, model_args, _, _ = TRUNKS[name]
    path = root / f"imagenet-{name}"
    if not path.exists():
        save_tiny_timm_trunk(path, architecture, mean=IMAGENET_MEAN, std=IMAGENET_STD, **model_args)
    return build(root, tok, vision_tower_aux=str(path), **kw)


@pytest.mark.parametrize("name", list(TRUNKS))
def test_hr_tower_with_its_own_normalization_equals_timm_forward_features(root, tok, name):
    import timm
    model = hr_model(root, tok, name).eval()
    trunk = timm.create_model("local-dir:" + str(root / f"imagenet-{name}"), pretrained=True).eval()
    raw = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))     # pixels in [0, 1]

    def normalized(mean, std):
        return (raw - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        ours = model.vision_tower_aux.stage_maps(normalized(CLIP_MEAN, CLIP_STD))  # what data.py feeds both towers
        theirs = trunk.forward_features(normalized(IMAGENET_MEAN, IMAGENET_STD))
    torch.testing.assert_close(ours[-1], theirs, atol=1e-5, rtol=1e-4)
    assert [m.shape[-1] for m in ours] == [8, 4, 2, 1]                               # input/4 ... input/32
    assert model.vision_tower_aux.channels == sum(m.shape[1] for m in ours) == 8 + 16 + 32 + 64


@pytest.mark.parametrize("name", list(TRUNKS))
def test_hr_tower_trains_its_last_stage_and_exports(tmp_path, root, tok, name):
    _, _, block_class, checkpointable = TRUNKS[name]
    model = hr_model(root, tok, name)
    aux = model.vision_tower_aux
    assert block_class in model._no_split_modules and "Sequential" not in model._no_split_modules
    set_stage(model, "pretrain", tune_vision_tower_aux=True, print_fn=None)
    aux.tune_last_stage()                                                    # train.py's tune_vision_tower_aux
    tuned = {n for n, p in aux.named_parameters() if p.requires_grad}
    assert tuned and all(n.startswith("stages.3.") for n in tuned)
    if checkpointable:
        aux.gradient_checkpointing(True)
    else:
        with pytest.raises(ValueError, match="gradient checkpointing"):
            aux.gradient_checkpointing(True)
    model.train()
    norms = [m for m in aux.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert all(not m.training for m in norms) and (norms or name == "convnext")   # running statistics kept
    stats = [m.running_mean.clone() for m in norms]
    before = {n: p.detach().clone() for n, p in aux.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    batch = tiny_batch(model)
    text_only = {k: v[1:2] for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask")}
    for inputs in (batch, text_only):         # text-only: the dummy black image, a 1x1 last-stage map of one image
        model(**inputs).loss.backward()
    optimizer.step()
    with FlopCounterMode(display=False) as counted:                          # MFU counts the trunk's layers right
        aux.stage_maps(torch.zeros(1, 3, 32, 32))
    assert sum(conv_forward_flops([aux.stem, *aux.stages], 32)[0]) == counted.get_total_flops()
    assert train_flops(model).per_image > 0
    changed = {n for n, p in aux.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= tuned
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))

    model.eval()
    model.save_pretrained(tmp_path / "export", tok, weights="full")
    again = MiniGemini.from_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "mgm_config.json").read_text())["vision_aux_config"]["mean"] == \
        list(IMAGENET_MEAN)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_images(batch["images"], batch["images_aux"]),
                                   model.encode_images(batch["images"], batch["images_aux"]))


def test_pooling_projector_quarters_the_tokens_consistently_in_data_and_model(tmp_path, root, tok):
    model = build(root, tok, hd=True, projector="pool2x_mlp2x_gelu")
    assert projector_tokens("pool2x_mlp2x_gelu", 4) == 1 and projector_tokens("pool2x_perceiver", 16, queries=3) == 3
    assert model.tokens_per_image == model.num_views * 4 // 4 == 5               # 2x2 LR patches -> 1 per view
    with pytest.raises(ValueError, match="even square grid"):
        GridPool2x.tokens(5)                                                     # patches + CLS
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    record = {"id": "r", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat color is the shape ?"}, {"from": "gpt", "value": "red ."}]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    args = DataArguments(str(tmp_path / "data.json"), image_folder=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                         max_length=64, packing=True)
    dataset = build_dataset(args, tok, model.image_settings(), model.tokens_per_image)
    batch = collate([dataset[0]], pad_token_id=tok.pad_token_id)
    batch = {k: v for k, v in batch.items() if k not in ("ids", "skipped")}
    set_stage(model, "pretrain", print_fn=None)
    spliced = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                                   batch["images_aux"], batch["image_counts"])
    length = int(spliced["attention_mask"].sum())
    assert length == dataset.lengths()[0] == int(train.sample_lengths(batch, model.tokens_per_image)[0])
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.projector[1][0].weight.grad.abs().sum() > 0
