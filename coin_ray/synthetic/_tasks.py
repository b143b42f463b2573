"""One example generator per CoIN task: a procedurally drawn image, a question body and its answer.

Related tasks share skills and answer formats, as in CoIN: TextVQA and OCRVQA both read words drawn in
the same glyph font and answer with a short lower-case word; GQA, VQAv2 and VizWiz ask about the same
coloured shapes (colour / shape / yes-no words; GQA and VQAv2 on the same scenes of large shapes); ImageNet
(object class names), ScienceQA (option letters) and Grounding (boxes) each have a format of their own.

What the tiny model learns in a stage (measured with a probe of each task alone, LoRA, the default
budget): answers that the image decides once the question's form is known - the colour of a dominant or
left-hand shape, an object class, a count of large shapes, a word tied to its sign colour, where one large
shape is - are learned; answers that depend on which of several small objects the question's words pick, or
on reading 3x5-pixel glyphs, are not (it falls back to the majority answer). Every task is designed to the
first kind; each generator's docstring has the numbers.

Each task has two question *families*: "task" (what the benchmark trains and tests) and "base" (other
questions in the same answer format, used only to instruction-pretrain the stage-0 base). A family is a
disjoint set of question types, so the base learns the formats without learning the tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from coin_ray.synthetic._draw import (COLORS, GLYPH_CHARS, OBJECT_CLASSES, SHAPES, canvas, draw_object, draw_shape, draw_text,
                                       finish, text_width)
from coin_ray.tasks import format_box

__all__ = ["Example", "FAMILIES", "GENERATORS", "SIGN_WORDS", "SIGN_COLORS", "TITLE_WORDS", "TITLE_COLORS", "GENRES", "MIN_IMAGE_SIZE"]

MIN_IMAGE_SIZE = 24  # below this a 4-letter word in the 3x5 font no longer fits on a book cover (3/4 wide)
FAMILIES = ("task", "base")
# TextVQA: read a sign. Three letters, so the glyphs are drawn at 2x on a 32-pixel image (4-letter words only fit at
# 1x, 3x5-pixel glyphs that the tiny model could not read in a stage: TextVQA stayed near chance); distinct first
# letters, so reading one glyph well is enough.
SIGN_WORDS = ("bus", "cab", "gym", "inn", "pub", "zoo")
SIGN_COLORS = dict(zip(SIGN_WORDS, ("yellow", "white", "purple", "green", "red", "blue")))  # a word's sign colour
TITLE_WORDS = ("city", "dawn", "echo", "gold", "moon", "rain")  # OCRVQA: read a title
TITLE_COLORS = dict(zip(TITLE_WORDS, ("red", "green", "blue", "yellow", "purple", "white")))  # a title's series colour
GENRES: dict[str, str] = {  # OCRVQA: a cover's colour tells its genre
    "red": "mystery", "green": "travel", "blue": "science", "yellow": "comedy", "purple": "poetry",
    "white": "cooking"}
_COLOR_NAMES = tuple(COLORS)
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
_LETTERS = "ABCDE"


@dataclass
class Example:
    image: Image.Image
    body: str  # question text before the task's instruction line ("" when the instruction is the question)
    answer: str
    ref: str | None = None  # Grounding: the referring expression that goes into the instruction
    answers: list[str] | None = None  # TextVQA: the 10 "human" answers
    extra: dict = field(default_factory=dict)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _place(rng: np.random.Generator, width: int, height: int, n: int, side: int, grid: int = 1
           ) -> list[tuple[int, int, int, int]]:
    """n non-overlapping side x side boxes in a width x height image, corners on a `grid`-pixel lattice."""
    for _ in range(200):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            x = int(rng.integers(0, (width - side) // grid + 1)) * grid
            y = int(rng.integers(0, (height - side) // grid + 1)) * grid
            box = (x, y, x + side, y + side)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in boxes):
                boxes.append(box)
        if len(boxes) == n:
            return boxes
    raise RuntimeError(f"could not place {n} boxes of side {side} in {width}x{height}")  # pragma: no cover


def _scene(rng: np.random.Generator, size: int, items: list[tuple[str, str]], side: int | None = None
           ) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    side = side or max(4, size // 4)
    img = canvas(size, size, rng)
    boxes = _place(rng, size, size, len(items), side)
    for (colour, shape), box in zip(items, boxes):
        draw_shape(img, shape, box, COLORS[colour], rng)
    return finish(img, rng), boxes


def _distinct_items(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n (colour, shape) pairs with distinct shapes and distinct colours."""
    shapes = rng.permutation(len(SHAPES))[:n]
    colours = rng.permutation(len(_COLOR_NAMES))[:n]
    return [(_COLOR_NAMES[c], SHAPES[s]) for c, s in zip(colours, shapes)]


