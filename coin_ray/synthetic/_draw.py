"""Drawing primitives of the synthetic benchmark: colours, shapes, object classes and a 3x5 pixel font.

Everything is drawn with PIL ImageDraw polygons/rectangles/ellipses and a font defined here (not a
system or Pillow font), so the same seed gives byte-identical images on every machine.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "OBJECT_CLASSES", "GLYPH_CHARS", "canvas", "draw_shape", "draw_object",
           "draw_text", "text_width", "finish"]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "cross", "square", "triangle")
OBJECT_CLASSES: tuple[str, ...] = ("apple", "boat", "car", "fish", "flag", "house", "moon", "tree")
BACKGROUND = (40, 40, 48)

# 3x5 glyphs, rows top to bottom, "#" = ink
_FONT_ROWS = {
    "A": ".#.|#.#|###|#.#|#.#", "B": "##.|#.#|##.|#.#|##.", "C": ".##|#..|#..|#..|.##", "D": "##.|#.#|#.#|#.#|##.",
    "E": "###|#..|##.|#..|###", "F": "###|#..|##.|#..|#..", "G": ".##|#..|#.#|#.#|.##", "H": "#.#|#.#|###|#.#|#.#",
    "I": "###|.#.|.#.|.#.|###", "J": "..#|..#|..#|#.#|.#.", "K": "#.#|#.#|##.|#.#|#.#", "L": "#..|#..|#..|#..|###",
    "M": "#.#|###|###|#.#|#.#", "N": "##.|#.#|#.#|#.#|#.#", "O": ".#.|#.#|#.#|#.#|.#.", "P": "##.|#.#|##.|#..|#..",
    "Q": ".#.|#.#|#.#|##.|.##", "R": "##.|#.#|##.|#.#|#.#", "S": ".##|#..|.#.|..#|##.", "T": "###|.#.|.#.|.#.|.#.",
    "U": "#.#|#.#|#.#|#.#|###", "V": "#.#|#.#|#.#|#.#|.#.", "W": "#.#|#.#|###|###|#.#", "X": "#.#|#.#|.#.|#.#|#.#",
    "Y": "#.#|#.#|.#.|.#.|.#.", "Z": "###|..#|.#.|#..|###",
    "0": "###|#.#|#.#|#.#|###", "1": ".#.|##.|.#.|.#.|###", "2": "##.|..#|.#.|#..|###", "3": "##.|..#|.#.|..#|##.",
    "4": "#.#|#.#|###|..#|..#", "5": "###|#..|##.|..#|##.", "6": ".##|#..|###|#.#|###", "7": "###|..#|.#.|.#.|.#.",
    "8": "###|#.#|###|#.#|###", "9": "###|#.#|###|..#|##.",
}
GLYPH_CHARS = "".join(sorted(_FONT_ROWS))
_FONT = {c: np.array([[ch == "#" for ch in row] for row in rows.split("|")]) for c, rows in _FONT_ROWS.items()}


def canvas(width: int, height: int, rng: np.random.Generator, background: tuple[int, int, int] = BACKGROUND
           ) -> Image.Image:
    """A plain background with a slight random tint, so the colour of the background is not a cue."""
    tint = rng.integers(-12, 13, size=3)
    colour = tuple(int(np.clip(c + t, 0, 255)) for c, t in zip(background, tint))
    return Image.new("RGB", (width, height), colour)


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int = 20) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def draw_shape(img: Image.Image, shape: str, box: tuple[int, int, int, int], rgb: tuple[int, int, int],
               rng: np.random.Generator) -> None:
    """One filled shape inside box (x0, y0, x1, y1), exclusive x1/y1, colour jittered slightly."""
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    x1, y1 = x1 - 1, y1 - 1
    fill = _jitter(rgb, rng)
    if shape == "circle":
        d.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        d.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w, h = x1 - x0 + 1, y1 - y0 + 1
        tx, ty = max(1, w // 3), max(1, h // 3)
        d.rectangle((x0 + tx, y0, x1 - tx, y1), fill=fill)
        d.rectangle((x0, y0 + ty, x1, y1 - ty), fill=fill)
    else:  # pragma: no cover - callers pass SHAPES
        raise ValueError(f"unknown shape {shape!r}: use one of {SHAPES}")


def draw_object(img: Image.Image, name: str, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """One of OBJECT_CLASSES, composed of primitives, inside box (x0, y0, x1, y1)."""
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    X = lambda f: x0 + f * w  # noqa: E731 - box-relative coordinates keep the drawings readable
    Y = lambda f: y0 + f * h  # noqa: E731
    j = lambda rgb: _jitter(rgb, rng, 25)  # noqa: E731
    if name == "apple":
        d.ellipse((X(0.1), Y(0.25), X(0.9), Y(1.0) - 1), fill=j((210, 30, 30)))
        d.rectangle((X(0.45), Y(0.0), X(0.55), Y(0.3)), fill=j((110, 70, 30)))
        d.ellipse((X(0.55), Y(0.05), X(0.85), Y(0.25)), fill=j((50, 170, 50)))
    elif name == "boat":
        d.polygon([(X(0.0), Y(0.65)), (X(1.0) - 1, Y(0.65)), (X(0.8), Y(1.0) - 1), (X(0.2), Y(1.0) - 1)],
                  fill=j((140, 80, 40)))
        d.polygon([(X(0.5), Y(0.0)), (X(0.5), Y(0.6)), (X(0.9), Y(0.6))], fill=j((235, 235, 235)))
    elif name == "car":
        d.rectangle((X(0.0), Y(0.4), X(1.0) - 1, Y(0.8)), fill=j((40, 90, 220)))
        d.rectangle((X(0.2), Y(0.15), X(0.75), Y(0.45)), fill=j((40, 90, 220)))
        d.ellipse((X(0.1), Y(0.65), X(0.35), Y(1.0) - 1), fill=(15, 15, 15))
        d.ellipse((X(0.65), Y(0.65), X(0.9), Y(1.0) - 1), fill=(15, 15, 15))
    elif name == "fish":
        d.ellipse((X(0.0), Y(0.25), X(0.7), Y(0.75)), fill=j((245, 140, 30)))
        d.polygon([(X(0.65), Y(0.5)), (X(1.0) - 1, Y(0.2)), (X(1.0) - 1, Y(0.8))], fill=j((245, 140, 30)))
    elif name == "flag":
        d.rectangle((X(0.1), Y(0.0), X(0.18), Y(1.0) - 1), fill=j((200, 200, 200)))
        d.rectangle((X(0.18), Y(0.05), X(0.95), Y(0.5)), fill=j((220, 40, 40)))
    elif name == "house":
        d.rectangle((X(0.15), Y(0.45), X(0.85), Y(1.0) - 1), fill=j((200, 170, 120)))
        d.polygon([(X(0.0), Y(0.5)), (X(0.5), Y(0.0)), (X(1.0) - 1, Y(0.5))], fill=j((170, 40, 40)))
    elif name == "moon":
        d.ellipse((X(0.05), Y(0.05), X(0.95), Y(0.95)), fill=j((240, 230, 150)))
        d.ellipse((X(0.35), Y(0.0), X(1.0) + 0.2 * w, Y(0.8)), fill=img.getpixel((0, 0)))
    elif name == "tree":
        d.rectangle((X(0.4), Y(0.55), X(0.6), Y(1.0) - 1), fill=j((110, 70, 30)))
        d.ellipse((X(0.05), Y(0.0), X(0.95), Y(0.7)), fill=j((40, 150, 50)))
    else:  # pragma: no cover - callers pass OBJECT_CLASSES
        raise ValueError(f"unknown object {name!r}: use one of {OBJECT_CLASSES}")


def text_width(text: str, scale: int) -> int:
    """Pixel width of `text` in the 3x5 font (1 pixel gap between glyphs, times scale)."""
    return (4 * len(text) - 1) * scale


def draw_text(img: Image.Image, text: str, xy: tuple[int, int], rgb: tuple[int, int, int], scale: int) -> None:
    """Render upper-case letters/digits in the 3x5 font with its top-left corner at xy."""
    d = ImageDraw.Draw(img)
    x, y = xy
    for ch in text.upper():
        glyph = _FONT[ch]
        for r, c in zip(*np.nonzero(glyph)):
            d.rectangle((x + c * scale, y + r * scale, x + (c + 1) * scale - 1, y + (r + 1) * scale - 1), fill=rgb)
        x += 4 * scale


def finish(img: Image.Image, rng: np.random.Generator, noise: int = 6) -> Image.Image:
    """Mild per-pixel sensor noise, so no two images are pixel-identical."""
    arr = np.asarray(img, dtype=np.int16)
    arr = arr + rng.integers(-noise, noise + 1, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
