"""Answer extraction and scoring rules for the CoIN tasks ("instruction following" accuracy).

Each rule follows CoIN's own eval scripts (ETrain/Eval/LLaVA/CoIN/eval_*.py) except where a
docstring names a deviation. Every scorer returns a float in [0, 1]; CoIN reports 100x the mean.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

# ---------------------------------------------------------------------------------------------
# ScienceQA: option letter
# ---------------------------------------------------------------------------------------------
OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D", "E")
_SINGLE_CHAR_WORD = re.compile(r"\b(\w)\b")


def extract_option_letter(reply: str) -> str | None:
    """The option letter a ScienceQA reply names, or None when it names none.

    CoIN's three rules, tried in order: the whole reply is a letter ("B"); the reply has the
    form "B. text"; else the first single-character word, upper-cased ("The answer is b" -> "B").
    The letter must be one of A-E. Deviation: leading/trailing whitespace is stripped first
    (CoIN compared the raw reply, so " B" reached rule 3 and gave the same letter anyway).
    """
    text = reply.strip()
    if text in OPTION_LETTERS:
        return text
    if len(text) >= 3 and text[0] in OPTION_LETTERS and text[1:3] == ". ":
        return text[0]
    words = _SINGLE_CHAR_WORD.findall(text)
    if words and words[0].upper() in OPTION_LETTERS:
        return words[0].upper()
    return None


def score_option_letter(prediction: str, reference: str) -> float:
    """1.0 when the extracted letter equals the reference letter; a reply naming no letter is wrong."""
    letter = extract_option_letter(prediction)
    return float(letter is not None and letter == reference.strip().upper())


# ---------------------------------------------------------------------------------------------
# TextVQA / VizWiz / VQAv2: VQA answer normalisation and soft accuracy
# ---------------------------------------------------------------------------------------------
# The standard VQA/EvalAI contractions table (lower-case keys only: input is lower-cased before
# lookup, so the table's capitalised keys "Im", "Ive", "Id've" could never match and are left out).
# "somebody'd" -> "somebodyd" is the table's own quirk; kept so scores match the standard tool.
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "i'dve": "i'd've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# The reference tool's pattern "(?!<=\d)(\.)(?!\d)" has a typo (a look-ahead where a look-behind
# was meant), so in practice it drops every period not followed by a digit: "5." -> "5",
# "3.5" stays. This pattern reproduces that behaviour.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def vqa_normalize(answer: str) -> str:
    """Normalise an answer as the standard VQA/EvalAI answer processor does.

    Steps, in order: lower-case; drop "," and "?"; split "'s" off its word; newlines and tabs to
    spaces; each punctuation mark in ;/[]"{}()=+\\_-><@`,?! is deleted when it touches a space and
    replaced by a space otherwise; periods not followed by a digit are deleted; number words
    none/zero..ten become digits; articles a/an/the are dropped; contraction-less spellings get
    their apostrophes ("dont" -> "don't"). This is LLaVA's m4c_evaluator processor, which CoIN's
    TextVQA scoring uses; it normalises the human answers too (the original VQA tool only
    punctuation-processes them).
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # Whether a mark touches a space is decided on the text before any replacement, as the
    # reference tool does. Its comma-between-digits test can never fire here (commas are gone).
    before = text
    for mark in _PUNCTUATION:
        text = text.replace(mark, "" if (mark + " " in before or " " + mark in before) else " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one reply against a list of human answers.

    acc = mean over the n leave-one-out subsets of the answers of min(1, matches / 3), after
    `vqa_normalize` on both sides. With the usual 10 answers: 3 matching answers score 0.9,
    4 or more score 1.0. The formula was designed for 10 answers; other lengths are accepted
    (the synthetic benchmark may carry fewer), but a one-answer list would always score 0, so
    it is rejected: pass the single answer as a string to get exact matching instead.
    """
    if isinstance(answers, str):
        raise TypeError("vqa_soft_accuracy needs a list of human answers, got a single string: "
                        "use score_vqa(prediction, answer) for one stored answer")
    if len(answers) < 2:
        raise ValueError(f"VQA soft accuracy needs at least 2 human answers (10 in VQA/TextVQA), got "
                         f"{len(answers)}: pass a single answer as a string for exact matching")
    reply = vqa_normalize(prediction)
    matches = [vqa_normalize(answer) == reply for answer in answers]
    count = sum(matches)
    return sum(min(1.0, (count - held_out) / 3.0) for held_out in matches) / len(matches)


def score_vqa(prediction: str, reference: str | Sequence[str]) -> float:
    """TextVQA, VizWiz and VQAv2 scoring.

    A list of human answers gets `vqa_soft_accuracy` (CoIN does this for TextVQA). A single stored
    answer (a string, or a one-element list) gets CoIN's rule for VizWiz/VQAv2: case-insensitive
    exact match, e.g. "unanswerable" == "Unanswerable". Deviation: surrounding whitespace is
    stripped on both sides (CoIN compared raw strings). An empty reply is wrong.
    """
    if isinstance(reference, str):
        single: str | None = reference
    elif len(reference) == 1:
        single = reference[0]
    else:
        single = None
    if single is None:
        return vqa_soft_accuracy(prediction, reference)
    reply = prediction.strip()
    return float(bool(reply) and reply.upper() == single.strip().upper())


# ---------------------------------------------------------------------------------------------
# ImageNet, GQA, OCRVQA
# ---------------------------------------------------------------------------------------------
def score_class_name(prediction: str, reference: str) -> float:
    """ImageNet: correct when the class name is a substring of the reply or the reply of the class
    name, case-sensitive (CoIN's rule). Deviations: the reply is stripped of surrounding whitespace,
    and an empty reply (or empty reference) is wrong - CoIN counted an empty reply correct because
    "" is a substring of every string.
    """
    reply, label = prediction.strip(), reference.strip()
    if not reply or not label:
        return 0.0
    return float(label in reply or reply in label)


def score_gqa(prediction: str, reference: str) -> float:
    """GQA: strip trailing periods, lower-case, exact match (LLaVA/CoIN convert_gqa_for_eval).
    Deviation: surrounding whitespace is stripped and the reference is lower-cased too (GQA's
    answers already are). An empty reply is wrong.
    """
    reply = prediction.strip().rstrip(".").strip().lower()
    return float(bool(reply) and reply == reference.strip().lower())


def score_ocrvqa(prediction: str, reference: str) -> float:
    """OCRVQA: lower-case exact match; a reply containing "Unanswerable" is wrong.
    Deviations: the "Unanswerable" test ignores case (CoIN's was case-sensitive), surrounding
    whitespace is stripped, and an empty reply is wrong.
    """
    reply = prediction.strip()
    if not reply or "unanswerable" in reply.lower():
        return 0.0
    return float(reply.lower() == reference.strip().lower())


# ---------------------------------------------------------------------------------------------
# Grounding: boxes
# ---------------------------------------------------------------------------------------------
Box = tuple[float, float, float, float]
IOU_THRESHOLD = 0.5


def parse_box(text: str, size: Sequence[float] | None = None) -> Box | None:
    """Parse "[x1, y1, x2, y2]" into four floats, or None when the text is not such a box.

    CoIN's rule minus its bug: strip whitespace, remove every "[" and "]", split on ",", and
    require exactly four finite numbers. (CoIN also cut one more character off each end after
    removing the brackets, turning "0.12" into ".12" and "0.85" into "0.8" - not copied.)
    Coordinates are normalised to the image padded to a square of side max(w, h). With `size`
    = [w, h] the box is scaled by max(size) to pixels of that padded square, as CoIN does; IoU
    is scale-invariant, so `size` only matters when reporting boxes, never for the score.
    """
    parts = text.strip().replace("[", "").replace("]", "").split(",")
    if len(parts) != 4:
        return None
    try:
        values = [float(part) for part in parts]
    except ValueError:
        return None
    if not all(math.isfinite(value) for value in values):
        return None
    if size is not None:
        scale = max(size)
        values = [value * scale for value in values]
    return (values[0], values[1], values[2], values[3])


def box_problem(text: str) -> str | None:
    """None when `text` is a box a Grounding answer may be - "[x1, y1, x2, y2]" (`parse_box`), coordinates in
    [0, 1] (normalised to the padded square), x1 <= x2 and y1 <= y2 - else what is wrong with it."""
    box = parse_box(text) if isinstance(text, str) else None
    if box is None:
        return "expected '[x1, y1, x2, y2]' of four numbers"
    if not all(0.0 <= value <= 1.0 for value in box):
        return "coordinates must lie in [0, 1] (normalised to the image padded to a square)"
    if box[0] > box[2] or box[1] > box[3]:
        return "x1 <= x2 and y1 <= y2 are needed (left, top, right, bottom)"
    return None


def format_box(coords: Sequence[float]) -> str:
    """A box as CoIN's Grounding answers write it: "[x1, y1, x2, y2]" with two decimals (`parse_box` reads it)."""
    return "[" + ", ".join(f"{float(c):.2f}" for c in coords) + "]"


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes.

    Deviation from CoIN: a box with x2 < x1 or y2 < y1 has zero area (CoIN's formula gave it a
    negative area, which could inflate the IoU of an inverted prediction). Zero union gives 0.
    """
    ax1, ay1, ax2, ay2 = box_a
    bx1, by1, bx2, by2 = box_b
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def reference_box(reference: str | Sequence[float]) -> Box:
    """A Grounding reference ("[x1, y1, x2, y2]" string or four numbers) as a box; raises on bad data."""
    if isinstance(reference, str):
        box = parse_box(reference)
    else:
        try:
            box = parse_box(",".join(str(float(value)) for value in reference))
        except (TypeError, ValueError):
            box = None
    if box is None:
        raise ValueError(f"a Grounding reference must be a box '[x1, y1, x2, y2]' of four numbers, "
                         f"got {reference!r}: check the test record's answer_bbox")
    return box


def score_box(prediction: str, reference: str | Sequence[float]) -> float:
    """Grounding: correct iff IoU(predicted box, reference box) > 0.5; an unparseable reply is wrong."""
    predicted = parse_box(prediction)
    if predicted is None:
        return 0.0
    return float(box_iou(predicted, reference_box(reference)) > IOU_THRESHOLD)
