"""Synthetic defects without diffusion: regions, procedural generators, the library format and the
`library:` reader, resume after a partial run. Runs in-process (no Ray), in seconds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from anomalyfleet.data import parse_data_spec
from anomalyfleet.data.transforms import load_mask
from anomalyfleet.errors import ConfigError, DataError
from anomalyfleet.synthesis.library import finished_shards, load_recipe, parse_recipe, plan_shards, resolve_normals, synthesize_library
from anomalyfleet.synthesis.procedural import make_procedural, perlin_noise
from anomalyfleet.synthesis.regions import RegionSpec, estimate_foreground, sample_region
from tests.image_sets import write_folder_dataset


def texture(size=(48, 64), seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    base = 120 + 40 * np.sin(xx / 4.0) + rng.normal(0, 10, size)
    return np.repeat(base[..., None], 3, axis=2).clip(0, 255).astype(np.uint8)


# --- regions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["box", "ellipse", "free"])
def test_region_ranges_and_seed(shape):
    spec = RegionSpec(shape=shape, size=(0.2, 0.3), aspect=(0.5, 2.0), rotation=(0, 90))
    for seed in range(20):
        a = sample_region(np.random.default_rng(seed), spec, 60, 80)
        b = sample_region(np.random.default_rng(seed), spec, 60, 80)
        assert np.array_equal(a.mask, b.mask) and a.to_dict() == b.to_dict()
        assert a.mask.shape == (60, 80) and a.mask.any()
        side = np.sqrt(a.width * a.height) / 60
        assert 0.2 - 1e-6 <= side <= 0.3 + 1e-6 or side < 0.2  # only ever shrunk, to fit the image
        assert 0 <= a.angle <= 90
        x0, y0, x1, y1 = a.bbox
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
        # The rasterised area follows the drawn size (a box exactly, an ellipse by pi/4, free form roughly).
        expected = a.width * a.height * {"box": 1.0, "ellipse": np.pi / 4, "free": 0.64 * np.pi / 4}[shape]
        assert 0.5 * expected <= a.mask.sum() <= 1.6 * expected + 4


def test_region_rotation_and_aspect():
    spec = RegionSpec(shape="box", size=(0.3, 0.3), aspect=(6.0, 6.0), rotation=(90, 90))
    region = sample_region(np.random.default_rng(0), spec, 100, 100)
    x0, y0, x1, y1 = region.bbox
    assert (y1 - y0) > 4 * (x1 - x0)  # wide box turned upright


def test_region_inside_foreground():
    fg = np.zeros((64, 64), bool)
    fg[16:48, 20:44] = True
    spec = RegionSpec(shape="ellipse", size=(0.1, 0.2), inside_foreground=True)
    for seed in range(10):
        region = sample_region(np.random.default_rng(seed), spec, 64, 64, fg)
        assert region.mask.any() and not (region.mask & ~fg).any()
    image = np.full((64, 64, 3), 20, np.uint8)
    image[fg] = 200
    assert (estimate_foreground(image) == fg).mean() > 0.97


def test_region_spec_errors():
    with pytest.raises(ConfigError, match="shape"):
        RegionSpec(shape="star")
    with pytest.raises(ConfigError, match="empty"):
        RegionSpec.from_dict({"size": [0.5, 0.1]})
    assert RegionSpec.from_dict({"rotation": 30}).rotation == (30.0, 30.0)


# --- procedural ----------------------------------------------------------------------------------


def test_perlin_noise():
    a = perlin_noise(np.random.default_rng(1), 40, 56, 4, 8)
    b = perlin_noise(np.random.default_rng(1), 40, 56, 4, 8)
    assert a.shape == (40, 56) and np.array_equal(a, b)
    assert np.abs(a).max() <= 1.0 + 1e-6 and a.std() > 0.05
    assert np.abs(np.diff(a, axis=1)).max() < 0.5  # smooth, not white noise


@pytest.mark.parametrize("name,settings", [("perlin", {}), ("perlin", {"texture": "noise"}), ("cutpaste", {}), ("scar", {})])
def test_procedural_generators(name, settings):
    image = texture()
    gen = make_procedural(name, settings)
    first = gen.generate(image, 7)
    again = gen.generate(image, 7)
    other = gen.generate(image, 8)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert not np.array_equal(first.image, other.image)
    assert first.image.dtype == np.uint8 and first.image.shape == image.shape
    assert first.mask.any() and not (first.mask & ~first.region.mask).any()
    changed = (first.image != image).any(-1)
    assert not (changed & ~first.mask).any(), "pixels outside the mask changed"
    assert changed[first.mask].mean() > 0.3, "the mask claims a defect that is not there"
    json.dumps(first.details), json.dumps(gen.settings())


def test_procedural_texture_directory_and_errors(tmp_path):
    (tmp_path / "tex").mkdir()
    Image.fromarray(np.full((20, 30, 3), 250, np.uint8)).save(tmp_path / "tex" / "white.png")
    out = make_procedural("perlin", {"texture": str(tmp_path / "tex"), "beta": [0, 0]}).generate(texture(), 1)
    assert out.details["texture"] == "white.png"
    with pytest.raises(ConfigError, match="unknown procedural"):
        make_procedural("sparkle")
    with pytest.raises(ConfigError, match="bad settings"):
        make_procedural("perlin", {"colour": 1})


# --- library -------------------------------------------------------------------------------------


def recipe_dict(data, out, **extra):
    return {
        "name": "unit", "normal": f"folder:{data}", "output": str(out), "seed": 3, "shard_size": 3,
        "defects": [
            {"name": "stain", "generator": "perlin", "count": 7, "region": {"shape": "free", "size": [0.2, 0.4]}},
            {"name": "cut", "generator": "cutpaste", "count": 4},
            {"name": "scar", "generator": "scar", "count": 2},
        ],
        "ray": {"actors": 0}, **extra,
    }


@pytest.fixture
def normals(tmp_path):
    return write_folder_dataset(tmp_path / "normals", normals=5, anomalies=2, size=48)


def test_library_format_and_reader(tmp_path, normals):
    out = tmp_path / "lib"
    result = synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False)
    assert result.counts == {"stain": 7, "cut": 4, "scar": 2} and result.images == 13 and result.shards == 6
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 13 and len({r["image"] for r in rows}) == 13
    sources = resolve_normals([f"folder:{normals}"])
    assert len(sources) == 5  # the folder's anomalies are not normal images
    for row in rows:
        assert row["source_image"] in sources and row["label"] == 1
        assert hashlib.sha256((out / row["image"]).read_bytes()).hexdigest() == row["sha256"]["image"]
        assert hashlib.sha256((out / row["mask"]).read_bytes()).hexdigest() == row["sha256"]["mask"]
        assert {"generator", "settings", "seed", "region", "defect_type", "details"} <= set(row)
        assert load_mask(out / row["mask"]).sum() > 0
    # Each normal image is used once before any is used twice.
    stain_sources = [r["source_image"] for r in rows if r["defect_type"] == "stain"]
    assert len(set(stain_sources[:5])) == 5
    card = json.loads((out / "card.json").read_text())
    assert card["counts"] == result.counts and set(card["generators"]) == {"perlin", "cutpaste", "scar"}
    assert "numpy" in card["generators"]["perlin"] and "| stain | perlin | 7 |" in (out / "card.md").read_text()
    assert "mixed_versions" not in card
    with Image.open(out / "contact-sheet.png") as sheet:
        assert sheet.width >= 128 and sheet.height >= 3 * 128
    # A run resumed after an upgrade: one stain shard made by another numpy. The card says so.
    from anomalyfleet.synthesis.library import write_library_files

    recipe = parse_recipe(recipe_dict(normals, out))
    shard = sorted((out / "shards").glob("stain-*"))[0] / "shard.json"
    info = json.loads(shard.read_text())
    info["versions"] = {**info["versions"], "numpy": "0.0.1"}
    shard.write_text(json.dumps(info))
    write_library_files(out, recipe, plan_shards(recipe, resolve_normals(recipe.normal)))
    mixed = json.loads((out / "card.json").read_text())["mixed_versions"]
    assert set(mixed) == {"perlin"} and {v["numpy"] for v in mixed["perlin"]} == {"0.0.1", card["generators"]["perlin"]["numpy"]}

    samples = parse_data_spec(f"library:{out}")
    assert len(samples) == 13 and all(s.label == 1 and s.has_mask for s in samples)
    assert len(parse_data_spec(f"library:{out}?defects=cut,scar&category=tiles")) == 6
    assert {s.category for s in parse_data_spec(f"library:{out}?category=tiles")} == {"tiles"}


def test_library_resume_skips_finished_and_redoes_missing(tmp_path, normals):
    out = tmp_path / "lib"
    recipe = parse_recipe(recipe_dict(normals, out))
    synthesize_library(recipe, progress=False)
    manifest = (out / "manifest.jsonl").read_bytes()
    kept = out / "shards" / "stain-00000"
    stamp = (kept / "manifest.jsonl").stat().st_mtime_ns
    # A killed run leaves a temporary shard and lacks others; the re-run cleans up and fills in.
    shutil.rmtree(out / "shards" / "cut-00001")
    shutil.rmtree(out / "shards" / "stain-00002")
    from anomalyfleet.synthesis.library import _host_tag

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a worker that died: its pid is free
    (out / "shards" / f".tmp-stain-00002-h{_host_tag()}-pid{gone.pid}-deadbeef" / "images").mkdir(parents=True)
    # A second run's build in progress on the same output (a live process here): left alone.
    live = out / "shards" / f".tmp-cut-00003-h{_host_tag()}-pid{os.getpid()}-0badcafe"
    live.mkdir()
    again = synthesize_library(recipe, progress=False)
    assert again.shards_done_now == 2 and again.images == 13
    assert (out / "manifest.jsonl").read_bytes() == manifest, "a redone shard must equal the original"
    assert (kept / "manifest.jsonl").stat().st_mtime_ns == stamp
    assert [p for p in (out / "shards").iterdir() if p.name.startswith(".")] == [live]
    assert synthesize_library(recipe, progress=False).shards_done_now == 0


def test_a_given_embedding_file_is_part_of_the_recipe_by_content(tmp_path, normals, capsys):
    """A recipe names its embedding files by path; a file replaced there is another recipe, so a
    resumed library is not finished with a different defect. Recipes without such files keep the
    fingerprint earlier versions wrote (their libraries still resume)."""
    from anomalyfleet.synthesis import library

    emb = tmp_path / "crack.pt"
    emb.write_bytes(b"first embedding")
    defect = {"name": "crack", "generator": "anogen", "count": 2, "embedding": str(emb), "pipeline": "sd"}
    recipe = parse_recipe({**recipe_dict(normals, tmp_path / "lib"), "defects": [defect]})
    sources = resolve_normals(recipe.normal)
    before = library.recipe_fingerprint(recipe, sources)
    assert library.recipe_fingerprint(recipe, sources) == before
    emb.write_bytes(b"other embedding")
    assert library.recipe_fingerprint(recipe, sources) != before
    emb.unlink()
    with pytest.raises(DataError, match=f"defect crack: embedding {emb} not found"):
        library.recipe_fingerprint(recipe, sources)

    plain = parse_recipe(recipe_dict(normals, tmp_path / "lib2"))
    earlier = hashlib.sha256(json.dumps({"recipe": plain.content(), "normals": sources}, sort_keys=True).encode())
    assert library.recipe_fingerprint(plain, sources) == earlier.hexdigest()

    # A library started by the version before (its fingerprint without the files) is taken up, once:
    # recipe.json then pins the files as they are, and a file replaced later is refused.
    emb.write_bytes(b"first embedding")
    root = str(tmp_path / "lib")
    legacy = library.recipe_fingerprint(recipe, sources, embedding_files=False)
    assert legacy != before and library._check_recipe(root, recipe, legacy)  # as the older version wrote it
    assert not library._check_recipe(root, recipe, before, legacy)
    assert "started before embedding files counted" in capsys.readouterr().err
    assert json.loads((tmp_path / "lib" / "recipe.json").read_text())["fingerprint"] == before
    emb.write_bytes(b"other embedding")
    with pytest.raises(ConfigError, match="different recipe .*embedding files"):
        library._check_recipe(root, recipe, library.recipe_fingerprint(recipe, sources), legacy)


def test_of_two_runs_starting_on_one_output_with_different_recipes_one_is_refused(tmp_path, normals, monkeypatch):
    """Both find no recipe.json and both write one: the run whose recipe did not land must not go on
    (it would add its shards to a library described by the other's recipe)."""
    from anomalyfleet.synthesis import library

    out = tmp_path / "lib"
    first, second = parse_recipe(recipe_dict(normals, out)), parse_recipe(recipe_dict(normals, out, seed=4))
    sources = resolve_normals(first.normal)
    library._check_recipe(str(out), first, library.recipe_fingerprint(first, sources))
    # The second run looked before the first had written (a race), so it writes too.
    monkeypatch.setattr(library.storage, "exists", lambda *args, **kwargs: False)
    with pytest.raises(ConfigError, match="different recipe"):
        library._check_recipe(str(out), second, library.recipe_fingerprint(second, sources))
    assert json.loads((out / "recipe.json").read_text())["fingerprint"] == library.recipe_fingerprint(first, sources)
    assert sorted(p.name for p in out.iterdir()) == ["recipe.json"]  # no temporary file left


def test_library_refuses_a_different_recipe(tmp_path, normals):
    out = tmp_path / "lib"
    synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False)
    with pytest.raises(ConfigError, match="different recipe"):
        synthesize_library(parse_recipe(recipe_dict(normals, out, seed=4)), progress=False)
    # Output and Ray settings do not change the samples, so they may differ between runs.
    assert synthesize_library(parse_recipe(recipe_dict(normals, out, ray={"actors": 0, "num_cpus": 2})),
                              progress=False).shards_done_now == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the flushed files through /proc")
