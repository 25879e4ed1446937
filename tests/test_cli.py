"""The au-detect command line, called as users call it (main(args) is the console script)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datamodules.io.manifest import ManifestError
from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "configs" / "demo.yaml"


@pytest.mark.slow
def test_synth_then_align(tmp_path, capsys):
    main(["synth", "--root", str(tmp_path / "s"), "--num_images", "30", "--seed", "2", "--workers", "1"])
    out = capsys.readouterr().out
    assert "SynthAU in" in out and "'train': 24" in out and "contact_sheet.png" in out
    assert (tmp_path / "s" / "contact_sheet.png").is_file()
    main(["align", "--manifests", f"[{tmp_path / 's' / 'val.tsv'}]", "--cache_dir", str(tmp_path / "c"),
          "--alignment.crop_size", "48"])
    out = capsys.readouterr().out
    assert "val.tsv: 3 images" in out and "faces found" in out and "aligned_sheet.png" in out
    (cache,) = (tmp_path / "c").iterdir()
    assert (cache / "crops.npy").is_file() and cache.name.startswith("val-")


def test_prepare_from_the_demo_config(tmp_path, capsys):
    main(["prepare", "--config", str(DEMO), "--data.data_root", str(tmp_path / "s"),
          "--data.synth.num_images", "30", "--data.cache_dir", str(tmp_path / "c"),
          "--data.alignment.crop_size", "48", "--data.num_workers", "0"])
    out = capsys.readouterr().out
    for split, n in (("train", 24), ("val", 3), ("test", 3)):
        assert f"{split}.tsv: {n} images" in out
    assert len(list((tmp_path / "c").iterdir())) == 3


def test_demo_config_prints(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--config", str(DEMO), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["balanced_sampling"] is True
    assert printed["data"]["alignment"]["crop_size"] == 96
    assert printed["data"]["aus"][:3] == [1, 2, 4]


def test_bad_manifest_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("image\tAU1\tAU2\nx.jpg\t0\t7\n")
    with pytest.raises(ManifestError, match=r"bad\.tsv:2: column 3 \(AU2\): value '7'"):
        main(["align", "--manifests", f"[{bad}]", "--aus", "[1, 2]", "--cache_dir", str(tmp_path / "c")])


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--num_imagez", "3"])
    assert exit_.value.code != 0
    assert "num_imagez" in capsys.readouterr().err


def test_download_command(synthau, image_server, tmp_path, capsys):
    lines = (synthau / "val.tsv").read_text().splitlines()
    manifest = tmp_path / "emotionet.tsv"
    manifest.write_text("\n".join([lines[0]] + [f"{image_server}/{r}" for r in lines[1:6]]
                                  + [f"{image_server}/missing.jpg" + lines[1][lines[1].index("\t"):]]) + "\n")
    main(["download", "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--settings.retries", "0",
          "--progress", "false"])
    out = capsys.readouterr().out
    assert "5 downloaded" in out and "http_404" in out and "emotionet.local.tsv" in out
    local = (tmp_path / "out" / "emotionet.local.tsv").read_text().splitlines()
    assert len(local) == 6 and all(row.startswith("images/") for row in local[1:])


@pytest.mark.parametrize("task,metric", [("pretrain-face", "val/verification_accuracy"),
                                         pytest.param("pretrain-expression", "val/f1_macro", marks=pytest.mark.slow)])
def test_pretraining_commands_write_a_loadable_backbone(synthau, aligned_train, tmp_path, capsys, task, metric):
    """au-detect pretrain-*: the demo config, a few steps, MLflow run with the backbone; the AU
    model's branch loads every tensor of it."""
    from mlflow import MlflowClient

    from lightning_modules.backbones import create_backbone

    name = "face" if task == "pretrain-face" else "expression"
    cfg = tmp_path / "mlflow.yaml"
    cfg.write_text(f"tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}\nexperiment_name: pretrain\n"
                   f"artifact_location: {tmp_path / 'artifacts'}\n")
    out = tmp_path / f"{name}.pt"
    main([task, "fit", "--config", str(DEMO.with_name(f"pretrain_{name}_demo.yaml")),
          "--data.data_root", str(synthau), "--data.cache_dir", str(aligned_train.path.parent),
          "--data.alignment.crop_size", "64", "--data.num_workers", "0", "--data.batch_size", "16",
          "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar",
          "false", "--trainer.default_root_dir", str(tmp_path / "runs"), "--export.path", str(out),
          "--mlflow", str(cfg)])
    assert f"Backbone saved to {out}" in capsys.readouterr().out
    _, report = create_backbone("resnet18", str(out))
    assert report.missing == [] and report.unexpected == [] and report.loaded > 100
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id])
    assert metric in run.data.metrics and run.data.params["model.backbone"] == "resnet18"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "backbone")] == [f"backbone/{name}.pt"]


def _printed_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


TRAINING_CONFIGS = sorted(p.name for p in DEMO.parent.glob("*.yaml")
                          if not p.name.startswith(("ablation", "pipeline", "sweep")) and p.name != "crossval_demo.yaml")


