"""hades-gpu: GPU-first document ingestion — chunk, embed (local or Triton), graph, ISNE."""

__version__ = "0.1.0"
