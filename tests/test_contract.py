"""The published contract (/docs.json) is true: a client built from the document alone calls
the service and gets what it promises; schemathesis fuzzes a real server against it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from digitops import __version__
from digitops.data import mnist
from tests.conftest import FIXTURES
from tests.servers import bentoml_serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spec(client) -> dict:
    return client.get("/docs.json").json()


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory) -> bytes:
    directory = tmp_path_factory.mktemp("mnist")
    mnist._from_directory(FIXTURES / "mnist", directory)
    images, _ = mnist.load(directory, "t10k")
    buf = io.BytesIO()
    Image.fromarray(255 - images[0]).resize((280, 280)).save(buf, format="PNG")
    return buf.getvalue()


def operation(spec: dict, operation_id: str) -> tuple[str, str, dict]:
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            if op.get("operationId") == operation_id:
                return path, method, op
    raise LookupError(operation_id)


def reply_schema(spec: dict, op: dict, status: int) -> dict:
    """The documented JSON schema of a reply, with the document's components to resolve $refs."""
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    return {**schema, "components": spec["components"]}


def test_a_client_built_from_the_document_alone_calls_predict(client, spec, digit_png):
    path, method, op = operation(spec, "predict")
    form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in form:
        form = spec["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
    (field,) = form["required"]
    options = form["properties"]
    assert (options["noise"]["minimum"], options["noise"]["maximum"]) == (0, 1)
    assert options["invert"]["enum"][:3] == ["auto", "true", "false"]
    assert form["additionalProperties"] is False

    reply = client.request(method, path, files={field: ("d.png", digit_png, "image/png")})
    assert reply.status_code == 200
    jsonschema.validate(reply.json(), reply_schema(spec, op, 200))
    assert reply.json()["digit"] == 7

    bad = client.request(method, path, data={"noise": "2"}, files={field: digit_png})
    assert bad.status_code == 400 and "400" in op["responses"]
    jsonschema.validate(bad.json(), reply_schema(spec, op, 400))


def test_every_route_documents_its_body_parameters_and_errors(spec):
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            responses = op["responses"]
            assert "200" in responses, f"{method} {path}"
            if method == "post" and path not in ("/admin/reload",):
                assert op.get("requestBody", {}).get("content"), f"{method} {path} has no body"
            for status, response in responses.items():
                if int(status) >= 400 and path not in ("/readyz",):
                    assert "application/json" in response["content"], f"{path} {status}"
    assert set(operation(spec, "reload")[2]["responses"]) >= {"401", "403"}
    assert set(operation(spec, "predict")[2]["responses"]) >= {"400", "413", "415"}
    feedback = operation(spec, "feedback")[2]["requestBody"]["content"]
    assert set(feedback) == {"application/json", "multipart/form-data"}
    queue = {p["name"]: p["schema"] for p in operation(spec, "review_queue")[2]["parameters"]}
    assert (queue["k"]["minimum"], queue["k"]["maximum"]) == (1, 200)
    assert queue["strategy"]["enum"] == ["entropy", "margin", "least_confidence"]


def test_docs_describe_this_service_and_load_nothing_from_outside(client, spec):
    info = spec["info"]
    assert info["title"].startswith("digitops")
    assert info["version"].startswith(__version__) and "model digit-cnn" in info["version"]
    assert "BentoML" not in info["description"] and "http" not in info["description"]
    page = client.get("/docs").text
    assert "/docs.json" in page and "http://" not in page and "https://" not in page


@pytest.mark.parametrize(
    "body",
    [{"pixels": {}}, {"pixels": "x"}, {"pixels": [[[{}]]]}, {"pixels": [[1, 2]]}, {}],
    ids=["object", "string", "nested-object", "wrong-shape", "missing"],
)
def test_classify_answers_bad_input_with_a_4xx_object(client, body):
    reply = client.post("/classify", json=body)
    assert reply.status_code == 400
    assert isinstance(reply.json(), dict) and reply.json()["error"]


def test_classify_refuses_pixels_out_of_range_and_bodies_that_are_not_json(client):
    assert client.post("/classify", json={"pixels": [[[300] * 28] * 28]}).status_code == 400
    reply = client.post(
        "/classify", content=b"--x--", headers={"content-type": "multipart/form-data"}
    )
    assert reply.status_code == 415 and reply.json()["status"] == 415
    ok = client.post("/classify", json={"pixels": np.zeros((2, 28, 28)).tolist()})
    assert ok.status_code == 200 and np.asarray(ok.json()).shape == (2, 10)


def test_a_wrong_method_gets_405_with_allow(client):
    reply = client.request("TRACE", "/predict")
    assert reply.status_code == 405 and reply.headers["allow"] == "POST"
    assert reply.json() == {"error": "method TRACE not allowed; allowed: POST", "status": 405}


def test_options_come_from_the_form_only_and_unknown_ones_are_refused(client, digit_png):
    files = {"image": ("d.png", digit_png, "image/png")}
    reply = client.post("/predict", files=files, data={"nosie": "0.5"})
    assert reply.status_code == 400 and "nosie: unknown field" in reply.json()["error"]
    reply = client.post("/predict", files=files, params={"noise": "0"}, data={"noise": "0.0"})
    assert reply.status_code == 400 and "not in the URL" in reply.json()["error"]
    reply = client.post("/predict", files=files, data={"noise": "0", "seed": "1"})
    assert reply.status_code == 200


@pytest.mark.e2e
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path):
    """Every check on, bounded by --max-examples (tests/schemathesis.toml says which statuses
    schema-valid image uploads may get, and why).

    It takes 2.5-3.5 minutes on 2 cores, most of it in schemathesis itself: py-spy on the client
    found 73% of its time in Hypothesis drawing the floats of /classify's 28x28 pixel arrays in
    the coverage phase. The timeout only catches a hang, so it leaves room for a slow machine.
    """
    cli = Path(sys.executable).parent / "schemathesis"
    with bentoml_serve(tmp_path, DIGITOPS_FEEDBACK_PER_MINUTE="100000") as (base, _):
        out = subprocess.run(
            [
                str(cli),
                "--config-file",
                str(ROOT / "tests" / "schemathesis.toml"),
                "run",
                f"{base}/docs.json",
                "--checks",
                "all",
                "--max-examples",
                "20",
                "--seed",
                "1",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=600,  # under pytest-timeout's 900 s ceiling, so a hang fails here, saying so
        )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout or " passed" in out.stdout
