"""CoIN task registry, instruction templates and scoring rules, on hand-written cases."""
from __future__ import annotations

import pytest

from coin_ray.tasks import (ALPHABETICAL_ORDER, TASK_NAMES, InstructionStyleUnavailableError,
                            InvalidOrderError, UnknownTaskError, box_iou, extract_option_letter,
                            get_task, parse_box, validate_order, vqa_normalize, vqa_soft_accuracy)

SHORT = "Answer the question using a single word or phrase."


# -- registry and orders ------------------------------------------------------------------------
def test_default_and_alphabetical_orders() -> None:
    assert TASK_NAMES == ("ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA")
    assert ALPHABETICAL_ORDER == ("GQA", "ImageNet", "OCRVQA", "Grounding", "ScienceQA", "TextVQA",
                                  "VizWiz", "VQAv2")
    assert [get_task(name).name for name in TASK_NAMES] == list(TASK_NAMES)


def test_get_task_ignores_case_and_returns_canonical_name() -> None:
    assert get_task("scienceqa").name == "ScienceQA"
    assert get_task("VQAV2") is get_task("VQAv2")


def test_unknown_task_error_lists_valid_names() -> None:
    with pytest.raises(UnknownTaskError) as info:
        get_task("COCO")
    message = str(info.value)
    assert "'COCO'" in message and all(name in message for name in TASK_NAMES)
    assert isinstance(info.value, ValueError)


def test_validate_order_canonicalises() -> None:
    assert validate_order(["gqa", "ImageNet"]) == ("GQA", "ImageNet")
    assert validate_order(ALPHABETICAL_ORDER) == ALPHABETICAL_ORDER


def test_validate_order_reports_every_problem_at_once() -> None:
    with pytest.raises(InvalidOrderError) as info:
        validate_order(["GQA", "Foo", "gqa", "Bar", "ImageNet", "ImageNet"])
    message = str(info.value)
    assert "'Foo'" in message and "'Bar'" in message
    assert "more than once: GQA, ImageNet" in message


@pytest.mark.parametrize("order, fragment", [([], "at least one task"), ("GQA", "the string 'GQA'")])
def test_validate_order_rejects_empty_and_bare_string(order, fragment) -> None:
    with pytest.raises(InvalidOrderError, match=fragment):
        validate_order(order)


# -- instructions and questions -----------------------------------------------------------------
@pytest.mark.parametrize("name, line", [
    ("ScienceQA", "Answer with the option's letter from the given choices directly."),
    ("TextVQA", SHORT), ("GQA", SHORT), ("VQAv2", SHORT), ("OCRVQA", SHORT),
    ("ImageNet", f"What is the object in the image?\n{SHORT}"),
    ("VizWiz", f"When the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT}"),
])
def test_original_instruction_lines(name, line) -> None:
    assert get_task(name).instruction() == line


def test_format_question_appends_instruction() -> None:
    assert get_task("GQA").format_question("Is the cup red?") == f"Is the cup red?\n{SHORT}"
    assert get_task("ImageNet").format_question("") == f"What is the object in the image?\n{SHORT}"


def test_grounding_instruction_takes_the_referring_expression() -> None:
    grounding = get_task("Grounding")
    expected = "Please provide the bounding box coordinate of the region this sentence describes: left dog"
    assert grounding.format_question("", ref="left dog") == expected
    with pytest.raises(ValueError, match="referring expression"):
        grounding.instruction()
    with pytest.raises(ValueError, match="no place for a referring expression"):
        get_task("GQA").instruction(ref="left dog")


def test_unregistered_style_and_bad_variant() -> None:
    gqa = get_task("GQA")
    with pytest.raises(InstructionStyleUnavailableError, match="with_instructions"):
        gqa.instruction("10Type")
    with pytest.raises(ValueError, match="unknown"):
        gqa.instruction("fancy")
    with pytest.raises(ValueError, match=r"variant \(1\) must be in \[0, 1\)"):
        gqa.instruction(variant=1)


def test_with_instructions_registers_a_style_without_touching_the_registry() -> None:
    gqa = get_task("GQA").with_instructions("10Type", ["Reply briefly.", "One word, please."])
    assert gqa.format_question("Color?", "10type", variant=1) == "Color?\nOne word, please."
    assert gqa.score("yes", "yes") == 1.0
    with pytest.raises(InstructionStyleUnavailableError):
        get_task("GQA").instruction("10type")


