"""The ``myvlm`` command: end to end in subprocesses on a tiny checkpoint, and its error paths in-process."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from myvlm.cli import main
from myvlm.demo import CONCEPT, write_toy_data

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "myvlm.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A data root in the reference layout: my_toy/ (6 drawings + captions.json), negatives/, test/."""
    root = tmp_path_factory.mktemp("world")
    write_toy_data(root / "data")
    return root


def train_args(world: Path, tiny: Path, *extra: str) -> list[str]:
    return ["train", "--concept", CONCEPT, "--data", str(world / "data"), "--backbone", "tiny",
            f"backbone.name_or_path={tiny}", "--head", "clip_probe_tiny", "--negatives",
            str(world / "data" / "negatives"), "--steps", "3", "-q", *extra]


@pytest.fixture(scope="module")
def trained(world, tiny_blip2_path) -> Path:
    """`myvlm train` run once in a subprocess; returns the working directory it ran in."""
    result = run_cli(*train_args(world, tiny_blip2_path), cwd=world)
    assert result.returncode == 0, result.stderr
    assert f"trained '{CONCEPT}' -> concepts/{CONCEPT}" in result.stdout
    return world


def test_train_writes_the_concept_its_config_and_a_run_folder(trained):
    concept = trained / "concepts" / CONCEPT
    assert sorted(p.name for p in concept.iterdir()) == [
        "concept.json", "config.yaml", "embedding.safetensors", "head.safetensors"]
    assert [p.name for p in (trained / "concepts").iterdir()] == [CONCEPT]  # no staging leftovers
    meta = json.loads((concept / "concept.json").read_text())
    assert meta["identifier"] == "sks" and meta["training"]["steps"] == 3 and meta["head"]["type"] == "clip_probe"
    (run,) = (trained / "outputs").glob("*/*-my_toy")
    assert {"config.yaml", "overrides.yaml", "train.log"} <= {p.name for p in run.iterdir()}
    assert (run / "config.yaml").read_text() == (concept / "config.yaml").read_text()
    assert f"run_dir: {run.relative_to(trained)}" in (run / "config.yaml").read_text()
    assert "train.steps=3" in (run / "overrides.yaml").read_text()
    assert "fitted clip_probe" in (run / "train.log").read_text()


def test_list_then_caption_json_detects_the_concept_only_where_it_is(trained):
    listing = run_cli("concepts", "list", cwd=trained)
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.strip().splitlines()
    assert header.split() == ["NAME", "IDENTIFIER", "KIND", "BACKBONE", "HEAD", "STEPS", "CREATED"]
    assert row.split()[:3] == [CONCEPT, "sks", "object"] and "clip_probe@0.5" in row and row.split()[5] == "3"

    training = sorted(str(p) for p in (trained / "data" / CONCEPT).glob("*.png"))
    different = str(trained / "data" / "test" / "empty_room.png")
    result = run_cli("caption", *training, different, "--json", "-q", cwd=trained)
    assert result.returncode == 0, result.stderr
    rows = {Path(r["image"]).name: r for r in json.loads(result.stdout)}
    assert len(rows) == len(training) + 1
    for name, row in rows.items():
        expected = name != "empty_room.png"
        assert row["detections"][CONCEPT]["fired"] is expected, (name, row)
        assert (row["active"] == [CONCEPT]) is expected and isinstance(row["text"], str)


def test_help_for_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "caption", "concepts", "demo"))
    for command in (["train"], ["caption"], ["concepts"], ["concepts", "list"], ["concepts", "remove"], ["demo"]):
        assert main([*command, "--help"]) == 0
        assert "usage: myvlm " + " ".join(command) in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert "backbone: blip2_flan_t5_xl, blip2_opt_2.7b, llava_1.5_7b" in capsys.readouterr().out  # config groups
    assert main(["--version"]) == 0
    if importlib.util.find_spec("myvlm.eval") is not None:  # `myvlm eval` is wired in when it is in the checkout
        assert main(["eval", "--help"]) == 0


