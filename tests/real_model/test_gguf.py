"""A `.gguf` model.path: the folder posttrain converts the file into holds what transformers loads
from the file itself (every tensor, the tokenizer), its manifest names the file's sha256, and a
copy cut short is one error line at plan time."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain import checkpoints
from posttrain.plan import load_config
from tests.conftest import compose_tree, run_posttrain
from tests.real_model.conftest import RECIPE

pytestmark = pytest.mark.real_model

SAMPLE = "<|im_start|>user\nSort these words: pear, fig, apple.<|im_end|>\n  Ünïcode 🙂 12 + 7 = 19"


def test_the_converted_folder_is_what_transformers_loads_from_the_file(gguf_file, real_folder, real_cache):
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    expected, converted = loaded.state_dict(), load_file(real_folder / "model.safetensors")
    assert set(converted) <= set(expected) and set(expected) - set(converted) <= {"lm_head.weight"}  # tied
    assert [name for name, tensor in converted.items() if not torch.equal(tensor, expected[name])] == []
    config = json.loads((real_folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == loaded.config.num_hidden_layers

    from_file = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert AutoTokenizer.from_pretrained(real_folder).encode(SAMPLE) == from_file.encode(SAMPLE)

    manifest = json.loads((real_folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    # model.path naming the file itself is the same model: the same folder, not converted again
    model = load_config(compose_tree([RECIPE, f"model.path={gguf_file}"])).model
    assert checkpoints.resolve(model, real_cache) == str(real_folder)


@pytest.mark.parametrize("megabytes", [1, 50])  # cut in the header's metadata, in the tensors
def test_a_gguf_file_cut_short_is_one_error_line_at_plan_time(megabytes, gguf_file, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with gguf_file.open("rb") as f:
        truncated.write_bytes(f.read(megabytes << 20))
    proc = run_posttrain("plan=true", "recipe=smollm2_sft_dpo", f"model.path={truncated}", cache_dir=tmp_path / "cache")
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: model.path: {truncated} is not a readable GGUF file (damaged or cut short: ")
