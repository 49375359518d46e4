"""Reading arbitrary image files as upright 8-bit RGB, with a reason when a file cannot be used.

Photos collected from the web come in every mode PIL knows (CMYK, palette, 16-bit grey, with alpha,
EXIF-rotated ...); an annotator wants HWC uint8 RGB. Failures raise `UnreadableImageError` whose
message is the reason to report, so a batch job can skip the file and go on.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from annotator.util import HWC3

# EXIF tag 0x0112: how the camera held the sensor; 1 means the stored pixels are already upright.
EXIF_ORIENTATION_TAG = 0x0112
UPRIGHT = 1
# Full-scale values of the high-bit-depth integer modes, mapped onto 255.
UINT16_MAX = 65535


class UnreadableImageError(ValueError):
    """The file is not a usable image; str(error) is the reason, e.g. 'truncated or corrupt: ...'.

    transient: the cause may pass (no permission to read it, an I/O error of the disk or the network file
    system) rather than lie in the file's bytes, so trying again later can succeed.
    """

    def __init__(self, reason: str, transient: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient


@dataclass(frozen=True)
class DecodedImage:
    """pixels: HWC uint8 RGB, upright. file_is_rgb_jpeg: the file itself is an upright 8-bit RGB JPEG,
    so its bytes can be copied instead of re-encoded (no generation loss)."""

    pixels: np.ndarray
    file_is_rgb_jpeg: bool


def read_image_rgb(path: str | Path, max_pixels: int | None = Image.MAX_IMAGE_PIXELS) -> DecodedImage:
    """Decode an image file to upright RGB uint8 (HWC, values 0..255).

    EXIF orientation is applied; alpha is composited onto white; grey and palette images are expanded;
    16-bit grey is scaled (not clipped) to 8 bits; CMYK and other colour spaces go through PIL's
    conversion. Images with more than `max_pixels` pixels are refused before their pixels are decoded
    (decompression-bomb guard; None disables our limit, PIL's own hard limit still applies).
    Raises UnreadableImageError with the reason for empty, unknown, corrupt, truncated or too large files.
    """
    path = Path(path)
    # A FIFO or device would block or never end; a dangling link has nothing to read.
    if not path.is_file():
        if path.is_symlink() and not path.exists():
            raise UnreadableImageError(f"a link to nothing: {os.readlink(path)} does not exist")
        raise UnreadableImageError("not a regular file")
    try:
        file = open(path, "rb")
    except OSError as err:
        raise UnreadableImageError(f"cannot open: {err.strerror}", transient=True) from err
    try:
        with file, warnings.catch_warnings():
            # PIL only warns between its limit and twice its limit; a warning is as bad as an error here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if os.fstat(file.fileno()).st_size == 0:
                raise UnreadableImageError("empty file (0 bytes)")
            with Image.open(file) as image:
                return _decode(image, max_pixels)
    except UnreadableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UnreadableImageError(f"too large (decompression-bomb guard): {err}") from err
    except UnidentifiedImageError as err:
        raise UnreadableImageError("not an image (format not recognised)") from err
    except OSError as err:
        if err.errno is not None:  # the system failed to read the file (EIO, ESTALE ...): not its content
            raise UnreadableImageError(f"read error: {err.strerror or err}", transient=True) from err
        raise UnreadableImageError(f"truncated or corrupt: {err}") from err
    except (SyntaxError, ValueError, EOFError) as err:
        # PIL reports truncation and corrupt streams as OSError; some plugins raise SyntaxError/ValueError.
        raise UnreadableImageError(f"truncated or corrupt: {err}") from err


def _decode(image: Image.Image, max_pixels: int | None) -> DecodedImage:
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        raise UnreadableImageError(f"too large: {width}x{height} = {width * height} pixels > {max_pixels}")
    image.load()
    orientation = image.getexif().get(EXIF_ORIENTATION_TAG, UPRIGHT)
    file_is_rgb_jpeg = image.format == "JPEG" and image.mode == "RGB" and orientation == UPRIGHT
    if orientation != UPRIGHT:
        image = ImageOps.exif_transpose(image)
    return DecodedImage(pixels=_to_rgb_array(image), file_is_rgb_jpeg=file_is_rgb_jpeg)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (PNG/TIFF): PIL's convert("L") would clip at 255; scale the full range instead.
        grey = np.asarray(image).astype(np.float64)
        return HWC3(np.clip(np.rint(grey * 255.0 / UINT16_MAX), 0, 255).astype(np.uint8))
    if mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        # Float images carry no scale of their own; [0, 1] is the common convention, else assume 0..255.
        scale = 255.0 if grey.size and np.nanmax(grey) <= 1.0 else 1.0
        return HWC3(np.clip(np.rint(np.nan_to_num(grey) * scale), 0, 255).astype(np.uint8))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        return HWC3(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"))
