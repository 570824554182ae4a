"""Image files -> uint8 arrays: the one loader behind `minivit predict` / `inspect`, the pretrained-model lesson
and image-folder data sets.

Policy: every image is opened with Pillow and converted explicitly to the channels asked for (RGB for 3, gray 'L'
for 1; channels=None keeps the file's own: 1 for a gray mode, else 3), then, when a size is given, resized as a
whole to (H, W) with Pillow's bilinear filter (antialiased when shrinking), without cropping and without keeping
the aspect ratio, as the original ViT evaluation pipeline resizes straight to the crop size. Pixels stay uint8;
normalizing them is the caller's step (minivit.data.transforms.normalize).

Errors name the file: FileNotFoundError "image PATH does not exist", ValueError "cannot read image PATH: ...".

Shapes: N images, H, W, C height, width, channels (C = 1 gray, 3 colour).
"""
import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow modes that hold one gray value per pixel (with channels=None these become C = 1)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")

_BILINEAR = getattr(Image, "Resampling", Image).BILINEAR     # Pillow >= 9.1 moved the filters to Image.Resampling


def image_suffixes():
    """File name endings Pillow can open ('.png', '.jpg', ...)."""
    return {ext.lower() for ext in Image.registered_extensions()}


def load_image(path, image_hw=None, channels=None):
    """An image file -> uint8 (H, W, C): converted to `channels` (1, 3, or None: the file's own), resized to
    `image_hw` = (H, W) when given (else the file's size)."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    try:
        with Image.open(path) as im:
            if channels is None:
                channels = 1 if im.mode in GRAY_MODES else 3
            im = im.convert("L" if channels == 1 else "RGB")
            if image_hw is not None and im.size != (image_hw[1], image_hw[0]):
                im = im.resize((image_hw[1], image_hw[0]), _BILINEAR)          # Pillow sizes are (W, H)
            a = np.asarray(im, dtype=np.uint8)                                 # (H, W) or (H, W, 3)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return a.reshape(a.shape[0], a.shape[1], channels)                         # (H, W, C)


def load_image_files(paths, image_hw, channels):
    """Image files -> uint8 (N, H, W, C), each converted to `channels` and resized to `image_hw` = (H, W)."""
    H, W = image_hw
    out = np.empty((len(paths), H, W, channels), dtype=np.uint8)               # (N, H, W, C)
    for i, path in enumerate(paths):
        out[i] = load_image(path, (H, W), channels)
    return out
