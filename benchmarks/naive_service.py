"""The naive BentoML service: the same work, one forward pass per request, no batching.

bentoml serve benchmarks.naive_service:NaiveDigitService --port 3002
"""

from pathlib import Path

import bentoml

from digitops.inference.preprocess import preprocess
from digitops.inference.served import load_served_model
from digitops.inference.settings import Settings

SETTINGS = Settings.from_env()


@bentoml.service(http={"host": "127.0.0.1", "port": 3002})
class NaiveDigitService:
    def __init__(self) -> None:
        self.served = load_served_model(SETTINGS.model_tag, SETTINGS.shipped_model)

    @bentoml.api
    def predict(self, image: Path) -> dict:
        prepared = preprocess(image.read_bytes())
        probabilities = self.served.answers(prepared.pixels[None])[0][0]
        return {"digit": int(probabilities.argmax()), "probabilities": probabilities.tolist()}
