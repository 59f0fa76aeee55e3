"""The typed config (mona_ray/config): real Hydra composition of the four entry points'
trees through load_config and through the real CLIs (``--cfg job`` prints the resolved
config without running anything)."""

import os
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mona_ray.config import (CONF_DIR, ConfigError, EmbedConfig, EvalConfig, ModelConfig, PoolConfig, RenderConfig,
                             RunConfig, SaeConfig, SaeEvalConfig, TrainSaeConfig, load_config, to_typed, validate)
from mona_ray.config.renames import RENAMES
from mona_ray.config.schema import (AGGREGATES, MASS_RULES, REPRESENTATIONS, SCHEMAS, SELECT_METHODS, field_docs,
                                    schema_classes)

ROOT = Path(__file__).resolve().parents[1]
CONF = CONF_DIR
ENTRY = {"config": RunConfig, "eval/default": EvalConfig, "train_sae": TrainSaeConfig, "sae_eval": SaeEvalConfig}


def cli(module, *overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module, "--cfg", "job", *overrides], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.mark.parametrize("name", list(ENTRY))
def test_every_entry_point_composes_its_schema_defaults(name):
    """The schema's dataclasses are the one source of the defaults: a primary YAML file names its
    schema and Hydra's own settings, never a setting (a value there would shadow the class's)."""
    primary = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert set(primary) <= {"defaults", "hydra"}, (name, sorted(primary))
    assert SCHEMAS[name][0] in primary["defaults"]
    cfg = load_config([], name)
    assert OmegaConf.get_type(cfg) is ENTRY[name]
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(OmegaConf.structured(ENTRY[name]))


def test_each_entry_point_reads_its_own_hookpoint():
    """The pipeline selects at the middle block; the evaluation and the SAE tools default to the
    penultimate block (the shipped SAEs have both)."""
    assert load_config([]).sae.hookpoint == "layers.15"
    assert load_config([], "eval/default").sae.hookpoint == "layers.28"
    assert list(load_config([], "eval/default").mona.hookpoints) == ["layers.15", "layers.28"]
    assert list(load_config([], "train_sae").hookpoints) == ["layers.28"]
    e = load_config([], "sae_eval")
    assert e.sae.hookpoint == "layers.28" and list(e.hookpoints) == ["layers.28"]


def test_the_shipped_sae_alone_is_read_at_the_default_selectors_k(tmp_path):
    """sae.k's run default: 16 for the shipped SmolLM2 SAE (docs/evaluation.md, round 2), the SAE's
    own K for any other SAE (a folder or a hub id), an explicit sae.k always; the paper's experiment
    and the evaluation read the SAE's own K. The rest of the default selector with it."""
    from mona_ray.config import asset_path

    d = load_config([])
    assert (d.sae.k, d.select.aggregate, d.select.min_silhouette, d.select.prototype_mass) == (16, "clusters", 0.5, 1.0)
    assert load_config([f"sae.path={asset_path('sae/smollm2-135m-instruct')}"]).sae.k == 16
    (tmp_path / "sae").mkdir()
    assert load_config([f"sae.path={tmp_path / 'sae'}"]).sae.k is None
    assert load_config(["sae.path=EleutherAI/sae-llama-3-8b-32x"]).sae.k is None
    assert load_config([f"sae.path={tmp_path / 'sae'}", "sae.k=32"]).sae.k == 32
    assert load_config(["sae.k=null"]).sae.k is None
    assert load_config(["+experiment=mona_paper"]).sae.k is None
    assert load_config(["+experiment=openhermes_llama3"]).sae.k == 192
    assert load_config([], "eval/default").sae.k is None


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _schema_has(cls, key: str) -> bool:
    """``key`` (dotted) is a setting of ``cls``, or lies under one that takes any keys (a dict)."""
    for part in key.split("."):
        by_name = {f.name: f for f in fields(cls)}
        if part not in by_name:
            return False
        cls = by_name[part].type
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return True
    return True


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")) + sorted((CONF / "sae_train").glob("*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_names_existing_settings_and_each_takes_effect(path):
    """An experiment or preset only overrides settings the schema has, and every value it sets is
    the one the entry point composes with it."""
    name, override = ("config", f"+experiment={path.stem}") if path.parent.name == "experiment" else \
        ("train_sae", f"sae_train={path.stem}")
    doc = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items() if k != "defaults"}
    cfg = OmegaConf.to_container(load_config([override], name))
    for key, value in _leaves(doc):
        assert _schema_has(ENTRY[name], key), (path.name, key)
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, (path.name, key, node, value)


