"""fmk's flags come from the config definitions: every one has help with its default (and choices), booleans are
switches (--x / --no-x) while every earlier spelling still parses, fmk finetune shows --from as required; the
config is nested per section, each validating itself."""
import argparse

import pytest

from fmkernels.cli import build_parser, main
from fmkernels.models.config import ConfigError
from fmkernels.train.config import SECTIONS, TrainConfig, field_help


def _sub(name):
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


@pytest.mark.parametrize("cmd", ["train", "finetune", "finetune-minilm", "merge", "prune", "quantize", "eval",
                                 "generate", "bench", "info"])
def test_every_flag_has_help_with_its_default(cmd):
    sub = _sub(cmd)
    text = sub.format_help()
    for a in sub._actions:
        if a.help == argparse.SUPPRESS or not a.option_strings or a.dest == "help":
            continue
        assert a.help, f"fmk {cmd} {a.option_strings[0]} has no help text"
        shown = sub._get_formatter()._expand_help(a)
        if a.required or a.help.startswith("required") or isinstance(a, (argparse._StoreTrueAction, argparse._StoreConstAction)):
            continue  # a required flag or a plain switch has no default to show
        assert "default" in shown, f"fmk {cmd} {a.option_strings[0]}: help does not give the default: {shown!r}"
    assert "usage" in text


def test_train_help_lists_choices_and_defaults():
    text = _sub("train").format_help()
    assert "--dtype {auto,bf16,fp32}" in text and "default: 'auto'" in text
    assert "--lora_base {dense,int8,int4}" in text
    assert "off: --no-resume" in text
    for name in TrainConfig.field_names():
        assert f"--{name}" in text, name
        assert field_help(name)["help"], f"{name} has no help text in its section"


def test_finetune_shows_from_as_required():
    usage = _sub("finetune").format_usage()
    assert "fmk finetune --from CHECKPOINT" in usage and "[--from" not in usage


@pytest.mark.parametrize("argv,want", [
    (["--resume"], True), (["--no-resume"], False), (["--no_resume"], False), (["--resume", "false"], False),
    (["--resume", "yes"], True), (["--resume=0"], False), (["--tie-embeddings", "off"], False),
    (["--tie_embeddings"], True), (["--no-tie-embeddings"], False),
])
def test_boolean_spellings(argv, want):
    args = _sub("train").parse_args(argv)
    name = "resume" if "resume" in argv[0] else "tie_embeddings"
    cfg = TrainConfig.build(None, {k: v for k, v in vars(args).items() if k in TrainConfig.field_names()})
    assert getattr(cfg, name) is want


def test_value_flags_keep_both_spellings():
    sub = _sub("train")
    assert sub.parse_args(["--max_steps", "5"]).max_steps == "5"
    assert sub.parse_args(["--max-steps", "5"]).max_steps == "5"
    assert _sub("finetune").parse_args(["--init_from", "x"]).init_from == "x"


def test_finetune_without_from_is_a_clean_error(capsys):
    assert main(["finetune", "--preset", "tiny"]) == 2
    assert "--from" in capsys.readouterr().err


def test_sections_nested_view_and_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("preset: tiny\nlora: {rank: 4, alpha: 8}\noptim: {lr: 0.001}\n")
    cfg = TrainConfig.build(str(y), {"max_steps": 3})
    assert cfg.lora_rank == 4 and cfg.lora_alpha == 8 and cfg.lr == 0.001
    sec = cfg.sections()
    assert set(sec) == set(SECTIONS) and sec["lora"].lora_rank == 4 and sec["optim"].max_steps == 3
    assert sorted(f for s in SECTIONS.values() for f in s.__dataclass_fields__) == sorted(TrainConfig.field_names())
    y.write_text("lora: {bogus: 1}\n")
    with pytest.raises(ConfigError, match="lora.bogus"):
        TrainConfig.build(str(y))


def test_each_section_validates_itself():
    with pytest.raises(ConfigError, match="lora_alpha"):
        SECTIONS["lora"](lora_rank=4, lora_alpha=0).validate()
    with pytest.raises(ConfigError, match="select_scorer"):
        SECTIONS["selection"](select_mode="offline").validate()
    with pytest.raises(ConfigError, match="sparsity"):
        TrainConfig.build(None, {"sparsity": "1:2"})
    SECTIONS["optim"]().validate()  # defaults are valid


def test_info_files_maps_ops_to_their_files(capsys):
    from fmkernels._info import CSRC, op_files

    d = op_files()
    assert set(d) >= {"rms_norm", "flash_attention", "sparse24_mm", "sparse24_values_grad", "int8_mm"}
    assert "fmkernels/triton/rms_norm.py" in d["rms_norm"]["triton"]
    assert d["rms_norm"]["autograd"] == ["fmkernels/ops/rms_norm.py"]
    assert "fmkernels/reference/sparse.py" in d["sparse24_values_grad"]["reference"]
    assert "fmkernels/triton/sparse24_mm.py" in d["sparse24_values_grad"]["triton"]
    assert "fmkernels/triton/int8_mm.py" in d["int8_mm"]["triton"]
    if CSRC.is_dir():  # a checkout: the C++ sources are found from the schemas the backends call
        assert "csrc/cpu/rms_norm.cpp" in d["rms_norm"]["cpu"]
        assert "csrc/cpu/sparse24_mm.cpp" in d["sparse24_values_grad"]["cpu"]
    for per in d.values():
        for files in per.values():
            for f in files:
                assert (CSRC.parent / f).exists(), f
    assert main(["info", "--files"]) == 0
    assert "sparse24_values_grad" in capsys.readouterr().out
