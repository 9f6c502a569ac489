"""What the server and the trainer share: the setup error, start-up checks of model folders,
model fetching, atomic folder writes, the one LoRA merge and the one settings-file loader.

Nothing here knows vLLM or the HTTP API; `server`, `rm_training` and `bench` import it, never the
other way round.
"""
