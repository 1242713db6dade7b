"""params.yaml -> typed configs: the presets load, and every bad input is an error naming file and key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from maptr import config
from maptr.config import ModelConfig, PackConfig, ParamsError, SynthConfig, load_model_config, load_params, load_section

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(data)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load_every_section():
    params = load_params(REPO / "params.yaml")
    for name in ("synth", "pack", "model", "float", "sensitivity", "calibrate", "qat", "export", "compile", "validate"):
        assert name in params, f"params.yaml lacks section {name}"
    synth = load_section(params, "synth", SynthConfig)
    assert synth.version == "v1.0-trainval" and synth.val_scenes * synth.samples_per_scene >= 200
    pack = load_section(params, "pack", PackConfig)
    assert pack.pc_range == [-15.0, -30.0, -2.0, 15.0, 30.0, 2.0]


@pytest.mark.parametrize("preset", ["nano", "tiny", "r50"])
def test_presets_build_typed_model_config(tmp_path, preset):
    path = write_params(tmp_path, lambda d: d["model"].update(preset=preset))
    cfg = load_model_config(load_params(path))
    assert isinstance(cfg, ModelConfig) and cfg.preset == preset
    assert cfg.num_classes == 3 and cfg.pc_range[3] == 15.0
    assert cfg.criterion.cls_weight == 2.0 and cfg.criterion.pts_weight == 5.0
    if preset == "r50":  # the guide's configuration
        assert (cfg.backbone, cfg.embed_dims, cfg.decoder_layers, cfg.num_vec_one2many, cfg.k_one2many) == (
            "resnet50",
            256,
            6,
            300,
            6,
        )
        assert cfg.image_size == [800, 480] and (cfg.bev_h, cfg.bev_w) == (200, 100)
    if preset == "nano":  # tiny without one2many, layer3 and half the points; one more decoder layer, which
        # samples 8 BEV points per point query instead of 4
        assert (cfg.num_vec_one2many, cfg.k_one2many, cfg.num_pts_per_vec, cfg.backbone_max_stride) == (0, 0, 10, 8)
        assert (cfg.decoder_layers, cfg.decoder_points) == (3, 8)


def test_feature_stride_must_be_a_resnet_stage_stride(tmp_path):
    path = write_params(tmp_path, lambda d: d["model"]["presets"]["nano"].update(feature_stride=2))
    with pytest.raises(ParamsError, match=r"model.presets.nano.feature_stride: must be 4, 8, 16 or 32, got 2"):
        load_model_config(load_params(path))


def test_unknown_preset_names_choices(tmp_path):
    path = write_params(tmp_path, lambda d: d["model"].update(preset="r101"))
    with pytest.raises(ParamsError, match=r"params.yaml: model.preset: unknown preset 'r101'.*r50.*tiny"):
        load_model_config(load_params(path))


def test_wrong_type_names_file_and_key(tmp_path):
    path = write_params(tmp_path, lambda d: d["model"]["presets"]["tiny"].update(bev_h="fifty"))
    with pytest.raises(ParamsError, match=r"model.presets.tiny.bev_h: expected an integer, got 'fifty'"):
        load_model_config(load_params(path))
    path = write_params(tmp_path, lambda d: d["synth"].update(seed=1.5))
    with pytest.raises(ParamsError, match=r"synth.seed: expected an integer"):
        load_section(load_params(path), "synth", SynthConfig)


def test_unknown_key_is_an_error_not_ignored(tmp_path):
    path = write_params(tmp_path, lambda d: d["pack"].update(pc_rang=[0]))
    with pytest.raises(ParamsError, match=r"pack: unknown key\(s\) \['pc_rang'\]"):
        load_section(load_params(path), "pack", PackConfig)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_invalid_image_size_rejected(tmp_path):
    path = write_params(tmp_path, lambda d: d["model"]["presets"]["tiny"].update(image_size=[350, 128]))
    with pytest.raises(ParamsError, match="multiples of 32"):
        load_model_config(load_params(path))


def test_errors_in_presets_not_selected_are_caught_at_load(tmp_path):
    # nano is the default: a broken tiny must fail now, naming tiny, not when tiny is chosen later
    path = write_params(tmp_path, lambda d: d["model"]["presets"]["tiny"].update(num_heads=5))
    assert load_params(path)["model"]["preset"] == "nano"
    with pytest.raises(ParamsError, match=r"model.presets.tiny: embed_dims 64 must be divisible by num_heads 5"):
        load_model_config(load_params(path))


def test_one2many_queries_and_k_go_together(tmp_path):
    path = write_params(tmp_path, lambda d: d["model"]["presets"]["nano"].update(k_one2many=3))
    with pytest.raises(ParamsError, match=r"model.presets.nano: num_vec_one2many \(0\) and k_one2many \(3\)"):
        load_model_config(load_params(path))


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("float", "epochs", -1, "float.epochs: must be >= 1, got -1"),
    ("float", "lr", 0.0, "float.lr: must be > 0, got 0.0"),
    ("float", "min_lr_ratio", 1.5, "float.min_lr_ratio: must be in [0, 1], got 1.5"),
    ("qat", "batch_size", 0, "qat.batch_size: must be >= 1, got 0"),
    ("synth", "jpeg_quality", 101, "synth.jpeg_quality: must be in [1, 100], got 101"),
    ("calibrate", "observer", "max", "calibrate.observer: must be one of mse, percentile, minmax, got 'max'"),
    ("compile", "thread_sweep", [1, 0], "compile.thread_sweep: each item must be >= 1, got [1, 0]"),
    ("export", "opset", 17, "export.opset: must be >= 21, got 17"),
])  # fmt: skip
def test_out_of_range_value_names_file_key_range_and_value(tmp_path, section, key, value, message):
    from maptr.config import CalibrateConfig, CompileConfig, ExportConfig, QATConfig, TrainConfig

    classes = {"float": TrainConfig, "qat": QATConfig, "synth": SynthConfig, "calibrate": CalibrateConfig,
               "compile": CompileConfig, "export": ExportConfig}  # fmt: skip
    path = write_params(tmp_path, lambda d: d[section].update({key: value}))
    with pytest.raises(ParamsError) as info:
        load_section(load_params(path), section, classes[section])
    assert str(info.value) == f"{path}: {message}"


def test_out_of_range_model_and_criterion_values_are_errors(tmp_path):
    path = write_params(tmp_path, lambda d: d["model"]["presets"]["tiny"].update(num_heads=0))
    with pytest.raises(ParamsError, match=r"model.presets.tiny.num_heads: must be >= 1, got 0"):
        load_model_config(load_params(path))
    path = write_params(tmp_path, lambda d: d["model"]["criterion"].update(focal_alpha=2.0))
    with pytest.raises(ParamsError, match=r"model.criterion.focal_alpha: must be in \[0, 1\], got 2.0"):
        load_model_config(load_params(path))
    path = write_params(tmp_path, lambda d: d["model"]["criterion"].update(class_weights=[1.0, 2.0]))
    with pytest.raises(ParamsError, match=r"class_weights: one weight per class \['divider', 'ped_crossing', 'bo"):
        load_model_config(load_params(path))
    path = write_params(tmp_path, lambda d: d["model"]["criterion"].update(class_weights=[1.0, 0.0, 1.0]))
    with pytest.raises(ParamsError, match=r"model.criterion.class_weights: each item must be > 0, got"):
        load_model_config(load_params(path))


def test_missing_section_names_it(tmp_path):
    path = write_params(tmp_path, lambda d: d.pop("pack"))
    with pytest.raises(ParamsError, match=r"params.yaml: pack: section missing \(add a `pack:` section"):
        load_section(load_params(path), "pack", PackConfig)


def test_no_section_class_has_a_default_so_params_yaml_is_the_one_source():
    """A default in the code would be a second value of the knob (they had drifted: lr 6e-4 vs 1e-3,
    the abandoned 352x128 image size, preset tiny); every value comes from params.yaml."""
    classes = [config.SynthConfig, config.PackConfig, config.TrainConfig, config.QATConfig, config.SensitivityConfig,
               config.CalibrateConfig, config.ExportConfig, config.CompileConfig, config.ValidateConfig,
               config.CriterionConfig, config.ModelConfig]  # fmt: skip
    with_default = [
        f"{cls.__name__}.{f.name}"
        for cls in classes
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []
    with pytest.raises(TypeError):
        config.TrainConfig()


def test_every_pack_key_is_read_by_the_packer():
    """pack.classes (could only equal the fixed list) and pack.sample_dist (read by nothing) are gone; a
    params file that still sets them is told so."""
    params = load_params(REPO / "params.yaml")
    assert sorted(params["pack"]) == ["dataroot", "pc_range", "version"]
    params["pack"]["sample_dist"] = 1.0
    with pytest.raises(ParamsError, match=r"pack: unknown key\(s\) \['sample_dist'\]"):
        load_section(params, "pack", PackConfig)


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_bf16_takes_true_false_or_auto(tmp_path, value):
    path = write_params(tmp_path, lambda d: d["float"].update(bf16=value))
    assert load_section(load_params(path), "float", config.TrainConfig).bf16 == value


def test_bf16_other_words_are_refused_with_the_choices(tmp_path):
    path = write_params(tmp_path, lambda d: d["float"].update(bf16="yes"))
    with pytest.raises(ParamsError, match=r"float.bf16: must be true, false or auto, got 'yes'"):
        load_section(load_params(path), "float", config.TrainConfig)
