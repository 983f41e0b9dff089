"""The export format is pinned: tiny exports (standard and HD) hold exactly the state-dict keys, shapes and
mgm_config.json fields recorded in tests/golden/export_format.json, so exports made by earlier versions keep
loading. Regenerate the golden file only for a deliberate format change:
    python -m tests.test_export_format  (writes tests/golden/export_format.json)"""
import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.tiny_models import build

GOLDEN = Path(__file__).parent / "golden" / "export_format.json"
CASES = {"standard": dict(), "hd": dict(hd=True), "pretrain": dict(), "llava": dict(hr=None),
         "anyres": dict(hr=None, image_grid_pinpoints="default")}


def describe_export(path: Path) -> dict:
    """What an old loader depends on: every weight key with its shape, and the mgm_config.json fields."""
    meta = json.loads((path / "mgm_config.json").read_text())
    weights = {}
    for file in sorted(path.rglob("*.safetensors")):
        with safe_open(file, "pt") as f:
            weights[str(file.relative_to(path))] = {k: list(f.get_slice(k).get_shape()) for k in sorted(f.keys())}
    return dict(config_fields=sorted(meta), args_fields=sorted(meta["args"]), export=meta["export"],
                image_settings=meta["image_settings"], vision_aux_config=meta["vision_aux_config"],
                vision_config_fields=sorted(meta["vision_config"]), weights=weights)


def make_export(root, tok, out: Path, case: str) -> Path:
    from model import set_stage
    model = build(root, tok, **CASES[case])
    if case == "pretrain":
        set_stage(model, "pretrain", print_fn=None)
    model.save_pretrained(out, tok)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_exports_keep_the_recorded_format(tmp_path, root, tok, case):
    described = describe_export(make_export(root, tok, tmp_path / case, case))
    assert described == json.loads(GOLDEN.read_text())[case]


def test_an_export_in_the_recorded_format_loads(tmp_path, root, tok):
    from model import MiniGemini
    out = make_export(root, tok, tmp_path / "hd", "hd")
    model = MiniGemini.from_pretrained(out)
    assert sorted(k for k in model.state_dict() if not k.startswith("llm.")) == \
        sorted(json.loads(GOLDEN.read_text())["hd"]["weights"]["model.safetensors"])


def _write_golden(tmp: Path) -> None:
    from transformers import AutoTokenizer

    from tests.tiny_models import save_tiny_tokenizer
    tok = AutoTokenizer.from_pretrained(save_tiny_tokenizer(tmp / "tokenizer"))
    golden = {case: describe_export(make_export(tmp / "ckpt", tok, tmp / case, case)) for case in CASES}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    import tempfile
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as tmp:
        _write_golden(Path(tmp))