@pytest.mark.parametrize("argv,named", [
    (["train", "--concept", "x", "--stepz", "3"], "'--stepz'"),
    (["caption", "a.png", "--jsn"], "'--jsn'"),
    (["concepts", "list", "extra"], "'extra'"),
    (["train", "--concept", "x", "train.stepz=3"], "'train.stepz'"),
    (["train", "--concept", "x", "backbone=gpt5"], "'gpt5'"),
    (["train", "--kind", "animal"], "'animal'"),
])
def test_wrong_flag_or_override_is_a_one_line_error_naming_it(argv, named, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and err.startswith("myvlm"), err


@pytest.mark.parametrize("name", ["my dog", "a/b", "../up"])
def test_bad_concept_names_are_refused_before_anything_is_written(name, world, tiny_blip2_path, tmp_path, capsys):
    code = main(train_args(world, tiny_blip2_path, "--output", str(tmp_path / "lib"), "--concept", name))
    assert code != 0 and "letters, digits" in capsys.readouterr().err
    assert not (tmp_path / "lib").exists()


def test_existing_concept_is_refused_unless_overwrite(trained, tiny_blip2_path, capsys, monkeypatch):
    monkeypatch.chdir(trained)
    before = (trained / "concepts" / CONCEPT / "embedding.safetensors").read_bytes()
    assert main(train_args(trained, tiny_blip2_path)) == 1
    assert "already holds a concept; pass --overwrite" in capsys.readouterr().err
    assert main(train_args(trained, tiny_blip2_path, "--overwrite", "--seed", "1")) == 0
    assert (trained / "concepts" / CONCEPT / "embedding.safetensors").read_bytes() != before
    assert [p.name for p in (trained / "concepts").iterdir()] == [CONCEPT]


def test_failed_training_leaves_no_concept_behind(world, tiny_blip2_path, tmp_path, monkeypatch, capsys):
    import myvlm.api

    def crash(images, name, output_dir=None, **kwargs):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "concept.json").write_text("{")  # half-written
        raise RuntimeError("out of memory")

    monkeypatch.setattr(myvlm.api, "personalize", crash)
    monkeypatch.chdir(tmp_path)
    assert main(train_args(world, tiny_blip2_path, "--output", "lib")) == 1
    assert capsys.readouterr().err.strip() == "myvlm: error: out of memory"
    assert not (tmp_path / "lib").exists()


@pytest.mark.parametrize("captions,message", [
    ('{"beach.png": ["my_toy on the beach"], "gone.png": ["my_toy"]}', "names 'gone.png', which is not in"),
    ('{"beach.png": ["my_toy on the beach"', "is not valid JSON"),
    ('{"beach.png": ["a red thing on the beach"]}', "no caption of beach.png names the concept"),
])
def test_bad_captions_json_is_a_clear_error(captions, message, world, tiny_blip2_path, tmp_path, capsys):
    data = tmp_path / "data" / CONCEPT
    shutil.copytree(world / "data" / CONCEPT, data)
    (data / "captions.json").write_text(captions)
    argv = train_args(world, tiny_blip2_path, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "lib"))
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "lib").exists()


def test_mirrored_captions_json_reaches_training_in_photo_order(world, tiny_blip2_path, tmp_path, monkeypatch):
    import myvlm.api

    data = tmp_path / "data" / CONCEPT
    shutil.copytree(world / "data" / CONCEPT, data)
    names = list(json.loads((data / "captions.json").read_text()))
    # one photo's mirror image is described, the others' are left out (they read the same both ways)
    (data / "mirrored_captions.json").write_text(json.dumps({names[1]: "my_toy seen in a mirror"}))
    seen = {}

    def capture(images, name, output_dir=None, **kwargs):
        seen.update(kwargs, images=images)
        raise RuntimeError("stop here")

    monkeypatch.setattr(myvlm.api, "personalize", capture)
    assert main(train_args(world, tiny_blip2_path, "--data", str(tmp_path / "data"), "--output",
                           str(tmp_path / "lib"))) == 1
    assert [Path(p).name for p in seen["images"]] == names
    assert seen["mirrored_captions"] == [[], ["my_toy seen in a mirror"]] + [[]] * (len(names) - 2)


