"""A method from another installed package: registered through the `posttrain.stages` entry
point group, configured through a Hydra search-path plugin, trained by the real `posttrain`.

The package is installed the way pip lays one out (a `.dist-info` folder with its
`entry_points.txt` beside the code, on the path), so importlib.metadata finds it as it would
in a user's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import posttrain_argv

PLUGIN = '''
"""SFT with the token embeddings frozen: a posttrain method shipped by another package."""
import dataclasses
from dataclasses import dataclass

from posttrain.config import require
from posttrain.stages import sft
from posttrain.stages.base import StageSpec, TrainerInputs


@dataclass
class FrozenEmbeddingsConfig(sft.SFTStageConfig):
    # keep the token embeddings as the parent left them
    freeze_embeddings: bool = True
    # the embedding rows' names in the model
    embeddings: str = "model.embed_tokens.weight"

    def validate(self, key):
        super().validate(key)
        require(self.embeddings.endswith(".weight"), f"{key}.embeddings", "must name a weight")


def make_trainer(inputs: TrainerInputs):
    if inputs.cfg.freeze_embeddings:
        inputs.model.get_input_embeddings().weight.requires_grad_(False)
    return sft.make_trainer(inputs)


STAGE = dataclasses.replace(sft.STAGE, config_cls=FrozenEmbeddingsConfig, make_trainer=make_trainer)
NOT_A_STAGE = 3
'''

SEARCH_PATH = """
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class FrozenEmbeddingsSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="frozen-embeddings", path="pkg://frozen_embeddings/conf")
"""

# an option of posttrain's `sft` group: SFT's defaults, the new method and its field
OPTION = """
defaults:
  - default
  - _self_
method: sft_frozen_embeddings
# keep the token embeddings as the parent left them
freeze_embeddings: true
# the embedding rows' names in the model
embeddings: model.embed_tokens.weight
"""


def install(site: Path, entry_points: str) -> Path:
    """The package laid out as pip installs it into `site`."""
    package = site / "frozen_embeddings"
    (package / "conf" / "sft").mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (package / "conf" / "__init__.py").write_text("")
    (package / "conf" / "sft" / "frozen_embeddings.yaml").write_text(OPTION)
    plugin = site / "hydra_plugins" / "frozen_embeddings_searchpath"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(SEARCH_PATH)
    info = site / "frozen_embeddings-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: frozen-embeddings\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text(f"[posttrain.stages]\n{entry_points}\n")
    return site


def posttrain_with(site: Path, *args: str, cache_dir: Path) -> subprocess.CompletedProcess:
    """`posttrain <args>` in an environment where the package in `site` is installed."""
    argv, env = posttrain_argv(*args, cache_dir=cache_dir)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.slow  # an end-to-end run of 20-40 s: CI runs it with `pytest -m slow`
def test_a_method_from_another_package_trains_as_a_stage(tmp_path, cache_dir):
    site = install(tmp_path / "site", "sft_frozen_embeddings = frozen_embeddings:STAGE")
    out = tmp_path / "run"
    args = (
        "sft=frozen_embeddings", "align=none", f"run.output_dir={out}", "sft.max_steps=4",
        "sft.per_device_train_batch_size=8", "sft.learning_rate=3e-3", "sft.eval.num_prompts=4",
    )  # fmt: skip
    assert "sft: default, frozen_embeddings, none" in posttrain_with(site, "--help", cache_dir=cache_dir).stdout
    proc = posttrain_with(site, *args, cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft: sft_frozen_embeddings from base" in proc.stdout
    sft = manifest(out / "sft")
    assert sft["status"] == "complete" and sft["method"] == "sft_frozen_embeddings"
    assert sft["config"]["freeze_embeddings"] is True
    # the registering package is part of the stage's key and recorded beside it
    assert sft["content"]["plugin"] == "frozen-embeddings 0.3.1"
    # the plugin's own code ran: embeddings as the base had them, every other layer trained
    base = load_file(str(Path(sft["parent"]["source"]) / "model.safetensors"))
    trained = load_file(str(out / "sft" / "model.safetensors"))
    embeddings = "model.embed_tokens.weight"
    assert torch.equal(trained[embeddings], base[embeddings])
    assert all(not torch.equal(trained[k], base[k]) for k in base if k.endswith("proj.weight"))

    # the package's field is checked like posttrain's own, and a new version is a new key
    proc = posttrain_with(site, *args, "sft.embeddings=model.embed_tokens", "plan=true", cache_dir=cache_dir)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: sft.embeddings: must name a weight"
    metadata = site / "frozen_embeddings-0.3.1.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace("0.3.1", "0.4.0"))
    proc = posttrain_with(site, *args, "plan=true", cache_dir=cache_dir)
    assert proc.returncode == 1 and "a complete stage made with a different config (changed: plugin)" in proc.stderr
    proc = posttrain_with(site, *args, "plan=true", f"run.output_dir={tmp_path / 'upgraded'}", cache_dir=cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"key {sft['key']}" not in proc.stdout and "sft_frozen_embeddings from base" in proc.stdout


@pytest.mark.parametrize(
    "entry_point, message",
    [
        (
            "sft = frozen_embeddings:STAGE",
            "error: posttrain.stages entry point sft = 'frozen_embeddings:STAGE' (frozen-embeddings 0.3.1): "
            "'sft' is a built-in method name; register it under another",
        ),
        (
            "broken = frozen_embeddings.missing:STAGE",
            "error: posttrain.stages entry point broken = 'frozen_embeddings.missing:STAGE' (frozen-embeddings "
            "0.3.1) cannot be loaded: ModuleNotFoundError: No module named 'frozen_embeddings.missing'",
        ),
        (
            "odd = frozen_embeddings:NOT_A_STAGE",
            "error: posttrain.stages entry point odd = 'frozen_embeddings:NOT_A_STAGE' (frozen-embeddings 0.3.1) "
            "gives int, not a StageSpec (posttrain.stages.base) whose config_cls subclasses "
            "posttrain.config.StageConfig",
        ),
    ],
)
def test_a_bad_entry_point_is_one_line_naming_it(tmp_path, cache_dir, entry_point, message):
    site = install(tmp_path / "site", entry_point)
    proc = posttrain_with(site, "plan=true", f"run.output_dir={tmp_path / 'run'}", cache_dir=cache_dir)
    assert proc.returncode == 1
    assert proc.stderr.strip() == message
