"""`make bench`: training speed, accuracy through the API, the forward pass, latency and
throughput of the service beside baselines, load and soak."""

import json
from pathlib import Path


def save_report(out: Path, name: str, data: object, lines: list[str]) -> None:
    """Write `name`.json and `name`.md into `out` and print the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
