"""The similarity core: the runtime a process works with (settings, store, embedder, fetcher,
project schemas) and the background embedding of what a request had no time for.

It sits above the store and the encoders and below the jobs layer (workers/: RQ) and the
shells (backend/: HTTP, echolabel/cli/): nothing here imports rq or redis.
"""
