"""Weights that are not what they claim (issue 22, items 2 and 3): a weight index naming files outside its folder,
integer (quantized) tensors in a float model, NaN or infinite values. Each is one line from ``generate`` (exit 2)
before a model is built, for transformers folders and for our checkpoints alike."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm_lightning.checkpoint import load_checkpoint, save_checkpoint
from lm_lightning.pretrained import load_source

from conftest import run_main
from test_compat import OLD
from test_pretrained import make_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_folder("llama", tmp_path_factory.mktemp("llama"))


def copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def sharded(folder, tmp_path, outside: str):
    """``folder`` with its weights as an index naming one shard inside and one at ``outside``."""
    model = copy(folder, tmp_path)
    weights = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(weights)
    save_file({n: weights[n] for n in names[:3]}, model / "part-1.safetensors")
    save_file({n: weights[n] for n in names[3:]}, tmp_path / "elsewhere.safetensors")
    weight_map = {**{n: "part-1.safetensors" for n in names[:3]}, **{n: outside for n in names[3:]}}
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


def generate_fails(capsys, source, *expected: str) -> None:
    assert run_main("generate", "--ckpt_path", str(source), "--max_new_tokens", "2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("outside", ["../elsewhere.safetensors", "ABSOLUTE", "/etc/passwd", "../../../../etc/passwd"])
def test_a_weight_index_naming_a_file_outside_its_folder_is_refused(llama, tmp_path, capsys, outside):
    outside = str(tmp_path / "elsewhere.safetensors") if outside == "ABSOLUTE" else outside
    generate_fails(capsys, sharded(llama, tmp_path, outside), "outside the folder", "model.safetensors.index.json")


def test_a_link_out_of_the_folder_is_refused_and_a_shard_inside_loads(llama, tmp_path, capsys):
    model = sharded(llama, tmp_path, "part-2.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", model / "part-2.safetensors")
    generate_fails(capsys, model, "'part-2.safetensors', which is outside the folder")
    (model / "part-2.safetensors").unlink()
    shutil.move(tmp_path / "elsewhere.safetensors", model / "part-2.safetensors")
    assert run_main("generate", "--ckpt_path", str(model), "--max_new_tokens", "2") == 0


def test_a_sharded_snapshot_of_the_hub_cache_loads(llama, tmp_path):
    """models--org--name/snapshots/<rev>/<file> are links to ../../blobs/<hash>, as huggingface_hub writes them."""
    model = sharded(llama, tmp_path, "part-2.safetensors")
    shutil.move(tmp_path / "elsewhere.safetensors", model / "part-2.safetensors")
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        os.symlink(f"../../blobs/blob{i}", snapshot / f.name)
    assert run_main("generate", "--ckpt_path", str(snapshot), "--max_new_tokens", "2") == 0


@pytest.mark.parametrize("index", ["[1, 2]", '{"weight_map": ["a"]}', '{"metadata": {}}', "not json"])
def test_an_index_that_is_not_one(llama, tmp_path, capsys, index):
    model = sharded(llama, tmp_path, "part-1.safetensors")
    (model / "model.safetensors.index.json").write_text(index)
    generate_fails(capsys, model, "is not a weight index")


def test_a_missing_shard(llama, tmp_path, capsys):
    generate_fails(capsys, sharded(llama, tmp_path, "part-9.safetensors"), "part-9.safetensors, which does not exist")


@pytest.mark.parametrize("bad", ["int8", "nan", "inf"])
def test_integer_or_non_finite_weights_in_a_folder(llama, tmp_path, capsys, bad):
    model = copy(llama, tmp_path)
    weights = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    weights[name] = {"int8": lambda w: w.to(torch.int8), "nan": lambda w: w.fill_(float("nan")),
                     "inf": lambda w: w.index_fill(0, torch.tensor([3]), float("-inf"))}[bad](weights[name])
    save_file(weights, model / "model.safetensors")
    generate_fails(capsys, model, "tensor transformer.h.1.mlp.c_proj.weight", "int8" if bad == "int8" else "NaN or infinite")


@pytest.mark.parametrize("bad", ["int8", "nan"])
def test_integer_or_non_finite_weights_in_a_checkpoint(tmp_path, capsys, bad):
    ckpt = tmp_path / "model.ckpt"
    checkpoint = load_checkpoint(OLD)
    name = next(k for k in checkpoint["state_dict"] if k.endswith("c_fc.weight"))
    weight = checkpoint["state_dict"][name]
    checkpoint["state_dict"][name] = weight.to(torch.int8) if bad == "int8" else weight.fill_(float("nan"))
    save_checkpoint(checkpoint, ckpt)
    generate_fails(capsys, ckpt, f"tensor {name.removeprefix('model.')}", "int8" if bad == "int8" else "NaN or infinite")
    assert load_source(OLD)[0] is not None  # the committed checkpoint itself still loads


def edit_config(model, **changes):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | changes))


@pytest.mark.parametrize("changes, expected", [
    ({"num_hidden_layers": "two"}, "config.json num_hidden_layers='two' must be an integer"),
    ({"num_attention_heads": None}, "config.json num_attention_heads=None must be an integer"),
    ({"hidden_size": 32.0}, "config.json hidden_size=32.0 must be an integer"),
    ({"vocab_size": 10**9}, "needs at least"),
    ({"num_hidden_layers": 10**6}, "needs at least"),
    ({"intermediate_size": 10**10}, "needs at least"),
    ({"max_position_embeddings": 10**12}, "GiB of memory"),
])
def test_a_config_that_does_not_fit_its_weights_or_memory(llama, tmp_path, capsys, changes, expected):
    """Checked against the weights and the machine's memory before a model is allocated (these hung or raised
    a DefaultCPUAllocator traceback)."""
    model = copy(llama, tmp_path)
    edit_config(model, **changes)
    generate_fails(capsys, model, "cannot load", expected)


def test_a_config_that_is_not_an_object(llama, tmp_path, capsys):
    model = copy(llama, tmp_path)
    (model / "config.json").write_text("[1, 2]")
    generate_fails(capsys, model, "config.json holds a list")


@pytest.mark.parametrize("size", [0, 8, "half"])
def test_truncated_weights(llama, tmp_path, capsys, size):
    model = copy(llama, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2 if size == "half" else size])
    generate_fails(capsys, model, "cannot load", "its weights cannot be read", "download the model's weight files again")


def test_a_header_that_declares_more_than_the_file_holds(llama, tmp_path, capsys):
    model = copy(llama, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] = 10**15
    text = json.dumps(header).encode()
    (model / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    generate_fails(capsys, model, "cannot load", "its weights cannot be read", "download the model's weight files again")


@pytest.mark.parametrize("changes, expected", [
    ({"n_layer": 10**6}, "needs at least"),
    ({"n_head": "x"}, "n_head='x' is not of type int"),
    ({"block_size": 512}, "its weights do not fit its hyper_parameters (size mismatch for transformer.wpe.weight"),
    ({"vocab_size": None}, "its hyper_parameters give vocab_size=None, not a number of tokens"),
])
def test_a_checkpoint_whose_hyperparameters_were_edited(tmp_path, capsys, changes, expected):
    ckpt = tmp_path / "model.ckpt"
    checkpoint = load_checkpoint(OLD)
    checkpoint["hyper_parameters"].update(changes)
    save_checkpoint(checkpoint, ckpt)
    generate_fails(capsys, ckpt, expected)