@pytest.mark.parametrize("mirrored,captions_json,message", [
    ('{"gone.png": "my_toy"}', True, "names ['gone.png'], which are not among the training photos"),
    ('{"beach.png": ["a red thing in a mirror"]}', True, "no caption of beach.png (mirrored) names the concept"),
    ('{"beach.png": {"caption": "my_toy"}}', True, "the entry for 'beach.png' must be a caption or a list"),
    ('{"beach.png": "my_toy in a mirror"}', False, "mirrored_captions.json needs a captions.json beside it"),
])
def test_bad_mirrored_captions_json_is_a_clear_error(mirrored, captions_json, message, world, tiny_blip2_path,
                                                     tmp_path, capsys):
    data = tmp_path / "data" / CONCEPT
    shutil.copytree(world / "data" / CONCEPT, data)
    if not captions_json:
        (data / "captions.json").unlink()
    (data / "mirrored_captions.json").write_text(mirrored)
    argv = train_args(world, tiny_blip2_path, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "lib"),
                      "--class-word", "toy")
    assert main(argv) in (1, 2)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "lib").exists()


def test_bare_folder_needs_a_class_word(world, tiny_blip2_path, tmp_path, capsys):
    for image in (world / "data" / CONCEPT).glob("*.png"):
        (tmp_path / "photos").mkdir(exist_ok=True)
        shutil.copy(image, tmp_path / "photos" / image.name)
    argv = ["train", "--concept", "toy", "--images", str(tmp_path / "photos"), "--backbone", str(tiny_blip2_path)]
    assert main(argv) == 2
    assert "pass --class-word WORD" in capsys.readouterr().err


def test_corrupt_concept_in_library_is_skipped_with_a_warning(trained, tmp_path, capsys):
    library = tmp_path / "lib"
    shutil.copytree(trained / "concepts" / CONCEPT, library / CONCEPT)
    shutil.copytree(trained / "concepts" / CONCEPT, library / "broken")
    (library / "broken" / "concept.json").write_text("{not json")
    image = str(trained / "data" / "test" / "toy_beach.png")
    assert main(["caption", image, "--library", str(library), "--explain"]) == 0
    out, err = capsys.readouterr()
    assert "skipping" in err and "broken" in err
    path, text, explanation = out.strip().split("\t")
    assert path == image and explanation.startswith(f"[fired: {CONCEPT} ")
    assert main(["concepts", "list", "--library", str(library)]) == 0
    out, err = capsys.readouterr()
    assert CONCEPT in out and "broken" not in out and "broken" in err


def test_concepts_show_and_remove_needs_yes(trained, tmp_path, capsys):
    library = tmp_path / "lib"
    shutil.copytree(trained / "concepts" / CONCEPT, library / CONCEPT)
    assert main(["concepts", "show", CONCEPT, "--library", str(library)]) == 0
    assert "identifier sks" in capsys.readouterr().out.replace("  ", " ")
    assert main(["concepts", "remove", CONCEPT, "--library", str(library)]) == 2
    assert "pass --yes" in capsys.readouterr().err and (library / CONCEPT).is_dir()
    assert main(["concepts", "remove", "nope", "--library", str(library), "--yes"]) == 1
    assert main(["concepts", "remove", CONCEPT, "--library", str(library), "--yes"]) == 0
    assert list(library.iterdir()) == []


