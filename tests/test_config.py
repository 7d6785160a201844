"""Config parsing: defaults, TOML file, CLI overrides, round trip, and every error case."""

import dataclasses
from pathlib import Path

import pytest

from simpo.config import Config, ConfigError, help_text, load_config, parse_args, to_toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_match_official_simpo_recipe_shape():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.train.batch_size == 128 and cfg.train.warmup_ratio == 0.1
    assert cfg.loss.name == "simpo" and cfg.loss.sft_weight == 0.0
    assert cfg.data.max_length == 2048 and cfg.data.max_prompt_length == 1800


def test_cli_overrides_file_overrides_defaults(tmp_path):
    path = write(tmp_path, "[loss]\nbeta = 10\ngamma_beta_ratio = 0.3\n[train]\nlr = 1e-6\n")
    cfg = parse_args(["--config", str(path), "--loss.beta=2.5", "--train.resume=true"])
    assert cfg.loss.beta == 2.5 and isinstance(cfg.loss.beta, float)  # CLI wins over file
    assert cfg.loss.gamma_beta_ratio == 0.3  # file wins over default
    assert cfg.train.lr == 1e-6 and cfg.train.resume is True
    assert cfg.train.batch_size == 128  # default
    assert parse_args([f"--config={path}"]).loss.beta == 10.0


@pytest.mark.parametrize(
    "text, value", [("true", True), ("False", False), ("1", True), ("off", False)]
)
def test_bool_spellings(text, value):
    assert load_config(None, [f"--train.resume={text}"]).train.resume is value


def test_round_trip_through_toml(tmp_path):
    cfg = load_config(None, ["--data.train=a b.jsonl", "--train.max_steps=7", "--loss.name=dpo"])
    path = write(tmp_path, to_toml(cfg))
    assert load_config(path) == cfg


def test_unknown_key_in_file_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1e-6\nprecison = 'fp32'\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert f"{path}:3" in msg and "train.precison" in msg and "Did you mean 'precision'" in msg
    assert "batch_size" in msg  # lists the valid keys


def test_unknown_section(tmp_path):
    path = write(tmp_path, "[trian]\nlr = 1e-6\n")
    with pytest.raises(ConfigError, match=r"run.toml:1: unknown section 'trian'.*'train'"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown section 'los'.*Did you mean 'loss'"):
        load_config(None, ["--los.beta=1"])


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match=r"train.max_steps = 1.5 has type float, expected int"):
        load_config(None, ["--train.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"train.resume = 'maybe'.*expected bool"):
        load_config(None, ["--train.resume=maybe"])
    with pytest.raises(ConfigError, match=r"loss.beta='high': expected float"):
        load_config(None, ["--loss.beta=high"])


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, "[train]\nbatch_size = 'big'\n")
    with pytest.raises(ConfigError, match=r"run.toml:2: train.batch_size='big': expected int"):
        load_config(path)
    path = write(tmp_path, "[train]\nresume = 1\n")
    with pytest.raises(ConfigError, match=r"train.resume = 1 has type int, expected bool"):
        load_config(path)


def test_choices_are_checked_with_suggestion():
    with pytest.raises(ConfigError, match=r"train.precision = 'bf16'.*bf16-mixed.*Did you mean"):
        load_config(None, ["--train.precision=bf16"])
    with pytest.raises(ConfigError, match=r"data.packing = 'shared'"):
        load_config(None, ["--data.packing=shared"])


def test_malformed_arguments_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["loss.beta=1"])
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["--loss.beta"])
    with pytest.raises(ConfigError, match="must be section.key"):
        load_config(None, ["--beta=1"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[train\nlr = 1"))
    with pytest.raises(ConfigError, match="must be a \\[section\\] table"):
        load_config(write(tmp_path, "lr = 1\n"))
    with pytest.raises(ConfigError, match="--config needs a file"):
        parse_args(["--config"])


def test_help_lists_every_key_with_help():
    text = help_text()
    for section, sub in vars(Config()).items():
        for key in vars(sub):
            assert f"{section}.{key} " in text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--loss.beta=0", r"command line: loss.beta = 0.0: expected > 0"),
        ("--loss.beta=-2", r"loss.beta = -2.0: expected > 0"),
        ("--train.lr=-1", r"train.lr = -1.0: expected > 0"),
        ("--train.log_every=0", r"train.log_every = 0: expected >= 1"),
        ("--train.warmup_ratio=1.5", r"train.warmup_ratio = 1.5: expected 0 <= x < 1"),
        ("--data.max_prompt_length=4096", r"max_prompt_length = 4096: expected < data.max_len"),
        ("--data.max_tokens=0", r"data.max_tokens = 0: expected >= 2"),
    ],
)
def test_values_that_make_a_run_meaningless_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_range_errors_name_the_file_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nseed = 1\nlr = 0.0\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: train.lr = 0.0: expected > 0"):
        load_config(path)
    load_config(None, ["--loss.name=sft", "--loss.beta=0"])  # SFT has no β: accepted


def test_choices_come_from_the_modules_that_implement_them():
    from simpo.attention import BACKENDS
    from simpo.packing import PACKINGS
    from simpo.templates import TEMPLATES

    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(Config().data)}
    assert choices["packing"] == PACKINGS and set(TEMPLATES) < set(choices["template"])
    model_choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(Config().model)}
    assert model_choices["attention"] == BACKENDS
    assert "[eval]" not in help_text()  # eval.py's flags are its own


