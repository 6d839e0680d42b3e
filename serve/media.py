"""Where a request's images may come from, and fetching them (vLLM's policy).

    data:image/...;base64,...   always
    file:///path                only under --allowed-local-media-path (after resolving symlinks and '..')
    http(s)://...               only with --enable-http-media, with a timeout and a byte cap
    anything else               refused: a bare path would let a client read the server's files

`MediaPolicy.load` runs on a worker thread (inside the input processor), never on the event loop,
so a blocking HTTP client is the right tool here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import urllib.parse
import warnings
from pathlib import Path

import httpx
from PIL import Image

from serve.protocol import ApiError

DEFAULT_FETCH_TIMEOUT = 5.0  # seconds, vLLM's VLLM_IMAGE_FETCH_TIMEOUT
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


def media_error(message: str, status: int = 400, code: str = "invalid_image_url") -> ApiError:
    return ApiError(status, message, param="messages", code=code)


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: Path | None = None
    enable_http_media: bool = False
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int | None = None  # checked from the header here so that the 413 names the limit

    def load(self, reference: object) -> bytes:
        """An image reference from a request -> its encoded bytes, for the preprocessor to decode."""
        if not isinstance(reference, str):
            raise media_error(f"an image reference must be a URL string, got {type(reference).__name__}")
        scheme = reference.split(":", 1)[0].lower() if ":" in reference else ""
        if scheme == "data":
            data = self._decode_data_url(reference)
        elif scheme == "file":
            data = self._read_local(reference)
        elif scheme in ("http", "https"):
            data = self._fetch(reference)
        else:
            raise media_error(f"unsupported image URL {reference[:80]!r}: use a data:image/...;base64 URL"
                              + (", a file:// URL" if self.allowed_local_media_path else "")
                              + (" or an http(s) URL" if self.enable_http_media else ""))
        self.check_pixels(data)
        return data

    def _decode_data_url(self, url: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma:
            raise media_error("malformed data URL: expected data:image/<type>;base64,<data>")
        media_type, *parameters = header[len("data:"):].split(";")
        if not media_type.strip().lower().startswith("image/"):
            raise media_error(f"unsupported data URL media type {media_type.strip() or '(none)'!r}: expected image/*")
        if "base64" not in (parameter.strip().lower() for parameter in parameters):
            raise media_error(f"unsupported data URL {header[:60]!r}: only base64 data (';base64,') is accepted")
        if len(payload) > self.max_image_bytes * 4 // 3 + 4:
            raise media_error(f"the data URL is over the {self.max_image_bytes} byte image limit", 413,
                              "image_too_large")
        try:
            # Line-wrapped (MIME-style) base64 is common; anything else outside the alphabet is an error.
            return base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as error:
            raise media_error(f"the data URL payload is not valid base64 ({error}); encode the image bytes with "
                              "standard base64", code="invalid_base64") from error

    def _read_local(self, url: str) -> bytes:
        if self.allowed_local_media_path is None:
            raise media_error("file:// image URLs are disabled on this server (start it with "
                              "--allowed-local-media-path DIR to allow files under DIR); send a data URL instead",
                              code="local_media_disabled")
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise media_error(f"file URL {url[:80]!r} names a host; use file:///absolute/path")
        root = self.allowed_local_media_path.resolve()
        path = Path(urllib.parse.unquote(parsed.path)).resolve()
        # resolve() follows symlinks and '..', so a link inside the root that points out is refused too.
        if not path.is_relative_to(root):
            raise media_error(f"file URL {url[:80]!r} is outside the allowed media directory {str(root)!r}",
                              code="local_media_forbidden")
        if not path.is_file():
            raise media_error(f"no file at {str(path)!r}", code="local_media_not_found")
        size = path.stat().st_size
        if size > self.max_image_bytes:
            raise media_error(f"{str(path)!r} is {size} bytes, over the {self.max_image_bytes} byte image limit",
                              413, "image_too_large")
        return path.read_bytes()

    def _fetch(self, url: str) -> bytes:
        if not self.enable_http_media:
            raise media_error("http(s) image URLs are disabled on this server (start it with --enable-http-media); "
                              "send the image as a data:image/...;base64 URL instead", code="http_media_disabled")
        try:
            with httpx.stream("GET", url, timeout=self.fetch_timeout, follow_redirects=True) as response:
                if response.status_code != 200:
                    raise media_error(f"fetching {url[:80]!r} gave HTTP {response.status_code}",
                                      code="image_fetch_failed")
                chunks, total = [], 0
                for chunk in response.iter_bytes():
                    total += len(chunk)
                    # Counted while streaming: a Content-Length header may lie or be missing.
                    if total > self.max_image_bytes:
                        raise media_error(f"{url[:80]!r} is over the {self.max_image_bytes} byte image limit", 413,
                                          "image_too_large")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException as error:
            raise media_error(f"fetching {url[:80]!r} timed out after {self.fetch_timeout} s",
                              code="image_fetch_timeout") from error
        except httpx.HTTPError as error:
            raise media_error(f"fetching {url[:80]!r} failed: {error}", code="image_fetch_failed") from error

    def check_pixels(self, data: bytes) -> None:
        """Refuses an image whose header declares more than `max_pixels` pixels (a decompression bomb)
        with 413. Anything unreadable is left to the preprocessor, whose messages say what is wrong."""
        if self.max_pixels is None:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as image:  # parses the header only
                    width, height = image.size
        except Image.DecompressionBombError:
            width, height = self.max_pixels + 1, 1
        except Exception:  # not an image, truncated header...: the preprocessor reports it
            return
        if width * height > self.max_pixels:
            raise media_error(f"the image is {width}x{height} = {width * height} pixels, over the limit of "
                              f"{self.max_pixels} pixels; send a smaller image", 413, "image_too_large")

