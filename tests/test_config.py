"""The YAML config loader and its overrides."""

import pytest

from stgpt.config import CONFIG_DIR, Config, ConfigError, load_config


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.video.num_frames == 8 and cfg.generation.num_beams == 8


@pytest.mark.parametrize("name", ["tiny.yaml", "vatex.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIG_DIR / name)
    assert cfg.video.num_frames == 8


def test_vatex_config_is_the_original_setup():
    cfg = load_config(CONFIG_DIR / "vatex.yaml")
    assert cfg.model.kind == "pretrained"
    assert cfg.model.encoder == "facebook/timesformer-base-finetuned-k600" and cfg.model.decoder == "gpt2"
    assert (cfg.video.short_side, cfg.video.crop_size) == (224, 224)
    assert cfg.train.batch_size == 6 and cfg.train.lr == 5e-7 and cfg.train.precision == "fp16"
    assert cfg.generation.num_beams == 8
    assert (cfg.generation.min_new_tokens, cfg.generation.max_new_tokens) == (30, 60)


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=1e-4", "train.use_gpu=true", "model.kind=tiny", "model.checkpoint=null",
                             "video.image_mean=[0.5, 0.5, 0.5]"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 3 and cfg.train.use_gpu is True
    assert cfg.model.kind == "tiny" and cfg.model.checkpoint is None
    assert cfg.video.image_mean == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "unknown key.*train.nope"),
    ("nosection.x=1", "unknown key.*nosection"),
    ("train.epochs=three", "train.epochs: expected an integer"),
    ("train.use_gpu=1", "train.use_gpu: expected true or false"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.lr", "section.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
