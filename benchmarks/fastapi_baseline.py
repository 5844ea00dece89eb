"""The limit for any Python HTTP wrapper: one FastAPI route, same preprocessing + model, no extras.

uvicorn benchmarks.fastapi_baseline:app --port 3001
"""

from typing import Annotated

from fastapi import FastAPI, File, UploadFile

from digitops.inference.preprocess import preprocess
from digitops.inference.served import load_served_model
from digitops.inference.settings import Settings

SETTINGS = Settings.from_env()

app = FastAPI()
served = load_served_model(SETTINGS.model_tag, SETTINGS.shipped_model)


@app.post("/predict")
def predict(image: Annotated[UploadFile, File()]):
    prepared = preprocess(image.file.read())
    probabilities = served.answers(prepared.pixels[None])[0][0]
    return {"digit": int(probabilities.argmax()), "probabilities": probabilities.tolist()}