@pytest.mark.parametrize("name", list(ENTRY))
def test_every_setting_is_documented_where_it_is_defined(name):
    for cls in schema_classes(ENTRY[name]):
        docs = field_docs(cls)
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), cls.__name__
        assert [f.name for f in fields(cls) if not docs.get(f.name, "").strip()] == [], cls.__name__


@pytest.mark.parametrize("name", list(ENTRY))
def test_the_commented_reference_is_the_composed_config_with_every_doc(name, capsys):
    from mona_ray.config.__main__ import main

    assert main([name, "+experiment=mona_paper"] if name == "config" else [name]) == 0
    text = capsys.readouterr().out
    overrides = ["+experiment=mona_paper"] if name == "config" else []
    assert yaml.safe_load(text) == OmegaConf.to_container(load_config(overrides, name))
    for cls in schema_classes(ENTRY[name]):
        for doc in field_docs(cls).values():
            assert "# " + " ".join(doc.split()[:4]) in " ".join(text.split()), (cls.__name__, doc)
    assert main(["config", "select.ratio=2"]) == 2
    assert capsys.readouterr().err == "mona_ray: error: select.ratio=2.0: must be in (0, 1]\n"


def test_enumerations_are_the_schema_tuples():
    """An enumerated setting's allowed values (and its default, the first) come from one tuple."""
    assert load_config([]).embed.representation == REPRESENTATIONS[0]
    assert list(load_config([], "eval/default").mona.representations) == list(REPRESENTATIONS)
    _refused("config", "select.aggregate=mean", "select.aggregate='mean': use one of " + ", ".join(AGGREGATES))
    _refused("config", "select.mass_rule=x", "use one of " + ", ".join(MASS_RULES))
    _refused("eval/default", "selectors=[x]", "use one of " + ", ".join(SELECT_METHODS))


def test_shared_sections_are_one_class_across_entry_points():
    cfgs = {n: load_config([], n) for n in ENTRY}
    shared = {"model": ModelConfig, "render": RenderConfig, "sae": SaeConfig, "pool": PoolConfig,
              "embed": EmbedConfig}
    seen = {}
    for n, cfg in cfgs.items():
        for section, cls in shared.items():
            if section in cfg and not (n == "train_sae" and section == "sae"):  # there: the SAE being trained
                assert OmegaConf.get_type(cfg[section]) is cls, (n, section)
                seen.setdefault(section, set()).add(n)
    assert seen["model"] == seen["render"] == set(ENTRY)
    assert seen["sae"] == {"config", "eval/default", "sae_eval"} and seen["embed"] == {"config", "eval/default"}


def test_experiment_composes_and_to_typed_gives_dataclasses():
    cfg = load_config(["+experiment=openhermes_llama3"])
    assert cfg.render.mode == "plain" and cfg.sae.k == 192 and cfg.model.dtype == "bfloat16"
    typed = to_typed(cfg)
    assert isinstance(typed, RunConfig) and isinstance(typed.model, ModelConfig)
    assert typed.sae.hookpoint == "layers.30" and typed.embed.num_actors == "auto"
    assert typed.source.paths == ["/data/openhermes-2.5"]
    assert isinstance(to_typed(load_config(["sae_train=smollm2"], "train_sae")), TrainSaeConfig)