@pytest.mark.parametrize("config", TRAINING_CONFIGS)
def test_every_shipped_config_parses(config, capsys):
    """Configs are the documentation of what runs: each one parses with its command."""
    command = {"pretrain_face": ["pretrain-face", "fit"], "pretrain_expression": ["pretrain-expression", "fit"]}
    prefix = next((v for k, v in command.items() if config.startswith(k)), ["fit"])
    printed = _printed_config([*prefix, "--config", str(DEMO.parent / config)], capsys)
    assert printed["model"]["backbone"].startswith("resnet") and printed["trainer"]["max_epochs"] > 0


class _Parsed(Exception):
    """Raised by :func:`_parsed` once LightningCLI has parsed (and validated) its args."""


def _parsed(cli_class, *args, config: dict):
    """What a LightningCLI makes of a config given as a dict (as the ablation gives it), parsed
    and type-checked but nothing built: LightningCLI's own hook before instantiation stops it."""
    class ParseOnly(cli_class):
        def before_instantiate_classes(self) -> None:
            raise _Parsed(self.config[self.config.subcommand])

    with pytest.raises(_Parsed) as parsed:
        ParseOnly(*args, args={"fit": config})
    return parsed.value.args[0]


def test_pipeline_config_overrides_are_options_of_its_commands(monkeypatch):
    """The main job's config parses, its AU config names both branch checkpoints, and the
    pretraining configs accept its changes."""
    from experiments.lightning_cli import AUDetectCLI, PretrainCLI
    from experiments.pipeline import build_parser
    from experiments.stages import with_overrides

    monkeypatch.chdir(ROOT)
    cfg = build_parser().parse_path(str(DEMO.parent / "pipeline_demo.yaml"))
    fit = _parsed(AUDetectCLI, config=with_overrides(cfg.fit_config, cfg.fit_overrides or {}))
    assert fit.model.face_weights and fit.model.emotion_weights
    for task, config, key in (("pretrain-face", cfg.face_config, "face_weights"),
                              ("pretrain-expression", cfg.expression_config, "emotion_weights")):
        parsed = _parsed(PretrainCLI, task, config=with_overrides(config, {**cfg.pretrain_overrides,
                                                                          "export.path": fit.model[key]}))
        assert parsed.export.path == fit.model[key]
        assert parsed.data.alignment.crop_size == fit.data.alignment.crop_size  # one cache for both


@pytest.mark.slow
def test_ablation_config_overrides_are_options_of_its_commands(monkeypatch):
    """The ablation config parses, and every config it hands fit and pretraining (a dict: the
    config file with the row's changes) is accepted by them."""
    from experiments.ablation.run import build_parser
    from experiments.stages import with_overrides
    from experiments.ablation.rows import ROW_BY_KEY
    from experiments.lightning_cli import AUDetectCLI, PretrainCLI

    monkeypatch.chdir(ROOT)  # the config's paths are relative to the project root
    weights = {"face": "face.pt", "emotion": "emotion.pt"}
    for name in ("ablation_table1.yaml", "ablation_demo.yaml"):
        cfg = build_parser().parse_path(str(DEMO.parent / name))
        assert set(cfg.rows) <= set(ROW_BY_KEY), name
        for key, row in ROW_BY_KEY.items():
            config = with_overrides(cfg.fit_config, {**cfg.fit_overrides, **row.overrides(weights), "run_name": key})
            parsed = _parsed(AUDetectCLI, config=config)
            assert parsed.trainer.max_epochs == cfg.fit_overrides["trainer.max_epochs"], key
            assert parsed.data.alignment.method == row.crop and parsed.model.target_rate == row.target, key
            assert parsed.model.branches == list(row.branches) and parsed.run_name == key
            assert parsed.model.backbone == (row.backbone or "resnet18"), key
    for task, config in (("pretrain-face", cfg.face_config), ("pretrain-expression", cfg.expression_config)):
        parsed = _parsed(PretrainCLI, task, config=with_overrides(config, {**cfg.pretrain_overrides,
                                                                          "export.path": "b.pt"}))
        assert parsed.data.alignment.crop_size == cfg.pretrain_overrides["data.alignment.crop_size"]
        assert parsed.export.path == "b.pt"


def test_models_are_registered_under_mlflow_yaml_name_unless_the_config_names_one(synthau, tmp_path):
    from callbacks.mlflow_artifacts import MLflowArtifacts
    from experiments.lightning_cli import AUDetectCLI

    settings = tmp_path / "mlflow.yaml"
    settings.write_text(f"tracking_uri: sqlite:///{tmp_path}/m.db\nregistered_model_name: team-au\n")
    names = []
    for extra in ([], ["--mlflow_artifacts.registered_model_name", "mine"]):
        # the session's SynthAU as it was made: the priors linked into the model read its labels
        cli = AUDetectCLI(args=["--config", str(DEMO), "--data.data_root", str(synthau), "--data.synth.num_images",
                                "120", "--data.synth.seed", "3", "--mlflow", str(settings), "--trainer.logger=false",
                                "--model.face_weights=null", "--model.emotion_weights=null", *extra],
                          run=False)
        names += [c.registered_model_name for c in cli.trainer.callbacks if isinstance(c, MLflowArtifacts)]
    assert names == ["team-au", "mine"]
