"""The CLI stays thin, and options become one frozen config."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import COMMANDS, main
from pipelines.options import BuildConfig, CorpusOptions


def test_help_lists_every_command_without_importing_heavy_modules():
    code = "import sys; from pipelines.cli import main; main(['--help']); print(sorted(m for m in ('torch', 'open_clip', 'apache_beam', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")
    for name in COMMANDS:
        assert name in out


def test_unknown_command_fails():
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2


def test_options_become_a_frozen_config_and_pass_beam_flags_through():
    options = PipelineOptions(
        ["--input", "a/*.tar", "--input", "b.parquet", "--output", "o", "--seed", "7", "--runner", "DirectRunner"]
    )
    cfg = BuildConfig.from_options(options.view_as(CorpusOptions))
    assert cfg.input == ("a/*.tar", "b.parquet") and cfg.output == "o" and cfg.seed == 7
    assert options.get_all_options()["runner"] == "DirectRunner"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_every_config_field_has_a_flag():
    options = PipelineOptions(["--input", "x", "--output", "o"]).view_as(CorpusOptions).get_all_options()
    missing = [f.name for f in dataclasses.fields(BuildConfig) if f.name not in options]
    assert missing == []


def test_config_defaults_match_flag_defaults():
    cfg = BuildConfig.from_options(PipelineOptions(["--input", "x", "--output", "o"]).view_as(CorpusOptions))
    defaults = BuildConfig(input=("x",), output="o")
    assert cfg == defaults


def test_missing_input_or_output_is_a_clear_error_and_other_pipelines_still_parse():
    with pytest.raises(SystemExit, match="--input and --output required"):
        BuildConfig.from_options(PipelineOptions([]).view_as(CorpusOptions))
    assert PipelineOptions([]).get_all_options()["input"] is None  # any pipeline parses every options class


@pytest.mark.parametrize(
    "flags",
    [["--neighbour_input", "a/*.tar"], ["--extend_memory_bank"], ["--extend_memory_bank", "--neighbour_input=x"]],
)
def test_bank_flags_without_a_bank_are_an_error_not_ignored(flags):
    base = ["--input", "in/*.tar", "--output", "out"]
    with pytest.raises(SystemExit, match="need --memory_bank"):
        BuildConfig.from_options(PipelineOptions(base + flags))
    cfg = BuildConfig.from_options(PipelineOptions(base + flags + ["--memory_bank", "bank"]))
    assert cfg.memory_bank == "bank"


def test_build_help_lists_the_build_flags(capsys):
    from pipelines import build_corpus

    with pytest.raises(SystemExit) as e:
        build_corpus.run(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--input", "--output", "--clip_model", "--memory_bank", "--holdout_fraction", "--seq_len"):
        assert flag in out


def test_key_prefix_must_be_key_safe():
    base = ["--input", "in/*.tar", "--output", "out"]
    with pytest.raises(SystemExit, match="may only hold"):
        BuildConfig.from_options(PipelineOptions([*base, "--key_prefix", "../x"]))
    assert BuildConfig.from_options(PipelineOptions([*base, "--key_prefix", "laion-b_"])).key_prefix == "laion-b_"


def test_a_misspelt_flag_is_a_one_line_error_not_a_default():
    from pipelines.build_corpus import check_known_flags

    with pytest.raises(SystemExit) as exc:
        check_known_flags(["--input", "x", "--output", "y", "--image_codebok_size", "16"])
    msg = str(exc.value)
    assert "--image_codebok_size" in msg and "--image_codebook_size" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="--image_size"):
        check_known_flags(["--input", "x", "--output", "y", "--image_size", "big"])
    # The build's own flags and Beam's (runner, direct runner, portable runner) still pass.
    check_known_flags(
        ["--input", "x", "--output", "y", "--image_codebook_size=16", "--runner", "DirectRunner"]
        + ["--direct_running_mode=multi_processing", "--direct_num_workers", "2"]
        + ["--job_endpoint", "embed", "--environment_type", "LOOPBACK", "--experiments", "a,b"]
    )