# ---------------------------------------------------------------------------------------------- ScienceQA
def science_qa(rng: np.random.Generator, size: int, family: str) -> Example:
    """Multiple choice over a fixed option order (shuffled orders stayed at chance for the tiny model): the colour
    of one shape (task, options A-E) or the number of shapes (base). A task that also asked for the shape, half the
    time, reached only about 0.4 after a stage (measured), so the task asks one thing."""
    if family == "task":
        colour, shape = _pick(rng, _COLOR_NAMES[:5]), _pick(rng, SHAPES)  # 5 colours: options A-E
        img, _ = _scene(rng, size, [(colour, shape)], side=max(6, size // 2))
        options, question, answer = _COLOR_NAMES[:5], "Which color is the shape?", colour
    else:
        n = int(rng.integers(1, 5))
        img, _ = _scene(rng, size, [(_pick(rng, _COLOR_NAMES), _pick(rng, SHAPES)) for _ in range(n)])
        options, question, answer = _NUMBER_WORDS[1:5], "How many objects are there?", _NUMBER_WORDS[n]
    lines = [question] + [f"{_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    return Example(img, "\n".join(lines), _LETTERS[list(options).index(answer)])


# ---------------------------------------------------------------------------------------------- sign / cover text
def _text_scale(size: int, text: str, width: int) -> int:
    return max(1, min(size // 16, width // (text_width(text, 1) + 2)))  # + 1-glyph-pixel padding per side


def _ink_on(colour: str) -> tuple[int, int, int]:
    """Text colour that reads on a `colour` background: near-black on the light ones, near-white otherwise."""
    return (20, 20, 20) if colour in ("yellow", "white") else (250, 250, 250)


def text_vqa(rng: np.random.Generator, size: int, family: str) -> Example:
    """A banner that fills the scene, its text printed on two lines (as posters repeat a name); the answer is the
    word (task) or the single letter / digit (base) written on it. Each word has its own sign colour (like a
    brand colour: SIGN_COLORS), so the task is learnable from colour as well as by reading.

    Measured on the tiny model (2-layer 64-wide vision tower, 8-pixel patches, LoRA on the LM only): the image
    features separate the six words perfectly (a linear probe on them scores 1.0), yet a stage of LoRA on the LM
    stayed at chance whether the sign was small and anywhere, one fixed line, or this two-line banner - the LM
    would have to pick out one or two image tokens. With the colour cue it is learned like ImageNet. The base reads
    every letter and digit on signs of every colour, so the glyphs stay part of the picture."""
    slots = max(len(w) for w in SIGN_WORDS)
    text = _pick(rng, SIGN_WORDS) if family == "task" else _pick(rng, GLYPH_CHARS).lower()
    scale = _text_scale(size, "x" * slots, size)
    tw, th = text_width("x" * slots, scale), 5 * scale
    img = canvas(size, size, rng)
    sign_colour = SIGN_COLORS[text] if family == "task" else _pick(rng, _COLOR_NAMES)
    sign = COLORS[sign_colour]
    ink = _ink_on(sign_colour)
    margin = max(1, size // 32)
    img.paste(sign, (margin, margin, size - margin, size - margin))
    x0 = (size - tw) // 2 + int(rng.integers(-margin, margin + 1))
    gap = (size - 2 * th) // 3
    slot = 0 if family == "task" else int(rng.integers(slots))
    for y in (gap, 2 * gap + th):
        draw_text(img, text, (x0 + 4 * scale * slot, y), ink, scale)
    question = ("What is written on the sign?" if family == "task" else
                "What number is on the sign?" if text.isdigit() else "What letter is on the sign?")
    return Example(finish(img, rng), question, text, answers=[text] * 10)


def ocr_vqa(rng: np.random.Generator, size: int, family: str) -> Example:
    """A portrait book cover (padded to square by the model): the title on a block over the top half, in its
    series colour (TITLE_COLORS), the genre's colour (GENRES) below. Task: the title; base: the genre.

    Measured: a title in white on a thin black band over a colour-coded cover stayed near chance
    (0.07-0.10 alone) - at 1x scale the glyphs are 3x5 pixels inside 8-pixel patches; a series-coloured band
    reached 0.46 in a stage and 0.97 in three; the half-cover block is learned in one stage (1.00), like
    TextVQA's sign colours."""
    width, height = max(MIN_IMAGE_SIZE * 3 // 4, size * 3 // 4), size
    title = _pick(rng, TITLE_WORDS)
    series = TITLE_COLORS[title]
    colour = _pick(rng, [c for c in _COLOR_NAMES if c != series])  # the genre: never the series colour
    img = canvas(width, height, rng, background=COLORS[colour])
    img.paste(COLORS[series], (0, 0, width, height // 2))
    scale = _text_scale(size, title, width)
    tw, th = text_width(title, scale), 5 * scale
    ink = _ink_on(series)
    y = int(rng.integers(1, max(2, height // 2 - th)))
    draw_text(img, title, ((width - tw) // 2, y), ink, scale)
    if family == "task":
        return Example(finish(img, rng), "What is the title of this book?", title)
    return Example(finish(img, rng), "What is the genre of this book?", GENRES[colour])


# ---------------------------------------------------------------------------------------------- ImageNet
def image_net(rng: np.random.Generator, size: int, family: str) -> Example:
    """One object, centred-ish; the question is the instruction itself."""
    name = _pick(rng, OBJECT_CLASSES) if family == "task" else _pick(rng, SHAPES)
    side = int(rng.integers(size // 2, size * 3 // 4 + 1))
    x, y = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    img = canvas(size, size, rng)
    if family == "task":
        draw_object(img, name, (x, y, x + side, y + side), rng)
    else:
        draw_shape(img, name, (x, y, x + side, y + side), COLORS[_pick(rng, _COLOR_NAMES)], rng)
    return Example(finish(img, rng), "", name)


# ---------------------------------------------------------------------------------------------- GQA
def _quarters_scene(rng: np.random.Generator, size: int, items: list[tuple[str, str]],
                    cells: list[tuple[int, int]]) -> Image.Image:
    """Large shapes (half the image side, 2x2 patches at the default size), items[i] in quarter cells[i] =
    (column, row)."""
    img = canvas(size, size, rng)
    half = size // 2
    for (colour, shape), (col, row) in zip(items, cells):
        draw_shape(img, shape, (col * half, row * half, col * half + half, row * half + half), COLORS[colour], rng)
    return finish(img, rng)


def gqa(rng: np.random.Generator, size: int, family: str) -> Example:
    """Task: compositional questions about two large shapes, one in each half - relate-then-query ("What color is
    the object on the left?") and compare ("Are the circle and the cross the same color?"). Base: whether a
    colour is present among 2-3 small shapes.

    Measured: questions that pick an object by the question's words ("What shape is the red object?",
    "Is the circle to the left of the cross?", "What color is the object on the right?" next to "... left?")
    stayed at 0.3-0.6 alone, even in three stages' budget (the tiny model answers them with the majority answer
    or by colour alone); these two, whose answer the image and the question's form decide, reach 0.81 in one
    stage's budget and 0.96 in two (coin_ray.synthetic.TRAIN_SCALE gives GQA two; benchmarks/
    synthetic_calibration.py, generator v5)."""
    if family == "base":
        items = _distinct_items(rng, int(rng.integers(2, 4)))
        img, _ = _scene(rng, size, items)
        absent = [c for c in _COLOR_NAMES if c not in {c for c, _ in items}]
        colour = items[0][0] if rng.random() < 0.5 else _pick(rng, absent)
        return Example(img, f"Are there any {colour} objects?", "yes" if colour == items[0][0] else "no")
    s0, s1 = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
    c0 = _pick(rng, _COLOR_NAMES)
    c1 = c0 if rng.random() < 0.5 else _pick(rng, [c for c in _COLOR_NAMES if c != c0])
    img = _quarters_scene(rng, size, [(c0, s0), (c1, s1)], [(0, int(rng.integers(2))), (1, int(rng.integers(2)))])
    if rng.random() < 0.5:
        return Example(img, "What color is the object on the left?", c0)
    return Example(img, f"Are the {s0} and the {s1} the same color?", "yes" if c0 == c1 else "no")


# ---------------------------------------------------------------------------------------------- VQAv2
def vqa_v2(rng: np.random.Generator, size: int, family: str) -> Example:
    """Task: counting and yes/no about 1-3 large shapes, one per quarter of the image ("How many shapes are
    there?", "Is there more than one shape?"); base: the colour of a named shape among 1-4 small ones.

    Measured: counting one kind of shape among 1-4 small ones and "Is there a <colour> <shape>?" stayed
    at 0.40-0.51 alone, even in three stages' budget; the tiny model answers a yes/no question whose answer
    depends on the question's words with the majority answer (e.g. "Are there any circles?": 0.72-0.75 = always
    "yes"). Questions whose answer is a function of the image are learned: these reach 0.79 in one stage's budget
    and 0.97 in two (coin_ray.synthetic.TRAIN_SCALE gives VQAv2 two; calibration, generator v5)."""
    if family == "base":
        n = int(rng.integers(1, 5))
        items = _distinct_items(rng, n)
        img, _ = _scene(rng, size, items)
        return Example(img, f"What color is the {items[0][1]}?", items[0][0])
    n = int(rng.integers(1, 4))
    cells = [(int(c) % 2, int(c) // 2) for c in rng.permutation(4)[:n]]
    img = _quarters_scene(rng, size, [(_pick(rng, _COLOR_NAMES), _pick(rng, SHAPES)) for _ in range(n)], cells)
    if rng.random() < 0.5:
        return Example(img, "How many shapes are there?", str(n))
    return Example(img, "Is there more than one shape?", "yes" if n > 1 else "no")


# ---------------------------------------------------------------------------------------------- VizWiz
def viz_wiz(rng: np.random.Generator, size: int, family: str) -> Example:
    """One big shape photographed badly: a third of the photos are too dark or too noisy -> Unanswerable."""
    colour, shape = _distinct_items(rng, 1)[0]
    img, _ = _scene(rng, size, [(colour, shape)], side=max(6, size * 5 // 8))
    if family == "task":
        question, answer = "What color is this?", colour
    else:
        question, answer = "What shape is this?", shape
    u = rng.random()
    if u < 1 / 6:  # too dark
        img = Image.fromarray((np.asarray(img, dtype=np.float32) * 0.08).astype(np.uint8))
        answer = "Unanswerable"
    elif u < 2 / 6:  # blown out by noise
        arr = np.asarray(img, dtype=np.float32)
        noise = rng.integers(0, 256, size=arr.shape).astype(np.float32)
        img = Image.fromarray((0.15 * arr + 0.85 * noise).astype(np.uint8))
        answer = "Unanswerable"
    return Example(img, question, answer)


# ---------------------------------------------------------------------------------------------- Grounding
def grounding(rng: np.random.Generator, size: int, family: str) -> Example:
    """The box of one shape, normalised to the image padded to a square as CoIN's RefCOCO boxes are. Task: one
    large shape (half the side) in one of the four quarters of a square scene, referred to by colour and shape.
    Base: a small shape anywhere on a size/8 lattice of a landscape scene, "the object".

    Measured (each alone, LoRA): 2-3 shapes of 1/4-3/8 the side anywhere stayed at 0.03-0.09; one small
    patch-aligned shape at 0.16, with a distractor 0.19; one large shape at three overlapping places of a
    landscape scene 0.55-0.69 even with three stages' budget (left and middle confused). Four quarters: 0.61 in
    one stage's budget, 1.00 in two (coin_ray.synthetic.TRAIN_SCALE gives Grounding two)."""
    colour, shape = _distinct_items(rng, 1)[0]
    if family == "base":
        width, height = size, max(MIN_IMAGE_SIZE * 3 // 4, size * 3 // 4)
        grid = max(1, size // 8)
        box = _place(rng, width, height, 1, 2 * grid, grid)[0]
        ref = "the object"
    else:
        width = height = size
        half = size // 2
        x, y = int(rng.integers(2)) * half, int(rng.integers(2)) * half
        box = (x, y, x + half, y + half)
        ref = f"the {colour} {shape}"
    img = canvas(width, height, rng)
    draw_shape(img, shape, box, COLORS[colour], rng)
    side_sq = max(width, height)
    dx, dy = (side_sq - width) / 2, (side_sq - height) / 2
    x0, y0, x1, y1 = box
    coords = [(x0 + dx) / side_sq, (y0 + dy) / side_sq, (x1 + dx) / side_sq, (y1 + dy) / side_sq]
    return Example(finish(img, rng), "", format_box(coords), ref=ref, extra={"size": [width, height]})


GENERATORS: dict[str, Callable[[np.random.Generator, int, str], Example]] = {
    "ScienceQA": science_qa,
    "TextVQA": text_vqa,
    "ImageNet": image_net,
    "GQA": gqa,
    "VizWiz": viz_wiz,
    "Grounding": grounding,
    "VQAv2": vqa_v2,
    "OCRVQA": ocr_vqa,
}
