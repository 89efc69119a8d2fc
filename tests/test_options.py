"""Config dataclasses as the one source of the binaries' flags (finextract_jax/options.py, experiments/_app.py)."""
import dataclasses

import pytest
from absl import flags

from experiments import _app
from finextract_jax import guidance, options
from finextract_jax.audit import Settings as AuditSettings
from finextract_jax.caption import CaptionConfig
from finextract_jax.cluster import ClusterConfig
from finextract_jax.errors import InputError
from finextract_jax.features import EXTRACTORS, FeatureConfig
from finextract_jax.finetune import FinetuneConfig
from finextract_jax.metrics import ScoreConfig
from finextract_jax.reproduce import Settings as ReproduceSettings
from finextract_jax.sampling.run import ExtractConfig
from finextract_jax.sampling.schedulers import SAMPLERS

JOBS = (ExtractConfig, FinetuneConfig, CaptionConfig, ClusterConfig, FeatureConfig, ScoreConfig, AuditSettings,
        ReproduceSettings)


def _parsed(config_cls, argv, **kwargs):
    values = flags.FlagValues()
    _app.define_flags(config_cls, flag_values=values, **kwargs)
    values(["prog", *argv])
    return values


@pytest.mark.parametrize("config_cls", JOBS, ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_every_setting_is_documented_and_flags_round_trip(config_cls):
    fields = [f for f in dataclasses.fields(config_cls) if options.is_flag(f)]
    assert fields and all(options.help_of(f) for f in fields), config_cls
    required = {f.name: "x" for f in fields if f.default is dataclasses.MISSING}
    required = {name: ("3" if name == "num_train" else value) for name, value in required.items()}
    values = _parsed(config_cls, [f"--{k}={v}" for k, v in required.items()])
    extra = {"datasets": ()} if config_cls is ReproduceSettings else {}
    built = _app.config_from_flags(config_cls, flag_values=values, **extra)
    given = {k: int(v) if k == "num_train" else v for k, v in required.items()}
    assert built == config_cls(**given, **extra)  # the flags' defaults are the dataclass's


def test_choices_come_from_the_registries():
    fields = {f.name: f for f in dataclasses.fields(ExtractConfig)}
    assert options.choices_of(fields["method"]) == guidance.METHODS
    assert options.choices_of(fields["sampler"]) == SAMPLERS
    audit = {f.name: f for f in dataclasses.fields(AuditSettings)}
    assert options.choices_of(audit["features"]) == tuple(EXTRACTORS)
    assert options.help_of(audit["sampler"]) == options.help_of(fields["sampler"])  # same_as keeps the help
    assert audit["features"].default == "sscd_onnx"  # ... and may change the default
    values = _parsed(ExtractConfig, ["--pretrained=p", "--finetuned=f"])
    assert values["method"].parser.enum_values == list(guidance.METHODS)


def test_bad_values_are_refused_naming_the_flag():
    with pytest.raises(flags.IllegalFlagValueError):
        _parsed(ExtractConfig, ["--pretrained=p", "--finetuned=f", "--sampler=euler"])
    with pytest.raises(InputError, match="--method='nope' is not one of finextract"):
        ExtractConfig(pretrained="p", finetuned="f", method="nope")
    with pytest.raises(InputError, match="--finetunes='full'"):
        ReproduceSettings(pretrained="p", workdir="w", datasets=(), finetunes=("lora", "full"))
    values = _parsed(CaptionConfig, ["--timesteps=300,x"])
    with pytest.raises(InputError, match="--timesteps takes int values"):
        _app.config_from_flags(CaptionConfig, flag_values=values)
    assert _app.config_from_flags(CaptionConfig, flag_values=_parsed(CaptionConfig, ["--timesteps=100,200"])
                                  ).timesteps == (100, 200)


def test_only_skip_and_overrides():
    values = _parsed(FeatureConfig, ["--features=pixel"], only=("features",), defaults={"features": "sscd"},
                     helps={"features": "Scoring features."})
    assert set(values) == {"features"} and values["features"].help.endswith(": Scoring features.")
    assert _app.config_from_flags(FeatureConfig, flag_values=values).features == "pixel"
    library_only = {f.name for f in dataclasses.fields(FinetuneConfig) if not options.is_flag(f)}
    assert {"attention", "adam_beta1"} <= library_only
    assert not library_only & set(_parsed(FinetuneConfig, []))


def test_empty_path_flags_are_refused(capsys):
    values = flags.FlagValues()
    flags.DEFINE_string("workdir", None, "out", flag_values=values)
    flags.DEFINE_string("prompt", "", "caption", flag_values=values)
    values(["prog", "--prompt="])
    _app.check_no_empty_paths(values)  # an empty caption is a value
    values(["prog", "--workdir="])
    with pytest.raises(SystemExit) as exit_:
        _app.check_no_empty_paths(values)
    assert exit_.value.code == 2 and "--workdir is empty" in capsys.readouterr().err
