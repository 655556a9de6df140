"""retrieval layer: query an ingest output (embed the query, rank its chunks, optionally re-rank
through the chunk graph or ISNE vectors). Above store and embedding; nothing below imports it."""
