"""A tensor-parallel worker: its runtime (sequences, steps), sampling and gRPC service."""

# Static decoders per worker (Runtime lanes): this many sequences decode at once each on their
# own, their steps queued back to back on the GPU without parking each other's state.
DECODERS = 2
