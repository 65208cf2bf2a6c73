"""CLIP's zero-shot class names and prompt templates (clipjax/prompts) and their loader."""

import collections
import re
from importlib.resources import files

import pytest

from clipjax import prompts


def _raw_lines(filename):
    return files("clipjax.prompts").joinpath(filename).read_text(encoding="utf-8").split("\n")


def test_package_data_files_have_one_entry_a_line():
    for filename, count in [
        ("imagenet_classes.txt", 1000),
        ("imagenet_wnids.txt", 1000),
        ("imagenet_templates.txt", 80),
        ("cifar_templates.txt", 18),
    ]:
        lines = _raw_lines(filename)
        assert lines[-1] == "", filename  # ends with one newline
        body = lines[:-1]
        assert len(body) == count, filename
        assert all(line and line == line.strip() for line in body), filename


def test_imagenet_class_names():
    names = prompts.imagenet_class_names()
    assert len(names) == 1000
    assert all(name and name == name.strip() for name in names)
    assert not any(re.search(r"\d{3,}|^n\d{8}$", name) for name in names)  # names only, no ids
    assert names[:9] == [
        "tench",
        "goldfish",
        "great white shark",
        "tiger shark",
        "hammerhead shark",
        "electric ray",
        "stingray",
        "rooster",
        "hen",
    ]
    assert names[-1] == "toilet paper"
    # CLIP's renames of ImageNet's duplicate synset names.
    assert (names[134], names[517]) == ("crane bird", "construction crane")
    assert (names[638], names[639]) == ("tights", "one-piece bathing suit")
    # CLIP's published list keeps two duplicate pairs (missile/projectile, sunglass/sunglasses);
    # they are shipped verbatim, so exactly these repeat and everything else is unique.
    dupes = {name: count for name, count in collections.Counter(names).items() if count > 1}
    assert dupes == {"missile": 2, "sunglasses": 2}
    assert [i for i, n in enumerate(names) if n in dupes] == [657, 744, 836, 837]
    assert len(set(names)) == 998


def test_imagenet_wnids():
    wnids = prompts.imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids == sorted(wnids)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    # spot checks of the name <-> wnid alignment
    table = dict(zip(wnids, prompts.imagenet_class_names()))
    assert table["n01443537"] == "goldfish"
    assert table["n02012849"] == "crane bird"
    assert table["n03126707"] == "construction crane"
    assert table["n04008634"] == "missile"  # ImageNet's "projectile, missile"


def test_templates():
    imagenet = prompts.templates("imagenet")
    assert len(imagenet) == 80 and len(set(imagenet)) == 80
    assert all(t.count("{}") == 1 for t in imagenet)
    assert imagenet[:3] == ["a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}."]
    assert imagenet[-1] == "a tattoo of the {}."

    cifar = prompts.templates("cifar")
    assert len(cifar) == 18 and len(set(cifar)) == 18
    assert all(t.count("{}") == 1 for t in cifar)
    assert cifar[0] == "a photo of a {}." and cifar[-1] == "a photo of the big {}."
    assert prompts.templates("cifar100") == cifar

    assert prompts.templates("food101") == ["a photo of {}, a type of food."]
    assert prompts.templates("oxford_iiit_pet") == ["a photo of a {}, a type of pet."]
    assert prompts.templates("stl10") == ["a photo of a {}.", "a photo of the {}."]
    caltech = prompts.templates("caltech101")
    assert caltech[0] == "a photo of a {}." and len(caltech) == len(set(caltech))
    for name in ["food101", "oxford_iiit_pet", "caltech101", "stl10"]:
        assert all(t.count("{}") == 1 for t in prompts.templates(name))

    with pytest.raises(ValueError, match="no_such_set"):
        prompts.templates("no_such_set")


def test_loader_returns_copies():
    prompts.imagenet_class_names().append("x")
    prompts.templates("imagenet").clear()
    assert len(prompts.imagenet_class_names()) == 1000
    assert len(prompts.templates("imagenet")) == 80


def test_zero_shot_prompts_imagenet_wnids():
    wnids = prompts.imagenet_wnids()
    for dataset in ["imagenet2012:5.1.0", "imagenet_v2/matched-frequency", "imagenet_sketch"]:
        names, temps = prompts.zero_shot_prompts(dataset, wnids)
        assert names == prompts.imagenet_class_names()
        assert temps == prompts.templates("imagenet")


def test_zero_shot_prompts_wnid_subset_keeps_its_order():
    wnids = prompts.imagenet_wnids()
    table = dict(zip(wnids, prompts.imagenet_class_names()))
    subset = wnids[::5][::-1]  # 200 wnids, not in ImageNet order
    assert len(subset) == 200
    names, temps = prompts.zero_shot_prompts("imagenet_r:0.2.0", subset)
    assert names == [table[w] for w in subset]
    assert names[-1] == "tench"
    assert len(temps) == 80


def test_zero_shot_prompts_imagenet_1000_non_wnid_names_by_index():
    names, temps = prompts.zero_shot_prompts("imagenet2012_real", [f"class {i}" for i in range(1000)])
    assert names == prompts.imagenet_class_names()
    assert len(temps) == 80


def test_zero_shot_prompts_cifar():
    tfds_names = ["apple", "aquarium_fish", "maple_tree", "sweet_pepper", "willow_tree"]
    names, temps = prompts.zero_shot_prompts("cifar100:3.0.2", tfds_names)
    assert names == ["apple", "aquarium fish", "maple tree", "sweet pepper", "willow tree"]
    assert temps == prompts.templates("cifar")
    _, temps10 = prompts.zero_shot_prompts("cifar10", ["airplane", "automobile"])
    assert len(temps10) == 18


def test_zero_shot_prompts_dataset_templates():
    names, temps = prompts.zero_shot_prompts("oxford_iiit_pet:4.0.0", ["Abyssinian", "american_bulldog"])
    assert names == ["Abyssinian", "american bulldog"]
    assert temps == ["a photo of a {}, a type of pet."]
    names, temps = prompts.zero_shot_prompts("food101", ["apple_pie", "baby_back_ribs"])
    assert names == ["apple pie", "baby back ribs"]
    assert temps == ["a photo of {}, a type of food."]


def test_zero_shot_prompts_unknown_dataset_falls_back():
    names, temps = prompts.zero_shot_prompts("my_flowers/config:1.0.0", ["red_rose", "tulip"])
    assert names == ["red rose", "tulip"]
    assert temps == prompts.templates("imagenet")


def test_zero_shot_prompts_unknown_wnid_names_the_dataset():
    wnids = prompts.imagenet_wnids()[:3] + ["n99999999"]
    with pytest.raises(ValueError, match="imagenet_a") as info:
        prompts.zero_shot_prompts("imagenet_a:0.1.0", wnids)
    message = str(info.value)
    assert "n99999999" in message and "\n" not in message