def test_a_local_shard_is_on_disk_before_it_is_renamed_finished(tmp_path, normals, monkeypatch):
    """The rename marks a shard finished, so every file and directory in it is flushed first and
    the shards directory after: a power loss cannot leave a "finished" shard of empty files."""
    from anomalyfleet.synthesis import library

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(a, b):
        events.append(("rename", str(a)))
        return real_rename(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(library.os, "rename", rename)
    out = tmp_path / "lib"
    recipe = recipe_dict(normals, out)
    recipe["defects"] = recipe["defects"][:1]
    synthesize_library(parse_recipe(recipe), progress=False)
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename" and "/shards/.tmp-" in _]
    assert len(renames) == 3  # stain: 7 images in shards of 3
    first = events[renames[0]][1]
    flushed = {path for kind, path in events[:renames[0]] if kind == "fsync"}
    final = out / "shards" / "stain-00000"
    built = {f"{first}/{p.relative_to(final)}" for p in final.rglob("*")} | {first}
    assert len(built) == 1 + 2 + 2 * 3 + 3  # images/, masks/, 3 images and masks, shard.json, manifests
    assert built <= flushed  # every file and directory, before the rename
    assert ("fsync", str(out / "shards")) in events[renames[0] + 1:]


def test_plan_is_deterministic_and_shards_are_contiguous(normals, tmp_path):
    recipe = parse_recipe(recipe_dict(normals, tmp_path / "x"))
    sources = resolve_normals(recipe.normal)
    a, b = plan_shards(recipe, sources), plan_shards(recipe, sources)
    assert a == b
    assert [s.shard_id for s in a] == ["stain-00000", "stain-00001", "stain-00002", "cut-00000", "cut-00001", "scar-00000"]
    names = [i.name for s in a for i in s.items]
    assert len(names) == len(set(names)) == 13
    assert len({i.seed for s in a for i in s.items}) == 13


def test_recipe_yaml_and_job_entry_point(tmp_path, normals, capsys):
    from jobs.synthesize_library import main

    recipe_path = tmp_path / "recipes" / "r.yaml"
    recipe_path.parent.mkdir()
    data = recipe_dict("../normals", "../out", image_size=32)
    recipe_path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(recipe_path)
    assert recipe.output == str(tmp_path / "out") and recipe.normal == [f"folder:{tmp_path / 'normals'}"]
    assert main([str(recipe_path), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 13
    assert finished_shards(tmp_path / "out") and Image.open(tmp_path / "out" / "shards" / "cut-00000" / "images" / "cut-000000.png").size == (32, 32)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "defect": []}))
    assert main([str(bad)]) == 2
    with pytest.raises(ConfigError, match="invalid recipe"):
        parse_recipe({**recipe_dict(normals, tmp_path), "defects": [{"name": "a/b", "count": 1}]})
    # Rejected while the recipe is read, so no output directory is made for a recipe that cannot run.
    with pytest.raises(ConfigError, match="unknown generator 'glitter'"):
        parse_recipe({**recipe_dict(normals, tmp_path / "o2"), "defects": [{"name": "a", "generator": "glitter", "count": 1}]})
    with pytest.raises(DataError, match="no-normals"):
        synthesize_library(parse_recipe({**recipe_dict(tmp_path / "no-normals", tmp_path / "o3")}), progress=False)
    assert not (tmp_path / "o3").exists()
    capsys.readouterr()
    (tmp_path / "broken.yaml").write_text("defects: [\n")
    assert main([str(tmp_path / "broken.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid YAML (line 2, column 1:" in err[0]


def test_synthesis_cli_commands(tmp_path, normals):
    import argparse

    from anomalyfleet.synthesis.cli_args import add_synthesis_commands

    parser = argparse.ArgumentParser()
    add_synthesis_commands(parser.add_subparsers(dest="command"))
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_dict(normals, tmp_path / "lib")))
    args = parser.parse_args(["synthesize", str(recipe_path), "--quiet", "--actors", "0"])
    assert args.func(args) == 0 and (tmp_path / "lib" / "card.json").is_file()
    args = parser.parse_args(["synth", "learn", "--steps", "5"])
    with pytest.raises(ConfigError, match="needs --pipeline"):
        args.func(args)


# --- colour --------------------------------------------------------------------------------------


def equal_channels(image):
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


GENERATORS = [("perlin", {"texture": "noise"}), ("perlin", {}), ("cutpaste", {"jitter": 0.3}), ("scar", {"jitter": 0.3})]


@pytest.mark.parametrize("name,settings", GENERATORS)
def test_greyscale_images_get_grey_defects(name, settings):
    grey = texture()
    tinted = [make_procedural(name, {**settings, "color": "rgb"}).generate(grey, s) for s in range(4)]
    # Without the option the colour texture / per-channel gain does tint a greyscale image ...
    assert not all(equal_channels(t.image) for t in tinted)
    for seed, rgb in enumerate(tinted):
        auto = make_procedural(name, settings).generate(grey, seed)
        # ... with the default (auto) it stays grey, in the same place, and still changes the region.
        assert equal_channels(auto.image) and auto.details["grey"]
        assert np.array_equal(auto.mask, rgb.mask) and np.array_equal(auto.image[~auto.mask], grey[~auto.mask])
        assert (auto.image[auto.mask] != grey[auto.mask]).any(-1).mean() > 0.3
        assert make_procedural(name, settings).settings()["color"] == "auto"


@pytest.mark.parametrize("name,settings", GENERATORS)
def test_color_option_on_colour_images(name, settings):
    rng = np.random.default_rng(2)
    colour = (texture().astype(int) + rng.integers(-30, 30, (1, 1, 3))).clip(0, 255).astype(np.uint8)
    colour[..., 2] = colour[..., 2] // 2
    auto = make_procedural(name, settings).generate(colour, 5)
    rgb = make_procedural(name, {**settings, "color": "rgb"}).generate(colour, 5)
    forced = make_procedural(name, {**settings, "color": "grey"}).generate(colour, 5)
    assert np.array_equal(auto.image, rgb.image), "auto leaves colour images alone"
    assert not auto.details["grey"] and forced.details["grey"]
    assert equal_channels(forced.image[forced.mask]) and np.array_equal(forced.image[~forced.mask], colour[~forced.mask])
    assert not equal_channels(forced.image)  # only the defect is grey
    with pytest.raises(ConfigError, match="color must be one of auto, grey, rgb"):
        make_procedural(name, {**settings, "color": "gray-ish"})


def test_library_of_greyscale_normals_is_greyscale(tmp_path, normals):
    """write_folder_dataset's normals are greyscale; every written defect image keeps equal channels."""
    out = tmp_path / "lib"
    data = recipe_dict(normals, out)
    data["defects"][0]["settings"] = {"texture": "noise"}
    synthesize_library(parse_recipe(data), progress=False)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for row in rows:
        with Image.open(out / row["image"]) as handle:
            image = np.asarray(handle.convert("RGB"))
        assert equal_channels(image) and row["details"]["grey"] and row["settings"]["color"] == "auto"


def test_ray_options_are_validated(tmp_path, normals):
    import argparse

    from anomalyfleet.synthesis.cli_args import add_synthesize_arguments

    base = recipe_dict(normals, tmp_path / "lib")
    ray = parse_recipe({**base, "ray": {"learn_gpus": 0.25, "max_retries": 0,
                                         "fault_injection": {"kill_after_images": 2}}}).ray
    assert ray.learn_gpus == 0.25 and ray.num_gpus is None and ray.fault_injection.once is None
    for bad, word in [({"learn_gpus": -1}, "learn_gpus"), ({"max_retries": -1}, "max_retries"),
                      ({"fault_injection": {"kill_after": 2}}, "kill_after"), ({"learn_gpu": 1}, "learn_gpu")]:
        with pytest.raises(ConfigError, match=word):
            parse_recipe({**base, "ray": bad})
    parser = argparse.ArgumentParser()
    add_synthesize_arguments(parser)
    assert parser.parse_args(["r.yaml", "--learn-gpus", "0.5"]).learn_gpus == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["r.yaml", "--learn-gpus", "-1"])


