"""The example configs of configs/ load into their stages' typed configs, and the Literal choices are checked
once, when a config is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from slidemil.choices import MilType, choices_of
from slidemil.config import load_config
from slidemil.engine.score import ScoreConfig
from slidemil.errors import ConfigError
from slidemil.features.extract import ExtractConfig
from slidemil.models.mil import list_heads
from slidemil.slide.tiling import TilingConfig
from slidemil.trainer.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name, cls", [("tiling.yaml", TilingConfig), ("extraction.yaml", ExtractConfig),
                                       ("train_features.yaml", TrainConfig), ("train_end2end.yaml", TrainConfig),
                                       ("cv.yaml", TrainConfig), ("scoring.yaml", ScoreConfig)])
def test_example_configs_load(name: str, cls: type) -> None:
    cfg = load_config(cls, CONFIGS / name)
    assert isinstance(cfg, cls)


def test_examples_say_what_they_set() -> None:
    assert load_config(TrainConfig, CONFIGS / "train_end2end.yaml").data.mode == "end2end"
    assert load_config(TrainConfig, CONFIGS / "cv.yaml").cv.folds == 5
    assert load_config(TilingConfig, CONFIGS / "tiling.yaml") == TilingConfig()  # the defaults, written out
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        ["tiling.yaml", "extraction.yaml", "train_features.yaml", "train_end2end.yaml", "cv.yaml", "scoring.yaml"])


@pytest.mark.parametrize("cls, key, value", [(ScoreConfig, "backend", "tensorflow"), (ScoreConfig, "precision", "fp8"),
                                             (ScoreConfig, "attention_norm", "max"), (TrainConfig, "optim.scheduler", "step"),
                                             (TrainConfig, "model.mil", "lstm"), (ExtractConfig, "backend", "tensorrt"),
                                             (TilingConfig, "tissue.method", "ai")])
def test_a_choice_outside_its_literal_is_refused_naming_the_choices(cls: type, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=r"is not one of \["):
        load_config(cls, None, {key: value})


def test_the_mil_choices_are_the_registered_heads() -> None:
    assert sorted(choices_of(MilType)) == sorted(list_heads())


def test_train_command_sets_every_head_option() -> None:
    from slidemil.cli import build_parser
    from slidemil.cli.train import load_train_config

    args = build_parser().parse_args(["train", "--out", "x", "--mil", "transmil", "--attention-dim", "64", "--n-heads",
                                      "4", "--landmarks", "32", "--pinv-iterations", "8", "--instance-weight", "0",
                                      "--instance-k", "3", "--inits", "3", "--init-choice", "average"])
    cfg = load_train_config(args)
    assert (cfg.model.inits, cfg.model.init_choice) == (3, "average")
    assert (cfg.model.mil, cfg.model.attention_dim, cfg.model.n_heads, cfg.model.landmarks,
            cfg.model.pinv_iterations) == ("transmil", 64, 4, 32, 8)
    assert (cfg.loss.instance_weight, cfg.loss.instance_k) == (0.0, 3)


def test_train_command_sets_slide_contrast() -> None:
    from slidemil.cli import build_parser
    from slidemil.cli.train import load_train_config

    def contrast(*extra: str) -> str:
        return load_train_config(build_parser().parse_args(["train", "--out", "x", *extra])).model.slide_contrast

    assert contrast() == "auto"
    assert contrast("--slide-contrast") == "on"  # the flag alone, as before auto existed
    assert contrast("--slide-contrast", "off") == "off" and contrast("--slide-contrast", "auto") == "auto"


def test_train_command_chooses_the_kept_epoch() -> None:
    from slidemil.cli import build_parser
    from slidemil.cli.train import load_train_config

    parse = build_parser().parse_args
    assert load_train_config(parse(["train", "--out", "x"])).optim.select == "last"
    cfg = load_train_config(parse(["train", "--out", "x", "--select", "best", "--patience", "5"]))
    assert (cfg.optim.select, cfg.optim.patience) == ("best", 5)
    with pytest.raises(ConfigError, match="select"):
        load_config(TrainConfig, None, {"optim.select": "first"})


def test_yaml_scientific_notation_is_a_float(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads ``lr: 2e-4`` as the string '2e-4'; a float field takes it as 2e-4."""
    path = tmp_path / "train.yaml"
    path.write_text("optim:\n  lr: 2e-4\n  weight_decay: 1E-5\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.optim.lr == 2e-4 and cfg.optim.weight_decay == 1e-5
    with pytest.raises(ConfigError, match="is not a float"):
        load_config(TrainConfig, None, {"optim.lr": "fast"})