def test_sae_tools_use_the_shared_spellings():
    t = load_config(["sae_train=smollm2", "model.dtype=float32", "render.max_length=64"], "train_sae")
    assert (t.model.path, t.model.dtype, t.render.max_length, t.torch_threads) == \
        ("embedded:smollm2-135m-instruct", "float32", 64, 1)
    assert list(t.hookpoints) == ["layers.15", "layers.28"] and t.sae.k == 64
    e = load_config(["sae.path=/s", "sae.hookpoint=layers.15"], "sae_eval")
    assert list(e.hookpoints) == ["layers.15"] and e.model.dtype == "bfloat16"  # hookpoints default: sae.hookpoint


@pytest.mark.parametrize("name, override, words", [
    ("config", "embed.tokn_budget=5", ["embed.tokn_budget", "embed.token_budget"]),
    ("config", "+embed.tokn_budget=5", ["embed.tokn_budget", "embed.token_budget"]),  # `+` skips Hydra's check
    ("config", "selct.ratio=0.1", ["selct", "select"]),
    ("eval/default", "mona.kss=[4]", ["mona.kss", "mona.ks"]),
    ("train_sae", "train.stepz=4", ["train.stepz", "train.steps"]),
    ("sae_eval", "data.splitt=train", ["data.splitt"]),
])
def test_unknown_key_is_refused_naming_it(name, override, words):
    with pytest.raises(ConfigError) as e:
        load_config([override], name)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, key", [
    ("embed.token_budget=many", "embed.token_budget"), ("run.overwrite=maybe", "run.overwrite"),
    ("embed.num_actors=2.5", "embed.num_actors"), ("source.paths={a: 1}", "source.paths"),
    ("model=/models/llama", "model"),
])
def test_wrong_type_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config([override])


@pytest.mark.parametrize("name, override, message", [
    ("config", "model.dtype=bf16", "model.dtype='bf16': use one of auto, bfloat16, float16, float32"),
    ("config", "render.mode=chat", "render.mode='chat': use one of chat_template, plain"),
    ("config", "pool.method=max", "pool.method='max': use one of mean, sum"),
    ("config", "pool.exclude=all", "pool.exclude='all': use one of special, none, template"),
    ("config", "embed.representation=sparse", "embed.representation='sparse': use one of sae, mlp_gate, hidden"),
    ("config", "select.similarity=dot", "select.similarity='dot': use one of jaccard, cosine, euclidean"),
    ("config", "select.ratio=0", "select.ratio=0.0: must be in (0, 1]"),
    ("config", "select.ratio=1.5", "select.ratio=1.5: must be in (0, 1]"),
    ("config", "select.count=-3", "select.count=-3: use a positive integer"),
    ("config", "embed.token_budget=0", "embed.token_budget=0: use a positive integer"),
    ("config", "embed.num_actors=many", "embed.num_actors='many': use auto or a positive integer"),
    ("eval/default", "mona.similarities=[jaccard,dot]", "mona.similarities=['jaccard','dot']: use one of"),
    ("eval/default", "k=[10,'x%']", "k=[10,'x%']: use a positive integer or a share like 5%"),
    ("train_sae", "save_dtype=int8", "save_dtype='int8': use one of bfloat16, float16, float32"),
    ("sae_eval", "data.split=test", "data.split='test': use one of heldout, train"),
])
def test_value_rules_name_the_key_and_the_allowed_values(name, override, message):
    _refused(name, override, message)


def _refused(name, override, message):
    with pytest.raises(ConfigError) as e:
        load_config([override], name)
    assert message in str(e.value)


def test_null_ratio_and_count_is_refused():
    with pytest.raises(ConfigError, match="select.ratio and select.count"):
        load_config(["select.ratio=null"])
    assert load_config(["select.ratio=null", "select.count=7"]).select.count == 7