def test_question_for_judge_drops_the_instruction_line() -> None:
    assert get_task("GQA").question_for_judge(f"Is the cup red?\n{SHORT}") == "Is the cup red?"
    assert get_task("ImageNet").question_for_judge(f"What is the object in the image?\n{SHORT}") == \
        "What is the object in the image?"
    grounding_text = "Please provide the bounding box coordinate of the region this sentence describes: cat"
    assert get_task("Grounding").question_for_judge(grounding_text) == grounding_text


def test_max_new_tokens_and_answer_formats() -> None:
    assert get_task("ScienceQA").max_new_tokens == 4 and get_task("ScienceQA").answer_format == "letter"
    assert get_task("Grounding").answer_format == "box" and get_task("Grounding").max_new_tokens >= 32
    assert get_task("ImageNet").answer_format == "class"


# -- references -----------------------------------------------------------------------------------
def test_reference_from_record() -> None:
    assert get_task("ScienceQA").reference_from_record({"question_id": 1, "answer": "C"}) == "C"
    assert get_task("TextVQA").reference_from_record({"answer": ["a", "b"]}) == ("a", "b")
    assert get_task("Grounding").reference_from_record(
        {"answer_bbox": "[0.1, 0.2, 0.3, 0.4]", "size": [640, 480]}) == (0.1, 0.2, 0.3, 0.4)


def test_reference_from_record_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="has no 'answer_bbox' field"):
        get_task("Grounding").reference_from_record({"question_id": 7, "answer": "x"})
    with pytest.raises(ValueError, match="must be a string, got"):
        get_task("GQA").reference_from_record({"answer": ["yes", "no"]})
    with pytest.raises(ValueError, match="answer_bbox"):
        get_task("Grounding").reference_from_record({"answer_bbox": "[0.1, 0.2]"})
    with pytest.raises(ValueError, match="four numbers"):
        get_task("Grounding").score("[0, 0, 1, 1]", [0.0, "x", 1.0, 1.0])


# -- ScienceQA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("B. a magnet", "B"), ("The answer is B", "B"), ("the answer is c.", "C"),
    (" D\n", "D"), ("", None), ("I do not know", None), ("F", None),
])
def test_extract_option_letter(reply, letter) -> None:
    assert extract_option_letter(reply) == letter


def test_scienceqa_score() -> None:
    sqa = get_task("ScienceQA")
    assert sqa.score("B. text", "B") == 1.0
    assert sqa.score("A", "B") == 0.0
    assert sqa.score("", "A") == 0.0


# -- VQA family ---------------------------------------------------------------------------------------
def test_vqa_normalize() -> None:
    assert vqa_normalize("Two Dogs.") == "2 dogs"
    assert vqa_normalize("the red-car") == "red car"
    assert vqa_normalize("dont") == "don't"
    assert vqa_normalize("3.5") == "3.5"
    assert vqa_normalize("yes!") == "yes"


def test_three_of_ten_matching_answers_scores_point_nine() -> None:
    answers = ["red"] * 3 + ["blue"] * 7
    assert vqa_soft_accuracy("Red", answers) == pytest.approx(0.9)
    assert vqa_soft_accuracy("blue", answers) == pytest.approx(1.0)
    assert vqa_soft_accuracy("green", answers) == 0.0
    assert vqa_soft_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)


def test_vqa_soft_accuracy_rejects_a_one_answer_list() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        vqa_soft_accuracy("red", ["red"])


