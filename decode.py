"""Image files -> pixels: every decoder the input pipeline uses, and the fast training crop.

  * load_rgb: any image PIL reads -> 8-bit RGB (grayscale, CMYK, palette, transparency over white,
    16-bit grayscale scaled rather than saturated).
  * The fast training path (main.py --fast-decode, the default): the same crops and flips as
    data.train_transform, about twice the images per core. The crop is drawn from the JPEG header's size
    (the same RNG draws as torchvision's RandomResizedCrop + RandomHorizontalFlip), then libjpeg-turbo
    decodes the file straight into a uint8 tensor (torchvision.io.decode_jpeg: identical pixels to PIL,
    ~1.5x faster) and torch's vectorised uint8 antialiased resize crops it (~2x faster than PIL's; within
    2 grey levels of PIL's, mean difference ~0.02). When the crop is at least 2x the output size, libjpeg
    decodes at 1/2, 1/4 or 1/8 scale (PIL's draft): it pays on big photos (benchmark.py measures it) but
    never applies to ImageNet-sized (~500x375) images at 224. PNG, CMYK, ... take the PIL path, and so does
    a JPEG that libjpeg-turbo refuses through torchvision (PIL decodes some of those) before it counts as bad.
    The dataset reads files with load_encoded (bytes + header, no pixels) and FastRandomResizedCrop
    decodes them: data.train_dataset wires the two together explicitly.
"""
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}

# A truncated JPEG must be an error we can catch and report, never a silently half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_rgb(path):
    """Decode any image PIL can read into 8-bit RGB (grayscale, CMYK, palette and RGBA included)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency onto white, as a viewer would, instead of keeping undefined colours.
        img = img.convert("RGBA")
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode in SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    return img.convert("RGB")


def _sixteen_bit_to_rgb(img):
    """16-bit grayscale (medical and scientific PNG/TIFF) -> 8-bit RGB over the full 0-65535 range.
    PIL's own convert("RGB") clips every value above 255 to white. Mode "I" (32-bit) is how PIL opens some
    16-bit files: it is scaled the same way when its values exceed 8 bits, kept as it is otherwise."""
    pixels = np.asarray(img, dtype=np.int64)
    if img.mode != "I" or pixels.max(initial=0) > 255:
        pixels = (np.clip(pixels, 0, 65535) * 255 + 32767) // 65535  # round(v / 257)
    gray = Image.fromarray(pixels.astype(np.uint8))  # 2-D uint8: mode "L"
    return gray.convert("RGB")


FAST_DECODE_INTERPOLATIONS = ("bilinear",)  # the only filter whose uint8 torch resize matches PIL's closely
PIL_FILTERS = {InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
               InterpolationMode.NEAREST: Image.NEAREST}

try:
    from torchvision.io import ImageReadMode as _ImageReadMode, decode_jpeg as _decode_jpeg
    # torchvision 0.29 deprecates its decoders in favour of TorchCodec; they still work, so don't warn per worker.
    warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision are deprecated")
except ImportError:  # a torchvision without decoders: PIL decodes, the crop/resize stays fast
    _decode_jpeg = None


class UnreadableImage(Exception):
    """A file whose header parsed but whose pixels did not decode (e.g. truncated): reported, skipped."""


def jpeg_header(data):
    """(mode, (width, height)) from a baseline/progressive JPEG's SOF segment, or None (let PIL look)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 9 < n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            height, width, comps = int.from_bytes(data[pos + 5:pos + 7], "big"), \
                int.from_bytes(data[pos + 7:pos + 9], "big"), data[pos + 9]
            return ({1: "L", 3: "RGB", 4: "CMYK"}.get(comps, "?"), (width, height)) if width and height else None
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


class EncodedImage:
    """A training file read but not decoded: its bytes and its header's format, mode and size."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())
        header = jpeg_header(self.data)  # ~20 us; PIL's Image.open costs ~10x that
        if header is not None:
            self.format, (self.mode, self.size) = "JPEG", header
            return
        with Image.open(io.BytesIO(self.data)) as img:  # header only; raises for what is not an image
            self.format, self.mode, self.size = img.format, img.mode, img.size


def load_encoded(path):
    return EncodedImage(path)


class FastRandomResizedCrop:
    """RandomResizedCrop + RandomHorizontalFlip + PILToTensor, deciding the crop before decoding.

    `reduced_decode`: let libjpeg decode at 1/2..1/8 scale when the crop stays >= the output size, then
    resize the same (fractional) box with PIL. The DCT-domain downscale stands in for part of the
    antialiasing filter: the same picture (mean difference < 1 grey level on photos), not the same bits.
    """

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation="bilinear",
                 hflip_prob=0.5, reduced_decode=True):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = INTERPOLATIONS[interpolation] if isinstance(interpolation, str) else interpolation
        self.hflip_prob = hflip_prob
        self.reduced_decode = reduced_decode

    def reduction(self, crop_h, crop_w, image):
        """The DCT scale denominator (1, 2, 4 or 8) that keeps the crop at least the output size."""
        r = 1
        if self.reduced_decode and image.format == "JPEG" and image.mode in ("RGB", "L"):
            while r < 8 and crop_h >= 2 * r * self.size[0] and crop_w >= 2 * r * self.size[1]:
                r *= 2
        return r

    def __call__(self, image):
        width, height = image.size
        # The same draws, in the same order, as RandomResizedCrop then RandomHorizontalFlip.
        i, j, h, w = transforms.RandomResizedCrop.get_params(torch.empty(1, 1, 1).expand(3, height, width),
                                                             self.scale, self.ratio)
        flip = self.hflip_prob > 0 and bool(torch.rand(1) < self.hflip_prob)
        r = self.reduction(h, w, image) if isinstance(image, EncodedImage) else 1
        try:
            if isinstance(image, Image.Image):
                pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
            elif (r == 1 and _decode_jpeg is not None and image.format == "JPEG" and image.mode in ("RGB", "L")
                  and image.data.rfind(b"\xff\xd9", len(image.data) - 64) >= 0):  # no end marker: let PIL judge
                try:
                    pixels = _decode_jpeg(torch.frombuffer(image.data, dtype=torch.uint8), mode=_ImageReadMode.RGB)
                except RuntimeError:
                    # torchvision stops at the first libjpeg complaint that PIL's libjpeg only warns about (a
                    # stray marker inside the compressed data reads as "truncated" there): PIL has the last
                    # word. The crop box was drawn above, so the crop is the one the fast path would take.
                    pixels = torch.from_numpy(np.array(load_rgb(image.path))).permute(2, 0, 1)
            elif r > 1:  # decode at 1/r scale (pixel k covers original pixels [k*r, (k+1)*r)), resize the box
                with Image.open(io.BytesIO(image.data)) as img:
                    img.draft("RGB", (width // r, height // r))
                    img = img.convert("RGB").resize(self.size[::-1], PIL_FILTERS[self.interpolation],
                                                    box=(j / r, i / r, (j + w) / r, (i + h) / r))
                out = torch.from_numpy(np.array(img)).permute(2, 0, 1)
                return (out.flip(-1) if flip else out).contiguous()
            else:
                pixels = torch.from_numpy(np.array(load_rgb(image.path))).permute(2, 0, 1)
        except (OSError, RuntimeError, ValueError, SyntaxError) as e:
            raise UnreadableImage(f"{type(e).__name__}: {e}") from None
        out = F2.resized_crop(pixels, i, j, h, w, list(self.size), self.interpolation, antialias=True)
        return (out.flip(-1) if flip else out).contiguous()
