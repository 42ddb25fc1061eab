"""What a server is started with: one frozen value built by `runtime serve` (or a Ray deployment)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

STATIC_DIR = Path(__file__).resolve().parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Server options; defaults are `runtime serve`'s."""
    model: Path                                   # one exported folder, or a folder of them
    host: str = "127.0.0.1"
    port: int = 7860
    credentials: tuple = ()                       # ((user, password), ...) for HTTP Basic; () = no auth
    queue: int = 16                               # requests waiting beyond the running ones; more get 429
    workers: int = 1                              # pipeline runs at the same time
    threads: int = 0                              # onnxruntime intra-op threads per session (0: its default)
    provider: str = "auto"
    verify: bool = True                           # SHA-256 of the graphs when a model loads
    cors_origins: tuple = ()
    max_body_bytes: int = 64 << 20                # larger request bodies get 413
    max_image_pixels: int = 4096 * 4096           # decoded images larger than this are refused before decoding
    static_dir: Path = field(default=STATIC_DIR)
    max_batch: int = 1                            # images merged into one pipeline run (runtime.serve.batching)
    batch_wait_ms: int = 10                       # how long a run waits for compatible requests to join it
    lora_dir: Path | None = None                  # LoRA files for <lora:name:w> prompt tags and /sdapi/v1/loras
    embeddings_dir: Path | None = None            # textual-inversion files prompts name; /sdapi/v1/embeddings

    def __post_init__(self):
        for name, low in (("queue", 0), ("workers", 1), ("threads", 0), ("port", 0), ("max_batch", 1),
                          ("batch_wait_ms", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.port > 65535:
            raise UserError(f"--port must be in [0, 65535], got {self.port}")
        for option, folder in (("--lora-dir", self.lora_dir), ("--embeddings-dir", self.embeddings_dir)):
            if folder is not None and not Path(folder).is_dir():
                raise UserError(f"{option} {folder}: no such folder")

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect."""
        return self.host in LOOPBACK or self.host.startswith("127.")


def parse_credentials(text: str | None) -> tuple:
    """`USER:PASS[,USER2:PASS2]` (A1111's --api-auth) -> ((user, password), ...)."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UserError(f"--api-auth takes USER:PASS[,USER2:PASS2], got an entry {item.strip()!r}")
        pairs.append((user, password))
    return tuple(pairs)
