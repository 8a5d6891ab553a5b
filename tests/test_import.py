"""`import simclr_ext` loads the library only: the training recipe (simclr_ext.recipe) and the optional
dependencies it and the per-sample transform need are imported on first use of one of their names."""
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import simclr_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_DIR = os.path.join(os.path.dirname(simclr_ext.__file__), "recipe")

# The recipe's names that `simclr_ext` exports, and the module each one lives in.
LAZY_RECIPE = {"PretrainConfig": "simclr_ext.recipe.recipes", "pretrain": "simclr_ext.recipe.train",
               "linear_eval": "simclr_ext.recipe.train", "knn_eval": "simclr_ext.recipe.train"}
# torchvision: datasets, ResNets and SimCLRTransform; the rest only the recipe uses.
OPTIONAL = ["torchvision", "sklearn", "matplotlib", "PIL", "torch.utils.tensorboard"]

_PROBE = """
import json, sys
import simclr_ext
loaded = sorted(sys.modules)
names = {n: getattr(simclr_ext, n).__module__ for n in sys.argv[1].split(",")}
print(json.dumps({"loaded": loaded, "names": names, "after": sorted(sys.modules)}))
"""


def _run_fresh(names):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(names)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fresh():
    return _run_fresh(list(LAZY_RECIPE) + ["SimCLRTransform", "ragged_collate"])


def test_recipe_modules_exist_where_the_lazy_names_point():
    modules = {m.name for m in pkgutil.iter_modules([RECIPE_DIR])}
    assert {"train", "recipes", "data", "models", "optim", "checkpoint", "metrics", "evaluate", "cli"} <= modules
    assert {m.rsplit(".", 1)[1] for m in LAZY_RECIPE.values()} <= modules


def test_import_leaves_the_recipe_and_torchvision_out(fresh):
    loaded = set(fresh["loaded"])
    assert "simclr_ext" in loaded and "simclr_ext.loss" in loaded and "simclr_ext.augment" in loaded
    recipe = sorted(m for m in loaded if m == "simclr_ext.recipe" or m.startswith("simclr_ext.recipe."))
    assert recipe == [], f"import simclr_ext imported the training recipe: {recipe}"
    assert "simclr_ext.transforms" not in loaded
    heavy = [m for m in OPTIONAL if m in loaded]
    assert heavy == [], f"import simclr_ext imported optional dependencies: {heavy}"


def test_lazy_names_resolve_in_a_fresh_process(fresh):
    assert fresh["names"] == {**LAZY_RECIPE, "SimCLRTransform": "simclr_ext.transforms",
                              "ragged_collate": "simclr_ext.transforms"}
    assert set(LAZY_RECIPE.values()) <= set(fresh["after"])


def test_lazy_names_are_the_recipe_objects():
    from simclr_ext.recipe import recipes, train

    assert simclr_ext.PretrainConfig is recipes.PretrainConfig is train.PretrainConfig
    assert simclr_ext.pretrain is train.pretrain
    assert simclr_ext.linear_eval is train.linear_eval and simclr_ext.knn_eval is train.knn_eval
    from simclr_ext import PretrainConfig, knn_eval  # from-imports go through the module __getattr__ too

    assert PretrainConfig is train.PretrainConfig and knn_eval is train.knn_eval


def test_every_public_name_resolves_and_is_listed():
    for name in simclr_ext.__all__:
        assert getattr(simclr_ext, name) is not None, name
    assert set(simclr_ext.__all__) <= set(dir(simclr_ext))


def test_unknown_attribute_names_the_module():
    with pytest.raises(AttributeError, match="module 'simclr_ext' has no attribute 'Trainer'"):
        _ = simclr_ext.Trainer
