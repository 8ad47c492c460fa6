"""Small faults: a prompt file read byte for byte, an underflowing temperature, bad requests to the served model,
compressed corpora."""

import gzip
import json

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

from lm_lightning.commands import _read_prompt
from lm_lightning.data.corpus import DataError, iter_documents, resolve_sources
from lm_lightning.generate import Sampling, next_token


def test_prompt_file_reaches_the_model_byte_for_byte(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_bytes("line one\r\nline two\rline three\n床\r\n".encode())
    assert _read_prompt("", str(path)).encode() == path.read_bytes()


def test_a_temperature_that_underflows_is_greedy():
    """Scaled by 1/1e-38 a row's largest logit overflows to +inf, or (all negative, the others masked as the UTF-8
    guard does) every logit to -inf: either way the greedy token, never an id past the vocabulary."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[2] = -5.0 - torch.rand(50, generator=torch.Generator().manual_seed(1))
    logits[3, 10:] = float("-inf")
    logits[3, :10] = -logits[3, :10].abs() - 3
    Sampling(temperature=1e-38)  # accepted
    for top_k, top_p in ((None, 1.0), (5, 1.0), (None, 0.9)):
        assert torch.equal(next_token(logits, temperature=1e-38, top_k=top_k, top_p=top_p), logits.argmax(dim=-1))


@pytest.fixture(scope="module")
def served(tiny_run):
    mlflow.set_tracking_uri(tiny_run["tracking_uri"])
    return mlflow.pyfunc.load_model(f"runs:/{tiny_run['run_id']}/model")


@pytest.mark.usefixtures("one_thread")
def test_the_served_model_answers_bad_params_with_400_and_one_line(served):
    # The scoring server's own request handler (what `mlflow models serve` runs); its web layer answers an
    # MlflowException with the exception's HTTP status and JSON (scoring_server._async_catch_mlflow_exception).
    body = {"inputs": ["The "], "params": {"max_new_tokens": -5}}
    with pytest.raises(MlflowException) as raised:
        scoring_server.invocations(json.dumps(body), "application/json", served, served.metadata.get_input_schema())
    assert raised.value.get_http_status_code() == 400
    assert "max_new_tokens=-5 must be >= 0" in raised.value.message and "stack_trace" not in raised.value.serialize_as_json()


def test_the_model_refuses_a_prompt_that_is_not_text(served):
    with pytest.raises(MlflowException, match=r"input 0 is None, not a string") as raised:
        served.predict(["The ", None][1:])
    assert raised.value.get_http_status_code() == 400


def test_gzip_corpora_are_read_and_other_compression_is_named(tmp_path):
    text = "first line\nsecond line\n"
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"text": "one"}\n{"text": "two"}\n'))
    assert ["".join(doc) for doc in iter_documents(resolve_sources(str(tmp_path / "a.txt.gz"))[0], "text")] == [text]
    assert ["".join(doc) for doc in iter_documents(resolve_sources(str(tmp_path / "b.jsonl.gz"))[0], "text")] == ["one", "two"]
    assert len(resolve_sources(str(tmp_path))) == 2  # a folder's .gz text files are part of it
    (tmp_path / "c.txt").write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DataError, match=r"c.txt is gzip-compressed; name it .gz"):
        ["".join(doc) for doc in iter_documents(resolve_sources(str(tmp_path / "c.txt"))[0], "text")]