@pytest.mark.parametrize("name, override, message", [
    ("eval/default", "threads=1", "`threads` is now `embed.torch_threads`: use embed.torch_threads=1"),
    ("eval/default", "embed.chunk_rows=32", "`embed.chunk_rows` is now `embed.rows_per_unit`"),
    ("eval/default", "embed.keep_residuals=false", "`embed.keep_residuals` was removed"),
    ("config", "model_dtype=float32", "`model_dtype` is now `model.dtype`"),
    ("config", "max_length=64", "`max_length` is now `render.max_length`"),
    ("config", "threads=2", "`threads` is now `embed.torch_threads`"),
    ("config", "+threads=2", "`threads` is now `embed.torch_threads`"),  # caught by validate, not by Hydra
    ("train_sae", "sae_train.model=/m", "`sae_train.model` is now `model.path`: use model.path=/m"),
    ("train_sae", "sae_train.data.path=/d", "`sae_train.data.path` is now `data.path`"),
    ("train_sae", "sae_train.train.threads=1", "`sae_train.train.threads` is now `torch_threads`"),
    ("train_sae", "model_dtype=float32", "`model_dtype` is now `model.dtype`"),
    ("sae_eval", "model=/m", "`model` is now `model.path`"),
    ("sae_eval", "sae.hookpoints=[layers.1]", "`sae.hookpoints` is now `hookpoints`"),
    ("sae_eval", "threads=1", "`threads` is now `torch_threads`"),
])
def test_old_spelling_names_the_new_key(name, override, message):
    _refused(name, override, message)


def test_every_rename_target_exists():
    """The table points at real settings (a moved key must not point at another typo)."""
    from mona_ray.config.renames import COMMON

    for name, table in RENAMES.items():
        cfg = OmegaConf.to_container(OmegaConf.structured(ENTRY[name]))

        def has(key):
            node = cfg
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    return False
                node = node[part]
            return True

        for old, new in {**COMMON, **table}.items():
            if new.startswith("-") or "*" in new:
                continue
            assert has(new), (name, old, new)
            # the old key is gone, or is now the section holding the new one (model -> model.path)
            assert not has(old) or new.startswith(old + "."), (name, old)


def test_validate_checks_a_config_changed_after_composition():
    cfg = load_config([])
    cfg.model.dtype = "fp8"
    with pytest.raises(ConfigError, match="model.dtype='fp8'"):
        validate(cfg)
    assert {f.name for f in fields(RunConfig)} == {"run", "source", "target", "model", "sae", "render", "pool",
                                                   "embed", "select", "report", "ray"}


# ----------------------------------------------------------------------------- the real CLIs


@pytest.mark.parametrize("module", ["mona_ray.run", "mona_ray.evaluate", "mona_ray.train_sae", "mona_ray.eval_sae"])
def test_every_cli_composes_its_default_config(module):
    r = cli(module)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = OmegaConf.create(r.stdout)
    assert cfg.model.path == "embedded:smollm2-135m-instruct" and cfg.render.max_length == 512


def test_cli_prints_the_resolved_config():
    r = cli("mona_ray.run", "+experiment=openhermes_llama3", "embed.torch_threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = OmegaConf.create(r.stdout)
    assert cfg.model.path == "/models/Meta-Llama-3-8B" and cfg.embed.torch_threads == 1
    assert cfg.sae.hookpoint == "layers.30" and cfg.render.mode == "plain"


@pytest.mark.parametrize("module, override, words", [
    ("mona_ray.run", "embed.tokn_budget=5", ["tokn_budget", "embed.token_budget"]),
    ("mona_ray.run", "pool.method=max", ["pool.method", "mean, sum"]),
    ("mona_ray.run", "embed.token_budget=lots", ["embed.token_budget"]),
    ("mona_ray.train_sae", "sae_train.model=/m", ["`sae_train.model` is now `model.path`"]),
    ("mona_ray.eval_sae", "max_length=64", ["`max_length` is now `render.max_length`"]),
])
def test_cli_reports_a_bad_override_in_one_line(module, override, words):
    r = cli(module, override)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stdout == "" and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("mona_ray: error: ")
    for w in words:
        assert w in line
