"""REST gateway in front of the `acestep` Triton ensemble (no torch here).

`create_app(settings, engine)` builds the FastAPI app; `python -m gateway` serves it.
"""

from gateway.app import create_app
from gateway.engine import GenerationEngine, TritonEngine
from gateway.outputs import OutputStore
from gateway.settings import Settings

__all__ = ["GenerationEngine", "OutputStore", "Settings", "TritonEngine", "create_app"]