def test_report_to_is_a_list_from_toml_or_the_command_line(tmp_path):
    assert load_config().train.report_to == ["jsonl"]
    assert Config().train.report_to is not Config().train.report_to  # no shared default list
    path = write(tmp_path, '[train]\nreport_to = ["jsonl", "tensorboard"]\n')
    assert load_config(path).train.report_to == ["jsonl", "tensorboard"]
    cli = load_config(path, ["--train.report_to=wandb, jsonl"]).train.report_to
    assert cli == ["wandb", "jsonl"]  # CLI wins; spaces around commas are dropped
    assert load_config(None, ['--train.report_to=["wandb"]']).train.report_to == ["wandb"]
    assert load_config(None, ["--train.report_to="]).train.report_to == []  # nothing at all
    assert load_config(write(tmp_path, '[train]\nreport_to = "wandb"\n')).train.report_to == [
        "wandb"
    ]  # a single string in TOML, as TRL's report_to="wandb"


def test_report_to_round_trips_and_is_listed_in_help(tmp_path):
    cfg = load_config(None, ["--train.report_to=tensorboard,wandb"])
    text = to_toml(cfg)
    assert 'report_to = ["tensorboard", "wandb"]' in text
    assert load_config(write(tmp_path, text)) == cfg
    assert "train.report_to = ['jsonl']" in help_text()


def test_report_to_errors_name_the_source_and_the_valid_values(tmp_path):
    expected = (
        r"command line: train.report_to = \['wandb', 'tensorbord'\]: "
        r"valid: jsonl, wandb, tensorboard. Did you mean 'tensorboard'"
    )
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["--train.report_to=wandb,tensorbord"])
    path = write(tmp_path, "[train]\nreport_to = [1, 2]\n")
    with pytest.raises(
        ConfigError, match=rf"{path}:2: train.report_to = \[1, 2\]: expected a list"
    ):
        load_config(path)
    with pytest.raises(ConfigError, match="names a value twice"):
        load_config(None, ["--train.report_to=jsonl,jsonl"])
    with pytest.raises(ConfigError, match="expected a list of non-empty strings"):
        load_config(None, ["--train.report_to=jsonl,,wandb"])
    with pytest.raises(ConfigError, match=r"expected a list of strings, e.g. a,b"):
        load_config(None, ['--train.report_to=["jsonl"'])