def test_shard_build_dirs_of_dead_workers_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    import time

    from anomalyfleet.synthesis.library import SHARD_TMP_PREFIX, _host_tag, remove_orphaned_shard_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), _host_tag()
    orphan = tmp_path / f"{SHARD_TMP_PREFIX}perlin-00003-h{host}-pid{dead_pid}-0a1b2c3d"
    mine = tmp_path / f"{SHARD_TMP_PREFIX}perlin-00004-h{host}-pid{os.getpid()}-a9b8c7d6"
    # Another machine's (a shared /tmp is unusual, but its pids mean nothing here) and one without
    # an owner (an older version's name): judged by age only.
    foreign = tmp_path / f"{SHARD_TMP_PREFIX}perlin-00005-h{'0' * 8 if host != '0' * 8 else '1' * 8}-pid{dead_pid}-0a1b2c3d"
    unowned_old = tmp_path / f"{SHARD_TMP_PREFIX}perlin-00006-pid{dead_pid}-x1y2"
    for directory in (orphan, mine, foreign, unowned_old):
        (directory / "shard").mkdir(parents=True)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(unowned_old, (two_days_ago, two_days_ago))
    assert sorted(remove_orphaned_shard_dirs(tmp_path)) == sorted([orphan, unowned_old])
    assert mine.exists() and foreign.exists()


