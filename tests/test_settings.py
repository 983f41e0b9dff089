"""settings.py: recipes and the command line become the settings dataclasses, checked before anything loads.
(--help and each command's one-line mistakes: tests/test_cli.py.)"""
from __future__ import annotations

import pytest
import yaml

from tests.test_train import ROOT, run_in_process, tiny, write_recipe  # noqa: F401,F811


@pytest.mark.parametrize("name", sorted(p.name for pattern in ("mgm_*.yaml", "llava_*.yaml")
                                         for p in (ROOT / "recipes").glob(pattern)))
def test_recipes_parse_and_the_command_line_wins(name, tiny_export):
    """Every shipped recipe; one that starts from an export (init_from) is read against a tiny stand-in export."""
    import settings
    recipe = yaml.safe_load(open(ROOT / "recipes" / name))
    stand_in = ["--init_from", str(tiny_export)] if "init_from" in recipe else []
    model_args, data_args, args = settings.parse_args([str(ROOT / "recipes" / name), "--per_device_batch_size", "3",
                                                       *stand_in])
    settings.check_args(model_args, args, data_args)   # the data settings too (the pretrain recipe crops its images)
    assert recipe["per_device_batch_size"] != 3 and args.per_device_batch_size == 3
    llm = recipe["llm"] if not stand_in else yaml.safe_load(open(tiny_export / "mgm_config.json"))["args"]["llm"]
    assert (model_args.llm, data_args.data_path, args.stage) == (llm, recipe["data_path"], recipe["stage"])


def test_a_resolved_config_is_a_recipe_that_gives_the_same_settings(tmp_path):
    """null is none (vision_tower_aux: null is plain LLaVA, not the default ConvNeXt), a list joins with ",", so
    the train_config.yaml an export holds runs again as it was."""
    import settings
    recipe = write_recipe(tmp_path / "r.yaml", {"vision_tower_aux": None, "data_path": ["a.json", "b.json"],
                                                "projector_lr": 1e-4, "packing": True})
    parsed = settings.parse_args([str(recipe), "--projector_lr", "none"])
    model_args, data_args, args = parsed
    assert (model_args.vision_tower_aux, data_args.data_path, args.projector_lr, data_args.packing) == \
        (None, "a.json,b.json", None, True)
    saved = write_recipe(tmp_path / "train_config.yaml", settings.resolved_config(*parsed))
    assert settings.parse_args([str(saved)]) == parsed


def test_settings_out_of_range_are_refused_naming_the_setting_and_its_range(tiny, tmp_path):
    """Checked before anything is loaded; a prefix of a flag is not accepted as the flag."""
    import settings
    recipe = str(write_recipe(tmp_path / "r.yaml", tiny["recipe"]))
    cases = {"learning_rate": ("-0.01", "> 0"), "gradient_accumulation_steps": ("0", ">= 1"),
             "per_device_batch_size": ("0", ">= 1"), "save_steps": ("0", ">= 1"), "logging_steps": ("0", ">= 1"),
             "warmup_ratio": ("5", r"\[0, 1\]"), "max_skip_fraction": ("1.0", r"\[0, 1\)"),
             "lr_multi": ("projector", "not name:factor"), "device_memory_gb": ("-3", ">= 0"),
             "plan_processes": ("-1", ">= 0")}
    for setting, (value, allowed) in cases.items():
        with pytest.raises(settings.UserError, match=rf"^{setting}: .*{value}.*{allowed}"):
            run_in_process([recipe, "--output_dir", str(tmp_path / "run"), f"--{setting}", value])
    with pytest.raises(settings.UserError, match=r"^data_path: .*nowhere.json: no such file or directory"):
        run_in_process([recipe, "--output_dir", str(tmp_path / "run"), "--data_path", str(tmp_path / "nowhere.json")])
    with pytest.raises(settings.UserError, match=r"^image_folder: .*nowhere: no such directory"):
        run_in_process([recipe, "--output_dir", str(tmp_path / "run"), "--image_folder", str(tmp_path / "nowhere")])
    with pytest.raises(settings.UserError, match=r"^unknown setting\(s\) --max_step 2"):
        settings.parse_args([recipe, "--max_step", "2"])
    assert not (tmp_path / "run").exists()


def test_max_time_takes_seconds_or_slurm_durations():
    import settings
    assert [settings.duration_seconds(t) for t in ("", "90", "90.5", "1:30", "23:30:00", "1-00:00:00")] == \
        [0, 90, 90.5, 90, 84600, 86400]
    for bad in ("1h", "-5", "1:2:3:4", "1-"):
        with pytest.raises(ValueError, match="is not seconds or"):
            settings.duration_seconds(bad)
