"""`python -m hades_gpu.ingest corpus=... output=...`: the main job (same as `hades-ingest`)."""

from hades_gpu.cli import ingest_main

if __name__ == "__main__":
    ingest_main()