def test_textvqa_scores_list_references_softly_and_strings_exactly() -> None:
    textvqa = get_task("TextVQA")
    assert textvqa.score("two", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert textvqa.score("STOP", "stop") == 1.0
    assert textvqa.score("stop sign", "stop") == 0.0


def test_vizwiz_and_vqav2_case_insensitive_exact_match() -> None:
    vizwiz, vqav2 = get_task("VizWiz"), get_task("VQAv2")
    assert vizwiz.score("unanswerable", "Unanswerable") == 1.0
    assert vqav2.score("Yes", "yes") == 1.0
    assert vqav2.score("yes.", "yes") == 0.0  # exact match on a single stored answer: no normalisation
    assert vqav2.score("", "") == 0.0
    assert vqav2.score("Yes", ["yes"]) == 1.0  # a one-element list is the single stored answer


# -- ImageNet, GQA, OCRVQA ------------------------------------------------------------------------------
def test_imagenet_substring_either_way_and_empty_reply_is_wrong() -> None:
    imagenet = get_task("ImageNet")
    assert imagenet.score("golden retriever dog", "golden retriever") == 1.0
    assert imagenet.score("retriever", "golden retriever") == 1.0
    assert imagenet.score("Golden retriever", "golden retriever") == 0.0  # case-sensitive, as CoIN
    assert imagenet.score("", "golden retriever") == 0.0  # CoIN counted this correct
    assert imagenet.score("   ", "golden retriever") == 0.0


def test_gqa_strips_trailing_period_and_case() -> None:
    gqa = get_task("GQA")
    assert gqa.score("Yes.", "yes") == 1.0
    assert gqa.score("left side", "left") == 0.0
    assert gqa.score(".", "") == 0.0


def test_ocrvqa_unanswerable_is_wrong() -> None:
    ocrvqa = get_task("OCRVQA")
    assert ocrvqa.score("The Hobbit", "the hobbit") == 1.0
    assert ocrvqa.score("Unanswerable", "Unanswerable") == 0.0
    assert ocrvqa.score("unanswerable", "unanswerable") == 0.0
    assert ocrvqa.score("", "x") == 0.0


# -- Grounding --------------------------------------------------------------------------------------------
def test_parse_box_does_not_cut_characters() -> None:
    assert parse_box("[0.12, 0.34, 0.56, 0.78]") == (0.12, 0.34, 0.56, 0.78)
    assert parse_box(" [1, 2, 3, 4]\n") == (1.0, 2.0, 3.0, 4.0)
    assert parse_box("[0.1, 0.2, 0.3, 0.4]", size=(200, 100)) == pytest.approx((20.0, 40.0, 60.0, 80.0))


@pytest.mark.parametrize("text", ["", "a box", "[0.1, 0.2, 0.3]", "[0.1, 0.2, 0.3, 0.4, 0.5]",
                                  "[0.1, 0.2, 0.3, nan]", "[0.1, 0.2, x, 0.4]"])
def test_parse_box_rejects(text) -> None:
    assert parse_box(text) is None


def test_box_iou_edge_cases() -> None:
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (1, 0, 2, 1)) == 0.0  # touching edges
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # zero union
    assert box_iou((1, 1, 0, 0), (0, 0, 1, 1)) == 0.0  # inverted box has no area


def test_grounding_score_threshold_is_strictly_above_half() -> None:
    grounding = get_task("Grounding")
    reference = "[0.0, 0.0, 0.5, 0.5]"
    assert grounding.score("[0.0, 0.0, 0.5, 0.5]", reference) == 1.0
    assert grounding.score("[0.0, 0.0, 0.5, 0.25]", reference) == 0.0  # IoU exactly 0.5
    assert grounding.score("[0.0, 0.0, 0.5, 0.3]", reference) == 1.0  # IoU 0.6
    assert grounding.score("no idea", reference) == 0.0
    assert grounding.score("[0.0, 0.0, 0.5, 0.5]", (0.0, 0.0, 0.5, 0.5)) == 1.0


def test_every_scorer_stays_in_unit_interval() -> None:
    replies = ["", "A", "yes", "[0.1, 0.1, 0.2, 0.2]", "Unanswerable", "The answer is B"]
    references = {"ScienceQA": "A", "TextVQA": ("yes",) * 10, "ImageNet": "answer", "GQA": "yes",
                  "VizWiz": "Unanswerable", "Grounding": "[0.1, 0.1, 0.2, 0.2]", "VQAv2": "yes",
                  "OCRVQA": "yes"}
    for name in TASK_NAMES:
        task = get_task(name)
        scores = [task.score(reply, references[name]) for reply in replies]
        assert all(0.0 <= score <= 1.0 for score in scores), (name, scores)
        assert max(scores) == 1.0, name  # each reference is matched by one of the replies
