"""image: image processing with PIL -- build a deterministic 512x512 RGB pattern in memory,
then resize, rotate, blur, sharpen, convert to greyscale, thumbnail; PNG round trip.
Answer: sha256 hex of the raw bytes of the resulting greyscale image."""
import hashlib
import io

from PIL import Image, ImageChops, ImageFilter, ImageOps

NAME = "image"


def _source():
    g = Image.linear_gradient("L").resize((512, 512))              # vertical ramp
    r = g.rotate(90)                                                # horizontal ramp
    b = ImageChops.multiply(Image.radial_gradient("L").resize((512, 512)), ImageOps.invert(g))
    return Image.merge("RGB", (r, g, b))


def run():
    img = _source()
    img = img.resize((1024, 1024), Image.BICUBIC)
    img = img.rotate(30, resample=Image.BILINEAR, expand=True, fillcolor=(0, 0, 0))
    img = img.filter(ImageFilter.GaussianBlur(3))
    img = img.filter(ImageFilter.SHARPEN).filter(ImageFilter.EDGE_ENHANCE)
    img = ImageOps.autocontrast(img.convert("L"))
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img.thumbnail((400, 400), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")                                     # encode + decode round trip
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    return hashlib.sha256(out.tobytes()).hexdigest()


if __name__ == "__main__":
    print(run())
