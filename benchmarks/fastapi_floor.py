"""The floor under a plain FastAPI route on this machine: what floor_service.py does (read the
multipart upload, reply with a fixed JSON as big as a /predict reply), without BentoML.

Beside the BentoML floor it says what BentoML's stack costs per request; beside the FastAPI
baseline, what the work itself costs there.

uvicorn benchmarks.fastapi_floor:app --port 3004
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from benchmarks.floor_service import REPLY

app = FastAPI()


@app.post("/predict")
async def predict(request: Request):
    form = await request.form()
    await form["image"].read()
    return JSONResponse(REPLY)