def test_the_readmes_recipe_is_valid():
    """The recipe shown in the README parses as it is, so the example cannot rot."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("A recipe:\n\n```yaml\n", 1)[1].split("```", 1)[0]
    recipe = parse_recipe(yaml.safe_load(block))
    assert [d.generator for d in recipe.defects] == ["perlin", "cutpaste", "scar"]
    assert all(d.region_spec() is None or d.region_spec().size for d in recipe.defects)


def test_an_embedding_learned_for_an_object_storage_library_is_cached_by_what_it_is_learned_from(tmp_path):
    from anomalyfleet.synthesis.library import embedding_cache_dir

    def recipe(support: str, steps: int, seed: int = 3, lr: float = 5e-3):
        return parse_recipe({
            "name": "lib", "normal": [str(tmp_path / "normal")], "output": "s3://bucket/lib", "seed": seed,
            "defects": [{"name": "crack", "generator": "anogen", "count": 2, "pipeline": str(tmp_path / "sd"),
                         "support": f"folder:{tmp_path / support}", "learn": {"steps": steps, "learning_rate": lr}}],
        })

    def where(r):
        return embedding_cache_dir(r, "s3://bucket/lib", r.defects[0])

    same = where(recipe("cracks", 100))
    assert where(recipe("cracks", 100)) == same  # a resumed run finds its checkpoints
    assert where(recipe("other-cracks", 100)) != same  # other support images: learned anew
    assert where(recipe("cracks", 100, lr=1e-3)) != same and where(recipe("cracks", 100, seed=4)) != same
    assert where(recipe("cracks", 200)) == same  # more steps continue the same learning, as a resume does


def test_a_folder_that_is_not_a_library_is_refused_and_left_as_it_was(tmp_path, normals):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.jsonl").write_text("my own data\n")
    with pytest.raises(ConfigError, match="not empty and holds no synthesis library"):
        synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
    assert (out / "manifest.jsonl").read_text() == "my own data\n"
    # Embeddings learned first for this library (`synth learn --recipe`) are not someone else's files.
    fresh = tmp_path / "learned-first"
    (fresh / "embeddings").mkdir(parents=True)
    (fresh / "embeddings" / "crack.pt").write_bytes(b"learned")
    assert synthesize_library(parse_recipe(recipe_dict(normals, fresh)), progress=False).images == 13


def test_recipes_that_are_not_yaml_files_and_nothing_to_learn_are_one_line(tmp_path, capsys):
    from anomalyfleet.cli import main

    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "normal": [str(tmp_path)], "output": str(tmp_path / "out"),
                                      "defects": [{"name": "s", "generator": "perlin", "count": 1}]}))
    for argv, message in ((["synthesize", str(tmp_path)], "is a directory; a recipe is a YAML file"),
                          (["synthesize", str(tmp_path / "bin.yaml")], "not a text file"),
                          (["synth", "learn", "--recipe", str(recipe)], "no anogen defect type with `support`")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("existing_dir", [False, True])
def test_a_corrupt_normal_image_leaves_no_library_behind(tmp_path, normals, existing_dir):
    """A file that is not an image is refused before the output is touched: recipe.json pins the
    normal images, so once the user fixes the folder a re-run must start afresh, not be refused as
    'a different recipe'."""
    out = tmp_path / "lib"
    if existing_dir:
        out.mkdir()  # made by the user, empty: kept, and left empty
    (normals / "normal" / "n003.png").write_bytes(b"not a png")
    recipe = parse_recipe(recipe_dict(normals, out))
    with pytest.raises(DataError, match="n003.png: corrupt"):
        synthesize_library(recipe, progress=False)
    assert out.is_dir() == existing_dir and (not existing_dir or not any(out.iterdir()))
    (normals / "normal" / "n003.png").unlink()  # the user's fix: drop the bad image
    result = synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False)
    assert result.images == 13


def test_images_that_fail_only_when_decoded_withdraw_a_library_with_nothing_finished(tmp_path, normals):
    """Truncated files open (their header is fine) and fail in the workers: the run that started
    the library, with no shard finished, removes what it wrote."""
    out = tmp_path / "lib"
    originals = {p: p.read_bytes() for p in (normals / "normal").glob("*.png")}
    for path, data in originals.items():
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt"):
        synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False)
    assert not out.exists()
    for path, data in originals.items():
        path.write_bytes(data)
    assert synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False).images == 13


def test_bad_input_on_a_resumed_library_keeps_its_finished_shards(tmp_path, normals):
    """Only the run that started a library withdraws it: a resume keeps what earlier runs made."""
    out = tmp_path / "lib"
    synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False)
    shutil.rmtree(out / "shards" / "scar-00000")
    before = sorted(p.name for p in (out / "shards").iterdir())
    for image in (normals / "normal").iterdir():
        image.write_bytes(image.read_bytes()[:60])  # same names: the same recipe, now truncated
    with pytest.raises(DataError):
        synthesize_library(parse_recipe(recipe_dict(normals, out)), progress=False)
    assert (out / "recipe.json").is_file() and sorted(p.name for p in (out / "shards").iterdir()) == before


@pytest.mark.parametrize("defect, message", [
    ({"name": "stain", "generator": "perlin", "count": 2, "settings": {"scale": [3, 3]}}, "defect stain: its settings cannot make a sample"),
    ({"name": "crack", "generator": "anogen", "count": 2, "embedding": "x.pt", "pipeline": "sd",
      "settings": {"stepz": 5}}, "defect crack:"),
    ({"name": "crack", "generator": "anogen", "count": 2, "embedding": "x.pt"}, "defect crack: anogen needs `pipeline`"),
])
def test_bad_generator_settings_are_refused_before_the_output_is_touched(tmp_path, normals, defect, message):
    out = tmp_path / "lib"
    recipe = parse_recipe({**recipe_dict(normals, out), "defects": [defect]})
    with pytest.raises(ConfigError, match=message):
        synthesize_library(recipe, progress=False)
    assert not out.exists()