def test_caption_expands_folders_and_globs_and_explains(trained, capsys):
    folder, pattern = trained / "data" / "test", str(trained / "data" / CONCEPT / "s*.png")
    argv = ["caption", str(folder), pattern, "--library", str(trained / "concepts"), "--explain", "-q"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [Path(line.split("\t")[0]).name for line in lines]
    assert names == sorted(p.name for p in folder.iterdir()) + ["snow.png", "sofa.png", "street.png"]
    assert all(line.count("\t") == 2 and line.endswith("]") for line in lines)
    assert main(["caption", str(trained / "nothing*.png")]) == 1
    assert "no image matches" in capsys.readouterr().err


def test_head_from_reuses_a_fitted_head_without_refitting(trained, tiny_blip2_path, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)  # the run folder goes to ./outputs
    donor = trained / "concepts" / CONCEPT
    argv = train_args(trained, tiny_blip2_path, "--head-from", str(donor), "--output", str(tmp_path), "--steps", "2")
    assert main(argv) == 0
    reused = json.loads((tmp_path / CONCEPT / "concept.json").read_text())["head"]
    assert reused == json.loads((donor / "concept.json").read_text())["head"]
    weights = load_file(tmp_path / CONCEPT / "head.safetensors"), load_file(donor / "head.safetensors")
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[1])


def test_question_and_no_library(trained, tiny_blip2_path, tmp_path, capsys, monkeypatch):
    image = str(trained / "data" / "test" / "toy_beach.png")
    argv = ["caption", image, "--library", str(trained / "concepts"), "--question", "What is sks?", "--json"]
    assert main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["question"] == "What is sks?" and row["active"] == [CONCEPT]
    monkeypatch.chdir(tmp_path)  # no ./concepts here
    assert main(["caption", image]) == 2
    assert "pass --backbone" in capsys.readouterr().err
    assert main(["caption", image, "--backbone", str(tiny_blip2_path)]) == 0
    out, err = capsys.readouterr()
    assert "no concept library" in err and out.startswith(image + "\t")


def test_print_config_shows_flags_as_overrides(world, tiny_blip2_path, capsys):
    argv = train_args(world, tiny_blip2_path, "--print-config", "--kind", "person", "head.threshold=0.7",
                      "train.lr=0.5")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kind: person" in out and "threshold: 0.7" in out and "lr: 0.5" in out and "steps: 3" in out


def test_demo_shows_detection_and_says_the_models_are_random(tmp_path):
    from myvlm.demo import format_report, run_demo

    report = run_demo(tmp_path, steps=3, progress=False)
    text = format_report(report, 3)
    assert "RANDOM" in text and "gibberish" in text
    fired = {row["image"]: row["fired"] for row in report.rows}
    assert fired == {name: name.startswith("test/toy_") for name in fired}
    toys, others = report.held_out["toys"], report.held_out["others"]
    assert toys[0] / toys[1] > 0.8 and others[0] / others[1] < 0.2
    assert (tmp_path / "concepts" / CONCEPT / "concept.json").is_file()


def test_demo_on_the_toy_world_reports_its_metrics(tmp_path, capsys):
    """`myvlm demo` (default: the toy world) runs on the shipped pretrained models and prints the metric line."""
    assert main(["demo", "--workdir", str(tmp_path), "--steps", "10", "-q"]) == 0
    out = capsys.readouterr().out
    assert "the toy world" in out and "recall" in out and "false positives" in out
    assert (tmp_path / "concepts").is_dir()
    # the data it wrote trains `myvlm train` as the demo trained: the flipped photos on their mirrored captions
    from myvlm.data import read_mirrored_captions
    from myvlm.toyworld.concepts import BY_NAME, concept_photos, mirrored_targets
    from myvlm.toyworld.demo import DEFAULT_CONCEPT

    folder = tmp_path / "data" / DEFAULT_CONCEPT
    names = list(json.loads((folder / "captions.json").read_text()))
    assert read_mirrored_captions(folder, names) == mirrored_targets(concept_photos(BY_NAME[DEFAULT_CONCEPT], "train", 4))
