"""The floor under any BentoML service on this machine: read the multipart upload, reply with a
fixed JSON as big as a /predict reply. No preprocessing, no model.

bentoml serve benchmarks.floor_service:FloorService --port 3003
"""

import bentoml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from digitops.inference.settings import Settings

app = FastAPI()
# The size of a real /predict reply: ten probabilities, a 28x28 PNG in base64, the model's name.
REPLY = {"digit": 7, "probabilities": [0.1] * 10, "input_png": "A" * 400, "model": {}}


@bentoml.service(http={"host": "127.0.0.1", "port": 3003}, workers=Settings.from_env().workers)
@bentoml.asgi_app(app, path="/")
class FloorService:
    @app.post("/predict")
    async def predict(self, request: Request):
        form = await request.form()
        await form["image"].read()
        return JSONResponse(REPLY)
