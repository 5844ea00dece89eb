"""What a public service must not do: answer other sites' scripts, run code from a model file,
let a client's strings pick file paths, or take unbounded input."""

from __future__ import annotations

import pickle

import pytest
import torch

from digitops import checkpoint
from digitops.data import mnist
from tests.test_service import png_bytes


@pytest.fixture(scope="module")
def digit(mnist_dir) -> bytes:
    return png_bytes(mnist.load(mnist_dir, "t10k")[0][0])


def test_no_cors_unless_configured(client):
    origin = {"origin": "https://elsewhere.example"}
    preflight = client.options(
        "/predict", headers={**origin, "access-control-request-method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in client.get("/model", headers=origin).headers


class Payload:
    """An object whose unpickling would run code: what a tampered model file would carry."""

    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['PWNED']).touch()",))


def test_a_model_file_with_pickled_code_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED", str(marker))
    evil = tmp_path / "model.pt"
    torch.save({"model_args": {}, "state_dict": {}, "metadata": Payload()}, evil)
    with pytest.raises(checkpoint.CheckpointError, match="not a loadable"):
        checkpoint.load(evil)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload()))  # the payload is real: unpickled, it does run
    assert marker.exists()


def test_client_strings_never_become_paths(client, digit, tmp_path):
    files = {"image": ("../../../../tmp/digitops-upload.png", digit, "image/png")}
    reply = client.post("/predict", files=files)
    assert reply.status_code == 200
    assert not (tmp_path.parents[-1] / "tmp" / "digitops-upload.png").exists()
    unknown = client.post("/feedback", json={"prediction_id": "../../etc/passwd", "label": 1})
    assert unknown.status_code == 404 and unknown.json()["status"] == 404


def test_reload_wants_a_token_first_and_is_off_unless_one_is_set(client):
    # The in-process server has no DIGITOPS_ADMIN_TOKEN; tests/test_faults.py and
    # tests/test_e2e_serve.py check a server that has one (and that it never reaches the log).
    missing = client.post("/admin/reload")
    assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]
    disabled = client.post("/admin/reload", headers={"authorization": "Bearer guess"})
    assert disabled.status_code == 403 and "DIGITOPS_ADMIN_TOKEN" in disabled.json()["error"]
