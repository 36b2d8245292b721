"""`ServeOptions`: every limit and knob of `molmoe serve`, with its default and why."""
from __future__ import annotations

from dataclasses import dataclass

from molmoe.errors import UsageError, is_integral
from molmoe.processing import DEFAULT_MAX_PIXELS


@dataclass(kw_only=True)
class ServeOptions:
    # Decode rows of the continuous batch. 8 rows x 4,096 slots of MolmoE's bf16 K/V are 4 GiB.
    max_batch: int = 8
    # Requests admitted at once (preprocessing + waiting for a row + decoding); beyond: 429.
    max_queue: int = 64
    # KV cache slots per row (prompt + answer). None: min(model positions, 4096). Fixed, so a
    # long request never waits for the whole batch to drain before the cache is resized.
    max_len: int | None = None
    # Largest max_tokens a request may ask for (400 above), and the default when it asks none.
    max_tokens_limit: int = 2048
    default_max_tokens: int = 200  # `molmoe generate`'s default
    # Request body bytes (413 above); a 20 MiB image is ~27 MiB as a base64 data: URL.
    max_body_bytes: int = 32 << 20
    # The whole body must arrive within this many seconds (408 after): a client sending it a
    # byte at a time, or not at all, would otherwise hold its request and buffer forever.
    body_timeout_s: float = 30.0
    # Open connections (uvicorn's limit_concurrency; 503 beyond). With max_body_bytes this bounds
    # the memory request bodies can take: max_connections x max_body_bytes (2 GiB by default).
    max_connections: int = 64
    # A connection must deliver each request's head (request line and headers) within this many
    # seconds of opening, or of the previous response: an idle or header-dripping client is
    # closed instead of holding one of max_connections forever.
    header_timeout_s: float = 10.0
    # Image limits: pixels (decompression-bomb guard) and bytes of the encoded file.
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS
    max_image_bytes: int = 20 << 20
    allow_local_files: str | None = None  # a directory: file paths / file:// URLs under it
    allow_remote_images: bool = False  # http(s) URLs (public addresses only)
    fetch_timeout_s: float = 10.0
    # Threads that fetch, decode and process images and text (never the engine thread).
    preprocess_workers: int = 2
    # Decode large JPEGs at reduced DCT scale when the model needs at most half their size
    # (PIL draft mode): faster, NOT bit-exact (docs/preprocessing.md). Off by default.
    fast_decode: bool = False
    # On SIGINT/SIGTERM: running requests get this long to finish, then they are cancelled.
    shutdown_grace_s: float = 30.0
    retry_after_s: int = 1  # the Retry-After of a 429
    api_key: str | None = None
    decode_mode: str | None = None  # Engine(mode=): None = CUDA graphs where possible

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_tokens_limit", "default_max_tokens",
                     "max_body_bytes", "max_image_bytes", "preprocess_workers", "retry_after_s",
                     "max_connections"):
            value = getattr(self, name)
            if not is_integral(value) or value < 1:
                raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_len is not None and (not is_integral(self.max_len) or self.max_len < 2):
            raise UsageError(f"max_len must be an integer >= 2, got {self.max_len!r}")
        if self.max_image_pixels is not None and (not is_integral(self.max_image_pixels)
                                                  or self.max_image_pixels < 1):
            raise UsageError(f"max_image_pixels must be >= 1 or None, got "
                             f"{self.max_image_pixels!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit
        if not self.shutdown_grace_s >= 0 or not self.fetch_timeout_s > 0 \
                or not self.body_timeout_s > 0 or not self.header_timeout_s > 0:
            raise UsageError("shutdown_grace_s must be >= 0; fetch_timeout_s, body_timeout_s and "
                             "header_timeout_s > 0")
        if self.api_key is not None and not self.api_key:
            raise UsageError("the API key may not be empty")
